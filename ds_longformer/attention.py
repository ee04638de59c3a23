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
    `unfold`, an element mask keeps |i - j| <= w) plus the global keys. Each block is one
    `scaled_dot_product_attention` call batched over blocks, so time and memory are
    O(N * (window + block + G)): linear in sequence length and in window size.
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
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, attention_mask: Tensor, global_attention_mask: Tensor | None = None) -> "AttentionLayout":
        valid = attention_mask.bool()
        if global_attention_mask is None:
            is_global = torch.zeros_like(valid)
        else:
            is_global = global_attention_mask.bool() & valid
        counts = is_global.sum(dim=1)  # (B,)
        G = int(counts.max()) if is_global.numel() else 0
        # Stable sort puts the global positions first, in order; the rest are unused slots.
        order = torch.sort((~is_global).to(torch.int8), dim=1, stable=True).indices[:, :G]
        global_valid = torch.arange(G, device=valid.device)[None, :] < counts[:, None]
        global_idx = torch.where(global_valid, order, torch.zeros_like(order))
        return cls(valid, is_global, global_idx, global_valid)

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


def global_rows_attention_absorbed(qg: Tensor, hidden: Tensor, key_global: nn.Linear, value_global: nn.Linear,
                                   layout: AttentionLayout, dropout_p: float) -> Tensor:
    """The same result as projecting every token with key_global/value_global, for O(H G N C)
    instead of O(N C^2): the projections are folded into the G queries and the G outputs.

      score[g, n] = qg[g] . (Wk x[n] + bk) = (Wk^T qg[g]) . x[n] + const(g)   (const cancels in softmax)
      out[g]      = sum_n p[g, n] (Wv x[n] + bv) = Wv (sum_n p[g, n] x[n]) + (sum_n p[g, n]) bv

    qg: (B, H, G, D); hidden: (B, N, C). Returns (B, H, G, D).
    """
    B, H, G, D = qg.shape
    C = hidden.shape[-1]
    w_k = key_global.weight.view(H, D, C)
    w_v = value_global.weight.view(H, D, C)
    q_in = torch.einsum("bhgd,hdc->bhgc", qg, w_k)  # queries moved into the hidden space
    scores = torch.einsum("bhgc,bnc->bhgn", q_in, hidden).float() / math.sqrt(D)
    scores = scores.masked_fill(~layout.valid[:, None, None, :], float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p).to(hidden.dtype)  # (B, H, G, N)
    context = torch.einsum("bhgn,bnc->bhgc", probs, hidden)
    out = torch.einsum("bhgc,hdc->bhgd", context, w_v)
    return out + probs.sum(-1, keepdim=True) * value_global.bias.view(1, H, 1, D)


# ------------------------------------------------------------------------------------------
# Local part, backend "blocked".
# ------------------------------------------------------------------------------------------
def _block_geometry(n: int, window: int, block: int | None):
    w = window // 2
    b = block or max(w, 1)
    halo = math.ceil(w / b) * b  # key tokens gathered on each side of a query block
    n_blocks = math.ceil(n / b)
    return w, b, halo, n_blocks


def _blocked_mask(layout: AttentionLayout, window: int, block: int | None) -> Tensor:
    """(B * n_blocks, 1, b, 2 * halo + b + G) bool mask of the keys each query block may see."""
    B, N = layout.valid.shape
    w, b, halo, n_blocks = _block_geometry(N, window, block)
    n_pad = n_blocks * b
    span = 2 * halo + b
    device = layout.valid.device
    q_pos = torch.arange(n_pad, device=device).view(n_blocks, b)
    k_pos = torch.arange(span, device=device)[None, :] + (q_pos[:, :1] - halo)  # (n_blocks, span)
    in_band = (q_pos[:, :, None] - k_pos[:, None, :]).abs() <= w  # (n_blocks, b, span)

    # Keys outside [0, N) are padding; global keys are attended through the global columns instead.
    key_ok = F.pad(layout.valid & ~layout.is_global, (halo, n_pad - N + halo), value=False)
    key_ok = key_ok.unfold(1, span, b)  # (B, n_blocks, span)
    mask = in_band[None] & key_ok[:, :, None, :]
    # Padding queries see only themselves, so no softmax row is empty (their output is zeroed later).
    q_pad = ~F.pad(layout.valid, (0, n_pad - N), value=False).view(B, n_blocks, b)
    diagonal = q_pos[:, :, None] == k_pos[:, None, :]
    mask = mask | (q_pad[..., None] & diagonal[None])
    if layout.num_global:
        global_cols = layout.global_valid[:, None, None, :].expand(B, n_blocks, b, layout.num_global)
        mask = torch.cat([mask, global_cols], dim=-1)
    return mask.view(B * n_blocks, 1, b, -1)


