"""Command-line glue shared by the task programs (pretrain, classify, wikihop, qa).

* ``task_parser(task, description, **defaults)``: the trainer's flags plus the flags every task has
  (``--model_path``, ``--tokenizer_name``, ``--max_seq_len``, ``--cache_dir``), with the task's defaults.
* ``task_preflight(args, metrics, **folders)``: what the flags alone can tell, checked right after
  parsing (engine.preflight, and the task's output folders writable).
* ``resolve_model_path`` / ``load_tokenizer``: a local Hugging Face folder, or a hub name
  (downloaded only where a network exists; nothing is fetched for a local folder).
* ``add_model_choice`` / ``chosen_model_path`` / ``load_chosen_model``: ``--model Roberta|Longformer``,
  the folder it reads (a Longformer needs --model_path) and the model it loads.
* ``load_longformer(cls, path, max_seq_len)``: a Longformer folder and the input length to use.
  ``load_baseline(cls, path)``: the RoBERTa baseline -- the short model through our classes with
  its own position table and a window spanning all of it (full attention, i.e. exactly RoBERTa),
  inputs truncated to 512 tokens.
* ``tokenized_once(cache_dir, name, key, build)``: a tokenized dataset built once per key (rank 0
  first, then the other ranks and later runs load it from the cache).
* ``accuracy_stats`` / ``reduce_accuracy``: the trainer's metric hooks for label predictions.
* ``check_model_folder(path)``: config.json readable JSON, every weights file present whole
  (safetensors headers against the file sizes, zip archives with their directory), before anything
  is loaded; ``model_loader``: marks a function that reads a model folder; its file errors
  (FileNotFoundError, ValueError, OSError, safetensors') become TaskErrors naming the folder.
* ``ArgumentParser``: argparse's, whose usage errors are user errors too (not argparse's exit 2).
* ``cli(main)``: the one rule for user errors. Run a task's ``main`` as a program; a user error (a
  flag, a missing dataset, a malformed file, a wrong or damaged model folder, a bad DeepSpeed config,
  checkpoint or launch: DatasetNotFoundError, DataFormatError, UserError) is printed once, by rank 0,
  as one message, and the program exits with status 1, without a traceback. Any other exception is
  a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import sys
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from .data import DataFormatError, DatasetNotFoundError
from .data.common import cache_key, cached_dataset
from .engine import TrainerArgs, UserError, add_trainer_args, preflight, rank_zero_first
from .engine.args import ranged
from .engine.distributed import LaunchError, find_launch
from .engine.files import writable_folder
from .weights import check_folder, read_config_json

BASELINE_MAX_LEN = 512  # the RoBERTa baseline reads at most this many tokens (the paper's setting)
SHORT_MODEL = "distilbert/distilroberta-base"  # the seed scripts' short model and tokenizer


class TaskError(UserError):
    """A user error the task reports as a message (wrong model folder, impossible lengths...)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and the task's docstring as written."""


