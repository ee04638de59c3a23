"""Evaluation over the ranks, and which validation was the best.

``evaluate(forward, dataset, batch_size, ...) -> {metric: value}``: every sample once, split over the
ranks (rank r holds dataset[r::world]); all ranks run the same number of forwards (ZeRO-3 gathers
weights in each: a rank with fewer batches repeats one and does not count it). Metrics:

* ``loss``: the sample-weighted mean of the model's batch losses (when it returns one), unless
  ``reduce_metrics`` returns its own ``loss``: a task whose loss averages over tokens gives it from
  additive statistics (pretrain: the masked tokens' NLL sum and count), so a batch that scores no
  token (whose mean loss is NaN) does not make the validation loss NaN;
* ``compute_metrics(outputs, batch) -> {name: additive statistic}`` (sums over the batch, e.g.
  ``{"correct": 7, "nll": 52.1}``), summed over batches and ranks; ``reduce_metrics(totals)`` turns the
  totals (plus ``"samples"``) into metrics, e.g. bits per character; without it each total is divided
  by the number of samples.

``forward(batch) -> outputs`` is whatever runs the model: the DeepSpeed engine (Trainer.evaluate) or
a plain model on a device (pretrain's step-0 report on the short model).

Under sequence parallelism the ranks of a group run the same batches (``shard``: this replica's
data-parallel rank and their number) and their outputs (losses, logits from gathered rows) are the
same: one rank per group counts them (``counted``).

``BestTracker(metric, mode)``: ``update(metrics, step) -> bool`` says whether a validation beats
every earlier one (best_model/ is then exported; the Trainer does that).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from .batches import batch_size as samples_in
from .distributed import reduce_across_ranks
from .errors import UserError


def evaluate(forward: Callable[[Mapping], Any], dataset: Dataset, batch_size: int, collate_fn: Callable | None = None,
             num_workers: int = 0, compute_metrics: Callable[[Any, Mapping], Mapping[str, float]] | None = None,
             reduce_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
             shard: tuple[int, int] | None = None, counted: bool = True) -> dict[str, float]:
    """Metrics over ``dataset`` (see the module docstring). Collective: every rank calls it.
    shard: (index, number) of this rank's share of the data (default: its rank among all ranks)."""
    sums: dict[str, float] = {"samples": 0.0, "loss_sum": 0.0, "loss_samples": 0.0}
    with torch.no_grad():
        for batch, keep in _shard_batches(dataset, batch_size, collate_fn, num_workers, shard):
            keep = keep if counted else 0
            outputs = forward(batch)
            n = samples_in(batch) * keep
            stats = {"samples": n}
            if outputs.loss is not None:
                stats.update(loss_sum=outputs.loss.item() * n, loss_samples=n)
            if compute_metrics is not None:
                stats.update({k: float(v) * keep for k, v in compute_metrics(outputs, batch).items()})
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
    keys = sorted(sums)
    reduced = reduce_across_ranks(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    totals = dict(zip(keys, reduced.tolist()))
    metrics = {"loss": totals["loss_sum"] / totals["loss_samples"]} if totals["loss_samples"] else {}
    task = {k: v for k, v in totals.items() if k not in ("loss_sum", "loss_samples")}
    if reduce_metrics is not None:
        metrics.update(reduce_metrics(task))
    else:
        metrics.update({k: v / totals["samples"] for k, v in task.items() if k != "samples"})
    return metrics


def _shard_batches(dataset: Dataset, batch_size: int, collate_fn, num_workers: int,
                   shard: tuple[int, int] | None = None) -> Iterator[tuple[dict, int]]:
    """(batch, keep) pairs of this rank's shard; keep=0 marks the repeats that even out the ranks."""
    rank, world = shard or (dist.get_rank(), dist.get_world_size())
    shard = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, shard or [0]), batch_size, collate_fn=collate_fn, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    real = len(loader) if shard else 0
    most = reduce_across_ranks(torch.tensor([real]), op=dist.ReduceOp.MAX)
    batch = None
    for i, batch in enumerate(loader):
        if i == real:
            break
        yield batch, 1
    for _ in range(most.item() - real):
        yield batch, 0


class BestTracker:
    """The best value of one validation metric so far, and its step."""

    def __init__(self, metric: str, mode: str, value: float | None = None, step: int | None = None):
        # "val/loss" (our TensorBoard tag) and "eval_loss" (transformers' name) both mean "loss"
        self.metric = metric.removeprefix("val/").removeprefix("eval_")
        self.mode, self.value, self.step = mode, value, step

    def check(self, names) -> None:
        """The metric must be one of ``names`` (those the validation reports)."""
        if self.metric not in names:
            raise UserError(f"--best_metric {self.metric!r} is not a validation metric of this task; it reports "
                            f"{', '.join(sorted(names))}")

    def update(self, metrics: Mapping[str, float], step: int) -> bool:
        """Record a validation; True when it is the best so far (a NaN never is)."""
        self.check(metrics)
        value = metrics[self.metric]
        better = self.value is None or (value < self.value if self.mode == "min" else value > self.value)
        if better and math.isfinite(value):
            self.value, self.step = value, step
            return True
        return False
