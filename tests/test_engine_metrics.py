"""engine/metrics.py: the one writer of TensorBoard events and metrics.jsonl (rank 0 only, each step
recorded once across resumes and restarts), the per-step measurements (MFU only against a stated or
known peak, never above 100%, measured without touching the training's generators), the run folder."""

import json
from types import SimpleNamespace

import pytest
import torch

from ds_longformer.engine.metrics import MFU, MetricsWriter, device_peak_flops, step_extras
from tests.conftest import RESUME_FLAGS
from tests.trainer_helpers import random_mlm_data, records, run_dir, scalars, tiny_model, train


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_records_go_to_metrics_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.record({"loss": 1.5, "accuracy": 0.25}, step=2, epoch=0)
    writer.record({"test/f1": 0.5}, step=2, epoch=1)
    writer.scalars({"train/loss": 2.0}, step=1)
    writer.close()
    assert rows(tmp_path) == [{"step": 2, "epoch": 0, "loss": 1.5, "accuracy": 0.25},
                              {"step": 2, "epoch": 1, "test/f1": 0.5}]
    assert scalars(tmp_path, "val/loss") == {2: 1.5} and scalars(tmp_path, "test/f1") == {2: 0.5}
    assert scalars(tmp_path, "train/loss") == {1: 2.0}


def test_other_ranks_write_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.record({"loss": 1.0}, step=1, epoch=0)
    writer.scalars({"train/loss": 1.0}, step=1)
    writer.text("train/mfu_peak", "x")
    writer.close()
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_replaces_what_followed_its_checkpoint(tmp_path):
    first = MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 6):
        first.scalars({"train/loss": float(step)}, step)
        first.record({"loss": float(step)}, step, epoch=0)
    first.close()
    resumed = MetricsWriter(tmp_path, enabled=True, keep_until=3)  # resumed from the checkpoint of step 3
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    resumed.scalars({"train/loss": 40.0}, 4)
    resumed.close()
    assert scalars(tmp_path, "train/loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0}


def test_a_run_started_from_scratch_keeps_no_earlier_record(tmp_path, caplog):
    earlier = MetricsWriter(tmp_path, enabled=True)
    earlier.record({"loss": 9.0}, 0, epoch=0)  # e.g. pretrain's step-0 report of a run killed before its checkpoint
    earlier.close()
    again = MetricsWriter(tmp_path, enabled=True)  # keep_until -1: a new start
    again.record({"loss": 8.0}, 0, epoch=0)
    again.close()
    assert rows(tmp_path) == [{"step": 0, "epoch": 0, "loss": 8.0}]
    assert scalars(tmp_path, "val/loss") == {0: 8.0}
    assert "records of an earlier run" in caplog.text


def test_killed_before_its_first_checkpoint_and_restarted_records_each_step_once(tmp_path):
    """--resume latest finds no checkpoint and starts again: the first run's records are replaced."""
    flags = ["--max_steps", "3", "--save_every_n_steps", "2", "--val_check_interval", "1"]
    crashed = train(tmp_path, *flags, "--crash_during_save_at", "2", check=False)
    assert crashed.returncode == 3 and [r["step"] for r in records(tmp_path)] == [1, 2]
    train(tmp_path, *flags, "--resume", "latest")
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    assert sorted(scalars(run_dir(tmp_path), "val/loss")) == [1, 2, 3]


def test_fp16_loss_scale_is_read_from_zero_and_zero0_optimizers():
    """ZeRO's fp16 optimizers have cur_scale; ZeRO-0's FP16_Optimizer keeps it in loss_scale_config."""
    for optimizer, scale in ((SimpleNamespace(cur_scale=1024.0), 1024.0),
                             (SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=512.0)), 512.0)):
        engine = SimpleNamespace(fp16_enabled=lambda: True, optimizer=optimizer)
        assert step_extras(engine)["train/loss_scale"] == scale


def test_peak_flops_from_the_flag():
    engine = SimpleNamespace(fp16_enabled=lambda: False, bfloat16_enabled=lambda: True, device=torch.device("cpu"))
    assert device_peak_flops(engine, peak_tflops=2.5) == (2.5e12, "--peak_tflops, training in bf16")


