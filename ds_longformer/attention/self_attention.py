"""LongformerSelfAttention: the module, with transformers' parameter names.

    hidden (B, N, C) --query/key/value--> q, k, v (B, N, H, D) --band backend--> out (B, N, H, D)
                     --global projections, G global tokens--> global rows (B, G, H, D) written into out
                     padding rows -> 0;  out -> (B, N, C)

Under sequence parallelism (layout.sequence_parallel, see ds_longformer/sequence_parallel.py) the
same steps run on this rank's n = N / P tokens: hidden, q, k, v and out are (B, n, ...); the band
runs through DeepSpeed's all-to-all over all N tokens for H / P heads, the global rows as a softmax
split over the ranks' keys (global_rows.split_softmax_global_rows), and each rank writes the
global rows and zeroes the padding rows it holds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backends import check_backend
from .global_rows import AbsorbedGlobalRows, ZeroGradients, global_rows_attention, split_softmax_global_rows
from .layout import AttentionLayout
from .probabilities import global_probabilities, local_probabilities

GLOBAL_PATHS = ("auto", "absorbed", "projected")


class LongformerSelfAttention(nn.Module):
    """Sliding-window attention with global tokens (semantics of transformers' LongformerSelfAttention).

    window: total window (token i sees |i - j| <= window / 2); backend: a name of backends.BACKENDS;
    block_size: the blocked backend's query block (None: window / 2); global_path: how the global
    rows are computed, "auto" (absorbed while G < head_dim, the cheaper way) or one forced
    (tests compare the two)."""

    def __init__(self, hidden_size: int, num_heads: int, window: int, dropout: float = 0.0,
                 backend: str = "blocked", block_size: int | None = None, global_path: str = "auto"):
        super().__init__()
        if window <= 0 or window % 2:
            raise ValueError(f"attention window {window} must be a positive even number")
        if not 0 <= dropout < 1:
            raise ValueError(f"attention dropout {dropout} must be in [0, 1)")
        if global_path not in GLOBAL_PATHS:
            raise ValueError(f"global_path={global_path!r}: choose one of {GLOBAL_PATHS}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.window, self.dropout, self.block_size, self.global_path = window, dropout, block_size, global_path
        self.backend = backend
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        # Separate projections for global attention (Longformer paper, section 3.1).
        self.query_global = nn.Linear(hidden_size, hidden_size)
        self.key_global = nn.Linear(hidden_size, hidden_size)
        self.value_global = nn.Linear(hidden_size, hidden_size)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:  # checked here, once, not in forward
        self._band = check_backend(name, self.dropout).band
        self._backend = name

    def _heads(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, H, D)
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)

    def _global_query_key(self, hidden: Tensor, layout: AttentionLayout) -> tuple[Tensor, Tensor]:
        """query_global of the G global tokens (B, H, G, D) and key_global of every token (B, H, N, D)."""
        rows = layout.global_idx[:, :, None].expand(-1, -1, hidden.shape[-1])
        q_global = self._heads(self.query_global(hidden.gather(1, rows))).transpose(1, 2)
        return q_global, self._heads(self.key_global(hidden)).transpose(1, 2)

    def _global_rows(self, hidden: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
        """(B, H, G, D): the G global rows, absorbed while G < head_dim (2 H G N C multiply-adds
        against 2 N C^2 for projecting every token with key_global/value_global)."""
        absorb = layout.num_global < self.head_dim if self.global_path == "auto" else self.global_path == "absorbed"
        if layout.sequence_parallel is not None:
            return split_softmax_global_rows(hidden, self.query_global, self.key_global, self.value_global, layout,
                                             self.num_heads, dropout_p, absorb)
        if absorb:
            kg, vg = self.key_global, self.value_global
            return AbsorbedGlobalRows.apply(hidden, self.query_global.weight, self.query_global.bias, kg.weight,
                                            kg.bias, vg.weight, vg.bias, layout, self.num_heads, dropout_p)
        q_global, k_global = self._global_query_key(hidden, layout)
        v_global = self._heads(self.value_global(hidden)).transpose(1, 2)
        return global_rows_attention(q_global, k_global, v_global, layout, dropout_p)

    def forward(self, hidden: Tensor, layout: AttentionLayout) -> Tensor:
        """hidden: (B, N, C) -> (B, N, C); under sequence parallelism this rank's tokens (B, n, C)."""
        B, N, C = hidden.shape
        dropout_p = self.dropout if self.training else 0.0
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        sp = layout.sequence_parallel
        band = self._band if sp is None else sp.band_over_heads(self._band)
        out = band(q, k, v, layout, self.window, dropout_p, self.block_size)  # (B, N, H, D)

        if layout.num_global:
            out_global = self._global_rows(hidden, layout, dropout_p).transpose(1, 2)  # (B, G, H, D)
            batch, slot, token = layout.local_global_rows()
            out = out.index_put((batch, token), out_global[batch, slot].to(out.dtype))
        elif torch.is_grad_enabled() and self.query_global.weight.requires_grad:
            # The global projections applied to no token (B, 0, C), tied to the output: a zero
            # gradient for their parameters, through their own module calls.
            nothing = hidden[:, :0]
            out = ZeroGradients.apply(out, self.query_global(nothing), self.key_global(nothing), self.value_global(nothing))

        if layout.has_padding:  # padding rows output zeros, as transformers'
            out = out.masked_fill(~layout.local(layout.valid)[:, :, None, None], 0.0)
        return out.reshape(B, N, C)

    def attention_probabilities(self, hidden: Tensor, layout: AttentionLayout) -> tuple[Tensor, Tensor | None]:
        """(local (B, H, N, G + window + 1), global (B, H, N, G) or None without global tokens), in
        transformers' layout (see probabilities.py): recomputed from the projections, before dropout."""
        q, k = self._heads(self.query(hidden)), self._heads(self.key(hidden))
        local = local_probabilities(q, k, layout, self.window)
        if not layout.num_global:
            return local, None
        return local, global_probabilities(*self._global_query_key(hidden, layout), layout)
