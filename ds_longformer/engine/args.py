"""TrainerArgs: every setting of the engine, defined once, and the command-line flags made from it.

Each field carries its help line, its allowed range and, where one maps cleanly, the name
Hugging Face's ``TrainingArguments`` gives it (``--learning_rate`` for ``--lr``, ...), accepted as
an alias. ``add_trainer_args(parser)`` turns the fields into argparse flags; a task changes their
defaults with ``parser.set_defaults`` and reads them back with ``TrainerArgs.from_namespace``.

The parser remembers which flags the user typed (``TrainerArgs.given``): a value written in the
DeepSpeed config (see ds_config.py) yields to a flag the user gave, not to a flag's default.

``ranged(kind, name, minimum, below)`` is the argparse type that reads a number and checks its range
(finite, at least ``minimum``, below ``below``): the trainer's flags and the task programs' own.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

_GIVEN = "_trainer_flags_given"  # namespace attribute: the dests of the trainer flags the user typed


def flag(default, help: str, *, aliases: tuple[str, ...] = (), choices: tuple | None = None,
         minimum: float | None = None, below: float | None = None, consts: dict[str, Any] | None = None):
    """A TrainerArgs field with what its command-line flag needs: help, aliases (Hugging Face's names),
    choices, the range of a number (at least ``minimum``, less than ``below``; a float must be
    finite), and ``consts`` (extra flags that set a fixed value, e.g. ``--bf16`` for ``--precision bf16``)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "aliases": aliases, "choices": choices, "minimum": minimum, "below": below,
        "consts": consts or {}})


@dataclasses.dataclass
class TrainerArgs:
    deepspeed_config: str | dict | None = flag(
        None, "DeepSpeed JSON: a path or a name in ds_configs/ (zero0..zero3, zero2_offload, zero3_offload, fp16, "
              "bf16, cpu); default cpu on CPU, zero2 on GPU", aliases=("--deepspeed",))
    batch_size: int = flag(8, "micro batch per rank (samples per forward)", aliases=("--per_device_train_batch_size",),
                           minimum=1)
    gradient_accumulation_steps: int = flag(1, "micro batches per optimizer step", minimum=1)
    lr: float = flag(5e-5, "peak learning rate", aliases=("--learning_rate",), minimum=0)
    weight_decay: float = flag(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights)", minimum=0)
    adam_beta1: float = flag(0.9, "AdamW beta1", minimum=0, below=1)
    adam_beta2: float = flag(0.999, "AdamW beta2", minimum=0, below=1)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon", minimum=0)
    warmup_steps: int = flag(0, "linear warmup steps", minimum=0)
    epochs: int = flag(1, "passes over the training set", aliases=("--num_train_epochs",), minimum=0)
    max_steps: int = flag(-1, "> 0: train this many optimizer steps, whatever --epochs says", minimum=-1)
    val_check_interval: int = flag(0, "validate every N optimizer steps; 0: at the end of each epoch",
                                   aliases=("--eval_steps",), minimum=0)
    default_root_dir: str = flag("runs", "runs are written to DIR/<project_name>/", aliases=("--output_dir",))
    project_name: str = flag("ds-longformer", "the run's folder under --default_root_dir")
    seed: int = flag(42, "seed of the weights' initialisation, data order and dropout", minimum=0)
    gradient_checkpointing: bool = flag(False, "recompute each layer in backward (less memory, ~1/3 more time)")
    resume: str | None = flag(None, "'latest' (of this run folder) or a checkpoint folder",
                              aliases=("--resume_from_checkpoint",))
    grad_clip: float = flag(1.0, "clip the global gradient norm to this; 0: no clipping", aliases=("--max_grad_norm",),
                            minimum=0)
    save_every_n_steps: int = flag(1000, "checkpoint every N optimizer steps; 0: only at the end",
                                   aliases=("--save_steps",), minimum=0)
    keep_last_k: int = flag(2, "checkpoints kept; <= 0 keeps all", aliases=("--save_total_limit",))
    best_metric: str = flag("loss", "validation metric that picks best_model/", aliases=("--metric_for_best_model",))
    best_mode: str = flag("min", "whether a lower or a higher --best_metric is better", choices=("min", "max"))
    num_workers: int = flag(0, "DataLoader worker processes per rank (also the tokenizing processes)",
                            aliases=("--dataloader_num_workers",), minimum=0)
    precision: str = flag("auto", "auto: the DeepSpeed config's (its \"auto\": bf16 on a bf16 GPU, else fp32)",
                          choices=("auto", "fp32", "bf16", "fp16"), consts={"--bf16": "bf16", "--fp16": "fp16"})
    log_every_n_steps: int = flag(1, "write the training scalars every N optimizer steps", aliases=("--logging_steps",),
                                  minimum=1)
    log_level: str = flag("info", "rank 0's level for this program's messages; debug also shows DeepSpeed's",
                          choices=("debug", "info", "warning", "error"))
    sequence_parallel_size: int = flag(
        1, "ranks that hold each sequence between them (DeepSpeed Ulysses sequence parallelism: each rank runs "
           "1/P of the tokens, so 1/P of the activations); the world is data-parallel replicas x P; also the "
           "DeepSpeed config's sequence_parallel_size", minimum=1)
    peak_tflops: float = flag(0.0, "peak TFLOP/s of one device in the training precision, for train/mfu_percent; 0: "
                                   "a known GPU's datasheet figure, else a matmul rate measured at start", minimum=0)
    # The flags the user typed (from_namespace); None: TrainerArgs built in code (see is_given).
    given: frozenset[str] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for f in flag_fields():
            value = getattr(self, f.name)
            problem = out_of_range(value, f.metadata["minimum"], f.metadata["below"])
            if problem:
                raise ValueError(f"--{f.name} {problem}")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"--{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")

    def is_given(self, name: str) -> bool:
        """Whether the user chose this value: a flag they typed or, for TrainerArgs built in code, a
        field set to something else than its default."""
        if self.given is None:
            return getattr(self, name) != _FIELDS[name].default
        return name in self.given

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainerArgs":
        values = {f.name: getattr(ns, f.name) for f in flag_fields() if hasattr(ns, f.name)}
        return cls(**values, given=frozenset(getattr(ns, _GIVEN, ())))


def flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainerArgs) if "help" in f.metadata]


_FIELDS = {f.name: f for f in flag_fields()}


class _Given(argparse.Action):
    """Store the value and remember that the user typed this flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        given = set(getattr(namespace, _GIVEN, ()))
        setattr(namespace, _GIVEN, given | {self.dest})


def out_of_range(value, minimum: float | None = None, below: float | None = None) -> str | None:
    """Why a number is not allowed ("must be at least 1, got 0"), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if minimum is not None and value < minimum:
        return f"must be at least {minimum}, got {value}"
    if below is not None and value >= below:
        return f"must be less than {below}, got {value}"
    return None


def ranged(kind: type, name: str, minimum: float | None = None, below: float | None = None, even: bool = False):
    """An argparse ``type`` reading a ``kind`` (int or float) in the range; ``name``: the flag's, for
    the message. Task programs use it for their own numeric flags too."""
    def parse(text: str):
        value = kind(text)
        problem = out_of_range(value, minimum, below) or (f"must be even, got {value}" if even and value % 2 else None)
        if problem:
            raise argparse.ArgumentTypeError(f"--{name.lstrip('-')} {problem}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def add_trainer_args(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """Add the trainer's flags (all, or the fields named in ``only``) to ``parser``, in a group of their own;
    defaults are TrainerArgs' (tasks override them with ``parser.set_defaults``)."""
    group = parser.add_argument_group("trainer (Hugging Face TrainingArguments names accepted as aliases)")
    for f in flag_fields():
        if only is not None and f.name not in only:
            continue
        meta, names = f.metadata, (f"--{f.name}", *f.metadata["aliases"])
        if f.type == "bool":
            group.add_argument(*names, action=_Given, nargs=0, const=True, default=f.default, help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(f.type, str)  # (annotations are strings here)
        group.add_argument(*names, action=_Given, type=ranged(kind, f.name, meta["minimum"], meta["below"]),
                           default=f.default, choices=meta["choices"],
                           metavar=f.name.upper() if meta["choices"] is None else None, help=meta["help"])
        for const_flag, value in meta["consts"].items():
            group.add_argument(const_flag, dest=f.name, action=_Given, nargs=0, const=value, default=argparse.SUPPRESS,
                               help=f"same as --{f.name} {value}")
    return parser
