"""The blocked band attention on CPU, in chunks of query blocks, storing no gathered keys.

Autograd through SDPA keeps every block's gathered keys/values (3x K and V) and, with dropout,
the (N x span) probabilities and dropout mask of every block for backward. Here forward and
backward walk over chunks of query blocks, gathering each chunk's queries and keys straight from
the (B, N, H, D) tensors, and keep only q, k, v, the output and the log-sum-exp: peak memory is a
few (N x C) tensors plus one chunk's scores.

Without dropout each chunk is one call of torch's CPU flash kernel (forward and backward). That
kernel has no dropout, so with dropout each chunk is computed by `_chunk_forward` /
`_chunk_backward`, one query block at a time, whose dropout mask is drawn from a generator seeded
with (seed + the block's number) and drawn again, identically, in backward (`dropout_keep`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocks import Blocks, key_offsets

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
CHUNK_TOKENS = 256  # query tokens per chunk: bounds the gathered keys
DROPOUT_BLOCK = 128  # default query block with attention dropout (see blocked.blocked_band)


# ---- masks ------------------------------------------------------------------------------------
def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool (B, n, 1, b, K) -> additive (B * n, 1, b, K) of the query's dtype (the kernel's rule)."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf")).flatten(0, 1)


class ChunkBias:
    """The additive masks of the CPU chunked path, built once per batch and window (shared by the
    layers). Most blocks have the same mask, the interior one: the band, every key real and not
    global, every global column used. Chunks made only of such blocks get one (1, 1, b, K) bias
    broadcast over their blocks instead of a (blocks, 1, b, K) one built, filled and read per call.
    """

    def __init__(self, mask: Tensor, window: int, b: int, halo: int):
        B, n_blocks, _, _, K = mask.shape  # mask: (B, n_blocks, 1, b, K) bool
        interior = key_offsets(b, halo, mask.device).abs() <= window // 2
        interior = torch.cat([interior, interior.new_ones(b, K - interior.shape[1])], dim=1)  # + global columns
        self.mask, self.interior = mask, interior.view(1, 1, b, K)
        self.plain = (mask == self.interior).flatten(2).all(-1).all(0).tolist()  # per block, all examples
        self._interior_bias = {}

    def __call__(self, i0: int, i1: int, dtype: torch.dtype) -> Tensor:
        """Additive mask of query blocks [i0, i1): (B * (i1 - i0), 1, b, K)."""
        B, _, _, b, K = self.mask.shape
        if all(self.plain[i0:i1]):
            if dtype not in self._interior_bias:
                self._interior_bias[dtype] = _additive(self.interior[None], dtype)
            return self._interior_bias[dtype].expand(B * (i1 - i0), 1, b, K)
        return _additive(self.mask[:, i0:i1], dtype)


def _chunks(n_blocks: int, b: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[(first block, end block)] of the chunks of about chunk_tokens queries each."""
    step = max(1, chunk_tokens // b)
    return [(i, min(i + step, n_blocks)) for i in range(0, n_blocks, step)]


# ---- attention dropout, one query block at a time -----------------------------------------------
def dropout_keep(shape: torch.Size, p: float, seed: int) -> tuple[Tensor, float]:
    """(fp32 0/1 mask of the kept attention probabilities, 1 / keep probability) for one block, a
    pure function of (shape, p, seed) so that backward redraws exactly the forward's mask. An
    element is kept when a uniform 16-bit integer is >= round(p * 2^16) (p quantised to 1/65536).
    Measured on CPU: one 64-bit draw makes four decisions (torch.bernoulli_ makes one) and integer
    clamping beats comparison + masked_fill 2.5x; the random draws are still most of the cost."""
    dropped = round(p * 65536)  # of the 65536 values of a 16-bit draw
    if not 0 <= dropped < 65536:
        raise ValueError(f"attention dropout probability {p} must be in [0, 1)")
    if dropped == 0:
        return torch.ones(shape), 1.0
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    # from=-2^63 with no upper bound draws all 64 bits (the default range leaves the sign bit 0)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-2**63, None, generator=generator)
    bits = words.view(torch.int16)[:numel].view(shape)  # uniform in [-2^15, 2^15)
    threshold = dropped - 32768  # keep where bits >= threshold: 65536 - dropped values
    keep = bits.clamp(threshold - 1, threshold).sub_(threshold - 1)  # 0 or 1, no int16 overflow
    return keep.float(), 65536 / (65536 - dropped)


def _per_block(fn):
    """Run a chunk's dropout maths one query block at a time, block m of the chunk seeded with
    seed + m: one block's scores stay in cache (12 heads x 128 x 641 fp32 runs 1.6x faster than a
    chunk of 256-query blocks). Inputs are (M, ...) over the chunk's M blocks; the maths is fp32
    (bf16 inputs too: most CPUs have no native bf16 matmul); callers cast the results back."""
    def run(*args, p: float, seed: int) -> list[Tensor]:
        pieces = [fn(*(x[m: m + 1].float() for x in args), p=p, seed=seed + m) for m in range(args[0].shape[0])]
        return [torch.cat(parts) for parts in zip(*pieces)]
    return run


def _probs(q: Tensor, k: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + bias): (1, H, b, K). torch.softmax is one vectorised pass; an exp
    of the masked (-inf) scores on its own runs 3x slower on CPU, so backward recomputes this too."""
    return torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).add_(bias).softmax(dim=-1)


@_per_block
def _chunk_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, p: float, seed: int):
    """Attention with dropout on the probabilities: q (1, H, b, D), k/v (1, H, K, D), bias (1, 1, b, K).
    Returns the output (1, H, b, D)."""
    probs = _probs(q, k, bias)
    keep, scale = dropout_keep(probs.shape, p, seed)
    return (torch.matmul(probs.mul_(keep), v).mul_(scale),)


@_per_block
def _chunk_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, bias: Tensor,
                    p: float, seed: int):
    """Gradients of `_chunk_forward`, its probabilities P recomputed. With Z = keep * scale the
    dropout multipliers and O = (P Z) V:
        dV = (P Z)^T dO,   dS = P (Z dO V^T - rowsum(dO * O)),   dQ = dS K / sqrt(D),   dK = dS^T Q / sqrt(D)."""
    probs = _probs(q, k, bias)  # (1, H, b, K)
    keep, scale = dropout_keep(probs.shape, p, seed)
    row_dot = (grad_out * out).sum(dim=-1, keepdim=True)  # = rowsum(P * Z dO V^T)
    grad_out = grad_out * scale
    # dV and dK as transposes of (D x K) products: 1.5x faster on CPU than a transposed (K x b) operand
    grad_v = torch.matmul(grad_out.transpose(-1, -2), probs * keep).transpose(-1, -2)
    grad_scores = torch.matmul(grad_out, v.transpose(-1, -2)).mul_(keep).sub_(row_dot).mul_(probs)
    scale_qk = q.shape[-1] ** -0.5
    grad_q = torch.matmul(grad_scores, k).mul_(scale_qk)
    grad_k = torch.matmul(q.transpose(-1, -2), grad_scores).mul_(scale_qk).transpose(-1, -2)
    return grad_q, grad_k, grad_v


# ---- the autograd function --------------------------------------------------------------------
class CpuChunkedBandAttention(torch.autograd.Function):
    """q, k, v (B, N, H, D) -> the band attention output (B, N, H, D), chunk by chunk (see the
    module docstring). `bias` gives each chunk's additive mask, `blocks` the geometry."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: ChunkBias, blocks: Blocks,
                dropout_p: float, seed: int, chunk_tokens: int) -> Tensor:
        B, H, b, n = blocks.B, blocks.H, blocks.b, blocks.n_blocks
        k_global, v_global = blocks.global_rows(k), blocks.global_rows(v)
        out = torch.empty_like(q)
        lse = None if dropout_p else q.new_empty(B, n, H, b, dtype=torch.float32)  # the flash backward's
        for i0, i1 in _chunks(n, b, chunk_tokens):
            qc, kc, vc = (blocks.chunk_queries(q, i0, i1), blocks.chunk_keys(k, k_global, i0, i1),
                          blocks.chunk_keys(v, v_global, i0, i1))
            chunk_bias = bias(i0, i1, q.dtype)
            if dropout_p:  # the chunk's blocks get seeds seed + B * i0 + [0, B * (i1 - i0)): distinct
                (o,) = _chunk_forward(qc, kc, vc, chunk_bias, p=dropout_p, seed=seed + B * i0)
                o = o.to(q.dtype)
            else:
                o, l = _flash_cpu(qc, kc, vc, 0.0, False, attn_mask=chunk_bias)
                lse[:, i0:i1] = l.view(B, i1 - i0, H, b)
            blocks.write_rows(out, o, i0, i1)
        ctx.blocks, ctx.bias, ctx.dropout_p, ctx.seed, ctx.chunk_tokens = blocks, bias, dropout_p, seed, chunk_tokens
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        blocks = ctx.blocks
        B, H, b, D = blocks.B, blocks.H, blocks.b, blocks.D
        k_global, v_global = blocks.global_rows(k), blocks.global_rows(v)
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k, grad_v = (q.new_zeros(B, blocks.N + 2 * blocks.halo + b, H, D) for _ in range(2))
        grad_kg, grad_vg = torch.zeros_like(k_global), torch.zeros_like(v_global)
        for i0, i1 in _chunks(blocks.n_blocks, b, ctx.chunk_tokens):
            args = (blocks.chunk_queries(grad_out, i0, i1), blocks.chunk_queries(q, i0, i1),
                    blocks.chunk_keys(k, k_global, i0, i1), blocks.chunk_keys(v, v_global, i0, i1),
                    blocks.chunk_queries(out, i0, i1))
            bias = ctx.bias(i0, i1, q.dtype)
            if ctx.dropout_p:
                dq, dk, dv = (g.to(q.dtype) for g in _chunk_backward(*args, bias, p=ctx.dropout_p,
                                                                       seed=ctx.seed + B * i0))
            else:
                dq, dk, dv = _flash_cpu_backward(*args, lse[:, i0:i1].flatten(0, 1), 0.0, False, attn_mask=bias)
            blocks.write_rows(grad_q, dq, i0, i1)
            blocks.add_key_grad(grad_k, grad_kg, dk.view(B, i1 - i0, H, -1, D), i0, i1)
            blocks.add_key_grad(grad_v, grad_vg, dv.view(B, i1 - i0, H, -1, D), i0, i1)
        return (grad_q, blocks.key_grad_to_tokens(grad_k, grad_kg),
                blocks.key_grad_to_tokens(grad_v, grad_vg), None, None, None, None, None)
