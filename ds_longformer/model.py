"""The Longformer encoder and its heads: transformers models, with our attention and fast paths inside.

    LongformerModel                      embeddings -> N x LongformerLayer -> (pooler)
    LongformerForMaskedLM                + lm_head (decoder tied to the word embeddings); chunked loss
    LongformerForSequenceClassification  + classifier on <s> (global attention there by default)
    LongformerForQuestionAnswering       + qa_outputs: start/end logits (global attention on the question by default)
    LongformerForTokenClassification     + classifier on every token
    LongformerForMultipleChoice          + classifier on the pooled <s> of each choice (global attention on the choice)
    LongformerForCandidateScoring        + qa_score at given candidate positions (the paper's WikiHop model)

Sequence parallelism (`model.set_sequence_parallel(group)`, ds_longformer/sequence_parallel.py):
each rank of a group of P embeds and runs the layers on N / P tokens of every sequence; the
encoder's outputs are this rank's tokens, the heads' losses and logits those of the whole batch.

Every class is a `transformers.PreTrainedModel` with transformers' module and parameter names,
forward arguments, output classes (`[0]`, `to_tuple()`, `return_dict=False`), embedding and
resize API, weight tying and gradient-checkpointing switch, so `save_pretrained` folders load
both ways with no missing or unexpected keys. `from_pretrained` is transformers' for Longformer
folders (ours or transformers'); a short encoder's folder (RoBERTa/BERT style) is read through
`from_short_encoder` instead (see short_encoders.py). Shapes: B batch, N tokens, C hidden,
H heads, V vocabulary, G global tokens.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.longformer.modeling_longformer import (
    LongformerBaseModelOutput,
    LongformerBaseModelOutputWithPooling,
    LongformerMaskedLMOutput,
    LongformerMultipleChoiceModelOutput,
    LongformerQuestionAnsweringModelOutput,
    LongformerSequenceClassifierOutput,
    LongformerTokenClassifierOutput,
)
from transformers.utils import ModelOutput

from . import flops, short_encoders, weights
from .attention import AttentionLayout, LongformerSelfAttention, check_backend
from .config import LongformerConfig
from .losses import CE_CHUNK_ELEMENTS, linear_cross_entropy, span_loss
from .sequence_parallel import SequenceParallel


# ---- the encoder --------------------------------------------------------------------------------
class LongformerEmbeddings(nn.Module):
    """Word + position + token-type embeddings. RoBERTa-style positions: real tokens are numbered
    pad_token_id + 1, pad_token_id + 2, ...; padding tokens get position pad_token_id. With
    inputs_embeds (no ids to tell padding by) every token is numbered, as transformers does."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def positions(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """(B, N) position ids of the whole sequence."""
        pad = self.padding_idx
        if input_ids is not None:
            not_pad = input_ids.ne(pad).int()
            return torch.cumsum(not_pad, dim=1) * not_pad + pad
        n = inputs_embeds.shape[1]
        return torch.arange(pad + 1, n + pad + 1, device=inputs_embeds.device).expand(inputs_embeds.shape[:2])

    def forward(self, input_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                layout: AttentionLayout | None = None) -> Tensor:
        """(B, N, C). With a layout under sequence parallelism the inputs are the whole sequence's and
        only this rank's tokens are embedded (B, n, C), their positions counted over the whole sequence."""
        if position_ids is None:
            position_ids = self.positions(input_ids, inputs_embeds)  # (B, N)
        if layout is not None and layout.sequence_parallel is not None:
            input_ids, token_type_ids, position_ids, inputs_embeds = (
                None if x is None else layout.local(x) for x in (input_ids, token_type_ids, position_ids,
                                                                 inputs_embeds))
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros(position_ids.shape, dtype=torch.long, device=position_ids.device)
        x = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class LongformerSelfOutput(nn.Module):
    """dense -> dropout -> residual add -> LayerNorm (also the layer's output: LongformerOutput)."""

    def __init__(self, config: LongformerConfig, d_in: int | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class LongformerAttention(nn.Module):
    def __init__(self, config: LongformerConfig, layer_id: int):
        super().__init__()
        self.self = LongformerSelfAttention(
            config.hidden_size, config.num_attention_heads, config.attention_window[layer_id],
            config.attention_probs_dropout_prob, config.attention_backend, config.attention_block_size,
        )
        self.output = LongformerSelfOutput(config)

    def forward(self, x: Tensor, layout: AttentionLayout, output_attentions: bool = False):
        """(B, N, C) -> ((B, N, C), attention probabilities or None: see attention.probabilities)."""
        probs = self.self.attention_probabilities(x, layout) if output_attentions else None
        return self.output(self.self(x, layout), x), probs


class LongformerIntermediate(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class LongformerLayer(GradientCheckpointingLayer):
    """attention -> MLP. transformers' gradient-checkpointing switch recomputes it in backward."""

    def __init__(self, config: LongformerConfig, layer_id: int):
        super().__init__()
        self.attention = LongformerAttention(config, layer_id)
        self.intermediate = LongformerIntermediate(config)
        self.output = LongformerSelfOutput(config, config.intermediate_size)

    def forward(self, x: Tensor, layout: AttentionLayout, output_attentions: bool = False):
        x, probs = self.attention(x, layout, output_attentions)
        return self.output(self.intermediate(x), x), probs


class LongformerEncoder(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.layer = nn.ModuleList(LongformerLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x: Tensor, layout: AttentionLayout, output_attentions: bool = False,
                output_hidden_states: bool = False) -> LongformerBaseModelOutput:
        hidden_states = (x,) if output_hidden_states else None
        local, global_ = [], []
        for layer in self.layer:
            x, probs = layer(x, layout, output_attentions=output_attentions)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                local.append(probs[0])
                global_.append(probs[1])
        return LongformerBaseModelOutput(
            last_hidden_state=x, hidden_states=hidden_states,
            attentions=tuple(local) if output_attentions else None,
            global_attentions=tuple(global_) if output_attentions and layout.num_global else None)


class LongformerPooler(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:  # (B, N, C) -> (B, C), from the first token
        return torch.tanh(self.dense(hidden[:, 0]))


# ---- the heads' modules ---------------------------------------------------------------------------
class MLMDecoder(nn.Linear):
    """The LM head's output projection (transformers' `lm_head.decoder`, tied to the word
    embeddings). decoder(x) gives logits; decoder(x, targets) the mean cross-entropy in chunks
    (losses.linear_cross_entropy, `chunk_elements` logits at a time). A module call either way,
    so DeepSpeed ZeRO-3 gathers the weight for it."""

    chunk_elements = CE_CHUNK_ELEMENTS

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "MLMDecoder":
        """An MLMDecoder holding `linear`'s parameters (transformers' resize makes a plain Linear)."""
        decoder = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        decoder.weight, decoder.bias = linear.weight, linear.bias
        return decoder

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, self.bias, targets, self.chunk_elements)


class LongformerLMHead(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = MLMDecoder(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))  # the decoder's bias (tied)

    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """(..., C) -> logits (..., V); with targets (M,) for hidden (M, C): the mean cross-entropy."""
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden))), targets)


