"""Sequence parallelism in the engine: which ranks share a sequence, which share the data, and the
DeepSpeed config rules that keep the gradients right.

``--sequence_parallel_size P`` (or the DeepSpeed config's ``sequence_parallel_size``): the W ranks
are W / P data-parallel replicas of P ranks each; ranks [i P, (i + 1) P) form sequence-parallel
group i (DeepSpeed's ``parallel_state_sp``: consecutive ranks, so a group stays within a node while
P <= GPUs per node) and hold every sequence of the same batches between them, N / P tokens each
(the model's side: ds_longformer/sequence_parallel.py). Hence:

* data: the sampler, the seeds and the loader use the data-parallel rank ``rank // P`` among
  ``W / P`` (``Parallelism.data_rank``/``data_world_size``): the ranks of a group load the same
  batches and draw the same numbers (MLM masks, the heads' dropout). ``check_same_batch`` (the
  Trainer calls it on each epoch's first batch) stops a run whose group got different batches (it
  would train on nonsense without a word);
* gradients: DeepSpeed gets ``parallel_state_sp`` as its mpu. With it ZeRO 0-2 sum a gradient
  over the group and average it over the replicas: the one-device gradient, each rank's loss
  being its share. ZeRO shards over all W ranks; a global batch is micro x accumulation x W / P;
* ZeRO-3 reduce-scatters gradients averaged over all W ranks -- 1/P too small; with
  ``"reduce_scatter": false`` it averages over the replicas, for gradients that fit one bucket
  (every parameter <= ``reduce_bucket_size``). ``prepare_ds_config`` sets both where the config
  leaves them open (absent or "auto") and refuses a config that fixes them otherwise;
* ``data_parallel_size`` next to ``sequence_parallel_size`` makes DeepSpeed build a device mesh
  whose gradient reduction leaves the group out (each rank keeps its partial gradient): refused;
* counting: every rank of a group reports the batch's loss; its tokens, samples and FLOPs are
  counted once per group (``counts_data``);
* checkpoints record P: a resume with the same world size and P is exact (every rank's RNG is
  restored); with another P the ranks' RNG is re-seeded per replica.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import torch
import torch.distributed as dist

from .errors import UserError

logger = logging.getLogger(__name__)


def data_parallel_size(world_size: int, sequence_parallel_size: int) -> int:
    """W / P replicas; a UserError when P does not divide the world size."""
    if world_size % sequence_parallel_size:
        raise UserError(f"--sequence_parallel_size {sequence_parallel_size} does not divide the {world_size} ranks "
                        "of this run: the ranks form groups of that many (launch a multiple of it)")
    return world_size // sequence_parallel_size


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """This rank's place: rank ``rank`` of ``world_size``, in sequence-parallel groups of ``sequence_parallel_size``."""

    rank: int
    world_size: int
    sequence_parallel_size: int = 1
    group: object = None  # this rank's sequence-parallel process group (None: no sequence parallelism)

    @property
    def data_rank(self) -> int:  # which replica: the rank the data and the seeds follow
        return self.rank // self.sequence_parallel_size

    @property
    def data_world_size(self) -> int:
        return self.world_size // self.sequence_parallel_size

    @property
    def counts_data(self) -> bool:
        """Whether this rank counts its batches (tokens, samples, FLOPs, evaluation statistics):
        one rank per group, the group's first."""
        return self.rank % self.sequence_parallel_size == 0

    @property
    def mpu(self):
        """What deepspeed.initialize takes as mpu: DeepSpeed's sequence-parallel groups, or None."""
        if self.sequence_parallel_size == 1:
            return None
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        return parallel_state_sp


def setup(rank: int, world_size: int, sequence_parallel_size: int) -> Parallelism:
    """The groups of sequence_parallel_size consecutive ranks (DeepSpeed's parallel_state_sp, built
    once per process); collective. P = 1: nothing to build."""
    data_parallel_size(world_size, sequence_parallel_size)
    if sequence_parallel_size == 1:
        return Parallelism(rank, world_size)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:
        parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size)
    elif parallel_state_sp.get_sequence_parallel_world_size() != sequence_parallel_size:
        raise UserError(f"--sequence_parallel_size {sequence_parallel_size}: this process already has sequence-parallel "
                        f"groups of {parallel_state_sp.get_sequence_parallel_world_size()} ranks")
    return Parallelism(rank, world_size, sequence_parallel_size, parallel_state_sp.get_sequence_parallel_group())


