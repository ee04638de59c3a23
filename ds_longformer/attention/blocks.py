"""Query blocks and their key halo: the geometry both blocked paths (SDPA and the CPU chunks) share.

The sequence is cut into query blocks of b tokens (b = window/2 by default). Query block i is
given the key tokens [i*b - halo, (i+1)*b + halo) (halo = ceil(w / b) * b, zeros outside the
sequence) followed by the G global tokens; an element mask keeps the band |query - key| <= w.
With w = b = 4 (window 8) and block i starting at token t = 4i:

                       block i-1     block i       block i+1      globals
      key token:    t-4 t-3 t-2 t-1  t  t+1 t+2 t+3  t+4 t+5 t+6 t+7   g1 g2
      query t    :   #   #   #   #   #   #   #   #   #   .   .   .     #  #
      query t+1  :   .   #   #   #   #   #   #   #   #   #   .   .     #  #
      query t+2  :   .   .   #   #   #   #   #   #   #   #   #   .     #  #
      query t+3  :   .   .   .   #   #   #   #   #   #   #   #   #     #  #

'#' may be attended, '.' is gathered but masked. Each query sees 2w + 1 band keys of the 3b
gathered (fewer at the ends, at padding, and at global tokens, which it sees through their own
column instead). Time and memory are O(N * (window + b + G)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import AttentionLayout


def block_geometry(n: int, window: int, block: int | None):
    """(one-sided window w, query block b, halo of keys each side, number of blocks)."""
    w = window // 2
    if w >= n - 1:  # the window covers the whole sequence: one block, plain full attention
        return w, max(n, 1), 0, 1
    b = block or max(w, 1)
    halo = math.ceil(w / b) * b  # key tokens gathered on each side of a query block
    return w, b, halo, math.ceil(n / b)


def key_offsets(b: int, halo: int, device) -> Tensor:
    """(b, 2 halo + b): key column c of any block sits (c - halo - r) tokens from its query row r."""
    return torch.arange(2 * halo + b, device=device)[None, :] - halo - torch.arange(b, device=device)[:, None]


def blocked_mask(layout: AttentionLayout, window: int, block: int | None) -> Tensor:
    """(B * n_blocks, 1, b, 2 * halo + b + G) bool mask of the keys each query block may see."""
    B, N = layout.valid.shape
    w, b, halo, n_blocks = block_geometry(N, window, block)
    n_pad = n_blocks * b
    span = 2 * halo + b
    device = layout.valid.device
    offset = key_offsets(b, halo, device)
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


def pad_tokens(x: Tensor, before: int, after: int) -> Tensor:
    """Zero tokens around x (B, n, H, D); interior chunks need none and skip F.pad's copy."""
    return F.pad(x, (0, 0, 0, 0, before, after)) if before or after else x


@dataclass
class Blocks:
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
        rows = pad_tokens(rows, 0, (i1 - i0) * self.b - rows.shape[1])
        return rows.view(self.B, i1 - i0, self.b, self.H, self.D).transpose(2, 3).flatten(0, 1)

    def chunk_keys(self, x: Tensor, x_global: Tensor, i0: int, i1: int) -> Tensor:
        """Keys of query blocks [i0, i1) read from x (B, N, H, D): (B * (i1 - i0), H, span + G, D)."""
        lo, hi = i0 * self.b - self.halo, i1 * self.b + self.halo
        rows = x[:, max(lo, 0): min(hi, self.N)]
        rows = pad_tokens(rows, max(0, -lo), hi - lo - rows.shape[1] - max(0, -lo))
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