def _classifier_dropout(config: LongformerConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


class LongformerClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on the first token, as transformers'."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: Tensor) -> Tensor:  # (B, N, C) -> (B, num_labels)
        x = self.dropout(hidden[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


def question_global_mask(input_ids: Tensor, sep_token_id: int | None, after: bool = False) -> Tensor:
    """transformers' default global attention for QA and multiple choice: the tokens before the
    first sep token (the question), or with `after` those after the first two sep tokens (the
    `</s></s>` pair: the context or choice). input_ids (..., N) -> bool (..., N)."""
    if sep_token_id is None:
        raise ValueError("config.sep_token_id is None: give global_attention_mask (global attention on the question)")
    is_sep = input_ids == sep_token_id
    if not bool(is_sep.any(-1).all()):
        raise ValueError(f"an example has no sep token (id {sep_token_id}) to end its question: give "
                         "global_attention_mask")
    first_sep = is_sep.int().argmax(-1, keepdim=True)
    position = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return position > first_sep + 1 if after else position < first_sep


# ---- the models -----------------------------------------------------------------------------------
class LongformerPreTrainedModel(PreTrainedModel):
    """What the model and every head share: initialisation, folders, attention backend, FLOPs."""

    config_class = LongformerConfig
    base_model_prefix = "longformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongformerSelfAttention"]
    _keys_to_ignore_on_load_unexpected = [r"position_ids$"]  # a buffer older checkpoints saved
    _sequence_parallel: SequenceParallel | None = None  # set_sequence_parallel, on the base model

    def _init_weights(self, module: nn.Module):
        """transformers' rule (normal(0, initializer_range) for linear and embedding weights, zero
        biases and padding rows, LayerNorm at 1 and 0), and the MLM head's own bias at 0."""
        super()._init_weights(module)
        if isinstance(module, LongformerLMHead):
            init.zeros_(module.bias)

    def init_weights(self):
        """Initialise every module by `_init_weights` in module order (self.modules()), then tie the
        weights: the order in which this project has always drawn them, so a seed builds the same
        model as before (transformers' own order, children first, would draw other values)."""
        if self.device.type != "meta":  # built to be loaded (from_pretrained): nothing to draw
            with torch.no_grad():
                for module in self.modules():
                    self._init_weights(module)
        self.tie_weights(recompute_mapping=False)

    # ---- folders --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args, **kwargs):
        """transformers' from_pretrained for a Longformer folder (ours or transformers'; local, or a
        hub id where a network exists): keyword arguments that are config fields override
        config.json (e.g. attention_window, attention_backend, num_labels), the others are
        transformers' (dtype, ignore_mismatched_sizes, output_loading_info, ...). Then our checks
        (weights.check_fit): shapes must fit unless ignore_mismatched_sizes, and the encoder must
        be complete and no larger than the config. A short encoder's folder (RoBERTa/BERT style)
        goes to `from_short_encoder`."""
        model_type = weights.folder_model_type(pretrained_model_name_or_path)
        if model_type in short_encoders.SHORT_MODEL_TYPES:
            return cls.from_short_encoder(pretrained_model_name_or_path, **kwargs)
        if model_type not in (None, "longformer"):
            raise ValueError(f"{Path(pretrained_model_name_or_path) / 'config.json'}: model_type={model_type!r} is "
                             "not supported; expected longformer or a short encoder to convert "
                             f"({', '.join(short_encoders.SHORT_MODEL_TYPES)})")
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        rng_state = torch.random.get_rng_state()
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        mismatched = [] if ignore_mismatched_sizes else [
            f"{key}: checkpoint {tuple(theirs)} vs model {tuple(ours)}" for key, theirs, ours in info["mismatched_keys"]]
        weights.check_fit(str(pretrained_model_name_or_path), info["missing_keys"], info["unexpected_keys"], mismatched)
        new = info["missing_keys"] | {key for key, _, _ in info["mismatched_keys"]}
        if new and not is_deepspeed_zero3_enabled():
            model._initialise_as_built(new, rng_state)
        return (model, info) if output_loading_info else model

    def _initialise_as_built(self, keys: set[str], rng_state: Tensor) -> None:
        """Give the weights a folder lacked (a new head) the values of the same model built from the
        random state `from_pretrained` started with: a seed then gives the same new head whether
        the encoder was loaded or built (and the values this project's loaders always gave)."""
        torch.random.set_rng_state(rng_state)
        built = type(self)(self.config).state_dict()
        with torch.no_grad():
            for key in keys:
                self.get_parameter_or_buffer(key).copy_(built[key])

    @classmethod
    def from_short_encoder(cls, folder: str | Path, attention_window: int | list[int] | None = None,
                           **config_overrides):
        """This class from a short encoder's local folder (short_encoders.py): the same numbers of
        positions, attention_window (default 512) per layer, local q/k/v copied into the global
        projections, heads it lacks newly initialised. Keyword arguments are config fields.
        `convert` lengthens the position table."""
        raw = weights.read_config_json(folder)
        config = short_encoders.longformer_config(raw, attention_window or 512, **config_overrides)
        unknown = [k for k in config_overrides if not hasattr(config, k)]
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained of a short encoder ({folder}) takes config fields only, "
                            f"not {unknown}")
        model = cls(config)
        state = short_encoders.longformer_state(weights.read_state_dict(folder), raw)
        weights.load_state_dict_into(model, state, str(folder))
        return model.eval()  # as transformers' from_pretrained

    def save_pretrained(self, save_directory: str | Path, **kwargs):
        """transformers' save_pretrained, into a temporary folder whose files then replace those
        of `save_directory` (weights.atomic_folder): no file is ever half-written."""
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, **kwargs)
        with weights.atomic_folder(save_directory) as staging:
            super().save_pretrained(staging, **kwargs)

    # ---- attention backend ----------------------------------------------------------------------
    def set_attention_backend(self, backend: str):
        """Switch every layer to another attention backend (weights unchanged); checked first."""
        check_backend(backend, self.config.attention_probs_dropout_prob)
        self.config.attention_backend = backend
        for layer in self.base_model.encoder.layer:
            layer.attention.self.backend = backend

    # ---- sequence parallelism -------------------------------------------------------------------
    def set_sequence_parallel(self, group) -> None:
        """Run every later forward with sequence parallelism over `group`, a torch.distributed
        process group of P ranks that all get the same batches (None, or a group of one: off). See
        sequence_parallel.py; every rank of the group must call the model alike. The weights are
        unchanged (a save is an ordinary folder). ValueError for a head count not divisible by P
        or a head without sequence-parallel support."""
        sp = group if isinstance(group, SequenceParallel) or group is None else SequenceParallel.of(group)
        if sp is not None:
            supported = (LongformerModel, LongformerForMaskedLM, LongformerForSequenceClassification,
                         LongformerForCandidateScoring)
            if not isinstance(self, supported):
                raise ValueError(f"{type(self).__name__} has no sequence-parallel support; supported: "
                                 f"{', '.join(cls.__name__ for cls in supported)}")
            heads = self.config.num_attention_heads
            if heads % sp.size:
                raise ValueError(f"num_attention_heads={heads} is not divisible by sequence_parallel_size={sp.size}: "
                                 "each rank attends with an equal share of the heads")
        self.base_model._sequence_parallel = sp

    @property
    def sequence_parallel(self) -> SequenceParallel | None:
        """This rank's SequenceParallel (set_sequence_parallel), or None."""
        return self.base_model._sequence_parallel

    def replicated_loss(self, loss: Tensor | None) -> Tensor | None:
        """A loss computed alike on every rank of a sequence-parallel group (from gathered rows): its
        gradient shared out over the group (SequenceParallel.replicated_loss); unchanged without."""
        sp = self.sequence_parallel
        return loss if sp is None or loss is None else sp.replicated_loss(loss)

    def _rows(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """hidden (B, N, C) at positions (B, K) of the whole sequence: (B, K, C), under sequence
        parallelism gathered from the ranks holding them."""
        sp = self.sequence_parallel
        if sp is not None:
            return sp.gather_rows(hidden, positions)
        return hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))

    # ---- shared by the heads --------------------------------------------------------------------
    def _default_global_mask(self, input_ids: Tensor | None, global_attention_mask: Tensor | None) -> Tensor | None:
        return global_attention_mask  # heads that add global tokens by default say so

    def _outputs(self, output: ModelOutput, return_dict: bool | None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _extras(encoded: LongformerBaseModelOutputWithPooling) -> dict:
        return dict(hidden_states=encoded.hidden_states, attentions=encoded.attentions,
                    global_attentions=encoded.global_attentions)

    # ---- model FLOPs ----------------------------------------------------------------------------
    def train_flops(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    global_attention_mask: Tensor | None = None, **head_inputs) -> float:
        """Model FLOPs of one training step (forward + backward) on this batch, as `flops.py`
        counts them: the trainer's TFLOP/s and MFU. Reads only the masks' counts (no forward)."""
        c = self.config
        # the forward's own rule for which tokens are global (attention_mask 2, the head's default)
        global_attention_mask = self._default_global_mask(input_ids, global_attention_mask)
        ids = input_ids.reshape(-1, input_ids.shape[-1])  # multiple choice: (B, K, N) -> (B K, N)
        attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
        if global_attention_mask is not None:
            global_attention_mask = global_attention_mask.reshape(ids.shape)
        layout = AttentionLayout.build(attention_mask, global_attention_mask)
        encoder = sum(flops.encoder_layer_flops(ids.shape[1], window, g, c.hidden_size, c.num_attention_heads,
                                                c.intermediate_size)
                      for g in layout.is_global.sum(dim=1).tolist() for window in c.attention_window)
        return 3 * (encoder + self._head_flops(input_ids, **head_inputs))

    def _head_flops(self, input_ids: Tensor, **head_inputs) -> float:
        return 0.0


class LongformerModel(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = LongformerEmbeddings(config)
        self.encoder = LongformerEncoder(config)
        self.pooler = LongformerPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.embeddings.word_embeddings = value

    def _check_inputs(self, input_ids, attention_mask, global_attention_mask, position_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give either input_ids or inputs_embeds (exactly one)")
        shape = tuple(input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1])
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        if len(shape) != 2:
            raise ValueError(f"{name} must be (batch, seq_len{', hidden' if inputs_embeds is not None else ''}), "
                             f"got shape {tuple((input_ids if input_ids is not None else inputs_embeds).shape)}")
        for mask_name, mask in (("attention_mask", attention_mask), ("global_attention_mask", global_attention_mask),
                                ("position_ids", position_ids)):
            if mask is not None and tuple(mask.shape) != shape:
                raise ValueError(f"{mask_name} has shape {tuple(mask.shape)} but {name} has {shape}")
        if position_ids is None and shape[1] > self.config.max_tokens:
            raise ValueError(
                f"sequence of {shape[1]} tokens is longer than the position table allows "
                f"({self.config.max_tokens} = max_position_embeddings {self.config.max_position_embeddings} "
                f"- pad_token_id {self.config.pad_token_id} - 1); truncate it or convert the model to a "
                "longer max_pos with `python -m ds_longformer.convert`"
            )
        return shape

    def forward(
        self,
        input_ids: Tensor | None = None,  # (B, N)
        attention_mask: Tensor | None = None,  # (B, N): 0 padding, 1 token, 2 token with global attention
        global_attention_mask: Tensor | None = None,  # (B, N): 1 global attention
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,  # (B, N, C) instead of input_ids
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> LongformerBaseModelOutputWithPooling | tuple:
        c = self.config
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        shape = self._check_inputs(input_ids, attention_mask, global_attention_mask, position_ids, inputs_embeds)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        sp = self.sequence_parallel
        if sp is not None:  # the whole sequence, padded to a multiple of P: each rank then holds N / P tokens
            if output_attentions:
                raise ValueError("output_attentions is not available under sequence parallelism (each rank holds "
                                 "N / P tokens and H / P heads of the band)")
            if position_ids is None:
                position_ids = self.embeddings.positions(input_ids, inputs_embeds)
            input_ids, position_ids = sp.pad(input_ids, c.pad_token_id), sp.pad(position_ids, c.pad_token_id)
            attention_mask, global_attention_mask, token_type_ids, inputs_embeds = (
                sp.pad(x, 0) for x in (attention_mask, global_attention_mask, token_type_ids, inputs_embeds))
        layout = AttentionLayout.build(attention_mask, global_attention_mask, sp)  # masks once for every layer
        # Under sequence parallelism the dropout of this rank's tokens and heads draws from a stream of its own
        # (SequenceParallel.own_rng); activation checkpointing stashes and restores that stream per layer.
        dropout = self.training and (c.hidden_dropout_prob > 0 or c.attention_probs_dropout_prob > 0)
        with sp.own_rng(device) if sp is not None and dropout else contextlib.nullcontext():
            x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, layout)  # (B, N or n, C)
            encoded = self.encoder(x, layout, output_attentions, output_hidden_states)
        pooled = None
        if self.pooler is not None:  # (B, C), from the first token
            first = encoded.last_hidden_state if sp is None else \
                self._rows(encoded.last_hidden_state, torch.zeros(shape[0], 1, dtype=torch.long, device=device))
            pooled = self.pooler(first)
        return self._outputs(LongformerBaseModelOutputWithPooling(
            last_hidden_state=encoded.last_hidden_state, pooler_output=pooled, **self._extras(encoded)), return_dict)


# ---- masked language modelling -------------------------------------------------------------------
class LongformerForMaskedLM(LongformerPreTrainedModel):
    _tied_weights_keys = {
        "lm_head.decoder.weight": "longformer.embeddings.word_embeddings.weight",
        "lm_head.decoder.bias": "lm_head.bias",
    }

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.lm_head = LongformerLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head.decoder = new_embeddings if isinstance(new_embeddings, MLMDecoder) else \
            MLMDecoder.sharing(new_embeddings)

    def _head_flops(self, input_ids, labels=None, **_) -> float:
        scored = input_ids.numel() if labels is None else int((labels != -100).sum())  # see forward
        return 2 * scored * self.config.hidden_size * (self.config.hidden_size + self.config.vocab_size)

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None) -> LongformerMaskedLMOutput | tuple:
        """Training with labels scores only the labelled (masked) positions, in chunks
        (losses.linear_cross_entropy): the same loss without the (B, N, V) logits, which at N=4096
        and V=50k cost more than the encoder layers; then `.logits` is None. In eval mode, or
        without labels, `.logits` is (B, N, V) as usual. Under sequence parallelism with labels
        the loss is always computed so (`.logits` None), and without labels `.logits` holds this
        rank's tokens (B, N / P, V)."""
        encoded = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                                  inputs_embeds, output_attentions, output_hidden_states, return_dict=True)
        hidden = encoded.last_hidden_state  # (B, N, C)
        if labels is not None and self.sequence_parallel is not None:
            loss = self._sequence_parallel_loss(hidden, labels)
            return self._outputs(LongformerMaskedLMOutput(loss=loss, **self._extras(encoded)), return_dict)
        if labels is not None and self.training and torch.is_grad_enabled():
            scored = labels != -100  # M masked tokens; their logits are never held at once
            if scored.any():
                loss = self.lm_head(hidden[scored], labels[scored])
            else:  # nothing to score: a zero loss that still reaches every head weight (ZeRO expects it)
                loss = self.lm_head(hidden[scored]).sum() * 0.0
            return self._outputs(LongformerMaskedLMOutput(loss=loss, **self._extras(encoded)), return_dict)
        logits = self.lm_head(hidden)  # (B, N, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return self._outputs(LongformerMaskedLMOutput(loss=loss, logits=logits, **self._extras(encoded)), return_dict)

    def _sequence_parallel_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """The mean cross-entropy over the M masked tokens of the batch from this rank's hidden
        (B, n, C): its own M_r masked tokens' mean, times M_r / M, summed over the group (the value;
        the gradient is this rank's share)."""
        sp = self.sequence_parallel
        local = sp.local(labels, fill=-100)  # (B, n)
        scored = local != -100
        mine, everyone = int(scored.sum()), int((labels != -100).sum())
        if mine:
            partial = self.lm_head(hidden[scored], local[scored]) * (mine / everyone)
        else:  # nothing to score here: a zero that still reaches every head weight (ZeRO expects it)
            partial = self.lm_head(hidden[scored]).sum() * 0.0
        return sp.partial_loss(partial)


