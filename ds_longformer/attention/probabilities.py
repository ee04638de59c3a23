"""Attention probabilities for `output_attentions`, in transformers' Longformer layout.

Computed only when asked, from the projections (the softmax of the very scores every backend
uses, before attention dropout), so no backend stores or returns probabilities and the default
path pays nothing. Memory O(N * (window + G)), as the result itself.

  local (B, H, N, G + window + 1): query i's probabilities over the G global keys, then over the
      keys i - w .. i + w (w = window / 2; column G + w is the query itself). Keys outside the
      sequence, padding and global keys (seen through their own column) are 0 in the band; rows
      of padding and of global queries are 0 (the global rows are in `global_`).
  global_ (B, H, N, G): global query g's probabilities over every token (unused slots of examples
      with fewer global tokens: 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import AttentionLayout

CHUNK_QUERIES = 256  # queries per chunk of the local probabilities: bounds the (chunk x chunk + window) scores


def local_probabilities(q: Tensor, k: Tensor, layout: AttentionLayout, window: int,
                        chunk: int = CHUNK_QUERIES) -> Tensor:
    """q, k: (B, N, H, D) local projections -> (B, H, N, G + window + 1), `chunk` queries at a time."""
    B, N, H, D = q.shape
    w, G = window // 2, layout.num_global
    offsets = torch.arange(2 * w + 1, device=q.device)
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, 0, w, w))  # (B, w + N + w, H, D)
    band_key_ok = torch.nn.functional.pad(layout.valid & ~layout.is_global, (w, w), value=False)
    k_global = k.gather(1, layout.global_idx[:, :, None, None].expand(B, G, H, D))  # (B, G, H, D)
    probs = q.new_zeros(B, H, N, G + 2 * w + 1, dtype=torch.float32)
    for i0 in range(0, N, chunk):
        i1 = min(i0 + chunk, N)
        q_c = q[:, i0:i1] * D ** -0.5
        # the chunk's queries against its keys i0 - w .. i1 + w, then each row's 2w + 1 band columns
        scores = torch.einsum("bqhd,bkhd->bhqk", q_c, k_pad[:, i0: i1 + 2 * w]).float()
        band_idx = torch.arange(i1 - i0, device=q.device)[:, None] + offsets  # (n, 2w + 1)
        band = scores.gather(-1, band_idx.expand(B, H, -1, -1))
        band = band.masked_fill(~band_key_ok[:, i0:][:, band_idx][:, None], float("-inf"))
        to_global = torch.einsum("bqhd,bghd->bhqg", q_c, k_global).float()
        to_global = to_global.masked_fill(~layout.global_valid[:, None, None, :], float("-inf"))
        probs[:, :, i0:i1] = torch.cat([to_global, band], dim=-1).softmax(dim=-1)
    local_rows = (layout.valid & ~layout.is_global)[:, None, :, None]
    return probs.masked_fill(~local_rows, 0.0).to(q.dtype)


def global_probabilities(q_global: Tensor, k_global: Tensor, layout: AttentionLayout) -> Tensor:
    """q_global: (B, H, G, D) global queries, k_global: (B, H, N, D) -> (B, H, N, G)."""
    scores = (q_global @ k_global.transpose(-1, -2)).float() * q_global.shape[-1] ** -0.5  # (B, H, G, N)
    probs = scores.masked_fill(~layout.valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    probs = probs.masked_fill(~layout.global_valid[:, None, :, None], 0.0)
    return probs.transpose(2, 3).to(q_global.dtype)
