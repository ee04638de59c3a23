"""Longformer self-attention: a sliding window plus global attention.

Semantics (identical to Hugging Face `transformers`' LongformerSelfAttention):
  * w = attention_window // 2. A local (non-global) query i attends, with the local projections
    query/key/value, to every real key j with |i - j| <= w that is not global, plus every global key.
  * A global query attends to every real key, with its own projections query_global/key_global/
    value_global (the key/value projections of *all* tokens, the query projection of global rows only).
  * Padding rows (attention_mask == 0) output zeros.

Three interchangeable backends compute the local part (the global rows are always a small
(G x N) attention computed the same way):
  * "blocked": pure PyTorch. The sequence is cut into query blocks of `block` tokens; each block
    attends to its own and `ceil(w / block)` neighbouring key blocks on each side (gathered with
    shifted slices, an element mask keeps |i - j| <= w) plus the global keys. Each block is one
    `scaled_dot_product_attention` call batched over blocks, so time and memory are
    O(N * (window + block + G)): linear in sequence length and in window size. On CPU the same
    blocks are walked in chunks by CpuChunkedBandAttention (the CPU flash kernel; with attention
    dropout, matmul + softmax per block with a re-drawable dropout mask), storing no gathered keys.
  * "flex": FlexAttention with a BlockMask (fused kernel on CUDA under torch.compile; on CPU this
    torch has no backward, so it serves inference only).
  * "dense": full N x N scores with a band mask; the O(N^2) reference for tests.

Masks depend only on the batch's attention/global masks and on the window, so they are built once
per batch (AttentionLayout) and shared by every layer with that window.
Softmax always accumulates in fp32 (SDPA and FlexAttention kernels do; the dense path casts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionLayout:
    """Per-batch description of which tokens are real and which are global.

    valid:        (B, N) bool, True for real tokens.
    is_global:    (B, N) bool, True for real tokens with global attention.
    global_idx:   (B, G) long, position of each example's g-th global token (0 in unused slots).
    global_valid: (B, G) bool, False in the unused slots of examples with fewer global tokens.
    """

    valid: Tensor
    is_global: Tensor
    global_idx: Tensor
    global_valid: Tensor
    has_padding: bool
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, attention_mask: Tensor, global_attention_mask: Tensor | None = None) -> "AttentionLayout":
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
        return cls(valid, is_global, global_idx, global_valid, has_padding=not bool(valid.all()))

    @property
    def num_global(self) -> int:
        return self.global_idx.shape[1]

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


# ------------------------------------------------------------------------------------------
# Global rows: G global queries against all N keys, with the global projections.
# ------------------------------------------------------------------------------------------
def global_rows_attention(qg: Tensor, kg: Tensor, vg: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
    """qg: (B, H, G, D) global queries; kg, vg: (B, H, N, D). Returns (B, H, G, D)."""
    key_ok = layout.valid[:, None, None, :]  # (B, 1, 1, N); every global query has itself as key
    return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=key_ok, dropout_p=dropout_p)


class AbsorbedGlobalRows(torch.autograd.Function):
    """The global rows from the hidden states: query_global on the G global tokens only, and
    key_global/value_global folded into the G queries and outputs, O(H G N C) work instead of the
    O(N C^2) of projecting every token with them:

      score[g, n] = qg[g] . (Wk x[n] + bk) = (Wk^T qg[g]) . x[n] + const(g)   (const cancels in softmax)
      out[g]      = sum_n p[g, n] (Wv x[n] + bv) = Wv (sum_n p[g, n] x[n]) + (sum_n p[g, n]) bv

    A hand-written backward so that every path back to the hidden states (the score and context
    products and the gathered global rows) lands in one (B, N, C) gradient: autograd would make
    three N x C tensors and add them.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, w_q: Tensor, b_q: Tensor, w_k: Tensor, w_v: Tensor, b_v: Tensor,
                layout: AttentionLayout, num_heads: int, dropout_p: float) -> Tensor:
        # Under torch.autocast the maths runs in the autocast dtype, explicitly: backward runs
        # without autocast, so every saved tensor must already have the one dtype.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        ctx.input_dtypes = [t.dtype for t in (hidden, w_q, b_q, w_k, w_v, b_v)]
        with torch.autocast(device, enabled=False):
            return AbsorbedGlobalRows._forward(ctx, *(t.to(dtype) for t in (hidden, w_q, b_q, w_k, w_v, b_v)),
                                               layout, num_heads, dropout_p)

    @staticmethod
    def _forward(ctx, hidden, w_q, b_q, w_k, w_v, b_v, layout: AttentionLayout, num_heads: int, dropout_p: float):
        B, N, C = hidden.shape
        G, H = layout.num_global, num_heads
        D = C // H
        rows = layout.global_idx[:, :, None].expand(B, G, C)
        x_g = hidden.gather(1, rows)  # (B, G, C), the global tokens
        q_g = F.linear(x_g, w_q, b_q).view(B, G, H, D).transpose(1, 2)  # (B, H, G, D)
        q_in = torch.einsum("bhgd,hdc->bhgc", q_g, w_k.view(H, D, C)).reshape(B, H * G, C) * D ** -0.5
        scores = torch.matmul(q_in, hidden.transpose(1, 2)).float()  # (B, H G, N)
        probs = scores.masked_fill_(~layout.valid[:, None, :], float("-inf")).softmax(dim=-1)
        keep = torch.empty_like(probs).bernoulli_(1 - dropout_p).div_(1 - dropout_p) if dropout_p else None
        weights = (probs * keep if dropout_p else probs).to(hidden.dtype)  # what multiplies the values
        context = torch.matmul(weights, hidden)  # (B, H G, C)
        out = torch.einsum("bhgc,hdc->bhgd", context.view(B, H, G, C), w_v.view(H, D, C))
        out = out + weights.sum(-1).view(B, H, G, 1) * b_v.view(1, H, 1, D)
        ctx.save_for_backward(hidden, x_g, w_q, w_k, w_v, b_v, q_g, q_in, probs, keep, weights, context)
        ctx.layout, ctx.num_heads = layout, H
        return out  # (B, H, G, D)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, x_g, w_q, w_k, w_v, b_v, q_g, q_in, probs, keep, weights, context = ctx.saved_tensors
        grad_out = grad_out.to(hidden.dtype)
        B, N, C = hidden.shape
        H = ctx.num_heads
        G, D = q_g.shape[2], C // H
        grad_context = torch.einsum("bhgd,hdc->bhgc", grad_out, w_v.view(H, D, C)).reshape(B, H * G, C)
        grad_w_v = torch.einsum("bhgd,bhgc->hdc", grad_out, context.view(B, H, G, C)).reshape(C, C)
        grad_b_v = torch.einsum("bhgd,bhg->hd", grad_out, weights.sum(-1).view(B, H, G)).reshape(C)
        grad_weights = torch.matmul(grad_context, hidden.transpose(1, 2)).float()  # (B, H G, N)
        grad_weights += (grad_out * b_v.view(1, H, 1, D)).sum(-1).view(B, H * G, 1)
        grad_probs = grad_weights * keep if keep is not None else grad_weights
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
        grad_scores = grad_scores.to(hidden.dtype)
        grad_q_in = torch.matmul(grad_scores, hidden) * D ** -0.5  # (B, H G, C)
        # Both products with the hidden states in one matmul: (N, 2 H G) @ (2 H G, C).
        grad_hidden = torch.matmul(torch.cat([weights, grad_scores], 1).transpose(1, 2),
                                   torch.cat([grad_context, q_in], 1))
        grad_q_g = torch.einsum("bhgc,hdc->bhgd", grad_q_in.view(B, H, G, C), w_k.view(H, D, C))
        grad_w_k = torch.einsum("bhgd,bhgc->hdc", q_g, grad_q_in.view(B, H, G, C)).reshape(C, C)
        grad_q_g = grad_q_g.transpose(1, 2).reshape(B, G, C)  # gradient of query_global's output
        grad_w_q = torch.einsum("bgo,bgc->oc", grad_q_g, x_g)
        rows = ctx.layout.global_idx[:, :, None].expand(B, G, C)
        grad_hidden.scatter_add_(1, rows, torch.matmul(grad_q_g, w_q))  # unused slots carry zeros
        grads = (grad_hidden, grad_w_q, grad_q_g.sum((0, 1)), grad_w_k, grad_w_v, grad_b_v)
        return (*(g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes)), None, None, None)