# ---- sequence classification ---------------------------------------------------------------------
class LongformerForSequenceClassification(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.classifier = LongformerClassificationHead(config)
        self.post_init()

    def _default_global_mask(self, input_ids, global_attention_mask, inputs_embeds=None):
        """Global attention on the first token (<s> / [CLS]) unless a mask is given."""
        if global_attention_mask is not None:
            return global_attention_mask
        like = input_ids if input_ids is not None else inputs_embeds[..., 0]
        mask = torch.zeros(like.shape, dtype=torch.long, device=like.device)
        mask[:, 0] = 1
        return mask

    def _head_flops(self, input_ids, **_) -> float:
        c = self.config
        return 2 * input_ids.shape[0] * c.hidden_size * (c.hidden_size + c.num_labels)

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None) -> LongformerSequenceClassifierOutput | tuple:
        global_attention_mask = self._default_global_mask(input_ids, global_attention_mask, inputs_embeds)
        encoded = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                                  inputs_embeds, output_attentions, output_hidden_states, return_dict=True)
        hidden = encoded.last_hidden_state
        if self.sequence_parallel is not None:  # <s>, from the rank holding it: (B, 1, C)
            hidden = self._rows(hidden, torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device))
        logits = self.classifier(hidden)  # (B, num_labels)
        loss = None if labels is None else self.replicated_loss(self._loss(logits.float(), labels))
        return self._outputs(LongformerSequenceClassifierOutput(loss=loss, logits=logits, **self._extras(encoded)),
                             return_dict)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """transformers' rule: config.problem_type, else regression for one label, single-label
        classification for integer labels, multi-label (BCE) for float labels."""
        problem = self.config.problem_type
        if problem is None:
            problem = ("regression" if self.config.num_labels == 1 else
                       "single_label_classification" if not labels.is_floating_point() else
                       "multi_label_classification")
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float()) if self.config.num_labels == 1 else \
                F.mse_loss(logits, labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        raise ValueError(f"problem_type={problem!r}: expected regression, single_label_classification or "
                         "multi_label_classification")


# ---- question answering, token classification, multiple choice -----------------------------------
class LongformerForQuestionAnswering(LongformerPreTrainedModel):
    """Start and end logits of the answer span (B, N) each. Loss (losses.span_loss): positions (B,)
    as transformers' (the mean of the two cross-entropies, positions outside the input ignored);
    positions (B, K) padded with -100 give several gold spans per row (the marginal likelihood of
    them all). Without global_attention_mask the question (every token before the first sep
    token) gets global attention, as transformers'."""

    def __init__(self, config: LongformerConfig):
        if config.num_labels != 2:
            raise ValueError(f"num_labels={config.num_labels}: question answering scores a start and an end per "
                             "token, num_labels must be 2")
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _default_global_mask(self, input_ids, global_attention_mask):
        if global_attention_mask is not None or input_ids is None:
            return global_attention_mask
        return question_global_mask(input_ids, self.config.sep_token_id)

    def _head_flops(self, input_ids, **_) -> float:
        return 2 * input_ids.numel() * self.config.hidden_size * self.config.num_labels

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, start_positions=None, end_positions=None,
                output_attentions=None, output_hidden_states=None,
                return_dict=None) -> LongformerQuestionAnsweringModelOutput | tuple:
        global_attention_mask = self._default_global_mask(input_ids, global_attention_mask)
        encoded = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                                  inputs_embeds, output_attentions, output_hidden_states, return_dict=True)
        start_logits, end_logits = self.qa_outputs(encoded.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return self._outputs(LongformerQuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, **self._extras(encoded)), return_dict)


