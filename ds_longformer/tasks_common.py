"""Command-line glue shared by the task programs (pretrain, classify, wikihop).

* ``task_parser(task, description, **defaults)``: the trainer's flags plus the flags every task has
  (``--model_path``, ``--tokenizer_name``, ``--max_seq_len``, ``--cache_dir``), with the task's defaults.
* ``resolve_model_path`` / ``load_tokenizer``: a local Hugging Face folder, or a hub name
  (downloaded only where a network exists; nothing is fetched for a local folder).
* ``load_longformer(cls, path, max_seq_len)``: a Longformer folder and the input length to use.
  ``load_baseline(cls, path)``: the RoBERTa baseline -- the short model through our classes with
  its own position table and a window spanning all of it (full attention, i.e. exactly RoBERTa),
  inputs truncated to 512 tokens.
* ``tokenized_once(cache_dir, name, key, build)``: a tokenized dataset built once per key (rank 0
  first, then the other ranks and later runs load it from the cache).
* ``accuracy_stats`` / ``reduce_accuracy``: the trainer's metric hooks for label predictions.
* ``model_loader``: marks a function that reads a model folder; its FileNotFoundError/ValueError
  (no config.json, weights that do not fit the config, an impossible window) become TaskErrors.
* ``cli(main)``: run a task's ``main`` as a program; user errors (a missing dataset, a malformed
  file, a wrong model folder, a bad DeepSpeed config or launch) print their message and exit with
  status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

from .data import DataFormatError, DatasetNotFoundError
from .data.common import cache_key, cached_dataset
from .engine import UserError, add_trainer_args, rank_zero_first
from .weights import read_config_json

BASELINE_MAX_LEN = 512  # the RoBERTa baseline reads at most this many tokens (the paper's setting)
SHORT_MODEL = "distilbert/distilroberta-base"  # the seed scripts' short model and tokenizer


class TaskError(UserError):
    """A user error the task reports as a message (wrong model folder, impossible lengths...)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and the task's docstring as written."""


def task_parser(task: str, description: str, **defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m ds_longformer.{task}", description=description,
                                     formatter_class=HelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--model_path", default=None,
                   help="a local Hugging Face folder, or a hub name where a network exists")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer folder or hub name; None: --model_path's")
    g.add_argument("--max_seq_len", type=int, default=None,
                   help="input length in tokens" + ("" if "max_seq_len" in defaults else "; None: the model's"))
    g.add_argument("--cache_dir", default="./data",
                   help="where tokenized datasets are cached (one folder per tokenizer, data and length)")
    add_local_rank_arg(parser)
    add_trainer_args(parser)
    parser.set_defaults(**defaults)
    return parser


def add_local_rank_arg(parser: argparse.ArgumentParser) -> None:
    """The `deepspeed` launcher appends --local_rank=N; the rank comes from the environment
    (LOCAL_RANK) anyway, so the flag is accepted and ignored."""
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def resolve_model_path(name: str) -> Path:
    """A local folder as is; otherwise a hub name, fetched into the Hugging Face cache."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]))
    except Exception as err:  # offline, unknown repo, gated...: the user needs the message, not the stack
        raise TaskError(f"{name!r} is neither a local folder nor a model that could be fetched from the "
                        f"Hugging Face hub ({type(err).__name__}: {err}); give a local save_pretrained folder")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name)))


def model_loader(load):
    """Errors of reading a model folder (weights.py and config.py raise FileNotFoundError or
    ValueError naming the folder and the problem) become TaskErrors: a message, not a traceback."""
    @functools.wraps(load)
    def run(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except (FileNotFoundError, ValueError) as err:
            raise TaskError(str(err)) from err
    return run


def _model_type(path: Path) -> str | None:
    return read_config_json(path).get("model_type")


@model_loader
def load_longformer(cls, path: str | Path, max_seq_len: int | None = None, **overrides):
    """(model in training mode, input length) from a Longformer folder; the length defaults to the model's."""
    path = resolve_model_path(str(path))
    if _model_type(path) != "longformer":
        raise TaskError(f"{path} holds a {_model_type(path)!r} model, not a Longformer: convert it first "
                        f"(python -m ds_longformer.convert --source {path} --output DIR, or "
                        "python -m ds_longformer.pretrain), then pass the long model's folder")
    model = cls.from_pretrained(path, **overrides).train()  # from_pretrained gives eval mode, as transformers'
    max_len = max_seq_len or model.config.max_tokens
    if max_len > model.config.max_tokens:
        raise TaskError(f"--max_seq_len {max_len} exceeds the {model.config.max_tokens} positions of {path}")
    return model, max_len


@model_loader
def load_baseline(cls, path: str | Path, max_seq_len: int | None = None, **overrides):
    """(model in training mode, input length) for the RoBERTa baseline: full attention over at most 512 tokens."""
    path = resolve_model_path(str(path))
    # A window of twice the position table covers every pair of tokens: full attention, computed
    # by the dense backend (the blocked one would gather three 512-token blocks per block).
    window = 2 * read_config_json(path)["max_position_embeddings"]
    model = cls.from_pretrained(path, attention_window=window, attention_backend="dense", **overrides).train()
    max_len = min(max_seq_len or BASELINE_MAX_LEN, BASELINE_MAX_LEN, model.config.max_tokens)
    return model, max_len


def tokenized_once(cache_dir: str | Path, name: str, key: list, build: Callable):
    """``build()`` (a ``datasets.Dataset``) once per ``key`` (what the result depends on: tokenizer,
    data, length...): rank 0 builds and saves it under ``cache_dir/<name>-<hash of key>/`` while the
    other ranks wait, then they, and later runs, load it from there (data.common.cached_dataset)."""
    with rank_zero_first():
        dataset, _ = cached_dataset(Path(cache_dir) / f"{name}-{cache_key(*key)}", lambda: (build(), {"name": name}))
    return dataset


def accuracy_stats(outputs, batch) -> dict:
    """Correct predictions and examples in a batch (``labels``: one class index per example)."""
    labels = batch["labels"]
    predictions = outputs.logits.argmax(-1).cpu()
    return {"correct": (predictions == labels).sum().item(), "examples": len(labels)}


def reduce_accuracy(totals: dict) -> dict:
    return {"accuracy": totals["correct"] / max(totals["examples"], 1)}


def cli(main, argv=None) -> None:
    """Run ``main(argv)`` as a program: user errors become a message and exit status 1."""
    try:
        main(argv)
    except (DatasetNotFoundError, DataFormatError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
