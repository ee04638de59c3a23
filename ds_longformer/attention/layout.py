"""AttentionLayout: which tokens of a batch are real and which are global, built once per batch.

Every mask a backend needs depends only on this and on the window, so the masks are built once
per batch and window (`cached`) and shared by every layer with that window. Under sequence
parallelism (ds_longformer/sequence_parallel.py) the layout still describes the whole sequence
(the band runs over all of it, for some of the heads) and also says which tokens this rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AttentionLayout:
    """Per-batch description of which tokens are real and which are global.

    valid:        (B, N) bool, True for real tokens.
    is_global:    (B, N) bool, True for real tokens with global attention.
    global_idx:   (B, G) long, position of each example's g-th global token (0 in unused slots).
    global_valid: (B, G) bool, False in the unused slots of examples with fewer global tokens.
    sequence_parallel: None, or this rank's SequenceParallel: it holds the tokens [lo, hi).
    """

    valid: Tensor
    is_global: Tensor
    global_idx: Tensor
    global_valid: Tensor
    has_padding: bool
    sequence_parallel: object | None = None  # a SequenceParallel
    lo: int = 0
    hi: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, attention_mask: Tensor, global_attention_mask: Tensor | None = None,
              sequence_parallel=None) -> "AttentionLayout":
        valid = attention_mask.bool()
        is_global = attention_mask == 2  # transformers' convention: 2 = a real token with global attention
        if global_attention_mask is not None:
            is_global = (is_global | global_attention_mask.bool()) & valid
        counts = is_global.sum(dim=1)  # (B,)
        G = int(counts.max()) if is_global.numel() else 0
        # Stable sort puts the global positions first, in order; the rest are unused slots.
        order = torch.sort((~is_global).to(torch.int8), dim=1, stable=True).indices[:, :G]
        global_valid = torch.arange(G, device=valid.device)[None, :] < counts[:, None]
        global_idx = torch.where(global_valid, order, torch.zeros_like(order))
        lo, hi = (0, valid.shape[1]) if sequence_parallel is None else sequence_parallel.span(valid.shape[1])
        return cls(valid, is_global, global_idx, global_valid, has_padding=not bool(valid.all()),
                   sequence_parallel=sequence_parallel, lo=lo, hi=hi)

    @property
    def num_global(self) -> int:
        return self.global_idx.shape[1]

    def local(self, x: Tensor) -> Tensor:
        """This rank's tokens of x (B, N, ...): x itself without sequence parallelism."""
        return x if self.sequence_parallel is None else x[:, self.lo:self.hi]

    def local_global_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """(example, slot, token) of each global token this rank holds: its slot in global_idx and
        its position among this rank's tokens. Found once per batch."""
        def find():
            batch, slot = self.global_valid.nonzero(as_tuple=True)
            token = self.global_idx[batch, slot]
            if self.sequence_parallel is not None:
                mine = (token >= self.lo) & (token < self.hi)
                batch, slot, token = batch[mine], slot[mine], token[mine] - self.lo
            return batch, slot, token
        return self.cached("local_global_rows", find)

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]