def attach(model: torch.nn.Module, parallelism: Parallelism) -> None:
    """Give the model its sequence-parallel group (the model's checks become UserErrors)."""
    if parallelism.sequence_parallel_size == 1:
        return
    if not hasattr(model, "set_sequence_parallel"):
        raise UserError(f"--sequence_parallel_size {parallelism.sequence_parallel_size}: {type(model).__name__} has "
                        "no sequence-parallel support (set_sequence_parallel)")
    try:
        model.set_sequence_parallel(parallelism.group)
    except ValueError as err:
        raise UserError(f"--sequence_parallel_size {parallelism.sequence_parallel_size}: {err}") from None


def prepare_ds_config(config: dict, model: torch.nn.Module, sequence_parallel_size: int) -> dict:
    """The DeepSpeed config rules of sequence parallelism (see the module docstring), before
    ds_config.finalize: ZeRO-3 without reduce-scatter and with a bucket that holds the largest
    parameter; no data_parallel_size."""
    if sequence_parallel_size == 1:
        return config
    if "data_parallel_size" in config:
        raise UserError(f"DeepSpeed config data_parallel_size={config['data_parallel_size']!r} with sequence "
                        "parallelism: remove it (the replicas are the ranks / --sequence_parallel_size; with both "
                        "keys DeepSpeed's mesh would not sum the gradients over each sequence's ranks)")
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") != 3:
        return config
    if zero.get("reduce_scatter", "auto") not in ("auto", False):
        raise UserError("DeepSpeed config zero_optimization.reduce_scatter=true with sequence parallelism: ZeRO-3's "
                        "reduce-scatter divides the gradients by all ranks, 1/sequence_parallel_size too small; "
                        "set it to false (or leave it out)")
    zero["reduce_scatter"] = False
    largest = max((p.numel() for p in model.parameters()), default=0)  # (before deepspeed.initialize: whole)
    bucket = zero.get("reduce_bucket_size", "auto")
    if bucket == "auto":
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
        zero["reduce_bucket_size"] = max(hidden * hidden, largest)  # ds_config.finalize's rule, raised to fit
    elif bucket < largest:
        raise UserError(f"DeepSpeed config zero_optimization.reduce_bucket_size={bucket} is smaller than the largest "
                        f"parameter ({largest} elements): with sequence parallelism ZeRO-3 averages a larger "
                        "gradient over all ranks (1/sequence_parallel_size too small); raise it to at least "
                        f"{largest} (or \"auto\")")
    logger.info("sequence parallelism with ZeRO-3: reduce_scatter false, reduce_bucket_size %s",
                zero["reduce_bucket_size"])
    return config


def check_same_batch(batch: Mapping, parallelism: Parallelism) -> None:
    """Under sequence parallelism: stop if the ranks of this group got different batches (a
    fingerprint of its integer tensors, compared over the group). Collective within the group."""
    if parallelism.sequence_parallel_size == 1:
        return
    fingerprint = torch.zeros(2, dtype=torch.float64)
    for key in sorted(batch):
        value = batch[key]
        if torch.is_tensor(value) and not value.is_floating_point():
            weights = torch.arange(1, value.numel() + 1, dtype=torch.float64)
            fingerprint += torch.stack([(value.flatten().double() * weights).sum(), torch.tensor(value.numel())])
    from deepspeed.accelerator import get_accelerator

    both = torch.cat([fingerprint, -fingerprint]).to(get_accelerator().current_device_name())  # (NCCL: on the GPU)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=parallelism.group)
    if not torch.equal(both[:2], -both[2:]):  # the largest fingerprint is the smallest: all equal
        raise RuntimeError("the ranks of a sequence-parallel group got different batches: their data order, collation "
                           "randomness (e.g. MLM masks) or seeds differ; every rank of a group must load the same "
                           "batches (seed + data-parallel rank)")
