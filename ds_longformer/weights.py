"""Model weights in files: reading folders and state-dict files, the checks every load passes, and
saving a folder so that no file is ever half-written.

Longformer folders are read and written by transformers' own `from_pretrained`/`save_pretrained`
(model.py); this module holds what they do not do:

* `read_config_json`, `read_state_dict`: a save_pretrained folder (model.safetensors, shards named
  by model.safetensors.index.json, or pytorch_model.bin) or a state-dict file (.safetensors,
  .bin/.pt), for weights that are not a Longformer folder (short encoders, --state_dict_path).
* `load_state_dict_into(model, state, source)`: the one loader of such a state dict into a built
  model, with the prefix (`longformer.`) matched, tied weights filled or checked, and `check_fit`.
* `check_fit`: the rules every load follows (transformers' loads too, from their loading info):
  shapes must fit, the encoder (embeddings and layers) must be complete and no larger than the
  config; missing head weights are new heads.
* `check_folder`: a folder's config.json and weight files checked whole before anything is loaded
  (a copy or download cut short is named, not met deep inside safetensors or torch.load).
* `atomic_folder`: save into a temporary folder beside the target, then rename the files in.

Every problem of a file is a FileNotFoundError or ValueError naming the file (the task programs
turn them into one-line messages: tasks_common.model_loader).

No tokenizer, data or model code here (model.py imports this module, not the other way round).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)
ENCODER_PARTS = ("embeddings.", "encoder.")  # what every checkpoint of a model must hold in full
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")


# ---- reading --------------------------------------------------------------------------------
def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face save_pretrained folder (config.json + "
                                "model.safetensors)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the model folder is damaged (copied or downloaded "
                         "only in part?)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def folder_model_type(name_or_path: str | Path) -> str | None:
    """config.json's model_type of a local folder; None for a hub model id (read by transformers)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name_or_path).is_dir():
        return read_config_json(name_or_path).get("model_type")
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path}: no such folder; expected a Hugging Face save_pretrained folder "
                                "(config.json + model.safetensors)") from None
    return None


def read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors or torch.save file, on the CPU; a damaged file -> ValueError
    naming it."""
    _require_whole(file)
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    # (the weights-only unpickler meets a file that is not weights with any of these)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, IndexError, KeyError) as err:
        raise ValueError(f"{file} cannot be read as weights ({type(err).__name__}: {err})") from None


def _weight_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file} of a model.safetensors.index.json."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a shard index ({type(err).__name__}: {err})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} is not a shard index (its weight_map is not an object)")
    return weight_map


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a save_pretrained folder or of a state-dict file, on the CPU."""
    path = Path(path)
    if path.is_file():
        return read_weights_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_weights_file(path / name)
    index = path / "model.safetensors.index.json"
    if index.is_file():  # the shards the index names (not stray ones from an earlier save)
        shards = sorted(set(_weight_map(index).values()))
        return {k: v for shard in shards for k, v in read_weights_file(path / shard).items()}
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json (shards) or "
                            "pytorch_model.bin")