# ------------------------------------------------------------------------------------------
# Local part, backend "blocked".
# ------------------------------------------------------------------------------------------
def _block_geometry(n: int, window: int, block: int | None):
    """(one-sided window w, query block b, halo of keys each side, number of blocks)."""
    w = window // 2
    if w >= n - 1:  # the window covers the whole sequence: one block, plain full attention
        return w, max(n, 1), 0, 1
    b = block or max(w, 1)
    halo = math.ceil(w / b) * b  # key tokens gathered on each side of a query block
    return w, b, halo, math.ceil(n / b)


def _key_offsets(b: int, halo: int, device) -> Tensor:
    """(b, 2 halo + b): key column c of any block sits (c - halo - r) tokens from its query row r."""
    return torch.arange(2 * halo + b, device=device)[None, :] - halo - torch.arange(b, device=device)[:, None]


def _blocked_mask(layout: AttentionLayout, window: int, block: int | None) -> Tensor:
    """(B * n_blocks, 1, b, 2 * halo + b + G) bool mask of the keys each query block may see."""
    B, N = layout.valid.shape
    w, b, halo, n_blocks = _block_geometry(N, window, block)
    n_pad = n_blocks * b
    span = 2 * halo + b
    device = layout.valid.device
    offset = _key_offsets(b, halo, device)
    in_band = offset.abs() <= w  # (b, span), the same for every block

    # Keys outside [0, N) are padding; global keys are attended through the global columns instead.
    key_ok = F.pad(layout.valid & ~layout.is_global, (halo, n_pad - N + halo), value=False)
    key_ok = key_ok.unfold(1, span, b)  # (B, n_blocks, span)
    mask = in_band & key_ok[:, :, None, :]  # (B, n_blocks, b, span)
    # Padding queries see only themselves, so no softmax row is empty (their output is zeroed later).
    q_pad = ~F.pad(layout.valid, (0, n_pad - N), value=False).view(B, n_blocks, b)
    mask = mask | (q_pad[..., None] & (offset == 0))
    if layout.num_global:
        global_cols = layout.global_valid[:, None, None, :].expand(B, n_blocks, b, layout.num_global)
        mask = torch.cat([mask, global_cols], dim=-1)
    return mask.view(B * n_blocks, 1, b, -1)


