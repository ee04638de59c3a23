"""engine/trainer.py, the train loop: data parallel equivalence (ZeRO 0/2/3), gradient accumulation, no MFU
on CPU without a stated peak, the fused CPU AdamW, ZeRO-3 export, the resumable sampler, the stop at a
non-finite loss or gradient norm, measuring that never changes training, collation seeded per batch,
a DeepSpeed config's own micro batch. Runs: tests.trainer_helpers in subprocesses (conftest's parallel_runs,
1 or 2 gloo ranks)."""

import json
from pathlib import Path

import pytest
import torch

from ds_longformer.engine.trainer import ResumableDistributedSampler
from tests.trainer_helpers import (assert_params_close, assert_params_equal, finish, params, random_mlm_data, run_dir,
                                   scalars, start, train)


def tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_equal_one_process(parallel_runs, stage):
    out, single = parallel_runs / f"zero{stage}", parallel_runs / "single"
    rank0, rank1 = params(out, 0), params(out, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks disagree"
    assert_params_close(rank0, params(single))
    assert scalars(run_dir(out), "train/loss") == pytest.approx(scalars(run_dir(single), "train/loss"), rel=1e-6)


def test_gradient_accumulation_equals_batch(parallel_runs):
    assert_params_close(params(parallel_runs / "accumulate"), params(parallel_runs / "single"))


def test_no_mfu_on_cpu_without_a_stated_peak(parallel_runs):
    """On CPU the MFU divided by a matmul rate measured at start: up to 196% on a loaded machine.
    Without --peak_tflops no MFU is logged now (test_engine_metrics: against the flag's peak)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in ("single", "zero2"):
        acc = EventAccumulator(str(run_dir(parallel_runs / run)))
        acc.Reload()
        assert "train/tflops" in acc.Tags()["scalars"] and "train/mfu_percent" not in acc.Tags()["scalars"]


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
    assert "training diverged at step 3 (epoch 0): the training loss is nan" in proc.stderr
    assert (run_dir(tmp_path) / "checkpoints" / "latest").read_text() == "global_step2"


@pytest.mark.parametrize("precision, config", [("fp32", "zero0"), ("fp32", "zero2"), ("bf16", "zero0")])
def test_a_non_finite_gradient_norm_stops_the_run_at_its_step(tmp_path, precision, config):
    """Gradients made non-finite at step 3, the loss finite: the run used to go on (bf16 for 16
    steps and exit 0, DeepSpeed skipping each update; fp32 until the weights, saved, were NaN).
    Now it stops at step 3 in every precision, and no checkpoint of it or later is kept."""
    proc = train(tmp_path, "--max_steps", "5", "--save_every_n_steps", "1", "--inf_grad_at_step", "3",
                 "--precision", precision, "--deepspeed_config", config, check=False)
    assert proc.returncode != 0
    assert "training diverged at step 3 (epoch 0): the gradient norm is" in proc.stderr, proc.stderr[-3000:]
    ckpts = run_dir(tmp_path) / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step1", "global_step2"]


def test_lr_1e3_stops_and_keeps_only_finite_checkpoints(tmp_path):
    """The issue's fp32 run at lr 1e3 stopped at step 5 (a NaN loss) after non-finite gradients at
    steps 3-4, with non-finite weights in the checkpoints it kept. Now it stops at its first
    non-finite gradient norm, before the update, and every checkpoint it keeps is finite. (bf16:
    test_a_non_finite_gradient_norm_stops_the_run_at_its_step; this tiny model's bf16 run at lr 1e3
    stays finite.)"""
    proc = train(tmp_path, "--max_steps", "16", "--save_every_n_steps", "1", "--lr", "1e3", check=False)
    assert proc.returncode != 0 and "training diverged at step" in proc.stderr, proc.stderr[-3000:]
    ckpts = sorted((run_dir(tmp_path) / "checkpoints").glob("global_step*"))
    assert ckpts and (run_dir(tmp_path) / "checkpoints" / "latest").read_text() == ckpts[-1].name
    for ckpt in ckpts:
        weights = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.isfinite(w.float()).all() for w in weights.values()), ckpt.name


def test_measuring_never_changes_what_trains(tmp_path):
    """Dropout on; one run counts FLOPs with a counter that draws from torch's global generator and
    logs MFU against --peak_tflops, the other measures nothing: bit-identical losses and weights
    (the start-of-training matmul probe used to change the final loss from 4.7217 to 4.7474)."""
    flags = ["--max_steps", "4", "--dropout", "0.1", "--n_train", "8", "--batch_size", "1"]
    runs = [start(tmp_path / "plain", *flags), start(tmp_path / "measured", *flags, "--measure_draws",
                                                         "--peak_tflops", "1")]
    for run in runs:
        finish(run)
    assert "train/mfu_percent" in tags(run_dir(tmp_path / "measured"))
    assert scalars(run_dir(tmp_path / "plain"), "train/loss") == scalars(run_dir(tmp_path / "measured"), "train/loss")
    assert_params_equal(params(tmp_path / "plain"), params(tmp_path / "measured"))


def test_collate_masks_depend_on_the_batch_not_the_worker(tmp_path):
    """Masks drawn in the collate function (as MLM's) with dropout on the dense backend: 2 DataLoader
    workers train exactly as none do, and a run killed mid-epoch resumes exactly with its workers
    (each worker's generator used to continue from the epoch's start: other masks after a resume)."""
    flags = ["--max_steps", "6", "--dropout", "0.1", "--n_train", "10", "--batch_size", "1", "--mask_in_collate",
             "--attention_backend", "dense", "--save_every_n_steps", "2"]
    runs = [start(tmp_path / "main", *flags), start(tmp_path / "workers", *flags, "--num_workers", "2")]
    for run in runs:
        finish(run)
    crashed = train(tmp_path / "resumed", *flags, "--num_workers", "2", "--crash_during_save_at", "4", check=False)
    assert crashed.returncode == 3
    train(tmp_path / "resumed", *flags, "--num_workers", "2", "--resume", "latest")
    reference = scalars(run_dir(tmp_path / "main"), "train/loss")
    assert sorted(reference) == list(range(1, 7))
    for run in ("workers", "resumed"):
        assert scalars(run_dir(tmp_path / run), "train/loss") == reference, run
        assert_params_equal(params(tmp_path / run), params(tmp_path / "main"))


def test_the_deepspeed_configs_micro_batch_feeds_the_loader(tmp_path):
    """A micro batch written in the config (and no --batch_size typed) is the run's: 16 samples of
    batch 4 are 4 steps an epoch."""
    train(tmp_path, "--epochs", "1", "--ds_override", '{"train_micro_batch_size_per_gpu": 4}')
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert summary["args"]["batch_size"] == 4 and summary["global_step"] == 4
