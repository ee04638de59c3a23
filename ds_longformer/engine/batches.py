"""What the engine reads from a batch (a dict from the task's collate_fn): its samples, its tokens,
and the tensors the model's forward takes."""

from __future__ import annotations

import inspect
from typing import Mapping

import torch


def batch_size(batch: Mapping) -> int:
    """Samples in a batch: the labels' length (one per example, also when an example spans
    several input rows, as WikiHop's chunks do), else the first tensor's."""
    if torch.is_tensor(batch.get("labels")) and batch["labels"].dim() > 0:
        return batch["labels"].shape[0]
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def batch_tokens(batch: Mapping) -> int:
    """Non-padding tokens: attention_mask.sum(), or every input id without a mask."""
    if torch.is_tensor(batch.get("attention_mask")):
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel() if torch.is_tensor(batch.get("input_ids")) else 0


class ModelInputs:
    """batch -> the keyword arguments of ``module.forward`` (other keys may carry data for metrics),
    moved to ``device``."""

    def __init__(self, module: torch.nn.Module, device):
        forward = inspect.signature(module.forward).parameters
        self.takes_any = any(p.kind is p.VAR_KEYWORD for p in forward.values())
        self.names, self.device = set(forward), device

    def __call__(self, batch: Mapping) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                if torch.is_tensor(v) and (self.takes_any or k in self.names)}
