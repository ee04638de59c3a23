"""The training DataLoader: this rank's share of each epoch in a seeded order, resumable mid-epoch,
and collation that draws from a generator seeded per batch.

``TrainingLoader(dataset, batch_size, collate_fn, num_workers, seed, rank, world_size)`` is a
DataLoader over ``ResumableDistributedSampler`` (DistributedSampler that can start after the
samples an interrupted run already used). Its batches are numbered within the epoch, and each
batch is read and collated inside ``rng.seeded(batch_seed(seed, epoch, rank, number))``: an MLM
collator's masks (any randomness of the dataset or the collate function) depend on the batch alone,
not on which DataLoader worker made it nor on what the model's dropout drew before, so a run resumed
mid-epoch, or run with another ``num_workers``, trains on the same batches as the uninterrupted run.
``start_epoch(epoch, skip)`` sets the epoch and the samples of it to skip (per rank).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from .rng import batch_seed, seeded


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `skip` indices (on resume),
    so the rest of the epoch sees exactly the data order of an uninterrupted run."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class _NumberedBatches(Sampler):
    """This epoch's full batches of the sampler's indices (the last partial one dropped), each with
    its seed: ``(seed, [index, ...])``."""

    def __init__(self, sampler: ResumableDistributedSampler, batch_size: int, seed: int, rank: int):
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank

    def __iter__(self):
        number = self.sampler.skip // self.batch_size  # batches of this epoch used before a resume
        indices = list(self.sampler)
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            yield batch_seed(self.seed, self.sampler.epoch, self.rank, number), indices[start:start + self.batch_size]
            number += 1

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class _SeededBatches(Dataset):
    """(seed, indices) -> the collated batch, its samples read and collated under ``seeded(seed)``."""

    def __init__(self, dataset: Dataset, collate_fn: Callable | None):
        self.dataset, self.collate_fn = dataset, collate_fn or default_collate

    def __getitem__(self, batch: tuple[int, list[int]]):
        seed, indices = batch
        with seeded(seed):
            return self.collate_fn([self.dataset[i] for i in indices])


def _as_is(batch):
    return batch


class TrainingLoader(DataLoader):
    """See the module docstring. ``len()`` is the batches left in the current epoch."""

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn: Callable | None, num_workers: int, seed: int,
                 rank: int, world_size: int, pin_memory: bool = False):
        self.epoch_sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
        # batch_size=None: each item of the sampler is a whole batch, made by _SeededBatches. The
        # generator (reseeded per epoch) gives the workers their base seed; without one, making an
        # iterator (at each epoch, and once more on resume) would draw from torch's global
        # generator, dropout's.
        super().__init__(_SeededBatches(dataset, collate_fn), batch_size=None,
                         sampler=_NumberedBatches(self.epoch_sampler, batch_size, seed, rank), collate_fn=_as_is,
                         num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator())

    def start_epoch(self, epoch: int, skip: int) -> None:
        """Continue with ``epoch``, after its first ``skip`` samples of this rank."""
        self.epoch_sampler.set_epoch(epoch)
        self.epoch_sampler.skip = skip
        self.generator.manual_seed(self.epoch_sampler.seed + 1_000_003 * epoch + self.epoch_sampler.rank)
