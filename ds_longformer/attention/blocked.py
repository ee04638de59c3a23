"""Backend "blocked": query blocks against their own and neighbouring key blocks (see blocks.py).

On CPU (fp32, bf16) the blocks are walked in chunks by CpuChunkedBandAttention (torch's CPU flash
kernel; with attention dropout, matmul + softmax per block with a re-drawable dropout mask),
storing no gathered keys. Elsewhere (CUDA, other dtypes) every block is one batched
`scaled_dot_product_attention` call over keys gathered by NeighbourBlocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import Blocks, block_geometry, blocked_mask
from .cpu_chunked import CHUNK_TOKENS, DROPOUT_BLOCK, ChunkBias, CpuChunkedBandAttention
from .layout import AttentionLayout


class NeighbourBlocks(torch.autograd.Function):
    """x (B, N, H, D) -> keys of every query block (B, n_blocks, H, span + G, D), with a
    hand-written backward (one gradient buffer and a few adds)."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: Blocks) -> Tensor:
        ctx.blocks = blocks
        return blocks.keys(blocks.pad(x, blocks.halo), blocks.global_rows(x), 0, blocks.n_blocks)

    @staticmethod
    def backward(ctx, grad: Tensor):
        k = ctx.blocks
        grad_tokens = grad.new_zeros(k.B, k.N + 2 * k.halo + k.b, k.H, k.D)
        grad_global = grad.new_zeros(k.B, k.H, k.global_idx.shape[1], k.D)
        k.add_key_grad(grad_tokens, grad_global, grad, 0, k.n_blocks)
        return k.key_grad_to_tokens(grad_tokens, grad_global), None


def blocked_band(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, window: int, dropout_p: float,
                 block: int | None = None, *, cpu_chunked: bool = True, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """q, k, v: (B, N, H, D) local projections -> (B, N, H, D).

    block: query block size (None: window/2; with dropout on CPU, min(window/2, DROPOUT_BLOCK)).
    cpu_chunked=False takes the SDPA path on CPU too, chunk_tokens sets the CPU chunk size (tests
    compare the two paths and use small chunks)."""
    B, N, H, D = q.shape
    cpu_chunked = cpu_chunked and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
    if cpu_chunked and dropout_p and block is None:
        # The dropout maths writes each block's scores to memory, unlike the flash kernel: blocks of
        # 128 queries keep them in cache and need fewer keys per query (641 against 769 for w = 256).
        block = min(window // 2, DROPOUT_BLOCK)
    w, b, halo, n_blocks = block_geometry(N, window, block)
    blocks = Blocks(B, N, H, D, b, halo, n_blocks, layout.global_idx)
    mask = layout.cached(("blocked", window, b), lambda: blocked_mask(layout, window, b))  # (B*n, 1, b, K)

    if cpu_chunked:
        bias = layout.cached(("chunk_bias", window, b),
                             lambda: ChunkBias(mask.view(B, n_blocks, 1, b, -1), window, b, halo))
        # The dropout seed comes from torch's default generator: torch.manual_seed reproduces it,
        # and activation checkpointing (which restores that generator) recomputes the same mask.
        seed = int(torch.randint(0, 2**62, ())) if dropout_p else 0
        return CpuChunkedBandAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, blocks,
                                             dropout_p, seed, chunk_tokens)

    # Elsewhere (CUDA; on CPU, dtypes other than fp32/bf16): SDPA with autograd over all blocks at once.
    q_blocks = blocks.pad(q).flatten(0, 1)  # (B * n_blocks, H, b, D)
    out = F.scaled_dot_product_attention(
        q_blocks, NeighbourBlocks.apply(k, blocks).flatten(0, 1), NeighbourBlocks.apply(v, blocks).flatten(0, 1),
        attn_mask=mask, dropout_p=dropout_p,
    )  # (B * n_blocks, H, b, D)
    return blocks.unpad(out.view(B, n_blocks, H, b, D))
