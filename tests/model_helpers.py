"""Tiny models and batches shared by the model tests (transformers is their numerical reference)."""

import torch

from ds_longformer import LongformerConfig

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=200, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_config(**kw) -> LongformerConfig:
    return LongformerConfig(**{**TINY, **kw})


def make_batch(B, N, pad_lengths=(), globals_=(), vocab=120, pad_id=1, seed=0):
    """Random ids; example b is padded to pad_lengths[b]; globals_[b] lists its global positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    for b, length in enumerate(pad_lengths):
        am[b, length:] = 0
    ids[am == 0] = pad_id
    gm = torch.zeros(B, N, dtype=torch.long)
    for b, positions in enumerate(globals_):
        gm[b, list(positions)] = 1
    return ids, am, gm


def hf_twin(model, folder, hf_cls):
    """transformers' `hf_cls` loaded from `model`'s save_pretrained folder: no missing or unexpected key."""
    model.save_pretrained(folder)
    hf, info = hf_cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()
