"""The Longformer encoder and its heads, with Hugging Face parameter names.

    LongformerModel                     embeddings -> N x LongformerLayer -> (pooler)
    LongformerForMaskedLM               longformer + lm_head (decoder tied to the word embeddings)
    LongformerForSequenceClassification longformer + classifier on <s> (global attention there by default)
    LongformerForCandidateScoring       longformer + a linear score at given candidate positions (WikiHop)

Every module and parameter is named as in `transformers.Longformer*`, so `state_dict()` keys are
the same and `save_pretrained` folders load both ways (see `checkpoint.py` for the file format and
the short-model readers). Shapes: B batch, N tokens, C hidden, H heads, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import flops
from .attention import AttentionLayout, LongformerSelfAttention
from .config import LongformerConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ModelOutput:
    loss: Tensor | None = None
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None

    def __getitem__(self, key):  # dict-style access, as transformers' outputs allow
        return getattr(self, key)


class LongformerEmbeddings(nn.Module):
    """Word + position + token-type embeddings. RoBERTa-style positions: real tokens are numbered
    pad_token_id + 1, pad_token_id + 2, ...; padding tokens get position pad_token_id."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        pad = self.config.pad_token_id
        not_pad = input_ids.ne(pad).int()
        position_ids = torch.cumsum(not_pad, dim=1) * not_pad + pad  # (B, N)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class _DenseLayerNorm(nn.Module):
    """dense -> dropout -> residual add -> LayerNorm (HF's *SelfOutput and *Output)."""

    def __init__(self, d_in: int, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
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
        self.output = _DenseLayerNorm(config.hidden_size, config)

    def forward(self, x: Tensor, layout: AttentionLayout) -> Tensor:
        return self.output(self.self(x, layout), x)


class LongformerIntermediate(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class LongformerLayer(nn.Module):
    def __init__(self, config: LongformerConfig, layer_id: int):
        super().__init__()
        self.attention = LongformerAttention(config, layer_id)
        self.intermediate = LongformerIntermediate(config)
        self.output = _DenseLayerNorm(config.intermediate_size, config)

    def forward(self, x: Tensor, layout: AttentionLayout) -> Tensor:
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class LongformerEncoder(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.layer = nn.ModuleList(LongformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: Tensor, layout: AttentionLayout) -> Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, use_reentrant=False)  # recompute activations in backward
            else:
                x = layer(x, layout)
        return x


class LongformerPooler(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class LongformerPreTrainedModel(nn.Module):
    """Initialisation, save/load and gradient checkpointing shared by the model and its heads."""

    base_model_prefix = "longformer"
    hf_architecture = "LongformerModel"
    tied_weights = {}  # name in this model -> name of the tensor it shares (omitted when saving)

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.config = config

    def init_weights(self):
        """Normal(0, initializer_range) for linear and embedding weights, as Hugging Face does."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self):
        pass

    @property
    def encoder_model(self) -> "LongformerModel":
        return self if isinstance(self, LongformerModel) else getattr(self, self.base_model_prefix)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder_model.embeddings.word_embeddings

    def set_input_embeddings(self, embedding: nn.Embedding):
        self.encoder_model.embeddings.word_embeddings = embedding
        self.config.vocab_size = embedding.num_embeddings
        self.tie_weights()

    def gradient_checkpointing_enable(self, enable: bool = True):
        self.config.gradient_checkpointing = enable
        self.encoder_model.encoder.gradient_checkpointing = enable

    def set_attention_backend(self, backend: str):
        """Switch every layer to another attention backend (weights unchanged)."""
        self.config.attention_backend = backend
        self.config.validate()
        for layer in self.encoder_model.encoder.layer:
            layer.attention.self.backend = backend

    def train_flops(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    global_attention_mask: Tensor | None = None, **head_inputs) -> float:
        """Model FLOPs of one training step (forward + backward) on this batch, as `flops.py`
        counts them: the trainer's TFLOP/s and MFU. Reads only the masks' counts (no forward)."""
        c, N = self.config, input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # the forward's own rule for which tokens are global (attention_mask 2, the head's default)
        layout = AttentionLayout.build(attention_mask, self._default_global_mask(input_ids, global_attention_mask))
        encoder = sum(flops.encoder_layer_flops(N, window, g, c.hidden_size, c.num_attention_heads,
                                                c.intermediate_size)
                      for g in layout.is_global.sum(dim=1).tolist() for window in c.attention_window)
        return 3 * (encoder + self._head_flops(input_ids, **head_inputs))

    def _default_global_mask(self, input_ids: Tensor, global_attention_mask: Tensor | None) -> Tensor | None:
        return global_attention_mask  # heads that add global tokens by default say so

    def _head_flops(self, input_ids: Tensor, **head_inputs) -> float:
        return 0.0

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None):
        from .checkpoint import save_folder

        save_folder(self, folder, state_dict)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **config_overrides):
        from .checkpoint import load_folder

        return load_folder(cls, folder, **config_overrides)


class LongformerModel(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = LongformerEmbeddings(config)
        self.encoder = LongformerEncoder(config)
        self.pooler = LongformerPooler(config) if add_pooling_layer else None
        self.init_weights()

    def check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, global_attention_mask: Tensor | None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        for name, mask in (("attention_mask", attention_mask), ("global_attention_mask", global_attention_mask)):
            if mask is not None and mask.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(mask.shape)} but input_ids has {tuple(input_ids.shape)}"
                )
        if input_ids.shape[1] > self.config.max_tokens:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens is longer than the position table allows "
                f"({self.config.max_tokens} = max_position_embeddings {self.config.max_position_embeddings} "
                f"- pad_token_id {self.config.pad_token_id} - 1); truncate it or convert the model to a "
                "longer max_pos with `python -m ds_longformer.convert`"
            )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        global_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        layout: AttentionLayout | None = None,
    ) -> ModelOutput:
        self.check_inputs(input_ids, attention_mask, global_attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if layout is None:
            layout = AttentionLayout.build(attention_mask, global_attention_mask)
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), layout)  # (B, N, C)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=hidden, pooler_output=pooled)


CE_CHUNK_ELEMENTS = 2**25  # logits per chunk of LinearCrossEntropy: 128 MiB in fp32


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i cross_entropy(x_i W^T + b, t_i) without holding the (M, V) logits.

    The autograd way keeps the logits, their log-softmax and, in backward, two more (M, V) tensors:
    at N=32768 with 15% masked (M ~ 4900) and V = 50265 that is 4 x 1 GB. Here the rows go in
    chunks of CE_CHUNK_ELEMENTS logits, and each chunk's gradient (softmax - one-hot) is used at
    once: forward leaves dx (M, C), dW (V, C), db (V), and backward only scales them by the incoming
    gradient. The same three matmuls as autograd, none recomputed.
    Logits are computed in x's dtype and the softmax in fp32, as `F.cross_entropy(logits.float())`;
    the gradient matmuls in bf16 for bf16 (as autograd's) but in fp32 for fp16: these gradients are
    not yet multiplied by the loss scale, and fp16 would flush the small ones to zero. dW of one
    chunk (the usual case: 667 rows for V = 50265) is that chunk's product, as autograd's; several
    chunks are summed in an fp32 (V, C) buffer (147 MiB), which bf16 precision needs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> Tensor:
        M, V = x.shape[0], weight.shape[0]
        low, high = torch.stack([targets.min(), targets.max()]).tolist() if M else (0, 0)  # one device sync
        if low < 0 or high >= V:  # else gather's bare index error
            raise ValueError(f"MLM labels must be token ids in [0, {V}) or -100 (not scored); got values "
                             f"from {low} to {high}: a tokenizer of another vocabulary?")
        needs_grad = ctx.needs_input_grad[:3]
        grad_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        x_g, weight_g = x.to(grad_dtype), weight.to(grad_dtype)
        grad_x = torch.empty(x.shape, dtype=grad_dtype, device=x.device) if needs_grad[0] else None
        rows = max(1, CE_CHUNK_ELEMENTS // V)
        sum_grad_w = needs_grad[1] and not 0 < M <= rows  # several chunks; one writes its product
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if sum_grad_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=x.device) if needs_grad[2] else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, M, rows):
            x_c, t_c = x[i: i + rows], targets[i: i + rows]
            logits = torch.addmm(bias, x_c, weight.t()).float()  # (rows, V)
            target_logit = logits.gather(1, t_c[:, None])  # (rows, 1)
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place (logsumexp would make a second (rows, V))
            row_sum = probs.sum(dim=-1, keepdim=True)
            loss += (row_max + row_sum.log() - target_logit).sum()  # log-sum-exp minus the target's
            if not any(needs_grad):
                continue
            probs.div_(row_sum * M)  # softmax / M
            probs[torch.arange(len(t_c), device=x.device), t_c] -= 1.0 / M  # d(mean loss) / d(logits)
            probs_g = probs.to(grad_dtype)
            if grad_x is not None:
                grad_x[i: i + rows] = probs_g @ weight_g
            if needs_grad[1]:
                if not sum_grad_w:
                    grad_w = probs_g.t() @ x_g  # (V, C) in grad_dtype: the only chunk
                elif grad_dtype == torch.float32:
                    grad_w.addmm_(probs.t(), x_g[i: i + rows])
                else:
                    grad_w += probs_g.t() @ x_g[i: i + rows]
            if grad_b is not None:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return loss / M

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        # The loss's gradient is mostly 1 (else a loss scale or 1 / accumulation steps): then the
        # buffers are the gradients, and no second (V, C) tensor is made. Scaled out of place, so a
        # second backward through a retained graph finds them unscaled.
        unit = bool(grad_loss == 1)
        return (*(None if g is None else (g if unit else g * grad_loss).to(dtype)
                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)), None)


class MLMDecoder(nn.Linear):
    """The LM head's output projection (HF's `lm_head.decoder`, tied to the word embeddings).
    decoder(x) gives logits; decoder(x, targets) the mean cross-entropy through LinearCrossEntropy.
    A module call either way, so DeepSpeed ZeRO-3 gathers the weight for it."""

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is None:
            return super().forward(x)
        return LinearCrossEntropy.apply(x, self.weight, self.bias, targets)


class LongformerLMHead(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = MLMDecoder(config.hidden_size, config.vocab_size)
        self.bias = self.decoder.bias  # HF names the same tensor twice

    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """(..., C) -> logits (..., V); with targets (M,) for hidden (M, C): the mean cross-entropy."""
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden))), targets)


class LongformerForMaskedLM(LongformerPreTrainedModel):
    hf_architecture = "LongformerForMaskedLM"
    tied_weights = {
        "lm_head.decoder.weight": "longformer.embeddings.word_embeddings.weight",
        "lm_head.decoder.bias": "lm_head.bias",
    }

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.lm_head = LongformerLMHead(config)
        self.init_weights()

    def tie_weights(self):
        emb = self.longformer.embeddings.word_embeddings
        self.lm_head.decoder.weight = emb.weight
        if self.lm_head.decoder.out_features != emb.num_embeddings:  # vocabulary was resized
            bias = torch.zeros(emb.num_embeddings, dtype=emb.weight.dtype, device=emb.weight.device)
            n = min(len(bias), len(self.lm_head.bias))
            bias[:n] = self.lm_head.bias.data[:n]
            self.lm_head.decoder.out_features = emb.num_embeddings
            self.lm_head.decoder.bias = nn.Parameter(bias)
            self.lm_head.bias = self.lm_head.decoder.bias

    def _head_flops(self, input_ids, labels=None, **_) -> float:
        scored = input_ids.numel() if labels is None else int((labels != -100).sum())  # see forward
        return 2 * scored * self.config.hidden_size * (self.config.hidden_size + self.config.vocab_size)

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, labels=None,
                token_type_ids=None) -> ModelOutput:
        """Training with labels scores only the labelled (masked) positions, in chunks
        (LinearCrossEntropy): the same loss without the (B, N, V) logits, which at N=4096 and V=50k
        cost more than the encoder layers; then `.logits` is None. In eval mode, or without labels,
        `.logits` is (B, N, V) as usual."""
        out = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids)
        hidden = out.last_hidden_state  # (B, N, C)
        if labels is not None and self.training and torch.is_grad_enabled():
            scored = labels != -100  # M masked tokens; their logits are never held at once
            if scored.any():
                loss = self.lm_head(hidden[scored], labels[scored])
            else:  # nothing to score: a zero loss that still reaches every head weight (ZeRO expects it)
                loss = self.lm_head(hidden[scored]).sum() * 0.0
            return ModelOutput(loss=loss, logits=None, last_hidden_state=hidden)
        logits = self.lm_head(hidden)  # (B, N, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=hidden)


def _cls_global_mask(input_ids: Tensor, global_attention_mask: Tensor | None) -> Tensor:
    """Default for classification: global attention on the first token (<s> / [CLS])."""
    if global_attention_mask is not None:
        return global_attention_mask
    mask = torch.zeros_like(input_ids)
    mask[:, 0] = 1
    return mask


class LongformerClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on the first token, as Hugging Face's."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: Tensor) -> Tensor:
        x = self.dropout(hidden[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class LongformerForSequenceClassification(LongformerPreTrainedModel):
    hf_architecture = "LongformerForSequenceClassification"

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.classifier = LongformerClassificationHead(config)
        self.init_weights()

    def _default_global_mask(self, input_ids, global_attention_mask):
        return _cls_global_mask(input_ids, global_attention_mask)

    def _head_flops(self, input_ids, **_) -> float:
        c = self.config
        return 2 * input_ids.shape[0] * c.hidden_size * (c.hidden_size + c.num_labels)

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, labels=None,
                token_type_ids=None) -> ModelOutput:
        global_attention_mask = self._default_global_mask(input_ids, global_attention_mask)
        out = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids)
        logits = self.classifier(out.last_hidden_state)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self._loss(logits.float(), labels)
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state)

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


class LongformerForCandidateScoring(LongformerPreTrainedModel):
    """Scores candidate answers at given token positions (the paper's WikiHop model).

    forward(..., candidate_positions (B, K) long, candidate_mask (B, K) bool, labels (B,)) returns
    logits (B, K) = a linear score of the hidden state at each candidate's position, -inf where
    candidate_mask is False; loss = cross-entropy over the candidates.
    """

    hf_architecture = "LongformerForCandidateScoring"

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.qa_score = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    def _head_flops(self, input_ids, candidate_positions=None, **_) -> float:
        return 0.0 if candidate_positions is None else 2 * candidate_positions.numel() * self.config.hidden_size

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, candidate_positions=None,
                candidate_mask=None, labels=None, token_type_ids=None) -> ModelOutput:
        if candidate_positions is None:
            raise ValueError("LongformerForCandidateScoring needs candidate_positions (B, K)")
        out = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids)
        hidden = out.last_hidden_state
        idx = candidate_positions[:, :, None].expand(-1, -1, hidden.shape[-1])
        logits = self.qa_score(hidden.gather(1, idx)).squeeze(-1).float()  # (B, K)
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask.bool(), float("-inf"))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=hidden)

