"""Masked-language-model masking (BERT/RoBERTa recipe).

Of the tokens that are neither special (``<s>``, ``</s>``, ``<pad>``, ``[CLS]`` ...) nor
padding, each is selected with probability ``mlm_probability`` (15%). A selected token is
replaced by the mask token with probability 0.8, by a token drawn uniformly from the
vocabulary's ordinary tokens with probability 0.1 (never a special one: a random ``<pad>``
would also shift the position ids of every later token), and left unchanged with probability 0.1. Labels
hold the original id at selected positions and -100 (ignored by the loss) elsewhere.

All randomness comes from an optional ``torch.Generator``: the same generator state and
the same batch give the same masks. Without one, torch's global RNG is used; a
``DataLoader`` with workers seeds that per worker, whereas a generator passed here is
copied unchanged into every worker (all workers would then draw the same masks), so pass
a generator only with ``num_workers=0`` -- e.g. a freshly seeded one for each validation
pass, so every evaluation sees the same masks.

API
---
``mask_tokens(input_ids, special_tokens_mask, mask_token_id, vocab_size,
mlm_probability=0.15, generator=None, special_ids=None) -> (masked_input_ids, labels)``
    Pure function on a ``long`` tensor of any shape; ``special_tokens_mask`` is a bool
    tensor of the same shape marking positions that must never be selected; ``special_ids``
    the ids random replacements never draw.
``MLMCollator(tokenizer, mlm_probability=0.15, pad_to_multiple_of=None, generator=None,
global_attention_mask=False)``
    ``collator(features)`` with ``features`` a list of ``{"input_ids": list | tensor}``
    (e.g. rows of the WikiText block dataset) returns ``input_ids``, ``attention_mask``,
    ``labels`` (``long``, ``(batch, length)``, padded as in ``collate.pad_batch``) and, if
    asked, a ``global_attention_mask`` of zeros (MLM pretraining uses local attention only).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .collate import pad_batch


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
    special_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    probability = torch.full(input_ids.shape, mlm_probability)
    probability.masked_fill_(special_tokens_mask, 0.0)
    selected = torch.bernoulli(probability, generator=generator).bool()
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))

    masked = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    masked[to_mask] = mask_token_id
    # Half of the remaining 20% of selected tokens -> 10% of all selected ones.
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    if special_ids is not None:
        ordinary[special_ids] = False
    pool = ordinary.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), input_ids.shape, generator=generator)]
    masked[to_random] = random_ids[to_random]
    return masked, labels


class MLMCollator:
    def __init__(
        self,
        tokenizer,
        mlm_probability: float = 0.15,
        pad_to_multiple_of: int | None = None,
        generator: torch.Generator | None = None,
        global_attention_mask: bool = False,
    ):
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} needs a mask token and a pad token for MLM")
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = generator
        self.global_attention_mask = global_attention_mask

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch([{"input_ids": f["input_ids"]} for f in features], self.pad_token_id, self.pad_to_multiple_of)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        never = torch.isin(input_ids, self.special_ids) | (attention_mask == 0)
        masked, labels = mask_tokens(
            input_ids, never, self.mask_token_id, self.vocab_size, self.mlm_probability, self.generator,
            special_ids=self.special_ids,
        )
        out = {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}
        if self.global_attention_mask:
            out["global_attention_mask"] = torch.zeros_like(attention_mask)
        return out
