"""The random number generators a run draws from: seeding, their state for exact resume, and the two
rules that keep a resumed run on the uninterrupted run's trajectory:

* ``untouched()``: measuring (the MFU's matmul probe, FLOP counting) runs inside it and leaves every
  generator as it found it, so a run measures or not and trains the same;
* ``seeded(seed)``: a batch's collation (e.g. MLM masking) draws from generators seeded for that
  batch alone (``batch_seed``), not from a stream that a DataLoader worker or the model's dropout
  also draws from: the masks of batch k are the same whichever worker makes them and wherever a run
  was resumed.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(cuda: bool = True) -> dict:
    """python, numpy, torch (and CUDA) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def untouched():
    """Run the block and restore every generator afterwards (python, numpy, torch, CUDA)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The seed of one training batch: a hash of the run's seed, the epoch, the rank and the
    batch's number in the epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with python's, numpy's and torch's CPU generators seeded from ``seed``, then
    give them back their states (CUDA's generators are not touched: collation runs on the CPU)."""
    saved = rng_state(cuda=False)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        set_rng_state(saved)