def test_tensorboard_metrics_jsonl_and_run_folder(resume_runs):
    root, _, _ = resume_runs
    folder = run_dir(root / "straight")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
            "train/step_time", "train/rss_gb", "val/loss", "val/accuracy"} <= tags
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4, 6]
    assert scalars(folder, "train/tokens_per_s")[1] > 0
    # Model FLOPs per step: the model's train_flops of its two micro batches of one sample.
    sample = torch.utils.data.default_collate(random_mlm_data(1, 0))
    step_flops = 2 * tiny_model().train_flops(**sample)
    tflops, step_time = scalars(folder, "train/tflops")[1], scalars(folder, "train/step_time")[1]
    assert tflops * 1e12 * step_time == pytest.approx(step_flops, rel=1e-5)
    assert "--peak_tflops" in RESUME_FLAGS and "0.5" in RESUME_FLAGS
    assert scalars(folder, "train/mfu_percent")[1] == pytest.approx(100 * tflops / 0.5, rel=1e-5)
    assert acc.Tensors("train/mfu_peak/text_summary")[0].tensor_proto.string_val[0].decode() == \
        "0.5 TFLOP/s per device (--peak_tflops, training in fp32)"

    lines = records(root / "straight")
    assert [(r["step"], r["epoch"]) for r in lines] == [(2, 0), (4, 0), (6, 1)]  # 5 steps per epoch
    assert all({"loss", "accuracy"} <= r.keys() for r in lines)
    assert sorted(p.name for p in (folder / "checkpoints").glob("global_step*")) == ["global_step3", "global_step6"]
    for name in ("final_model", "best_model"):
        assert (folder / name / "model.safetensors").is_file() and (folder / name / "config.json").is_file()


def test_no_mfu_on_cpu_without_a_stated_peak():
    cpu = SimpleNamespace(fp16_enabled=lambda: False, bfloat16_enabled=lambda: False, device=torch.device("cpu"))
    peak, source = device_peak_flops(cpu, peak_tflops=0)
    assert peak is None and "--peak_tflops" in source and MFU(peak, source)(1e9) == {}


def test_mfu_is_never_above_100_percent(caplog):
    mfu = MFU(2e12, "--peak_tflops, training in fp32")
    assert mfu(1e12) == {"train/mfu_percent": 50.0}
    assert mfu(3e12) == {} and "give --peak_tflops this device's peak" in caplog.text  # the peak was too low
    assert mfu(1e12) == {} and caplog.text.count("give --peak_tflops") == 1  # said once, then no MFU


def test_measuring_a_gpu_peak_leaves_every_generator_as_it_was(monkeypatch):
    """An unknown GPU's peak is a measured matmul rate: whatever it draws, the training's generators
    continue as if it had not run."""
    import random

    import numpy as np

    from ds_longformer import flops

    def drawing_peak(device, precision):
        torch.rand(100), random.random(), np.random.rand()
        return 1e12, "measured"

    monkeypatch.setattr(flops, "peak_flops", drawing_peak)
    gpu = SimpleNamespace(fp16_enabled=lambda: False, bfloat16_enabled=lambda: True, device=torch.device("cuda"))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert device_peak_flops(gpu, peak_tflops=0)[0] == 1e12
    after = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert torch.equal(after[0], torch.rand(3)) and after[1:] == (random.random(), np.random.rand())


def test_a_resumed_run_keeps_exactly_the_records_before_its_checkpoint(tmp_path):
    """A checkpoint notes how many records preceded it: a record written at its step after it (classify's
    test metrics of a finished run) is not kept twice, and a line a kill cut short is dropped."""
    first = MetricsWriter(tmp_path, enabled=True)
    first.record({"loss": 1.0}, 2, epoch=0)
    noted = first.records  # saved with the checkpoint of step 2
    first.record({"test/f1": 0.5}, 2, epoch=0)
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "epoch"')  # killed mid-line
    resumed = MetricsWriter(tmp_path, enabled=True, keep_until=2, keep_records=noted)
    assert rows(tmp_path) == [{"step": 2, "epoch": 0, "loss": 1.0}] and resumed.records == 1
    old = MetricsWriter(tmp_path, enabled=True, keep_until=2)  # a checkpoint that noted nothing: by step
    assert old.records == 1

