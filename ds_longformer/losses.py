"""The heads' losses that are more than one call of torch.nn.functional.

* `linear_cross_entropy(x, weight, bias, targets)` == `F.cross_entropy(F.linear(x, weight, bias).float(),
  targets)` in value and gradients (tested), without ever holding the (M, V) logits: the MLM loss.
* `span_loss(start_logits, end_logits, start_positions, end_positions)`: the extractive-QA loss.
  Positions (B,) (or (B, 1)) are transformers' rule exactly: `(CE(start) + CE(end)) / 2`, a
  position outside the input is clamped to the input length and ignored. Positions (B, K), padded
  with -100, list several gold spans per row (TriviaQA's distant supervision: every occurrence of
  the answer); the loss is then the marginal negative log-likelihood of all of them (Clark and
  Gardner 2018, the loss the Longformer paper trained TriviaQA with: the model must put its mass on
  *some* occurrence, not on each one):

      loss = ( -log sum_k softmax(start)[s_k] - log sum_k softmax(end)[e_k] ) / 2,

  averaged over the rows that have a target; -100 and positions outside the input are no target,
  a duplicate counts once. With one target per row it equals the cross-entropy (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CE_CHUNK_ELEMENTS = 2**25  # logits per chunk of LinearCrossEntropy: 128 MiB in fp32


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i cross_entropy(x_i W^T + b, t_i) without holding the (M, V) logits.

    The autograd way keeps the logits, their log-softmax and, in backward, two more (M, V) tensors:
    at N=32768 with 15% masked (M ~ 4900) and V = 50265 that is 4 x 1 GB. Here the rows go in
    chunks of `chunk_elements` logits, and each chunk's gradient (softmax - one-hot) is used at
    once: forward leaves dx (M, C), dW (V, C), db (V), and backward only scales them by the incoming
    gradient. The same three matmuls as autograd, none recomputed.
    Logits are computed in x's dtype and the softmax in fp32, as `F.cross_entropy(logits.float())`;
    the gradient matmuls in bf16 for bf16 (as autograd's) but in fp32 for fp16: these gradients are
    not yet multiplied by the loss scale, and fp16 would flush the small ones to zero. dW of one
    chunk (the usual case: 667 rows for V = 50265) is that chunk's product, as autograd's; several
    chunks are summed in an fp32 (V, C) buffer (147 MiB), which bf16 precision needs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk_elements: int) -> Tensor:
        M, V = x.shape[0], weight.shape[0]
        low, high = torch.stack([targets.min(), targets.max()]).tolist() if M else (0, 0)  # one device sync
        if low < 0 or high >= V:  # else gather's bare index error
            raise ValueError(f"MLM labels must be token ids in [0, {V}) or -100 (not scored); got values "
                             f"from {low} to {high}: a tokenizer of another vocabulary?")
        needs_grad = ctx.needs_input_grad[:3]
        grad_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        x_g, weight_g = x.to(grad_dtype), weight.to(grad_dtype)
        grad_x = torch.empty(x.shape, dtype=grad_dtype, device=x.device) if needs_grad[0] else None
        rows = max(1, chunk_elements // V)
        sum_grad_w = needs_grad[1] and not 0 < M <= rows  # several chunks; one writes its product
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if sum_grad_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=x.device) if needs_grad[2] else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, M, rows):
            x_c, t_c = x[i: i + rows], targets[i: i + rows]
            logits = torch.addmm(bias, x_c, weight.t()).float()  # (rows, V)
            target_logit = logits.gather(1, t_c[:, None])  # (rows, 1)
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place (logsumexp would make a second (rows, V))
            row_sum = probs.sum(dim=-1, keepdim=True)
            loss += (row_max + row_sum.log() - target_logit).sum()  # log-sum-exp minus the target's
            if not any(needs_grad):
                continue
            probs.div_(row_sum * M)  # softmax / M
            probs[torch.arange(len(t_c), device=x.device), t_c] -= 1.0 / M  # d(mean loss) / d(logits)
            probs_g = probs.to(grad_dtype)
            if grad_x is not None:
                grad_x[i: i + rows] = probs_g @ weight_g
            if needs_grad[1]:
                if not sum_grad_w:
                    grad_w = probs_g.t() @ x_g  # (V, C) in grad_dtype: the only chunk
                elif grad_dtype == torch.float32:
                    grad_w.addmm_(probs.t(), x_g[i: i + rows])
                else:
                    grad_w += probs_g.t() @ x_g[i: i + rows]
            if grad_b is not None:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return loss / M

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        # The loss's gradient is mostly 1 (else a loss scale or 1 / accumulation steps): then the
        # buffers are the gradients, and no second (V, C) tensor is made. Scaled out of place, so a
        # second backward through a retained graph finds them unscaled.
        unit = bool(grad_loss == 1)
        return (*(None if g is None else (g if unit else g * grad_loss).to(dtype)
                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)), None, None)


def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor,
                         chunk_elements: int = CE_CHUNK_ELEMENTS) -> Tensor:
    """mean_i cross_entropy(x_i W^T + b, t_i): x (M, C), weight (V, C), bias (V,), targets (M,) in [0, V)."""
    return LinearCrossEntropy.apply(x, weight, bias, targets, chunk_elements)


IGNORE_INDEX = -100  # padding of (B, K) start/end positions: no target


def _marginal_nll(logits: Tensor, positions: Tensor) -> Tensor:
    """-log of the softmax mass on the target positions (B, K), per row (B,); rows without a target: nan."""
    rows, length = logits.shape
    positions = positions.to(logits.device)
    valid = (positions >= 0) & (positions < length)
    # A scatter into one extra column keeps the padding out (a duplicate target counts once).
    is_target = torch.zeros((rows, length + 1), dtype=torch.bool, device=logits.device)
    is_target.scatter_(1, positions.masked_fill(~valid, length), True)
    target_mass = torch.logsumexp(logits.masked_fill(~is_target[:, :length], float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - target_mass).masked_fill(~valid.any(dim=1), float("nan"))


def span_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor) -> Tensor:
    """The QA loss of start/end logits (B, N) (computed in fp32); positions (B,), (B, 1) or (B, K): see above."""
    start_logits, end_logits = start_logits.float(), end_logits.float()
    if start_positions.dim() > 1 and start_positions.shape[-1] == 1:  # (B, 1): transformers squeezes it
        start_positions, end_positions = start_positions.squeeze(-1), end_positions.squeeze(-1)
    if start_positions.dim() == 1:  # transformers' rule: outside the input -> clamped to N and ignored
        ignored = start_logits.shape[1]
        return (F.cross_entropy(start_logits, start_positions.clamp(0, ignored), ignore_index=ignored)
                + F.cross_entropy(end_logits, end_positions.clamp(0, ignored), ignore_index=ignored)) / 2
    return (_marginal_nll(start_logits, start_positions).nanmean()
            + _marginal_nll(end_logits, end_positions).nanmean()) / 2
