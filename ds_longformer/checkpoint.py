"""Hugging Face `save_pretrained` folders: read and write them, for Longformer and short encoders.

A folder is `config.json` + `model.safetensors` (or shards named by `model.safetensors.index.json`,
or `pytorch_model.bin`). We read:
  * Longformer folders (LongformerModel / ...ForMaskedLM / ...ForSequenceClassification), ours or
    transformers', with or without the `longformer.` prefix;
  * short encoders to convert: RoBERTa-style (RobertaModel / RobertaForMaskedLM / ...ForSequence-
    Classification: RoBERTa, DistilRoBERTa, XLM-R, CamemBERT) and BERT-style (BertModel /
    BertForMaskedLM). Their weights are renamed to Longformer names and their
    local q/k/v copied into the global projections (`short_to_longformer_state`).
We write Longformer folders that `transformers.Longformer*.from_pretrained` loads with no missing or
unexpected keys. Tied tensors (the MLM decoder) are written once; the weights and config.json are
both written under temporary names first and then renamed, so no file is ever half-written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LongformerConfig

log = logging.getLogger(__name__)
SHORT_MODEL_TYPES = ("roberta", "bert", "xlm-roberta", "camembert")
GLOBAL_PROJECTIONS = ("query", "key", "value")


# ---- reading --------------------------------------------------------------------------------
def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: expected a Hugging Face save_pretrained folder (config.json + "
            "model.safetensors); give a local path, nothing is downloaded"
        )
    return json.loads(path.read_text())


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # the shards the index names (not stray ones from an earlier save)
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json (shards) or "
                            "pytorch_model.bin")


def _rename_short_key(key: str, model_type: str) -> str | None:
    """Map a RoBERTa/BERT parameter name to its Longformer name (None = not used by us)."""
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


def short_config_to_longformer(cfg: dict, attention_window: int | list[int]) -> LongformerConfig:
    """A LongformerConfig with the short model's sizes. BERT-style models number positions from 0;
    we number them RoBERTa-style from pad_token_id + 1, so the table gets pad_token_id + 1 more rows."""
    model_type = cfg.get("model_type")
    offset = 0 if model_type != "bert" else cfg.get("pad_token_id", 0) + 1
    pad = cfg.get("pad_token_id", 1 if model_type != "bert" else 0)
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "type_vocab_size",
            "initializer_range", "layer_norm_eps", "id2label", "classifier_dropout", "problem_type")
    kw = {k: cfg[k] for k in keep if cfg.get(k) is not None}
    if "id2label" in kw:  # a classifier: its label count (transformers writes the keys as strings)
        kw["id2label"] = {int(k): v for k, v in kw["id2label"].items()}
        kw["num_labels"] = len(kw["id2label"])
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={cfg['position_embedding_type']!r} is not supported: "
                         "only absolute position embeddings can be copied to a longer table")
    # RoBERTa configs name <s>/</s>; BERT configs name neither [CLS] nor [SEP]: None, which
    # load_folder fills from the folder's tokenizer (0 and 2 would be [PAD] and [unused1] there).
    bos = cfg.get("bos_token_id", cfg.get("cls_token_id"))
    eos = cfg.get("eos_token_id", cfg.get("sep_token_id"))
    return LongformerConfig(
        **kw,
        max_position_embeddings=cfg["max_position_embeddings"] + offset,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        sep_token_id=cfg.get("sep_token_id", eos),
        attention_window=attention_window,
        extra={"converted_from": model_type},
    )


def short_to_longformer_state(state: dict, cfg: dict) -> dict:
    """Rename a short model's weights to Longformer names, shift BERT's position table to
    RoBERTa-style numbering, and copy local q/k/v into the global projections."""
    model_type = cfg.get("model_type")
    out = {}
    for k, v in state.items():
        name = _rename_short_key(k, model_type)
        if name is not None:
            out[name] = v
    prefix = "longformer." if any(k.startswith("longformer.") for k in out) else ""
    if model_type == "bert":
        pos_key = f"{prefix}embeddings.position_embeddings.weight"
        table = out[pos_key]
        offset = cfg.get("pad_token_id", 0) + 1
        shifted = torch.zeros(table.shape[0] + offset, table.shape[1], dtype=table.dtype)
        shifted[offset:] = table  # rows 0..pad: the padding position(s), never used by real tokens
        out[pos_key] = shifted
    copy_local_to_global(out)
    return out


def copy_local_to_global(state: dict):
    """query/key/value -> query_global/key_global/value_global in every layer (in place)."""
    for k in list(state):
        m = re.match(r"(.*\.attention\.self\.)(query|key|value)\.(weight|bias)$", k)
        if m:
            state[f"{m.group(1)}{m.group(2)}_global.{m.group(3)}"] = state[k].clone()


def mismatched_shapes(state: dict, ours: dict) -> list[str]:
    """'name: file (shape) vs model (shape)' for every tensor both have with different shapes."""
    return [f"{k}: file {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
            for k, v in state.items() if k in ours and v.shape != ours[k].shape]


def _fill_special_ids(config: LongformerConfig, folder: Path) -> None:
    """[CLS]/[SEP] ids a BERT-style config does not name, from the folder's tokenizer (if any)."""
    if None not in (config.bos_token_id, config.eos_token_id, config.sep_token_id):
        return
    from transformers import AutoTokenizer

    from .data.common import sequence_bounds

    try:
        start, end = sequence_bounds(AutoTokenizer.from_pretrained(str(folder)))
    except (OSError, ValueError):
        return  # no tokenizer: the ids stay unset (null in config.json), never guessed
    for field, value in (("bos_token_id", start), ("eos_token_id", end), ("sep_token_id", end)):
        if getattr(config, field) is None:
            setattr(config, field, value)


