"""MLM masking: 15% selection, 80/10/10 replacement, specials and padding never touched, determinism."""

import pytest
import torch
from data_fixtures import make_tiny_roberta_tokenizer
from transformers import AutoTokenizer

from ds_longformer.data.mlm import MLMCollator, mask_tokens

MASK, VOCAB = 4, 1000


def test_masking_statistics_on_a_large_tensor():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (64, 4096), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    ids[special] = 0
    masked, labels = mask_tokens(ids, special, MASK, VOCAB, 0.15, generator=g)

    selected = labels != -100
    eligible = (~special).sum().item()
    assert selected.sum().item() / eligible == pytest.approx(0.15, abs=0.002)
    n = selected.sum().item()
    to_mask = (masked == MASK) & selected
    unchanged = (masked == ids) & selected
    other = selected & ~to_mask & ~unchanged
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.01)
    # A random replacement may draw the original token: 0.1 + 0.1 / VOCAB of the selected stay unchanged.
    assert unchanged.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert other.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert torch.equal(labels[selected], ids[selected])
    assert not selected[special].any() and torch.equal(masked[~selected], ids[~selected])


def test_random_replacements_are_spread_over_the_vocabulary():
    g = torch.Generator().manual_seed(1)
    ids = torch.full((32, 4096), 7)
    masked, labels = mask_tokens(ids, torch.zeros_like(ids, dtype=torch.bool), MASK, VOCAB, 0.5, generator=g)
    replaced = masked[(labels != -100) & (masked != MASK) & (masked != 7)]
    assert replaced.min() >= 0 and replaced.max() < VOCAB
    assert replaced.unique().numel() > 0.9 * VOCAB


def test_random_replacements_never_draw_special_tokens():
    g = torch.Generator().manual_seed(2)
    ids = torch.full((16, 4096), 7)
    special_ids = torch.tensor([0, 1, 2, 3, MASK])
    masked, labels = mask_tokens(ids, torch.zeros_like(ids, dtype=torch.bool), MASK, 10, 0.5, generator=g,
                                 special_ids=special_ids)
    replaced = masked[(labels != -100) & (masked != MASK)]
    assert not torch.isin(replaced, special_ids).any()
    assert set(replaced.unique().tolist()) == {5, 6, 7, 8, 9}


def test_same_generator_state_gives_the_same_masks():
    ids = torch.randint(5, VOCAB, (4, 256))
    special = torch.zeros_like(ids, dtype=torch.bool)
    a = mask_tokens(ids, special, MASK, VOCAB, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, special, MASK, VOCAB, generator=torch.Generator().manual_seed(3))
    c = mask_tokens(ids, special, MASK, VOCAB, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_roberta_tokenizer(tmp_path_factory.mktemp("tok")))


def test_collator_pads_and_never_masks_specials_or_padding(tokenizer):
    generator = torch.Generator().manual_seed(0)
    collator = MLMCollator(tokenizer, mlm_probability=0.9, pad_to_multiple_of=8, generator=generator)
    body = torch.randint(5, len(tokenizer), (300,)).tolist()
    features = [{"input_ids": [0, *body[:200], 2]}, {"input_ids": torch.tensor([0, *body[:50], 2])}]
    batch = collator(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 208) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][1].sum() == 52 and (batch["input_ids"][1, 52:] == tokenizer.pad_token_id).all()
    labels = batch["labels"]
    assert (labels[:, 0] == -100).all() and labels[0, 201] == -100 and labels[1, 51] == -100
    assert (labels[1, 52:] == -100).all()
    assert batch["input_ids"][0, 0] == 0 and batch["input_ids"][0, 201] == 2
    assert (labels != -100).sum() > 0.8 * 250


def test_collator_is_deterministic_and_optionally_adds_global_mask(tokenizer):
    features = [{"input_ids": [0, *range(5, 100), 2]}] * 3
    a = MLMCollator(tokenizer, generator=torch.Generator().manual_seed(7), global_attention_mask=True)(features)
    b = MLMCollator(tokenizer, generator=torch.Generator().manual_seed(7), global_attention_mask=True)(features)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["global_attention_mask"], torch.zeros_like(a["input_ids"]))
