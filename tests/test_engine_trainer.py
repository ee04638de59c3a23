"""engine/trainer.py, the train loop: data parallel equivalence (ZeRO 0/2/3), gradient accumulation, MFU,
the fused CPU AdamW, ZeRO-3 export, the resumable sampler, the NaN stop, a DeepSpeed config's own micro
batch. Runs: tests.trainer_helpers in subprocesses (conftest's parallel_runs, 1 or 2 gloo ranks)."""

import json
from pathlib import Path

import pytest
import torch

from ds_longformer.engine.trainer import ResumableDistributedSampler
from tests.trainer_helpers import assert_params_close, params, random_mlm_data, run_dir, scalars, train


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_equal_one_process(parallel_runs, stage):
    out, single = parallel_runs / f"zero{stage}", parallel_runs / "single"
    rank0, rank1 = params(out, 0), params(out, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks disagree"
    assert_params_close(rank0, params(single))
    assert scalars(run_dir(out), "train/loss") == pytest.approx(scalars(run_dir(single), "train/loss"), rel=1e-6)


def test_gradient_accumulation_equals_batch(parallel_runs):
    assert_params_close(params(parallel_runs / "accumulate"), params(parallel_runs / "single"))


def test_mfu_against_a_measured_peak_on_cpu(parallel_runs):
    """Without --peak_tflops on CPU the MFU divides by a measured matmul rate: a fraction of it."""
    for run in ("single", "zero2"):
        mfu = scalars(run_dir(parallel_runs / run), "train/mfu_percent")
        assert sorted(mfu) == [1, 2, 3, 4] and all(0 < value < 100 for value in mfu.values()), mfu


def test_cpu_runs_use_torchs_fused_adamw(parallel_runs):
    """On CPU the trainer asks for torch's fused AdamW (5x its default loop), also under ZeRO-2."""
    for run in ("single", "zero2"):
        summary = json.loads((parallel_runs / run / "dump" / "summary.json").read_text())
        assert summary["optimizer"] == {"class": "AdamW", "fused": True}, summary


def test_zero3_export_loads_in_transformers(parallel_runs):
    import transformers

    out = parallel_runs / "zero3"
    summary = json.loads((out / "dump" / "summary.json").read_text())
    # The run trained with gradient checkpointing; the exported config does not carry that setting.
    assert not json.loads(Path(summary["final_model"], "config.json").read_text()).get("gradient_checkpointing")
    hf, info = transformers.LongformerForMaskedLM.from_pretrained(summary["final_model"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    probe = torch.utils.data.default_collate(random_mlm_data(2, 3))  # the batch of dump/logits.pt
    with torch.no_grad():
        logits = hf.eval()(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, torch.load(out / "dump" / "logits.pt"), rtol=0, atol=1e-5)


def test_resumable_sampler_continues_the_epoch_order():
    full = ResumableDistributedSampler(range(23), num_replicas=2, rank=1, seed=5)
    full.set_epoch(3)
    resumed = ResumableDistributedSampler(range(23), num_replicas=2, rank=1, seed=5)
    resumed.set_epoch(3)
    resumed.skip = 4
    assert list(resumed) == list(full)[4:] and len(resumed) == len(full) - 4


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    proc = train(tmp_path, "--max_steps", "5", "--save_every_n_steps", "2", "--nan_at_step", "3", check=False)
    assert proc.returncode != 0
    assert "training loss is nan at step 3" in proc.stderr
    assert (run_dir(tmp_path) / "checkpoints" / "latest").read_text() == "global_step2"


def test_the_deepspeed_configs_micro_batch_feeds_the_loader(tmp_path):
    """A micro batch written in the config (and no --batch_size typed) is the run's: 16 samples of
    batch 4 are 4 steps an epoch."""
    train(tmp_path, "--epochs", "1", "--ds_override", '{"train_micro_batch_size_per_gpu": 4}')
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert summary["args"]["batch_size"] == 4 and summary["global_step"] == 4
