"""Model FLOPs (flops.py, the models' train_flops) against torch's own FLOP counter, and the peaks
the trainer's MFU divides by."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ds_longformer import flops
from ds_longformer.config import LongformerConfig
from ds_longformer.model import (LongformerForCandidateScoring, LongformerForMaskedLM, LongformerForMultipleChoice,
                                 LongformerForQuestionAnswering, LongformerForSequenceClassification,
                                 LongformerForTokenClassification)

N = 24


def tiny(cls, window: int = 2 * N, **kw):
    """The dense backend computes plain matmuls that FlopCounterMode sees (torch's CPU flash kernel
    it does not count); a window covering the sequence makes its full N x N the model's work."""
    cfg = LongformerConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, attention_window=window, max_position_embeddings=64,
                           attention_backend="dense", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           **{"num_labels": 3, **kw})
    torch.manual_seed(0)
    return cls(cfg).train()


def _addmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted(model, **batch) -> int:
    # torch's counter knows addmm but not its in-place form, which the MLM loss sums its chunks with
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


def test_band_pairs_counts_the_window():
    for n, window in ((10, 2), (10, 4), (10, 18), (10, 20), (10, 40), (37, 8), (64, 64)):
        i = torch.arange(n)
        brute = int(((i[:, None] - i[None, :]).abs() <= window // 2).sum())
        assert flops.band_pairs(n, window) == brute, (n, window)


@pytest.mark.parametrize("chunk_rows", [None, 3])  # the loss in one chunk, or summed over 3-row chunks
def test_masked_lm_train_flops_equal_torch_count(chunk_rows):
    model = tiny(LongformerForMaskedLM)
    if chunk_rows:
        model.lm_head.decoder.chunk_elements = chunk_rows * 101
    ids = torch.randint(3, 100, (2, N))
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]  # the head scores only these 10 positions
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert model.train_flops(**batch) == counted(model, **batch)


def test_candidate_scoring_train_flops_equal_torch_count():
    model = tiny(LongformerForCandidateScoring)
    ids = torch.randint(3, 100, (2, N))
    batch = dict(input_ids=ids, candidate_positions=torch.tensor([[3, 7, 9], [4, 5, 6]]), labels=torch.tensor([0, 2]))
    assert model.train_flops(**batch) == counted(model, **batch)


@pytest.mark.parametrize("head", ["qa", "tokens", "choices"])
def test_other_heads_train_flops_equal_torch_count(head):
    """Question answering, token classification and multiple choice (B x K choices of N tokens),
    without global tokens (an explicit all-zero global_attention_mask)."""
    cls = {"qa": LongformerForQuestionAnswering, "tokens": LongformerForTokenClassification,
           "choices": LongformerForMultipleChoice}[head]
    model = tiny(cls, **({"num_labels": 2} if head == "qa" else {}))
    shape = (2, 3, N) if head == "choices" else (2, N)
    ids = torch.randint(3, 100, shape)
    batch = dict(input_ids=ids, global_attention_mask=torch.zeros_like(ids))
    batch.update({"qa": dict(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])),
                  "tokens": dict(labels=torch.randint(0, 3, shape)),
                  "choices": dict(labels=torch.tensor([0, 2]))}[head])
    assert model.train_flops(**batch) == counted(model, **batch)


@pytest.mark.parametrize("n_global", [None, 3])  # None: the classifier's default global <s>
def test_global_attention_flops_close_to_torch_count(n_global):
    """With global tokens the count is the model's math (global rows through key_global/value_global
    or folded into the queries, whichever is cheaper), not one implementation's: within 2%."""
    model = tiny(LongformerForSequenceClassification)
    ids = torch.randint(3, 100, (2, N))
    batch = dict(input_ids=ids, labels=torch.tensor([0, 2]))
    if n_global:
        batch["global_attention_mask"] = (torch.arange(N) < n_global).long().expand(2, N)
    plain = 3 * 2 * 2 * flops.encoder_layer_flops(N, 2 * N, 0, 32, 4, 64)  # 2 sequences, 2 layers
    assert model.train_flops(**batch) > plain  # the global rows are counted
    assert model.train_flops(**batch) == pytest.approx(counted(model, **batch), rel=0.02)


def test_flops_grow_linearly_with_length_and_window():
    per_token = [flops.encoder_layer_flops(n, 512, 1, 768, 12, 3072) / n for n in (2048, 4096, 16384)]
    assert max(per_token) / min(per_token) < 1.05
    band = [flops.self_attention_flops(16384, w, 0, 768, 12, projections=False) for w in (256, 512, 1024)]
    assert band[1] / band[0] == pytest.approx(2, rel=0.01) and band[2] / band[1] == pytest.approx(2, rel=0.01)


def test_peak_flops_from_the_gpu_table_or_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert flops.peak_flops("cuda", "bf16") == (756e12, "NVIDIA H100 PCIe bf16 dense peak")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert flops.peak_flops("cuda", "fp32")[0] == pytest.approx(494.7e12)  # fp32 matmuls run in TF32
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert flops.peak_flops("cuda", "fp32")[0] == pytest.approx(66.9e12)
    rate, source = flops.peak_flops("cpu", "fp32")
    assert rate > 1e8 and source == "measured float32 matmul rate on cpu"


def test_the_matmul_probe_draws_from_its_own_generator():
    """It drew its matrices from torch's global generator, the one dropout draws from."""
    torch.manual_seed(0)
    flops.matmul_rate("cpu", torch.float32, n=64, c=32, repeats=1)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_train_flops_reads_global_tokens_as_the_forward_does():
    """attention_mask 2 marks a global token (transformers' convention), as global_attention_mask
    does; a global mark on a padding token counts for nothing."""
    model = tiny(LongformerForMaskedLM, window=8)
    ids = torch.randint(3, 100, (1, N))
    ones = torch.ones_like(ids)
    first = (torch.arange(N) == 0).long()[None]
    by_mask_value = model.train_flops(ids, attention_mask=ones + first)
    assert by_mask_value == model.train_flops(ids, attention_mask=ones, global_attention_mask=first)
    assert by_mask_value > model.train_flops(ids, attention_mask=ones)
    padded = ones.clone()
    padded[0, -1] = 0
    last = (torch.arange(N) == N - 1).long()[None]
    assert model.train_flops(ids, attention_mask=padded, global_attention_mask=last) == \
        model.train_flops(ids, attention_mask=padded)