@dataclass
class _Blocks:
    """Geometry of one blocked attention call and the gather/scatter between tokens and blocks.

    Query block i holds tokens [i*b, (i+1)*b); it may see the key tokens [i*b - halo, (i+1)*b + halo)
    (zeros outside the sequence) followed by the G global tokens: `span + G` keys.
    """

    B: int
    N: int
    H: int
    D: int
    b: int
    halo: int
    n_blocks: int
    global_idx: Tensor  # (B, G)

    @property
    def parts(self) -> int:  # key blocks per query block
        return 2 * self.halo // self.b + 1

    def pad(self, x: Tensor, halo: int = 0) -> Tensor:
        """(B, N, H, D) -> (B, n_blocks + 2 halo / b, H, b, D), zero padded on both sides."""
        x_pad = x.new_zeros(self.B, self.n_blocks * self.b + 2 * halo, self.H, self.D)
        x_pad[:, halo: halo + self.N] = x
        return x_pad.view(self.B, -1, self.b, self.H, self.D).transpose(2, 3)

    def unpad(self, x_blocks: Tensor, halo: int = 0) -> Tensor:
        """Inverse of pad: (B, n, H, b, D) -> (B, N, H, D)."""
        return x_blocks.transpose(2, 3).reshape(self.B, -1, self.H, self.D)[:, halo: halo + self.N]

    def global_rows(self, x: Tensor) -> Tensor:  # (B, N, H, D) -> (B, H, G, D)
        idx = self.global_idx[:, :, None, None].expand(-1, -1, self.H, self.D)
        return x.gather(1, idx).transpose(1, 2)

    def keys(self, x_blocks: Tensor, x_global: Tensor, i0: int, i1: int) -> Tensor:
        """Keys of query blocks [i0, i1): (B, i1 - i0, H, span + G, D). torch.cat of shifted slices
        of one padded view copies each key once (unfold's autograd would zero-fill far more)."""
        parts = [x_blocks[:, i0 + j: i1 + j] for j in range(self.parts)]
        if x_global.shape[2]:
            parts.append(x_global[:, None].expand(-1, i1 - i0, -1, -1, -1))
        return torch.cat(parts, dim=3)

    def chunk_queries(self, x: Tensor, i0: int, i1: int) -> Tensor:
        """Rows of query blocks [i0, i1) of x (B, N, H, D): (B * (i1 - i0), H, b, D), zero padded."""
        rows = x[:, i0 * self.b: i1 * self.b]
        rows = _pad_tokens(rows, 0, (i1 - i0) * self.b - rows.shape[1])
        return rows.view(self.B, i1 - i0, self.b, self.H, self.D).transpose(2, 3).flatten(0, 1)

    def chunk_keys(self, x: Tensor, x_global: Tensor, i0: int, i1: int) -> Tensor:
        """Keys of query blocks [i0, i1) read from x (B, N, H, D): (B * (i1 - i0), H, span + G, D)."""
        lo, hi = i0 * self.b - self.halo, i1 * self.b + self.halo
        rows = x[:, max(lo, 0): min(hi, self.N)]
        rows = _pad_tokens(rows, max(0, -lo), hi - lo - rows.shape[1] - max(0, -lo))
        x_blocks = rows.view(self.B, -1, self.b, self.H, self.D).transpose(2, 3)
        return self.keys(x_blocks, x_global, 0, i1 - i0).flatten(0, 1)

    def write_rows(self, out: Tensor, rows: Tensor, i0: int, i1: int):
        """Write (B * (i1 - i0), H, b, D) block rows into out (B, N, H, D), dropping the padding."""
        m, b = i1 - i0, self.b
        rows = rows.view(self.B, m, self.H, b, self.D).transpose(2, 3)  # (B, m, b, H, D), not copied
        full = min(m, (self.N - i0 * b) // b)  # whole blocks: one transposing copy into out's view
        out[:, i0 * b: (i0 + full) * b].view(self.B, full, b, self.H, self.D).copy_(rows[:, :full])
        if full < m:  # the last block, cut at N
            end = self.N - (i0 + full) * b
            out[:, (i0 + full) * b:] = rows[:, full, :end]

    def add_key_grad(self, grad: Tensor, grad_global: Tensor, grad_keys: Tensor, i0: int, i1: int):
        """Accumulate the gradient of the keys of blocks [i0, i1) (B, i1 - i0, H, span + G, D) into
        grad (B, halo + N + halo + b, H, D), token-indexed with the halo in front, and grad_global."""
        b, m = self.b, i1 - i0
        for j in range(self.parts):  # add the transposed view in place: no (B, m b, H, D) copy first
            piece = grad_keys[:, :, :, j * b: (j + 1) * b].transpose(2, 3)  # (B, m, b, H, D)
            grad[:, (i0 + j) * b: (i1 + j) * b].view(self.B, m, b, self.H, self.D).add_(piece)
        if grad_global.shape[2]:
            grad_global += grad_keys[:, :, :, self.parts * b:].sum(dim=1)

    def key_grad_to_tokens(self, grad: Tensor, grad_global: Tensor) -> Tensor:
        grad = grad[:, self.halo: self.halo + self.N]
        if grad_global.shape[2]:
            idx = self.global_idx[:, :, None, None].expand(-1, -1, self.H, self.D)
            grad.scatter_add_(1, idx, grad_global.transpose(1, 2))  # in place: the buffer is ours
        return grad


def _pad_tokens(x: Tensor, before: int, after: int) -> Tensor:
    """Zero tokens around x (B, n, H, D); interior chunks need none and skip F.pad's copy."""
    return F.pad(x, (0, 0, 0, 0, before, after)) if before or after else x


class NeighbourBlocks(torch.autograd.Function):
    """x (B, N, H, D) -> keys of every query block (B, n_blocks, H, span + G, D), with a
    hand-written backward (one gradient buffer and a few adds)."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: _Blocks) -> Tensor:
        ctx.blocks = blocks
        return blocks.keys(blocks.pad(x, blocks.halo), blocks.global_rows(x), 0, blocks.n_blocks)

    @staticmethod
    def backward(ctx, grad: Tensor):
        k = ctx.blocks
        grad_tokens = grad.new_zeros(k.B, k.N + 2 * k.halo + k.b, k.H, k.D)
        grad_global = grad.new_zeros(k.B, k.H, k.global_idx.shape[1], k.D)
        k.add_key_grad(grad_tokens, grad_global, grad, 0, k.n_blocks)
        return k.key_grad_to_tokens(grad_tokens, grad_global), None


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
CHUNK_TOKENS = 256  # query tokens per chunk of the CPU path: bounds the gathered keys
CPU_CHUNKED = True  # tests switch it off to compare with the SDPA-autograd path
DROPOUT_BLOCK = 128  # default query block of the CPU path with attention dropout (see blocked_local_attention)


class CpuChunkedBandAttention(torch.autograd.Function):
    """The blocked band attention on CPU without storing the gathered keys and values.

    Autograd through SDPA keeps every block's gathered keys/values (3x K and V) and, with dropout,
    the (N x span) probabilities and dropout mask of every block for backward. Here forward and
    backward walk over chunks of query blocks, gathering each chunk's queries and keys straight from
    the (B, N, H, D) tensors, and keep only q, k, v, the output and the log-sum-exp: peak memory is a
    few (N x C) tensors plus one chunk's scores.

    Without dropout each chunk is one call of the CPU flash kernel (forward and backward). That
    kernel has no dropout, so with dropout each chunk is computed by `_chunk_forward` /
    `_chunk_backward` below, one query block at a time, whose dropout mask is drawn from a
    generator seeded with (seed + the block's number) and drawn again, identically, in backward.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: "_ChunkBias", blocks: _Blocks,
                dropout_p: float, seed: int) -> Tensor:
        B, H, b, n = blocks.B, blocks.H, blocks.b, blocks.n_blocks
        k_global, v_global = blocks.global_rows(k), blocks.global_rows(v)
        out = torch.empty_like(q)
        lse = None if dropout_p else q.new_empty(B, n, H, b, dtype=torch.float32)  # the flash backward's
        for i0, i1 in _chunks(n, b):
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
        ctx.blocks, ctx.bias, ctx.dropout_p, ctx.seed = blocks, bias, dropout_p, seed
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
        for i0, i1 in _chunks(blocks.n_blocks, b):
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
                blocks.key_grad_to_tokens(grad_v, grad_vg), None, None, None, None)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool (B, n, 1, b, K) -> additive (B * n, 1, b, K) of the query's dtype (the kernel's rule)."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf")).flatten(0, 1)