class NeighbourBlocks(torch.autograd.Function):
    """Gather, for every query block, the key/value rows it may attend to.

    x (B, N, H, D) -> (B, n_blocks, H, span + G, D): for query block i, the tokens
    [i*b - halo, i*b + b + halo) (zeros outside the sequence), then the G global tokens. Written by
    hand because the autograd of pad + unfold/cat + gather spends more time zero-filling and
    copying gradient buffers than the attention itself; here backward is one buffer and a few adds.
    """

    @staticmethod
    def forward(ctx, x: Tensor, b: int, halo: int, n_blocks: int, global_idx: Tensor) -> Tensor:
        B, N, H, D = x.shape
        ctx.shape, ctx.geometry = x.shape, (b, halo, n_blocks)
        ctx.save_for_backward(global_idx)
        x_pad = x.new_zeros(B, n_blocks * b + 2 * halo, H, D)
        x_pad[:, halo: halo + N] = x
        x_pad = x_pad.view(B, -1, b, H, D).transpose(2, 3)  # (B, n_blocks + 2 halo / b, H, b, D)
        parts = [x_pad[:, j: j + n_blocks] for j in range(2 * halo // b + 1)]
        G = global_idx.shape[1]
        if G:
            x_global = x.gather(1, global_idx[:, :, None, None].expand(B, G, H, D)).transpose(1, 2)
            parts.append(x_global[:, None].expand(B, n_blocks, H, G, D))
        return torch.cat(parts, dim=3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (global_idx,) = ctx.saved_tensors
        B, N, H, D = ctx.shape
        b, halo, n_blocks = ctx.geometry
        n_parts = 2 * halo // b + 1
        grad_pad = grad.new_zeros(B, n_blocks + n_parts - 1, H, b, D)
        for j in range(n_parts):
            grad_pad[:, j: j + n_blocks] += grad[:, :, :, j * b: (j + 1) * b]
        grad_x = grad_pad.transpose(2, 3).reshape(B, -1, H, D)[:, halo: halo + N].contiguous()
        G = global_idx.shape[1]
        if G:
            grad_global = grad[:, :, :, n_parts * b:].sum(dim=1).transpose(1, 2)  # (B, G, H, D)
            grad_x.scatter_add_(1, global_idx[:, :, None, None].expand(B, G, H, D), grad_global)
        return grad_x, None, None, None, None


def blocked_local_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, window: int, block: int | None, dropout_p: float
) -> Tensor:
    """q, k, v: (B, N, H, D) local projections. Returns (B, N, H, D)."""
    B, N, H, D = q.shape
    w, b, halo, n_blocks = _block_geometry(N, window, block)
    n_pad = n_blocks * b
    span = 2 * halo + b
    mask = layout.cached(("blocked", window, b), lambda: _blocked_mask(layout, window, b))

    q_blocks = F.pad(q, (0, 0, 0, 0, 0, n_pad - N)).view(B, n_blocks, b, H, D).transpose(2, 3)

    def neighbour_blocks(x: Tensor) -> Tensor:  # (B, N, H, D) -> (B * n_blocks, H, span + G, D)
        return NeighbourBlocks.apply(x, b, halo, n_blocks, layout.global_idx).flatten(0, 1)

    out = F.scaled_dot_product_attention(
        q_blocks.reshape(B * n_blocks, H, b, D),
        neighbour_blocks(k),
        neighbour_blocks(v),
        attn_mask=mask,
        dropout_p=dropout_p,
    )  # (B * n_blocks, H, b, D)
    return out.view(B, n_blocks, H, b, D).transpose(2, 3).reshape(B, n_pad, H, D)[:, :N]


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


def _flex_block_mask(layout: AttentionLayout, window: int):
    from torch.nn.attention.flex_attention import create_block_mask

    B, N = layout.valid.shape
    n_pad = math.ceil(N / FLEX_BLOCK) * FLEX_BLOCK
    valid = F.pad(layout.valid, (0, n_pad - N), value=False)
    is_global = F.pad(layout.is_global, (0, n_pad - N), value=False)
    w = window // 2

    def mask_mod(b, h, q_idx, kv_idx):
        band = ((q_idx - kv_idx).abs() <= w) & ~is_global[b, kv_idx]
        return (valid[b, kv_idx] & (band | is_global[b, kv_idx])) | (~valid[b, q_idx] & (q_idx == kv_idx))

    return create_block_mask(mask_mod, B, None, n_pad, n_pad, device=layout.valid.device, BLOCK_SIZE=FLEX_BLOCK)


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
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
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
            rows = layout.global_idx[:, :, None].expand(B, G, C)
            qg = self._heads(self.query_global(hidden.gather(1, rows))).transpose(1, 2)  # (B, H, G, D)
            if self.absorb_global_projections(G):
                out_global = global_rows_attention_absorbed(qg, hidden, self.key_global, self.value_global,
                                                            layout, dropout_p)
            else:
                kg = self._heads(self.key_global(hidden)).transpose(1, 2)  # (B, H, N, D)
                vg = self._heads(self.value_global(hidden)).transpose(1, 2)
                out_global = global_rows_attention(qg, kg, vg, layout, dropout_p)
            out_global = out_global.transpose(1, 2)  # (B, G, H, D)
            batch, slot = layout.global_valid.nonzero(as_tuple=True)
            out = out.index_put((batch, layout.global_idx[batch, slot]), out_global[batch, slot])

        out = out.masked_fill(~layout.valid[:, :, None, None], 0.0)
        return out.reshape(B, N, C)
