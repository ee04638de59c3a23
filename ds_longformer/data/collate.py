"""Padding collator shared by the tasks.

API
---
``pad_batch(features, pad_token_id, pad_to_multiple_of=None) -> dict``
    ``features`` is a list of dicts. The token-level fields ``input_ids``,
    ``attention_mask``, ``global_attention_mask`` and (sequence-valued) ``labels`` may be
    lists or 1-D tensors of different lengths; they are right-padded to the longest one,
    rounded up to a multiple of ``pad_to_multiple_of`` (e.g. the attention window), with
    ``pad_token_id``, 0, 0 and -100 respectively, and returned as ``long`` tensors of
    shape ``(batch, length)``. A missing ``attention_mask`` is built (1 on every token).
    Numeric scalar fields (e.g. a class ``labels``/``label``) become a 1-D tensor; any
    other field (e.g. string ``id``) comes back as a plain list.
``padded_length(length, pad_to_multiple_of) -> int``
    ``length`` rounded up to a multiple of ``pad_to_multiple_of`` (unchanged when None/0).
``PaddingCollator(pad_token_id, pad_to_multiple_of=None)``
    The same as a callable for ``torch.utils.data.DataLoader(collate_fn=...)``.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

# Padding value of each token-level field; the pad token id is filled in per call.
_TOKEN_FIELDS = {"input_ids": None, "attention_mask": 0, "global_attention_mask": 0, "labels": -100}


def _is_sequence(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    return isinstance(value, (list, tuple))


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, numbers.Number)


def padded_length(length: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of:
        return -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return length


def pad_batch(features: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    if not features:
        raise ValueError("cannot collate an empty batch")
    length = padded_length(max(len(f["input_ids"]) for f in features), pad_to_multiple_of)
    batch: dict[str, Any] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key in _TOKEN_FIELDS and all(_is_sequence(v) for v in values):
            fill = pad_token_id if key == "input_ids" else _TOKEN_FIELDS[key]
            out = torch.full((len(values), length), fill, dtype=torch.long)
            for row, v in enumerate(values):
                out[row, : len(v)] = torch.as_tensor(v, dtype=torch.long)
            batch[key] = out
        elif all(_is_scalar(v) for v in values):
            batch[key] = torch.tensor([v.item() if isinstance(v, torch.Tensor) else v for v in values])
        else:
            batch[key] = values
    if "attention_mask" not in batch:
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            mask[row, : len(f["input_ids"])] = 1
        batch["attention_mask"] = mask
    return batch


class PaddingCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict:
        return pad_batch(features, self.pad_token_id, self.pad_to_multiple_of)