class _ChunkBias:
    """The additive masks of the CPU chunked path, built once per batch and window (shared by the
    layers). Most blocks have the same mask, the interior one: the band, every key real and not
    global, every global column used. Chunks made only of such blocks get one (1, 1, b, K) bias
    broadcast over their blocks instead of a (blocks, 1, b, K) one built, filled and read per call.
    """

    def __init__(self, mask: Tensor, window: int, b: int, halo: int):
        B, n_blocks, _, _, K = mask.shape  # mask: (B, n_blocks, 1, b, K) bool
        interior = _key_offsets(b, halo, mask.device).abs() <= window // 2
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


def _chunks(n_blocks: int, b: int):
    step = max(1, CHUNK_TOKENS // b)
    return [(i, min(i + step, n_blocks)) for i in range(0, n_blocks, step)]


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


def blocked_local_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, window: int, block: int | None, dropout_p: float
) -> Tensor:
    """q, k, v: (B, N, H, D) local projections. Returns (B, N, H, D)."""
    B, N, H, D = q.shape
    cpu_chunked = CPU_CHUNKED and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
    if cpu_chunked and dropout_p and block is None:
        # The dropout maths writes each block's scores to memory, unlike the flash kernel: blocks of
        # 128 queries keep them in cache and need fewer keys per query (641 against 769 for w = 256).
        block = min(window // 2, DROPOUT_BLOCK)
    w, b, halo, n_blocks = _block_geometry(N, window, block)
    blocks = _Blocks(B, N, H, D, b, halo, n_blocks, layout.global_idx)
    mask = layout.cached(("blocked", window, b), lambda: _blocked_mask(layout, window, b))  # (B*n, 1, b, K)

    if cpu_chunked:
        bias = layout.cached(("chunk_bias", window, b),
                             lambda: _ChunkBias(mask.view(B, n_blocks, 1, b, -1), window, b, halo))
        # The dropout seed comes from torch's default generator: torch.manual_seed reproduces it,
        # and activation checkpointing (which restores that generator) recomputes the same mask.
        seed = int(torch.randint(0, 2**62, ())) if dropout_p else 0
        return CpuChunkedBandAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, blocks,
                                             dropout_p, seed)

    # Elsewhere (CUDA; on CPU, dtypes other than fp32/bf16): SDPA with autograd over all blocks at once.
    q_blocks = blocks.pad(q).flatten(0, 1)  # (B * n_blocks, H, b, D)
    out = F.scaled_dot_product_attention(
        q_blocks, NeighbourBlocks.apply(k, blocks).flatten(0, 1), NeighbourBlocks.apply(v, blocks).flatten(0, 1),
        attn_mask=mask, dropout_p=dropout_p,
    )  # (B * n_blocks, H, b, D)
    return blocks.unpad(out.view(B, n_blocks, H, b, D))


