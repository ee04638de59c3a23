"""Shared test set-up."""

import os

import pytest

# Set by in-process training runs (the trainer's single-process rendezvous); a later test's child
# process must not inherit them and try to bind the same port.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def restore_distributed_env():
    saved = {k: os.environ.get(k) for k in DIST_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
