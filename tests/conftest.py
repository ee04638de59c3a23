"""Shared test set-up, and the engine's training runs that several test files read (session-scoped:
each runs once per test session, in subprocesses; see trainer_helpers)."""

import os

import pytest

from tests.trainer_helpers import finish, start, train

# Set by in-process training runs (the trainer's single-process rendezvous); a later test's child
# process must not inherit them and try to bind the same port.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
ZERO3_PARTITION_ALL = '{"zero_optimization": {"stage3_param_persistence_threshold": 0}}'


@pytest.fixture(autouse=True)
def restore_distributed_env():
    saved = {k: os.environ.get(k) for k in DIST_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def parallel_runs(tmp_path_factory):
    """4 steps over the same global batches of 2, validating on 7 samples (uneven shards) every 2:
    one process (batch 2; batch 1 x accumulation 2) and two ranks of batch 1 at ZeRO 0, 2, 3 (ZeRO-3
    partitions every parameter and runs with gradient checkpointing)."""
    root = tmp_path_factory.mktemp("parallel")
    common = ["--max_steps", "4", "--val_check_interval", "2", "--n_val", "7"]
    one_process = [start(root / "single", *common, "--batch_size", "2"),  # in parallel: one core each
                   start(root / "accumulate", *common, "--batch_size", "1", "--gradient_accumulation_steps", "2")]
    for proc in one_process:
        finish(proc)
    for stage in (0, 2, 3):
        checkpointing = ["--gradient_checkpointing"] if stage == 3 else []  # the hardest combination
        train(root / f"zero{stage}", *common, *checkpointing, "--batch_size", "1", "--deepspeed_config",
              f"zero{stage}", "--ds_override", ZERO3_PARTITION_ALL, nproc=2)
    return root


RESUME_FLAGS = ["--max_steps", "6", "--save_every_n_steps", "3", "--val_check_interval", "2", "--dropout", "0.1",
                "--batch_size", "1", "--gradient_accumulation_steps", "2", "--n_train", "10", "--peak_tflops", "0.5"]

# Two ranks as a new user trains: dropout on (hidden and attention, blocked backend), masks drawn
# in the collate function, accumulation, no --peak_tflops; 24 steps over 4 epochs of 6 steps, a
# checkpoint every step (keep 2), validation every 4. The resume and fault tests run these flags.
TWO_RANK_RESUME_FLAGS = ["--max_steps", "24", "--n_train", "24", "--batch_size", "1", "--gradient_accumulation_steps",
                         "2", "--dropout", "0.1", "--mask_in_collate", "--save_every_n_steps", "1",
                         "--val_check_interval", "4", "--keep_last_k", "2"]


@pytest.fixture(scope="session")
def resume_runs(tmp_path_factory):
    """Six steps straight; the same run killed while saving step 6 (after DeepSpeed wrote its
    files, before the checkpoint was complete); a new run resuming from what the killed one left.
    Dropout is on and an epoch is 5 steps, so RNG and data order both matter."""
    from tests.trainer_helpers import run_dir

    root = tmp_path_factory.mktemp("resume")
    straight = start(root / "straight", *RESUME_FLAGS)
    killed = finish(start(root / "killed", *RESUME_FLAGS, "--crash_during_save_at", "6"), check=False)
    finish(straight)
    resumed = train(root / "resumed", *RESUME_FLAGS, "--resume", str(run_dir(root / "killed") / "checkpoints"))
    return root, killed, resumed


@pytest.fixture(scope="session")
def two_rank_straight(tmp_path_factory):
    """TWO_RANK_RESUME_FLAGS uninterrupted at ZeRO-0 (the CPU default) and ZeRO-2, each logging its
    losses to <root>/zero<stage>/loss.log (trainer_helpers.loss_log)."""
    root = tmp_path_factory.mktemp("two_rank_straight")
    runs = [start(root / f"zero{stage}", *TWO_RANK_RESUME_FLAGS, "--deepspeed_config", f"zero{stage}", "--loss_log",
                  str(root / f"zero{stage}" / "loss.log"), nproc=2) for stage in (0, 2)]
    for run in runs:
        finish(run)
    return root


# Two ranks that every launcher must reproduce (test_launch, test_engine_distributed), also logging
# warnings on every rank (test_engine_log): --warn, and a config value replaced by a typed flag (the
# same clipping as the default, so the training is that of the default flags).
TWO_RANK_FLAGS = ["--max_steps", "3", "--batch_size", "1", "--warn", "--grad_clip", "1.0",
                  "--ds_override", '{"gradient_clipping": 2.0}']


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """(output folder, completed process) of TWO_RANK_FLAGS under torchrun, one node, two processes."""
    out = tmp_path_factory.mktemp("two_ranks")
    return out, train(out, *TWO_RANK_FLAGS, nproc=2)
