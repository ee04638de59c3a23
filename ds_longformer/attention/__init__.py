"""Longformer self-attention: a sliding window plus global attention.

Semantics (those of transformers' LongformerSelfAttention):
  * w = attention_window // 2. A local (non-global) query i attends, with the local projections
    query/key/value, to every real key j with |i - j| <= w that is not global, plus every global key.
  * A global query attends to every real key, with its own projections query_global/key_global/
    value_global (the key/value projections of *all* tokens, the query projection of global rows only).
  * Padding rows (attention_mask == 0) output zeros.
Softmax always accumulates in fp32 (SDPA and FlexAttention kernels do; the dense path casts).

Read in this order:
  layout.py          AttentionLayout: real and global tokens of a batch; masks built once per batch
  blocks.py          query blocks and their key halo (the picture), shared by the blocked paths
  cpu_chunked.py     the blocked band on CPU: chunks through the flash kernel, re-drawable dropout
  blocked.py         backend "blocked" (default): CPU chunks, or one SDPA call over all blocks
  dense.py, flex.py  backends "dense" (O(N^2) reference) and "flex" (FlexAttention, CUDA training)
  backends.py        the table of backends, one signature band(q, k, v, layout, window, dropout_p)
  global_rows.py     the G global rows: projected, or folded into the queries (AbsorbedGlobalRows)
  probabilities.py   attention probabilities for output_attentions, computed only when asked
  self_attention.py  the module, with transformers' parameter names
"""

from .backends import BACKENDS, Backend, check_backend
from .blocked import blocked_band
from .dense import dense_band
from .flex import flex_band
from .layout import AttentionLayout
from .self_attention import LongformerSelfAttention

__all__ = ["BACKENDS", "AttentionLayout", "Backend", "LongformerSelfAttention", "blocked_band", "check_backend",
           "dense_band", "flex_band"]