class LongformerForTokenClassification(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _head_flops(self, input_ids, **_) -> float:
        return 2 * input_ids.numel() * self.config.hidden_size * self.config.num_labels

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None) -> LongformerTokenClassifierOutput | tuple:
        encoded = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                                  inputs_embeds, output_attentions, output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(encoded.last_hidden_state))  # (B, N, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
        return self._outputs(LongformerTokenClassifierOutput(loss=loss, logits=logits, **self._extras(encoded)),
                             return_dict)


class LongformerForMultipleChoice(LongformerPreTrainedModel):
    """Inputs (B, K, N) for K choices; logits (B, K) from the pooled first token of each. Without
    global_attention_mask each choice's tokens after its first two sep tokens get global
    attention, as transformers'."""

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def _default_global_mask(self, input_ids, global_attention_mask):
        if global_attention_mask is not None or input_ids is None:
            return global_attention_mask
        return question_global_mask(input_ids, self.config.sep_token_id, after=True)

    def _head_flops(self, input_ids, **_) -> float:
        choices, c = input_ids.numel() // input_ids.shape[-1], self.config.hidden_size
        return 2 * choices * c * (c + 1)  # pooler and classifier

    def forward(self, input_ids=None, token_type_ids=None, attention_mask=None, global_attention_mask=None,
                labels=None, position_ids=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None) -> LongformerMultipleChoiceModelOutput | tuple:
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        global_attention_mask = self._default_global_mask(input_ids, global_attention_mask)

        def flat(x: Tensor | None) -> Tensor | None:  # (B, K, N, ...) -> (B K, N, ...)
            return None if x is None else x.flatten(0, 1)

        encoded = self.longformer(flat(input_ids), flat(attention_mask), flat(global_attention_mask),
                                  flat(token_type_ids), flat(position_ids), flat(inputs_embeds), output_attentions,
                                  output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(encoded.pooler_output)).view(-1, num_choices)  # (B, K)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return self._outputs(LongformerMultipleChoiceModelOutput(loss=loss, logits=logits, **self._extras(encoded)),
                             return_dict)


