"""The global rows: each global token attends to every real token with its own projections
query_global/key_global/value_global (the Longformer paper's section 3.1).

Two ways to the same result, picked per layer and batch by the self-attention module:
  * `global_rows_attention`: project every token with key_global/value_global, O(N C^2);
  * `AbsorbedGlobalRows`: fold key_global/value_global into the G queries and outputs, O(H G N C),
    cheaper while G < head_dim.
Under sequence parallelism each rank holds N / P tokens, and `split_softmax_global_rows` computes
either way over the group (a softmax split over the ranks' keys).
Separate from the band backends: a band call is a pure function of (q, k, v, layout, window,
dropout_p), and the global rows are this module's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import AttentionLayout


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
    three N x C tensors and add them. key_global's bias adds the same score to every key of a row,
    which the softmax cancels: its true gradient is zero, and it gets that zero.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, w_q: Tensor, b_q: Tensor, w_k: Tensor, b_k: Tensor, w_v: Tensor, b_v: Tensor,
                layout: AttentionLayout, num_heads: int, dropout_p: float) -> Tensor:
        # Under torch.autocast the maths runs in the autocast dtype, explicitly: backward runs
        # without autocast, so every saved tensor must already have the one dtype.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        ctx.input_dtypes = [t.dtype for t in (hidden, w_q, b_q, w_k, w_v, b_v)]
        ctx.key_bias = (b_k.shape, b_k.dtype, b_k.device)
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
        grad_hidden, grad_w_q, grad_b_q, grad_w_k, grad_w_v, grad_b_v = (
            g.to(dtype) for g, dtype in zip((grad_hidden, grad_w_q, grad_q_g.sum((0, 1)), grad_w_k, grad_w_v, grad_b_v),
                                            ctx.input_dtypes))
        shape, dtype, device = ctx.key_bias
        grad_b_k = torch.zeros(shape, dtype=dtype, device=device)
        return grad_hidden, grad_w_q, grad_b_q, grad_w_k, grad_b_k, grad_w_v, grad_b_v, None, None, None


class ZeroGradients(torch.autograd.Function):
    """x -> x (a view), tied in backward to `unused` outputs that took no part in computing x (the
    global projections applied to no token, in a batch without global tokens): they get a zero
    gradient, and so the parameters behind them get theirs, the true one. Every trainable
    parameter then has a gradient, so DDP and ZeRO need no search for unused ones."""

    @staticmethod
    def forward(ctx, x: Tensor, *unused: Tensor) -> Tensor:
        ctx.unused = [(u.shape, u.dtype, u.device) for u in unused]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.unused))


def split_softmax_global_rows(hidden: Tensor, query_global: nn.Linear, key_global: nn.Linear,
                              value_global: nn.Linear, layout: AttentionLayout, num_heads: int, dropout_p: float,
                              absorb: bool) -> Tensor:
    """The G global rows (B, H, G, D) under sequence parallelism, the same on every rank of the
    group, from this rank's tokens hidden (B, n, C).

    A softmax split over the ranks' keys: the G global tokens are gathered from the ranks holding
    them, each rank scores the G queries of every head against its own n keys, and the partial
    results are combined over the group -- the maximum score (the softmax's shift), then in one
    all-reduce the sum of the exponentials, the context (their weighted sum of values) and the
    weights' sum. Communication O(B H G C) per layer, never O(N); work and memory O(H G n C).
    absorb: key_global/value_global folded into the queries and outputs (AbsorbedGlobalRows' maths),
    else they project this rank's tokens only. Attention dropout draws from this rank's stream
    (its keys; sequence_parallel.own_rng). Autograd does the backward (the collectives have theirs).
    """
    sp = layout.sequence_parallel
    B, n, C = hidden.shape
    H, G = num_heads, layout.num_global
    D = C // H
    q_g = query_global(sp.gather_rows(hidden, layout.global_idx)).view(B, G, H, D).transpose(1, 2)  # (B, H, G, D)
    if absorb:  # score[g, j] = (Wk^T q_g) . x_j: key_global's bias adds one constant per row, which softmax cancels
        q_in = torch.einsum("bhgd,hdc->bhgc", q_g, key_global.weight.view(H, D, C)) * D ** -0.5
        scores = torch.einsum("bhgc,bnc->bhgn", q_in, hidden)  # (B, H, G, n)
    else:
        k_g = key_global(hidden).view(B, n, H, D).transpose(1, 2)  # (B, H, n, D): this rank's keys only
        v_g = value_global(hidden).view(B, n, H, D).transpose(1, 2)
        scores = torch.matmul(q_g, k_g.transpose(-1, -2)) * D ** -0.5
    scores = scores.float().masked_fill(~layout.local(layout.valid)[:, None, None, :], float("-inf"))
    shift = sp.max_over(scores.amax(dim=-1))  # (B, H, G), finite: every global query has itself as a key
    expo = torch.exp(scores - shift[..., None])  # 0 at padding keys
    weights = expo * torch.empty_like(expo).bernoulli_(1 - dropout_p).div_(1 - dropout_p) if dropout_p else expo
    context = (torch.einsum("bhgn,bnc->bhgc", weights.to(hidden.dtype), hidden) if absorb else
               torch.matmul(weights.to(hidden.dtype), v_g))  # (B, H, G, C or D)
    sums = sp.sum_over(torch.cat([context.float(), weights.sum(-1, keepdim=True), expo.sum(-1, keepdim=True)], -1))
    sums = (sums[..., :-1] / sums[..., -1:]).to(hidden.dtype)  # normalised by the softmax's denominator
    context, weights_sum = sums[..., :-1], sums[..., -1:]
    if not absorb:
        return context
    out = torch.einsum("bhgc,hdc->bhgd", context, value_global.weight.view(H, D, C))
    out = out + weights_sum * value_global.bias.view(1, H, 1, D)
    return ZeroGradients.apply(out, key_global.bias)  # its true gradient: zero (see above)
