"""CUDA checks (skipped without a GPU): the fused flex path, low-precision training, fp16's loss scaler.

Run on a GPU machine with `bash launch/gpu_check.sh` (which also runs the benchmarks).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_longformer import AttentionLayout, LongformerConfig, LongformerForMaskedLM, LongformerSelfAttention

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def batch(B, N, device, n_global=3, pad=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    am[-1, N - pad:] = 0
    ids[am == 0] = 1
    gm = torch.zeros(B, N, dtype=torch.long)
    gm[:, 0] = 1
    gm[0, torch.randint(1, N - pad, (n_global,), generator=g)] = 1
    return ids.to(device), am.to(device), gm.to(device)


# Two shapes in a row: the compiled flex kernel must stay right when the batch size and padded
# length change, as they do from batch to batch in training (each new shape compiles: keep few).
@pytest.mark.parametrize("B, N", [(2, 1000), (1, 700)])
@pytest.mark.parametrize("backend", ["flex", "blocked"])
def test_backend_matches_dense_forward_and_backward_on_cuda(backend, B, N):
    torch.manual_seed(0)
    C, H, W = 256, 4, 128
    _, am, gm = batch(B, N, "cuda")
    module = LongformerSelfAttention(C, H, W).cuda()
    x = torch.randn(B, N, C, device="cuda")
    results = {}
    for name in (backend, "dense"):
        module.backend = name
        xi = x.clone().requires_grad_(True)
        out = module(xi, AttentionLayout.build(am, gm))
        out.pow(2).sum().backward()
        results[name] = (out.detach(), xi.grad, module.query.weight.grad.clone())
        module.zero_grad()
    for a, b in zip(results[backend], results["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["flex", "blocked"])
def test_low_precision_training_steps_stay_finite(dtype, backend):
    """The autocast loss equals the fp32 dense one to 1% (initializer_range 0.2: peaked attention,
    so a wrong mask or a low-precision softmax shows), then three steps stay finite."""
    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=2050, attention_window=256,
                           attention_backend=backend, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                           initializer_range=0.2)
    model = LongformerForMaskedLM(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    ids, am, gm = batch(2, 2048, "cuda")
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.15, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        model.set_attention_backend("dense")
        reference = model(ids, am, gm, labels=labels).loss.item()
        model.set_attention_backend(backend)
        with torch.autocast("cuda", dtype=dtype):
            low = model(ids, am, gm, labels=labels).loss.item()
    assert abs(low - reference) < 0.01 * abs(reference), (low, reference)
    for _ in range(3):
        with torch.autocast("cuda", dtype=dtype):
            loss = model(ids, am, gm, labels=labels).loss
        assert torch.isfinite(loss), loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()


@pytest.mark.parametrize("config, precision", [("zero2", "fp16"), ("zero2", "bf16"), ("zero0", "fp16")])
def test_trainer_on_one_gpu(tmp_path, config, precision):
    """The Trainer with ds_configs/zero2.json (and zero0.json, whose fp16 optimizer keeps its loss
    scale elsewhere than ZeRO's) on one GPU (torch's AdamW instead of DeepSpeed's FusedAdam, which
    would first be JIT-compiled): finite losses, finite trained weights."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "tests.trainer_helpers", "--deepspeed_config", config, "--precision", precision,
           "--max_steps", "4", "--ds_override", '{"optimizer": {"params": {"torch_adam": true}}}',
           "--default_root_dir", str(tmp_path), "--dump", str(tmp_path / "dump")]
    done = subprocess.run(cmd, cwd=repo, env={**env, "PYTHONPATH": str(repo)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert summary["global_step"] == 4 and torch.isfinite(torch.tensor(summary["train_loss"]))
    state = json.loads(Path(summary["run_dir"], "checkpoints", "global_step4", "trainer_state.json").read_text())
    assert state["zero_stage"] == int(config.removeprefix("zero"))
    params = torch.load(tmp_path / "dump" / "params_rank0.pt")
    assert all(torch.isfinite(p).all() for p in params.values())
    assert torch.isfinite(torch.load(tmp_path / "dump" / "logits.pt")).all()


@pytest.mark.parametrize("backend", ["flex", "blocked"])
def test_attentions_and_every_gradient_on_cuda(backend):
    """output_attentions gives the same probabilities with every backend (computed apart from the
    band kernels), and a training step gives every parameter a gradient, on the GPU too."""
    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=1026, attention_window=128,
                           attention_backend="dense", attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = LongformerForMaskedLM(cfg).cuda()
    ids, am, gm = batch(2, 1000, "cuda")
    with torch.no_grad():
        reference = model(ids, am, gm, output_attentions=True)
        model.set_attention_backend(backend)
        ours = model(ids, am, gm, output_attentions=True)
    for a, b in zip(ours.attentions + ours.global_attentions, reference.attentions + reference.global_attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.logits, reference.logits, rtol=1e-4, atol=1e-4)
    model.train()
    labels = torch.where(am.bool(), ids, torch.full_like(ids, -100))
    model(ids, am, torch.zeros_like(gm), labels=labels).loss.backward()  # no global token: zero gradients
    assert all(p.grad is not None for p in model.parameters())


def test_fp16_overflows_are_the_loss_scalers_until_it_gives_up(tmp_path):
    """fp16 (ZeRO-2): one step with overflowing gradients is skipped by the dynamic loss scaler and the
    run goes on; overflowing gradients at every step from step 2 bring the scale to its minimum
    (here 1, from 4), and then the run stops, naming the step, with `latest` before it."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    override = '{"optimizer": {"params": {"torch_adam": true}}, "fp16": {"initial_scale_power": 2, ' \
               '"min_loss_scale": 1, "hysteresis": 1}}'

    def run(out, *flags):
        cmd = [sys.executable, "-m", "tests.trainer_helpers", "--deepspeed_config", "zero2", "--precision", "fp16",
               "--max_steps", "8", "--save_every_n_steps", "1", "--ds_override", override, "--default_root_dir",
               str(out), "--dump", str(out / "dump"), *flags]
        return subprocess.run(cmd, cwd=repo, env={**env, "PYTHONPATH": str(repo)}, capture_output=True, text=True,
                              timeout=300)

    once = run(tmp_path / "once", "--inf_grad_at_step", "2")
    assert once.returncode == 0, once.stderr[-3000:]
    assert json.loads((tmp_path / "once" / "dump" / "summary.json").read_text())["global_step"] == 8
    always = run(tmp_path / "always", "--inf_grads_from_step", "2")
    assert always.returncode != 0
    assert "training diverged at step" in always.stderr and "loss scaler's minimum scale" in always.stderr
    latest = (tmp_path / "always" / "ds-longformer" / "checkpoints" / "latest").read_text()
    assert int(latest.removeprefix("global_step")) < 8
