"""What can be checked before any data or model is read: the task programs call ``preflight`` right
after parsing their flags, so a mistake there stops the run in a second, not after tokenising.

``preflight(args, metrics=None) -> args``: the run folder can be written; the DeepSpeed config
loads and fits the flags, the precision and the device (ds_config.resolve); ``--resume`` names a
sound checkpoint this world size can load (checkpointing.Checkpointer.find: ``latest`` becomes the
folder it picked, so the Trainer does not pick, nor warn, again); ``--best_metric`` is one of
``metrics``, the names the task's validation reports. Each raises a UserError naming the flag or
file. The Trainer runs the same checks again (for code that builds one without preflight).

``check_training_set(samples, args, world_size)``: one optimizer step's worth of samples at least
(the Trainer calls it; a task that knows its number of samples before tokenising calls it then).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable

from . import ds_config
from .args import TrainerArgs
from .checkpointing import Checkpointer
from .distributed import find_launch
from .errors import UserError
from .evaluation import BestTracker
from .files import writable_folder


def preflight(args: TrainerArgs, metrics: Iterable[str] | None = None) -> TrainerArgs:
    """See the module docstring; returns ``args`` with ``resume`` resolved to a folder (or None)."""
    from deepspeed.accelerator import get_accelerator

    launch = find_launch()
    run_dir = Path(args.default_root_dir) / args.project_name
    writable_folder(run_dir, "--default_root_dir")
    quiet = logging.getLogger(ds_config.__name__)
    quiet.disabled = True  # its notes (values taken from the file or a flag) come when the Trainer resolves it
    try:
        ds_config.resolve(args, launch.world_size, get_accelerator().device_name() == "cpu", run_dir)
    finally:
        quiet.disabled = False
    point = Checkpointer(run_dir, launch.rank, launch.world_size, args.keep_last_k).find(args.resume)
    if metrics is not None:
        BestTracker(args.best_metric, args.best_mode).check(metrics)
    return dataclasses.replace(args, resume=None if point is None else str(point.load_dir / point.tag))


def check_training_set(samples: int, args: TrainerArgs, world_size: int) -> None:
    per_rank = -(-samples // world_size)  # (DistributedSampler gives every rank as many, repeating a few)
    if per_rank < args.batch_size * args.gradient_accumulation_steps:
        raise UserError(f"the training set ({samples} samples) is smaller than one optimizer step ({world_size} ranks "
                        f"x --batch_size {args.batch_size} x --gradient_accumulation_steps "
                        f"{args.gradient_accumulation_steps}): lower them, or give more data")
