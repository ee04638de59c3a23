"""Logging for the programs: who prints what, once.

``setup_logging(level)`` (the task programs call it right after parsing their flags):

* rank 0 prints this package's messages from ``level`` up (default info: "resumed from ...", the
  MFU peak, config values replaced or used), every other library's warnings, and DeepSpeed's
  warnings (its info and debug lines with ``--log_level debug`` only);
* other ranks print errors only, plus the warnings logged with ``extra=EVERY_RANK`` (a problem of
  that rank alone): a warning that every rank meets is printed once, by rank 0. Their Python
  warnings, library progress bars and transformers/datasets chatter are off.

The rank is read from the launcher's environment (distributed.find_launch), so this works before
the process group exists, and before DeepSpeed is imported.
"""

from __future__ import annotations

import logging
import sys
import warnings

from .distributed import find_launch

EVERY_RANK = {"every_rank": True}  # logger.warning(..., extra=EVERY_RANK): printed by whichever rank meets it
_handler: logging.Handler | None = None


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _OnlyOwnProblems(logging.Filter):
    """Ranks > 0: errors, and warnings marked EVERY_RANK."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(record, "every_rank", False)


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def setup_logging(level: str = "info", rank: int | None = None) -> None:
    """Configure logging for this process (see the module docstring); calling it again replaces the set-up."""
    global _handler
    rank = find_launch().rank if rank is None else rank
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _Stderr()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    _handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if rank != 0:
        _handler.addFilter(_OnlyOwnProblems())
    root.addHandler(_handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors
    logging.getLogger("ds_longformer").setLevel(level.upper() if rank == 0 else logging.WARNING)

    # DeepSpeed logs through its own handler (stdout, no propagation), made at its import: a filter
    # on its logger works before and after that import.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for old in [f for f in deepspeed_logger.filters if isinstance(f, (_AtLeast, _OnlyOwnProblems))]:
        deepspeed_logger.removeFilter(old)
    if rank != 0:
        deepspeed_logger.addFilter(_OnlyOwnProblems())
    elif level == "debug":
        from deepspeed.utils.logging import set_log_level_from_string

        set_log_level_from_string("debug")
    else:
        deepspeed_logger.addFilter(_AtLeast(logging.WARNING))

    if rank != 0:
        warnings.filterwarnings("ignore")  # Python warnings: rank 0 shows them
        import datasets
        import transformers

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        transformers.logging.set_verbosity_error()
