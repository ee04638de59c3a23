"""The band backends and what each supports, checked once when a config or module is built.

Every backend is one function of one signature,

    band(q, k, v, layout, window, dropout_p, block=None) -> out

q, k, v, out: (B, N, H, D) local projections (unscaled) and the local part of the output; the
keys are the band |i - j| <= window / 2 plus the G global tokens, as `layout` says. A pure
function: what a caller (e.g. a sequence-parallel wrapper holding all N tokens for some heads)
passes is all it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .blocked import blocked_band
from .dense import dense_band
from .flex import flex_band


@dataclass(frozen=True)
class Backend:
    band: Callable
    dropout: bool  # attention dropout
    backward_devices: tuple[str, ...]  # device types with a backward (forward runs everywhere)
    summary: str


BACKENDS = {
    "blocked": Backend(blocked_band, dropout=True, backward_devices=("cpu", "cuda"),
                       summary="query blocks against neighbouring key blocks; CPU chunks through the flash kernel"),
    "flex": Backend(flex_band, dropout=False, backward_devices=("cuda",),
                    summary="FlexAttention with a BlockMask; fused kernel under torch.compile on CUDA"),
    "dense": Backend(dense_band, dropout=True, backward_devices=("cpu", "cuda"),
                     summary="full N x N scores with the band mask; the reference"),
}


def check_backend(name: str, dropout: float) -> Backend:
    """The backend called `name`, or a ValueError saying why it cannot run with this dropout."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r}: choose one of {sorted(BACKENDS)}")
    backend = BACKENDS[name]
    if dropout and not backend.dropout:
        raise ValueError(f"attention_backend={name!r} has no attention dropout: set attention_probs_dropout_prob=0 "
                         "or use the 'blocked' backend")
    return backend