# ------------------------------------------------------------------------------------------
# Local part, backend "dense" (reference).
# ------------------------------------------------------------------------------------------
def _dense_mask(layout: AttentionLayout, window: int) -> Tensor:
    """(B, 1, N, N) bool: local band over non-global keys, plus every global key."""
    B, N = layout.valid.shape
    pos = torch.arange(N, device=layout.valid.device)
    in_band = (pos[:, None] - pos[None, :]).abs() <= window // 2
    band_keys = layout.valid & ~layout.is_global
    mask = (in_band[None] & band_keys[:, None, :]) | layout.is_global[:, None, :]
    mask = mask | ((~layout.valid)[:, :, None] & torch.eye(N, dtype=torch.bool, device=pos.device)[None])
    return mask[:, None]


def dense_local_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, window: int, dropout_p: float, training: bool
) -> Tensor:
    """q, k, v: (B, N, H, D). Explicit fp32 softmax over full N x N scores. Returns (B, N, H, D)."""
    mask = layout.cached(("dense", window), lambda: _dense_mask(layout, window))
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, N, D)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return (probs @ v).transpose(1, 2)


# ------------------------------------------------------------------------------------------
# Local part, backend "flex".
# ------------------------------------------------------------------------------------------
FLEX_BLOCK = 128
_compiled_flex = None


