"""Short encoders (RoBERTa and BERT style) read as Longformers: their config and weights mapped.

    RobertaModel / ...ForMaskedLM / ...ForSequenceClassification (RoBERTa, DistilRoBERTa, XLM-R, CamemBERT)
    BertModel / BertForMaskedLM (BERT, MiniLM, ...)

Parameter names become Longformer's (`roberta.`/`bert.` -> `longformer.`, BERT's MLM head ->
`lm_head.`); the local query/key/value are copied into the global projections; BERT numbers
positions from 0 while the Longformer numbers them RoBERTa-style from pad_token_id + 1, so a BERT
position table gets pad_token_id + 1 leading rows. The positions are not lengthened here (that is
`convert`): the model reads what the short one read, with full attention when the window covers it.
"""

from __future__ import annotations

import re

import torch

from .config import LongformerConfig

SHORT_MODEL_TYPES = ("roberta", "bert", "xlm-roberta", "camembert")
KEPT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "type_vocab_size",
               "initializer_range", "layer_norm_eps", "id2label", "classifier_dropout", "problem_type")


def position_offset(cfg: dict) -> int:
    """Rows a BERT-style position table gets in front: pad_token_id + 1 (0 for RoBERTa-style)."""
    return cfg.get("pad_token_id", 0) + 1 if cfg.get("model_type") == "bert" else 0


def longformer_config(cfg: dict, attention_window: int | list[int], **overrides) -> LongformerConfig:
    """A LongformerConfig with the short model's sizes (`cfg`: its config.json), then `overrides`.
    A BERT config names no [CLS]/[SEP] ids: bos/eos/sep stay None (`convert` takes them from the
    tokenizer; 0 and 2 would be [PAD] and [unused1] there)."""
    model_type = cfg.get("model_type")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={cfg['position_embedding_type']!r} is not supported: "
                         "only absolute position embeddings can be copied to a longer table")
    fields = {k: cfg[k] for k in KEPT_FIELDS if cfg.get(k) is not None}
    eos = cfg.get("eos_token_id", cfg.get("sep_token_id"))
    fields.update(
        max_position_embeddings=cfg["max_position_embeddings"] + position_offset(cfg),
        pad_token_id=cfg.get("pad_token_id", 1 if model_type != "bert" else 0),
        bos_token_id=cfg.get("bos_token_id", cfg.get("cls_token_id")),
        eos_token_id=eos,
        sep_token_id=cfg.get("sep_token_id", eos),
        attention_window=attention_window,
        converted_from=model_type,
    )
    return LongformerConfig.from_dict(fields, **overrides)


def _rename(key: str, model_type: str) -> str | None:
    """A RoBERTa/BERT parameter name -> its Longformer name (None: not used by us)."""
    key = key.replace(".gamma", ".weight").replace(".beta", ".bias")  # very old BERT checkpoints
    key = re.sub(r"^(roberta|bert|camembert)\.", "longformer.", key)
    if model_type == "bert":
        key = (key.replace("cls.predictions.transform.dense", "lm_head.dense")
                  .replace("cls.predictions.transform.LayerNorm", "lm_head.layer_norm")
                  .replace("cls.predictions.decoder", "lm_head.decoder")
                  .replace("cls.predictions.bias", "lm_head.bias"))
    if key.startswith(("cls.", "qa_outputs.")) or key.endswith("position_ids"):
        return None
    return key


def copy_local_to_global(state: dict) -> None:
    """query/key/value -> query_global/key_global/value_global in every layer (in place)."""
    for k in list(state):
        m = re.match(r"(.*\.attention\.self\.)(query|key|value)\.(weight|bias)$", k)
        if m:
            state[f"{m.group(1)}{m.group(2)}_global.{m.group(3)}"] = state[k].clone()


def longformer_state(state: dict, cfg: dict) -> dict:
    """The short model's weights under Longformer names, BERT's position table shifted behind the
    padding row(s), local q/k/v copied into the global projections."""
    model_type = cfg.get("model_type")
    out = {name: v for k, v in state.items() if (name := _rename(k, model_type)) is not None}
    offset = position_offset(cfg)
    if offset:
        prefix = "longformer." if any(k.startswith("longformer.") for k in out) else ""
        pos_key = f"{prefix}embeddings.position_embeddings.weight"
        table = out[pos_key]
        shifted = torch.zeros(table.shape[0] + offset, table.shape[1], dtype=table.dtype)
        shifted[offset:] = table  # rows 0..pad: the padding position(s), never used by real tokens
        out[pos_key] = shifted
    copy_local_to_global(out)
    return out
