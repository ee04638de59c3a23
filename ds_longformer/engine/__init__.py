"""The DeepSpeed engine every task uses, in components (each module's docstring is its API):

    args.py           TrainerArgs: every setting once, the command-line flags made from it
    ds_config.py      the DeepSpeed config with its "auto" values filled (transformers' rules)
    distributed.py    ranks from the launcher's environment, the process group, small collectives
    log.py            who prints what: rank 0 at info, other ranks errors only, DeepSpeed at warning
    preflight.py      the checks a task runs right after parsing, before reading data or a model
    trainer.py        the train loop (Trainer), which calls the components below
    parallel.py       sequence parallelism: groups, data-parallel ranks, its DeepSpeed config rules
    checkpointing.py  save / prune / resume / roll-back / RNG, Hugging Face export
    evaluation.py     evaluation split over the ranks, best-model tracking
    loader.py         the training DataLoader: resumable mid-epoch, collation seeded per batch
    metrics.py        TensorBoard + metrics.jsonl (rank 0), progress bar, per-step measurements
    batches.py  rng.py  files.py  errors.py    small shared pieces (rng.py: the rules of exact resume)
"""

from .args import TrainerArgs, add_trainer_args
from .distributed import init_distributed, rank_zero_first, reduce_across_ranks
from .ds_config import CONFIG_DIR, load_ds_config
from .errors import DivergenceError, UserError
from .evaluation import evaluate
from .log import setup_logging
from .preflight import check_training_set, preflight
from .rng import seed_everything
from .trainer import Trainer

__all__ = ["CONFIG_DIR", "DivergenceError", "Trainer", "TrainerArgs", "UserError", "add_trainer_args",
           "check_training_set", "evaluate", "init_distributed", "load_ds_config", "preflight", "rank_zero_first",
           "reduce_across_ranks", "seed_everything", "setup_logging"]
