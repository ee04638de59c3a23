"""Backend "flex": FlexAttention with a BlockMask built from the block structure.

A fused block-sparse kernel under torch.compile on CUDA; on CPU this torch has no flex backward,
so there it serves inference only, and it has no attention dropout (see backends.BACKENDS).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import AttentionLayout

FLEX_BLOCK = 128
_compiled_flex = None


def flex_mask_mod(layout: AttentionLayout, window: int, n_pad: int):
    """The element rule of the local part, for FlexAttention (positions up to n_pad)."""
    N = layout.valid.shape[1]
    valid = F.pad(layout.valid, (0, n_pad - N), value=False)
    is_global = F.pad(layout.is_global, (0, n_pad - N), value=False)
    w = window // 2

    def mask_mod(b, h, q_idx, kv_idx):
        band = ((q_idx - kv_idx).abs() <= w) & ~is_global[b, kv_idx]
        return (valid[b, kv_idx] & (band | is_global[b, kv_idx])) | (~valid[b, q_idx] & (q_idx == kv_idx))

    return mask_mod


def flex_tiles(layout: AttentionLayout, window: int) -> tuple[Tensor, Tensor]:
    """(partial, full): (B, 1, n_blocks, n_blocks) bool over FLEX_BLOCK x FLEX_BLOCK tiles, from the
    block structure alone (never the N x N mask: create_block_mask would build that, 16 GiB of
    int64 at N=32768). A tile is needed when it touches the band (with a real key), holds a global
    key, or is the diagonal tile of a padding row; it is full (the kernel skips mask_mod) when every
    pair in it is allowed: all within the band, every query and key real, no global key."""
    B, N = layout.valid.shape
    n_blocks = math.ceil(N / FLEX_BLOCK)
    pad = n_blocks * FLEX_BLOCK - N
    per_block = lambda x: F.pad(x, (0, pad), value=False).view(B, n_blocks, FLEX_BLOCK)  # noqa: E731
    valid, is_global = per_block(layout.valid), per_block(layout.is_global)
    w = window // 2
    index = torch.arange(n_blocks, device=layout.valid.device)
    apart = (index[:, None] - index[None, :]).abs()  # tile distance in blocks
    touches_band = (apart == 0) | ((apart - 1) * FLEX_BLOCK + 1 <= w)  # closest pair within w
    inside_band = (apart + 1) * FLEX_BLOCK - 1 <= w  # farthest pair within w
    key_real, key_global = valid.any(-1)[:, None, :], is_global.any(-1)[:, None, :]  # (B, 1, n_k)
    key_all_local = (valid & ~is_global).all(-1)[:, None, :]
    query_all_real, query_any_pad = valid.all(-1)[:, :, None], (~valid).any(-1)[:, :, None]  # (B, n_q, 1)
    needed = (touches_band & key_real) | key_global | (query_any_pad & (apart == 0))
    full = inside_band & key_all_local & query_all_real
    return (needed & ~full)[:, None], full[:, None]


def flex_block_mask(layout: AttentionLayout, window: int):
    from torch.nn.attention.flex_attention import BlockMask

    def ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:  # (count per query block, key blocks first)
        tiles = tiles.to(torch.int32)
        return tiles.sum(-1, dtype=torch.int32), torch.argsort(tiles, dim=-1, descending=True, stable=True).int()

    partial, full = flex_tiles(layout, window)
    n_pad = partial.shape[-1] * FLEX_BLOCK
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=flex_mask_mod(layout, window, n_pad), seq_lengths=(n_pad, n_pad))


def flex_band(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, window: int, dropout_p: float,
              block: int | None = None) -> Tensor:
    """q, k, v: (B, N, H, D) -> (B, N, H, D). `block` is ignored (the kernel's tiles are FLEX_BLOCK)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if dropout_p:
        raise ValueError("attention_backend='flex' has no attention dropout")
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(
            "attention_backend='flex' has no backward on CPU in this torch; train with 'blocked' "
            "(or run under torch.no_grad() for inference)"
        )
    B, N, H, D = q.shape
    block_mask = layout.cached(("flex", window), lambda: flex_block_mask(layout, window))
    n_pad = block_mask.shape[-2]
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, n_pad - N)).transpose(1, 2) for x in (q, k, v))
    attend = flex_attention
    if q.device.type == "cuda":  # the fused kernel needs torch.compile; eager flex is a dense fallback
        if _compiled_flex is None:
            # dynamic=None (automatic): one static kernel while every batch has the same shape; once
            # the batch size or padded length changes (padding to the longest document, the last
            # batch), one shape-generic kernel. dynamic=False would compile anew for each shape
            # until dynamo's cache limit, then fall back to the dense eager path.
            _compiled_flex = torch.compile(flex_attention, dynamic=None)
        attend = _compiled_flex
    out = attend(q, k, v, block_mask=block_mask)
    return out.transpose(1, 2)[:, :N]
