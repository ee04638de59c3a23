"""Backend "dense": full N x N scores with the band mask and an explicit fp32 softmax, O(N^2).
The reference the other backends are tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import AttentionLayout


def dense_mask(layout: AttentionLayout, window: int) -> Tensor:
    """(B, 1, N, N) bool: local band over non-global keys, plus every global key."""
    B, N = layout.valid.shape
    pos = torch.arange(N, device=layout.valid.device)
    in_band = (pos[:, None] - pos[None, :]).abs() <= window // 2
    band_keys = layout.valid & ~layout.is_global
    mask = (in_band[None] & band_keys[:, None, :]) | layout.is_global[:, None, :]
    mask = mask | ((~layout.valid)[:, :, None] & torch.eye(N, dtype=torch.bool, device=pos.device)[None])
    return mask[:, None]


def dense_band(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, window: int, dropout_p: float,
               block: int | None = None) -> Tensor:
    """q, k, v: (B, N, H, D) -> (B, N, H, D). `block` is ignored (the whole sequence is one block)."""
    mask = layout.cached(("dense", window), lambda: dense_mask(layout, window))
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, N, D)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return (probs @ v).transpose(1, 2)