def _flex_mask_mod(layout: AttentionLayout, window: int, n_pad: int):
    """The element rule of the local part, for FlexAttention (positions up to n_pad)."""
    N = layout.valid.shape[1]
    valid = F.pad(layout.valid, (0, n_pad - N), value=False)
    is_global = F.pad(layout.is_global, (0, n_pad - N), value=False)
    w = window // 2

    def mask_mod(b, h, q_idx, kv_idx):
        band = ((q_idx - kv_idx).abs() <= w) & ~is_global[b, kv_idx]
        return (valid[b, kv_idx] & (band | is_global[b, kv_idx])) | (~valid[b, q_idx] & (q_idx == kv_idx))

    return mask_mod


def _flex_blocks(layout: AttentionLayout, window: int) -> tuple[Tensor, Tensor]:
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


def _flex_block_mask(layout: AttentionLayout, window: int):
    from torch.nn.attention.flex_attention import BlockMask

    def ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:  # (count per query block, key blocks first)
        tiles = tiles.to(torch.int32)
        return tiles.sum(-1, dtype=torch.int32), torch.argsort(tiles, dim=-1, descending=True, stable=True).int()

    partial, full = _flex_blocks(layout, window)
    n_pad = partial.shape[-1] * FLEX_BLOCK
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=_flex_mask_mod(layout, window, n_pad), seq_lengths=(n_pad, n_pad))