def read_weight_names(folder: str | Path) -> list[str]:
    """The tensor names of a save_pretrained folder, read from the safetensors header or the shard
    index without loading a tensor (only a pytorch_model.bin has to be loaded)."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        _require_whole(single)
        with safe_open(single, "pt") as f:
            return list(f.keys())
    if index.is_file() and not (folder / "pytorch_model.bin").is_file():  # (read_state_dict's order)
        return list(_weight_map(index))
    return list(read_state_dict(folder))


# ---- checking and loading ---------------------------------------------------------------------
def check_folder(path: str | Path) -> None:
    """A model folder's config.json (readable JSON) and every weights file in it (whole), checked
    before anything is loaded; a problem -> ValueError naming the file."""
    path = Path(path)
    if (path / "config.json").is_file():
        read_config_json(path)
    for file in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        _require_whole(file)


def _require_whole(file: Path) -> None:
    problem = weights_file_problem(file)
    if problem:
        raise ValueError(f"{file} {problem}: the file is damaged (copied or downloaded only in part?)")


def weights_file_problem(file: Path) -> str | None:
    """Why a weights file is not whole, or None: a safetensors header whose tensors end past the
    file, a torch.save zip archive without its directory (the end of the file)."""
    size = file.stat().st_size
    with file.open("rb") as f:
        if file.suffix != ".safetensors":
            zipped = f.read(4) == b"PK\x03\x04"
            return "is truncated (a zip archive without its directory)" if zipped and not zipfile.is_zipfile(file) \
                else None
        if size < 8:
            return f"is {size} bytes long, shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            return "is truncated (its header runs past the end of the file)"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "has an unreadable header"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    if 8 + header_len + max(ends, default=0) > size:
        return f"is truncated ({size} bytes; its tensors need {8 + header_len + max(ends)})"
    return None


def _encoder_keys(keys) -> list[str]:
    return sorted(k for k in keys if k.removeprefix("longformer.").startswith(ENCODER_PARTS))


def check_fit(source: str, missing, unexpected, mismatched: list[str], strict: bool = False) -> None:
    """Raise a ValueError naming `source` unless its weights fit the model: no shape differs
    (`mismatched`: 'name: checkpoint (shape) vs model (shape)'), the encoder is complete, and it
    holds no encoder weights the config has no place for (a config of fewer layers would
    silently drop them). Head weights may be missing (a new head) or extra (another task's head),
    unless `strict`."""
    if mismatched:
        raise ValueError(f"{source} does not fit the model's shapes: " + "; ".join(mismatched))
    missing_encoder = _encoder_keys(missing)
    if missing_encoder:
        raise ValueError(f"{source} lacks encoder weights, e.g. {missing_encoder[:5]} ({len(missing_encoder)} "
                         "missing): is it a checkpoint of this model?")
    extra_encoder = _encoder_keys(unexpected)
    if extra_encoder:
        raise ValueError(f"{source} has encoder weights the config has no place for, e.g. {extra_encoder[:5]} "
                         f"({len(extra_encoder)} extra): does config.json match the weights?")
    if strict and (missing or unexpected):
        raise ValueError(f"{source} does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def _with_model_prefix(state: dict, model) -> dict:
    """A bare encoder's keys ('embeddings.*') for a head model ('longformer.embeddings.*'), and the
    other way round."""
    prefix = f"{model.base_model_prefix}."
    if model.base_model is model:
        return {k.removeprefix(prefix): v for k, v in state.items()}
    if any(k.startswith(prefix) for k in state):
        return state
    return {prefix + k if k.split(".")[0] in ("embeddings", "encoder", "pooler") else k: v for k, v in state.items()}


def load_state_dict_into(model, state: dict[str, torch.Tensor], source: str, strict: bool = False) -> None:
    """Load `state` into the built `model` (a transformers PreTrainedModel): prefix matched, tied
    weights filled from their source (save_pretrained writes them once) or refused when they
    differ, then `check_fit` (strict: every weight present, none extra)."""
    state = _with_model_prefix(state, model)
    tied = getattr(model, "all_tied_weights_keys", {})
    for target, tied_to in tied.items():
        if target not in state and tied_to in state:
            state[target] = state[tied_to]
        elif target in state and tied_to not in state:
            state[tied_to] = state[target]
    ours = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
                  for k, v in state.items() if k in ours and v.shape != ours[k].shape]
    missing, unexpected = set(ours) - set(state), set(state) - set(ours)
    check_fit(source, missing, unexpected, mismatched, strict)
    for target, tied_to in tied.items():
        if target in state and tied_to in state and not torch.equal(state[target], state[tied_to]):
            raise ValueError(f"{source}: {target} differs from {tied_to}, which the model ties to it "
                             "(tie_word_embeddings): one of the two would be lost")
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)
    if missing:  # e.g. a fresh classifier head on a pretrained encoder
        log.info("%s: not in the checkpoint, newly initialised: %s", source, ", ".join(sorted(missing)))


# ---- writing --------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(folder: str | Path):
    """Yield a temporary folder beside `folder` to save into. When the block succeeds, each file
    written there replaces its namesake in `folder` (config.json last), and weight files of an
    earlier save that this one did not write (other shards, another format) are removed; a crash
    leaves each file whole, old or new, and a failed save replaces nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield staging
        written = sorted(staging.iterdir(), key=lambda p: (p.name == "config.json", p.name))
        mode = 0o666 & ~_umask()  # what a plain open() gives (safetensors writes owner-only files)
        for path in written:
            os.chmod(path, mode)
            os.replace(path, folder / path.name)
        names = {p.name for p in written}
        for pattern in WEIGHT_FILES:
            for stale in folder.glob(pattern):
                if stale.name not in names:
                    stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
