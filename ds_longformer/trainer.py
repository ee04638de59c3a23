"""The engine's former import path: it now lives in ds_longformer/engine/ (see its __init__)."""

from .engine import (  # noqa: F401
    Trainer,
    TrainerArgs,
    add_trainer_args,
    init_distributed,
    load_ds_config,
    reduce_across_ranks,
    seed_everything,
)