# ---- loading into our classes ---------------------------------------------------------------
def load_folder(cls, folder: str | Path, attention_window: int | list[int] | None = None, **overrides):
    """Build `cls` from a Longformer or short-encoder folder. Raises a clear error on a folder of
    another architecture or of a shape that does not match."""
    from .model import LongformerModel

    folder = Path(folder)
    raw = read_config_json(folder)
    model_type = raw.get("model_type")
    state = read_state_dict(folder)
    if model_type == "longformer":
        if attention_window is not None:
            overrides["attention_window"] = attention_window
        config = LongformerConfig.from_dict(raw, **overrides)
    elif model_type in SHORT_MODEL_TYPES:
        config = short_config_to_longformer(raw, attention_window or 512)
        for k, v in overrides.items():
            setattr(config, k, v)
        config.validate()
        _fill_special_ids(config, folder)
        state = short_to_longformer_state(state, raw)
    else:
        raise ValueError(
            f"{folder / 'config.json'}: model_type={model_type!r} is not supported; expected longformer or "
            f"a short encoder to convert ({', '.join(SHORT_MODEL_TYPES)})"
        )

    model = cls(config)
    ours = model.state_dict()
    # Accept both a bare encoder ("embeddings.*") and a head model ("longformer.embeddings.*").
    if cls is LongformerModel:
        state = {k.removeprefix("longformer."): v for k, v in state.items()}
    elif not any(k.startswith("longformer.") for k in state):
        state = {f"longformer.{k}" if k.split(".")[0] in ("embeddings", "encoder", "pooler") else k: v
                 for k, v in state.items()}
    for name, tied_to in cls.tied_weights.items():
        if name not in state and tied_to in state:
            state[name] = state[tied_to]
        elif name in state and tied_to in state and not torch.equal(state[name], state[tied_to]):
            raise ValueError(f"{folder}: {name} differs from {tied_to} (tie_word_embeddings false?); "
                             f"{cls.__name__} ties them, so one of the two would be lost")
    mismatched = mismatched_shapes(state, ours)
    if mismatched:
        raise ValueError(f"{folder}: checkpoint does not fit the config's shapes:\n  " + "\n  ".join(mismatched))
    missing = sorted(set(ours) - set(state))
    # Heads may be new (a classifier on a pretrained encoder); the encoder itself must be complete.
    missing_encoder = [k for k in missing if k.startswith(("longformer.", "embeddings.", "encoder."))]
    if missing_encoder:
        raise ValueError(f"{folder}: checkpoint lacks encoder weights, e.g. {missing_encoder[:5]} "
                         f"({len(missing_encoder)} missing); is it a {cls.__name__} checkpoint?")
    # Extra encoder weights mean the config describes a smaller model (e.g. fewer layers): refuse
    # rather than drop them. Head weights of another task (lm_head.*, a pooler) are ignored, as are
    # position_ids buffers that older checkpoints saved.
    extra_encoder = [k for k in state if k not in ours and not k.endswith("position_ids")
                     and k.removeprefix("longformer.").startswith(("embeddings.", "encoder."))]
    if extra_encoder:
        raise ValueError(f"{folder}: checkpoint has encoder weights the config has no place for, e.g. "
                         f"{extra_encoder[:5]} ({len(extra_encoder)} extra); does config.json match the weights?")
    usable = {k: v for k, v in state.items() if k in ours}
    model.load_state_dict(usable, strict=False)
    model.tie_weights()
    if missing:  # e.g. a fresh classifier head on a pretrained encoder
        log.info("%s: not in the checkpoint, newly initialised: %s", folder, ", ".join(missing))
    return model


# ---- writing --------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_files(writers: dict) -> None:
    """{path: write(tmp_path)}: write every file under a temporary name beside it, then rename them
    all. A crash leaves each file whole (old or new), and no file is replaced unless every write
    succeeded. The files get the permissions a plain open() gives (mkstemp's are owner-only)."""
    temporary = {}
    try:
        for path, write in writers.items():
            fd, temporary[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            write(temporary[path])
            os.chmod(temporary[path], 0o666 & ~_umask())
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def save_folder(model, folder: str | Path, state_dict: dict | None = None):
    """Write config.json + model.safetensors (tied tensors once, as transformers expects)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if k not in model.tied_weights}
    config = model.config.to_dict()
    config["architectures"] = [model.hf_architecture]
    config["tie_word_embeddings"] = True  # every head that has a decoder ties it (transformers' default too)
    config["gradient_checkpointing"] = False  # a training setting, not a property of the weights
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    config["dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    _write_files({
        folder / "model.safetensors": lambda p: save_file(state, p, metadata={"format": "pt"}),
        folder / "config.json": lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    })