# ---- candidate scoring (WikiHop) ------------------------------------------------------------------
class LongformerForCandidateScoring(LongformerPreTrainedModel):
    """Scores candidate answers at given token positions (the paper's WikiHop model).

    forward(..., candidate_positions (B, K) long, candidate_mask (B, K) bool, labels (B,)) returns
    logits (B, K) = a linear score of the hidden state at each candidate's position, -inf where
    candidate_mask is False; loss = cross-entropy over the candidates.
    """

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.qa_score = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def _head_flops(self, input_ids, candidate_positions=None, **_) -> float:
        return 0.0 if candidate_positions is None else 2 * candidate_positions.numel() * self.config.hidden_size

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, candidate_positions=None,
                candidate_mask=None, labels=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None,
                return_dict=None) -> LongformerSequenceClassifierOutput | tuple:
        if candidate_positions is None:
            raise ValueError("LongformerForCandidateScoring needs candidate_positions (B, K)")
        encoded = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                                  inputs_embeds, output_attentions, output_hidden_states, return_dict=True)
        rows = self._rows(encoded.last_hidden_state, candidate_positions)  # (B, K, C)
        logits = self.qa_score(rows).squeeze(-1).float()  # (B, K)
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask.bool(), float("-inf"))
        loss = self.replicated_loss(F.cross_entropy(logits, labels)) if labels is not None else None
        return self._outputs(LongformerSequenceClassifierOutput(loss=loss, logits=logits, **self._extras(encoded)),
                             return_dict)