def flex_local_attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, window: int) -> Tensor:
    """q, k, v: (B, N, H, D). Returns (B, N, H, D)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(
            "attention_backend='flex' has no backward on CPU in this torch; train with 'blocked' "
            "(or run under torch.no_grad() for inference)"
        )
    B, N, H, D = q.shape
    block_mask = layout.cached(("flex", window), lambda: _flex_block_mask(layout, window))
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


# ------------------------------------------------------------------------------------------
# The module (parameter names as Hugging Face's LongformerSelfAttention).
# ------------------------------------------------------------------------------------------
class LongformerSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, window: int, dropout: float = 0.0,
                 backend: str = "blocked", block_size: int | None = None):
        super().__init__()
        if window <= 0 or window % 2:
            raise ValueError(f"attention window {window} must be a positive even number")
        if not 0 <= dropout < 1:
            raise ValueError(f"attention dropout {dropout} must be in [0, 1)")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.window, self.dropout, self.backend, self.block_size = window, dropout, backend, block_size
        self.global_path = "auto"  # or "projected" / "absorbed" (tests compare the two)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        # Separate projections for global attention (Longformer paper, section 3.1).
        self.query_global = nn.Linear(hidden_size, hidden_size)
        self.key_global = nn.Linear(hidden_size, hidden_size)
        self.value_global = nn.Linear(hidden_size, hidden_size)

    def absorb_global_projections(self, num_global: int) -> bool:
        """Fold key_global/value_global into the global rows when that is cheaper: 2 H G N C
        multiply-adds against 2 N C^2 for projecting every token, i.e. when G < head_dim."""
        if self.global_path != "auto":
            return self.global_path == "absorbed"
        return num_global < self.head_dim

    def _heads(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, H, D)
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)

    def forward(self, hidden: Tensor, layout: AttentionLayout) -> Tensor:
        """hidden: (B, N, C) -> (B, N, C)."""
        B, N, C = hidden.shape
        dropout_p = self.dropout if self.training else 0.0
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        if self.backend == "blocked":
            out = blocked_local_attention(q, k, v, layout, self.window, self.block_size, dropout_p)
        elif self.backend == "dense":
            out = dense_local_attention(q, k, v, layout, self.window, self.dropout, self.training)
        elif self.backend == "flex":
            if dropout_p:
                raise ValueError(
                    "attention_backend='flex' has no attention dropout: set attention_probs_dropout_prob=0 "
                    "or use the 'blocked' backend"
                )
            out = flex_local_attention(q, k, v, layout, self.window)
        else:
            raise ValueError(f"unknown attention_backend {self.backend!r}")

        if layout.num_global:
            G = layout.num_global
            if self.absorb_global_projections(G):
                out_global = AbsorbedGlobalRows.apply(
                    hidden, self.query_global.weight, self.query_global.bias, self.key_global.weight,
                    self.value_global.weight, self.value_global.bias, layout, self.num_heads, dropout_p)
            else:
                rows = layout.global_idx[:, :, None].expand(B, G, C)
                qg = self._heads(self.query_global(hidden.gather(1, rows))).transpose(1, 2)  # (B, H, G, D)
                kg = self._heads(self.key_global(hidden)).transpose(1, 2)  # (B, H, N, D)
                vg = self._heads(self.value_global(hidden)).transpose(1, 2)
                out_global = global_rows_attention(qg, kg, vg, layout, dropout_p)
            out_global = out_global.transpose(1, 2)  # (B, G, H, D)
            batch, slot = layout.global_valid.nonzero(as_tuple=True)
            out = out.index_put((batch, layout.global_idx[batch, slot]), out_global[batch, slot].to(out.dtype))

        if layout.has_padding:  # padding rows output zeros, as Hugging Face's
            out = out.masked_fill(~layout.valid[:, :, None, None], 0.0)
        return out.reshape(B, N, C)
