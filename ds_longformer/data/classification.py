"""Tokenization for document classification (IMDB, Hyperpartisan).

Each text becomes ``<s> tokens </s>`` (``[CLS] ... [SEP]`` for BERT tokenizers), truncated
to ``max_seq_len`` tokens: the model's length for the Longformer, 512 for the RoBERTa
baseline. Global attention is on the first token (``<s>``) only, as in the Longformer paper;
the RoBERTa baseline gets none (``global_first=False``): a global row would use the separate
global projections, and the baseline must be exactly RoBERTa.

API
---
``encode_classification(examples, tokenizer, max_seq_len, num_proc=None, global_first=True) -> datasets.Dataset``
    ``examples``: the ``{"text", "label", "id"}`` dicts of ``imdb.load_imdb`` or
    ``hyperpartisan.load_hyperpartisan``. Columns: ``input_ids``, ``attention_mask``,
    ``global_attention_mask`` (lists of ints, unpadded), ``labels`` (int), ``id`` (str).
    Batch it with ``collate.PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of)``.
"""

from __future__ import annotations

from typing import Sequence

import datasets


class _Encode:
    """Batched map function (a class, so it pickles cleanly into ``num_proc`` workers)."""

    def __init__(self, tokenizer, max_seq_len: int, global_first: bool):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.global_first = int(global_first)

    def __call__(self, batch: dict) -> dict:
        encoded = self.tokenizer(batch["text"], truncation=True, max_length=self.max_seq_len)
        input_ids = encoded["input_ids"]
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "global_attention_mask": [[self.global_first] + [0] * (len(ids) - 1) for ids in input_ids],
            "labels": batch["label"],
        }


def encode_classification(
    examples: Sequence[dict], tokenizer, max_seq_len: int, num_proc: int | None = None, global_first: bool = True
) -> datasets.Dataset:
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    dataset = datasets.Dataset.from_dict(
        {
            "text": [ex["text"] for ex in examples],
            "label": [ex["label"] for ex in examples],
            "id": [str(ex["id"]) for ex in examples],
        }
    )
    return dataset.map(
        _Encode(tokenizer, max_seq_len, global_first),
        batched=True,
        num_proc=num_proc,
        remove_columns=["text", "label"],
        desc="Tokenizing",
    )
