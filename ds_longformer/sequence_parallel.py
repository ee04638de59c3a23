"""Sequence parallelism (DeepSpeed's Ulysses), the model's side: P ranks hold one sequence between them.

Rank r of a sequence-parallel group of P ranks holds the tokens [r n, (r + 1) n) of every sequence
(n = N / P; the model first pads N up to a multiple of P with padding tokens, which change nothing
for the real ones). Every rank of the group receives the whole batch (ids and masks: a few bytes a
token), builds the full AttentionLayout and embeds only its own tokens (positions counted over the
whole sequence); LayerNorms, MLP and dropout run on its n tokens, so its activations are 1/P of
one device's. The attention needs more (attention/self_attention.py):

  * the band: DeepSpeed's DistributedAttention trades the (B, n, H, D) queries, keys and values
    of this rank's tokens for (B, N, H/P, D), all tokens of H/P heads (one all-to-all each), runs
    our band backend unchanged on them, and trades the output back;
  * the global rows: a softmax split over the ranks' keys (attention/global_rows.py).

What lives here: `SequenceParallel` (the group, this rank's tokens, the band over the group's
heads, one dropout stream per rank), collectives with autograd, and the two shares of a loss.

Gradients. With the engine's mpu DeepSpeed sums every parameter's gradient over the group (and
averages it over data-parallel replicas), so the backward of each rank must give its share of the
one-device gradient, and the loss it returns must be the one-device loss (for logging):
  * a loss over tokens (MLM): each rank's loss over its own tokens, weighted by its share of the
    scored tokens; `partial_loss` reports the group's total as the value;
  * a loss every rank computes alike from rows gathered across the group (classification, WikiHop:
    `gather_rows`, whose backward sends each row's gradient to the rank holding it):
    `replicated_loss` keeps the value and gives each rank 1/P of the gradient.

Dropout. Every rank of a group draws the same numbers from torch's default generator (the same
seed, the same draws: the batches, and the heads' dropout on gathered rows, must agree). Random
decisions about this rank's own tokens or heads must not: with one shared stream every shard
would drop the same elements and heads on different ranks the same attention entries. `own_rng`
runs the embeddings and the layers (when the model has dropout) on a generator of this rank's own,
seeded from one draw of the shared one: masks independent across ranks, the shared generator
advanced alike on every rank, and activation checkpointing (which stashes the generator's state
before each layer and restores it to recompute the layer) redraws the same masks.

Without sequence parallelism none of this runs: `LongformerModel.sequence_parallel` is None.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_MASK64 = 2**64 - 1


def _mix(seed: int, rank: int) -> int:
    """A 64-bit seed from (seed, rank), all bits depending on both (splitmix64's finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15 * (rank + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # (63 bits: every generator accepts it)


class SequenceParallel:
    """This rank's place in a sequence-parallel group (a torch.distributed process group of P
    ranks): `rank` holds tokens [rank n, (rank + 1) n) of each sequence padded to a multiple of P."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self._band_over_heads = {}  # band function -> DeepSpeed's DistributedAttention around it

    @classmethod
    def of(cls, group) -> "SequenceParallel | None":
        """The SequenceParallel of `group`; None for no group or a group of one rank."""
        if group is None or dist.get_world_size(group) == 1:
            return None
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def __repr__(self) -> str:
        return f"SequenceParallel(rank {self.rank} of {self.size})"

    # ---- this rank's tokens ---------------------------------------------------------------------
    def padded(self, n_tokens: int) -> int:
        """The length the model pads a sequence of n_tokens to: a multiple of P."""
        return math.ceil(n_tokens / self.size) * self.size

    def span(self, n_tokens: int) -> tuple[int, int]:
        """[lo, hi): this rank's tokens of a sequence of n_tokens (padded to a multiple of P)."""
        n = self.padded(n_tokens) // self.size
        return self.rank * n, (self.rank + 1) * n

    def pad(self, x: Tensor | None, fill) -> Tensor | None:
        """x (B, N, ...) padded along the tokens to a multiple of P with `fill` (x itself if it is one)."""
        if x is None or x.shape[1] % self.size == 0:
            return x
        extra = self.padded(x.shape[1]) - x.shape[1]
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra), value=fill)

    def local(self, x: Tensor | None, fill=0) -> Tensor | None:
        """This rank's tokens of x (B, N, ...), the whole sequence (padded with `fill` first)."""
        if x is None:
            return None
        lo, hi = self.span(x.shape[1])
        return self.pad(x, fill)[:, lo:hi]

    # ---- randomness -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def own_rng(self, device: torch.device):
        """Run the block on generators of this rank's own (CPU, and `device`'s), seeded from one
        draw of the shared default generator; the shared generators are then as after that draw."""
        seed = _mix(int(torch.randint(0, 2**62, ())), self.rank)
        if device.type == "cpu":
            accelerator, device_type = [], "cuda"  # (fork_rng's default type; no device listed)
        else:
            module = torch.get_device_module(device.type)
            accelerator = [device.index if device.index is not None else module.current_device()]
            device_type = device.type
        with torch.random.fork_rng(devices=accelerator, device_type=device_type):
            torch.default_generator.manual_seed(seed)
            if accelerator:
                torch.get_device_module(device.type).manual_seed(seed)  # the current device's generator
            yield

    # ---- the band over all tokens for this rank's heads -------------------------------------------
    def band_over_heads(self, band):
        """`band` (a backend: band(q, k, v, layout, window, dropout_p, block)) for q, k, v (B, n, H, D)
        of this rank's tokens: DeepSpeed's DistributedAttention trades them for (B, N, H/P, D), runs
        `band` on those with the full layout, and trades the output back to (B, n, H, D)."""
        if band not in self._band_over_heads:
            from deepspeed.sequence.layer import DistributedAttention

            _start_deepspeed_comm()
            self._band_over_heads[band] = DistributedAttention(band, self.group, scatter_idx=2, gather_idx=1)
        distributed = self._band_over_heads[band]
        return lambda q, k, v, *args: distributed(q, k, v, 0, None, *args)  # batch dim 0, no rotary embedding

    # ---- collectives ----------------------------------------------------------------------------
    def sum_over(self, x: Tensor) -> Tensor:
        """The sum of x over the group, on every rank; backward sums the gradients alike."""
        return _SumOverGroup.apply(x, self.group)

    def max_over(self, x: Tensor) -> Tensor:
        """The maximum of x over the group, without gradient (a softmax's shift)."""
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def gather_rows(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """hidden (B, n, C): this rank's tokens; positions (B, K): token positions in the whole
        sequence. Returns the rows (B, K, C), the same on every rank of the group; backward sends
        each row's gradient (summed over the ranks that used it) to the rank holding the token."""
        B, n, C = hidden.shape
        lo = self.rank * n
        mine = (positions >= lo) & (positions < lo + n)
        idx = (positions - lo).clamp(0, n - 1)[:, :, None].expand(B, positions.shape[1], C)
        return self.sum_over(hidden.gather(1, idx) * mine[:, :, None].to(hidden.dtype))

    # ---- the shares of a loss -------------------------------------------------------------------
    def partial_loss(self, partial: Tensor) -> Tensor:
        """Value: the sum of the ranks' `partial` losses (the one-device loss); gradient: this
        rank's own partial (DeepSpeed sums the parameter gradients over the group)."""
        return _TotalValueOwnGradient.apply(partial, self.group)

    def replicated_loss(self, loss: Tensor) -> Tensor:
        """A loss every rank of the group computes alike: the same value, 1/P of its gradient."""
        return _ScaledGradient.apply(loss, 1.0 / self.size)


def _start_deepspeed_comm() -> None:
    """DeepSpeed's collectives run on its own wrapper of torch.distributed: create it where the
    process group was started without DeepSpeed (without building its CPU shared-memory kernel)."""
    import deepspeed
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _TotalValueOwnGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ScaledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None