class ArgumentParser(argparse.ArgumentParser):
    """A usage error (unknown flag, bad value) is a user error: cli prints it once and exits 1."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} ({self.prog} --help lists the flags)")


def task_parser(task: str, description: str, **defaults) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"python -m ds_longformer.{task}", description=description)
    g = parser.add_argument_group("model")
    g.add_argument("--model_path", default=None,
                   help="a local Hugging Face folder, or a hub name where a network exists")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer folder or hub name; None: --model_path's")
    g.add_argument("--max_seq_len", type=ranged(int, "max_seq_len", minimum=3), default=None,
                   help="input length in tokens" + ("" if "max_seq_len" in defaults else "; None: the model's"))
    g.add_argument("--cache_dir", default="./data",
                   help="where tokenized datasets are cached (one folder per tokenizer, data and length)")
    add_local_rank_arg(parser)
    add_trainer_args(parser)
    parser.set_defaults(**defaults)
    return parser


def task_preflight(args: argparse.Namespace, metrics: tuple[str, ...], **folders) -> TrainerArgs:
    """engine.preflight (the trainer's flags, DeepSpeed config, --resume, --best_metric against
    ``metrics``, the run folder), then the task's own output folders (--cache_dir, and ``folders``:
    {flag name: path}) writable; returns the TrainerArgs for the Trainer. Right after parsing."""
    trainer_args = preflight(TrainerArgs.from_namespace(args), metrics=metrics)
    for flag, folder in {"cache_dir": args.cache_dir, **folders}.items():
        writable_folder(Path(folder), f"--{flag}")
    return trainer_args


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

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # tokenizers' and transformers' parse errors have no common type
        raise TaskError(f"the tokenizer in {path} cannot be loaded ({type(err).__name__}: {err}); is the folder "
                        "complete (tokenizer.json or vocab files, tokenizer_config.json)?") from err


# What reading a damaged or wrong model folder raises (checkpoint.py and config.py name the problem).
MODEL_FILE_ERRORS = (FileNotFoundError, ValueError, OSError, SafetensorError, pickle.UnpicklingError)


def model_loader(load):
    """Errors of reading a model folder (weights.py and config.py raise FileNotFoundError or
    ValueError naming the folder and the problem) become TaskErrors: a message, not a traceback."""
    @functools.wraps(load)
    def run(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except MODEL_FILE_ERRORS as err:
            raise TaskError(str(err) if isinstance(err, (FileNotFoundError, ValueError)) else
                            f"a model file cannot be read ({type(err).__name__}: {err})") from err
    return run


def check_model_folder(path: Path) -> None:
    """weights.check_folder as a TaskError: a damaged config.json or weights file named before loading."""
    model_loader(check_folder)(path)


def _model_type(path: Path) -> str | None:
    return read_config_json(path).get("model_type")


def add_model_choice(group, task: str) -> None:
    """--model Roberta|Longformer: the paper's two readers of a task."""
    group.add_argument("--model", choices=("Roberta", "Longformer"), default="Roberta",
                       help=f"Roberta: the short baseline (--model_path default {SHORT_MODEL}), {task}; "
                            "Longformer: needs --model_path (a Longformer folder)")


def chosen_model_path(args: argparse.Namespace) -> str:
    """The model folder of --model: a Longformer needs --model_path; the baseline defaults to SHORT_MODEL."""
    if args.model == "Longformer" and not args.model_path:
        raise TaskError("--model Longformer needs --model_path: the folder of a Longformer (e.g. the "
                        "--save_model_to folder of ds_longformer.pretrain)")
    return args.model_path or SHORT_MODEL


def load_chosen_model(args: argparse.Namespace, cls, path: str, **overrides):
    """(model, input length) of --model: load_longformer or load_baseline, at --max_seq_len."""
    load = load_longformer if args.model == "Longformer" else load_baseline
    return load(cls, path, args.max_seq_len, **overrides)


@model_loader
def load_longformer(cls, path: str | Path, max_seq_len: int | None = None, **overrides):
    """(model in training mode, input length) from a Longformer folder; the length defaults to the model's."""
    path = resolve_model_path(str(path))
    check_model_folder(path)
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
    check_model_folder(path)
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


ACCURACY_METRICS = ("loss", "accuracy")  # what a validation with reduce_accuracy reports


def reduce_accuracy(totals: dict) -> dict:
    return {"accuracy": totals["correct"] / max(totals["examples"], 1)}


def cli(main, argv=None) -> None:
    """Run ``main(argv)`` as a program: a user error becomes one message (rank 0) and exit status 1."""
    try:
        main(argv)
    except (DatasetNotFoundError, DataFormatError, UserError) as err:
        try:
            rank = find_launch().rank
        except LaunchError:
            rank = 0
        if rank == 0:  # every rank meets the same error (each checks the same flags and files)
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
