"""Trainer: DeepSpeed config filling, data parallel equivalence (ZeRO 0/2/3), gradient accumulation,
exact kill-and-resume, TensorBoard + metrics.jsonl, ZeRO-3 export, NaN stop, world-size mismatch.

Training runs are subprocesses of `python -m tests.trainer_helpers` (tiny MLM model, random data),
two ranks through torch.distributed.run + gloo. Each run takes ~6 s (one rank) or ~15 s (two).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ds_longformer.trainer import (
    CONFIG_DIR,
    ResumableDistributedSampler,
    Trainer,
    TrainerArgs,
    add_trainer_args,
    build_ds_config,
)
from tests.trainer_helpers import random_mlm_data, reap, spawn, tiny_model

REPO = Path(__file__).resolve().parents[1]
ZERO3_PARTITION_ALL = '{"zero_optimization": {"stage3_param_persistence_threshold": 0}}'


def start(out: Path, *flags: str, nproc: int = 1) -> subprocess.Popen:
    """Start the tiny MLM training with `flags`, its run folder under `out`, dumps in `out/dump`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [*launcher, "-m", "tests.trainer_helpers", "--default_root_dir", str(out), "--dump", str(out / "dump"),
           *flags]
    return spawn(cmd, cwd=REPO, env=env)


def finish(proc: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    done = reap(proc)
    if check:
        assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stderr[-4000:]}"
    return done


def train(out: Path, *flags: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    return finish(start(out, *flags, nproc=nproc), check)


def params(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / "dump" / f"params_rank{rank}.pt")


def assert_params_close(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def run_dir(out: Path) -> Path:
    return out / "ds-longformer"


# ---- config and CLI (in process) ------------------------------------------------------------------
def _autos(node, path=""):
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos(v, f"{path}.{k}")]
    return [path] if node == "auto" else []


SHIPPED = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fp16", "bf16", "cpu"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_get_every_auto_value(name):
    args = TrainerArgs(deepspeed_config=name, batch_size=3, gradient_accumulation_steps=4, lr=2e-4,
                       weight_decay=0.1, grad_clip=0.5)
    on_cpu = name == "cpu"
    cfg = build_ds_config(args, total_steps=100, on_cpu=on_cpu)
    assert not _autos(cfg)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (3, 4)
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["lr"] == 2e-4 and cfg["optimizer"]["params"]["weight_decay"] == 0.1
    assert cfg["optimizer"]["params"].get("torch_adam", False) == on_cpu
    assert cfg["optimizer"]["params"].get("fused", False) == on_cpu  # torch's fused CPU AdamW
    assert "train_batch_size" not in cfg  # DeepSpeed derives it from the world size


def test_clipping_is_explicit_and_cli_wins_over_file(caplog):
    cfg = build_ds_config(TrainerArgs(deepspeed_config={"gradient_clipping": 2.0}, grad_clip=0.0), 10, on_cpu=True)
    assert cfg["gradient_clipping"] == 0.0  # not DeepSpeed's silent default of 1.0
    assert "replaced by the command line" in caplog.text


def test_precision_flags():
    assert build_ds_config(TrainerArgs(deepspeed_config="cpu", precision="bf16"), 10, True)["bf16"]["enabled"]
    cfg = build_ds_config(TrainerArgs(deepspeed_config="bf16", precision="fp32"), 10, False)
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        build_ds_config(TrainerArgs(deepspeed_config="fp16"), 10, on_cpu=True)


def test_deepspeed_scheduler_section_is_filled():
    sched = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                 "total_num_steps": "auto", "warmup_type": "linear"}}
    cfg = build_ds_config(TrainerArgs(deepspeed_config={"scheduler": sched}, lr=1e-3, warmup_steps=5), 50, True)
    assert cfg["scheduler"]["params"] == {"warmup_max_lr": 1e-3, "warmup_num_steps": 5, "total_num_steps": 50,
                                          "warmup_type": "linear"}


def test_unknown_config_lists_the_shipped_ones():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.json")) == sorted(SHIPPED)
    with pytest.raises(FileNotFoundError, match="zero3_offload"):
        build_ds_config(TrainerArgs(deepspeed_config="zero9"), 10, True)


def test_cli_flags_fill_trainer_args():
    parser = add_trainer_args(argparse.ArgumentParser())
    parser.set_defaults(lr=3e-5, project_name="classify")  # how a task sets its defaults
    ns = parser.parse_args("--deepspeed_config zero3 --batch_size 4 --gradient_accumulation_steps 2 --epochs 3 "
                           "--max_steps 7 --val_check_interval 5 --default_root_dir r --seed 1 "
                           "--gradient_checkpointing --resume latest --weight_decay 0 --warmup_steps 9".split())
    args = TrainerArgs.from_namespace(ns)
    assert args == TrainerArgs(deepspeed_config="zero3", batch_size=4, gradient_accumulation_steps=2, lr=3e-5,
                               weight_decay=0.0, warmup_steps=9, epochs=3, max_steps=7, val_check_interval=5,
                               default_root_dir="r", project_name="classify", seed=1, gradient_checkpointing=True,
                               resume="latest")


def test_resumable_sampler_continues_the_epoch_order():
    full = ResumableDistributedSampler(range(23), num_replicas=2, rank=1, seed=5)
    full.set_epoch(3)
    resumed = ResumableDistributedSampler(range(23), num_replicas=2, rank=1, seed=5)
    resumed.set_epoch(3)
    resumed.skip = 4
    assert list(resumed) == list(full)[4:] and len(resumed) == len(full) - 4


# ---- data parallel equivalence, gradient accumulation, ZeRO-3 export -----------------------------------
@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """4 steps over the same global batches of 2: one process (batch 2; batch 1 x accumulation 2)
    and two ranks of batch 1 at ZeRO 0, 2, 3 (ZeRO-3 partitions every parameter and runs with
    gradient checkpointing)."""
    root = tmp_path_factory.mktemp("parallel")
    common = ["--max_steps", "4", "--val_check_interval", "2"]
    one_process = [start(root / "single", *common, "--batch_size", "2"),  # in parallel: one core each
                   start(root / "accumulate", *common, "--batch_size", "1", "--gradient_accumulation_steps", "2")]
    for proc in one_process:
        finish(proc)
    for stage in (0, 2, 3):
        checkpointing = ["--gradient_checkpointing"] if stage == 3 else []  # the hardest combination
        train(root / f"zero{stage}", *common, *checkpointing, "--batch_size", "1", "--deepspeed_config",
              f"zero{stage}", "--ds_override", ZERO3_PARTITION_ALL, nproc=2)
    return root


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


def test_a_config_asking_for_foreach_gets_no_fused_flag():
    """torch refuses fused together with foreach: a config that asks for foreach keeps it alone."""
    cfg = build_ds_config(TrainerArgs(deepspeed_config={"optimizer": {"type": "AdamW", "params": {"foreach": True}}}),
                          10, on_cpu=True)
    assert cfg["optimizer"]["params"]["foreach"] is True and "fused" not in cfg["optimizer"]["params"]


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


def test_other_world_size_says_how_to_convert(parallel_runs, tmp_path):
    ckpt = run_dir(parallel_runs / "zero2") / "checkpoints"
    proc = train(tmp_path, "--max_steps", "6", "--deepspeed_config", "zero2", "--resume", str(ckpt), check=False)
    assert proc.returncode != 0
    assert "written by 2 ranks" in proc.stderr and "deepspeed.checkpoint.ds_to_universal" in proc.stderr


# ---- kill and resume, monitoring ---------------------------------------------------------------------
RESUME_FLAGS = ["--max_steps", "6", "--save_every_n_steps", "3", "--val_check_interval", "2", "--dropout", "0.1",
                "--batch_size", "1", "--gradient_accumulation_steps", "2", "--n_train", "10", "--peak_tflops", "0.5"]


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Six steps straight; the same run killed while saving step 6 (after DeepSpeed wrote its
    files, before the checkpoint was complete); a new run resuming from what the killed one left.
    Dropout is on and an epoch is 5 steps, so RNG and data order both matter."""
    root = tmp_path_factory.mktemp("resume")
    straight = start(root / "straight", *RESUME_FLAGS)
    killed = finish(start(root / "killed", *RESUME_FLAGS, "--crash_during_save_at", "6"), check=False)
    finish(straight)
    train(root / "resumed", *RESUME_FLAGS, "--resume", str(run_dir(root / "killed") / "checkpoints"))
    return root, killed


def test_kill_and_resume_is_exact(resume_runs):
    root, killed = resume_runs
    assert killed.returncode == 3, killed.stderr[-3000:]
    ckpts = run_dir(root / "killed") / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step3"  # not the half-written global_step6
    assert not (ckpts / "global_step6" / "trainer_state.json").exists()

    straight = scalars(run_dir(root / "straight"), "train/loss")
    first, second = scalars(run_dir(root / "killed"), "train/loss"), scalars(run_dir(root / "resumed"), "train/loss")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and sorted(second) == [4, 5, 6]
    assert [first[s] for s in (1, 2, 3)] + [second[s] for s in (4, 5, 6)] == pytest.approx(
        [straight[s] for s in range(1, 7)], rel=1e-6)
    assert scalars(run_dir(root / "resumed"), "train/lr") == pytest.approx(
        {s: v for s, v in scalars(run_dir(root / "straight"), "train/lr").items() if s > 3})
    assert_params_close(params(root / "resumed"), params(root / "straight"))


def test_tensorboard_metrics_jsonl_and_run_folder(resume_runs):
    root, _ = resume_runs
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
    assert scalars(folder, "train/mfu_percent")[1] == pytest.approx(100 * tflops / 0.5, rel=1e-5)  # --peak_tflops 0.5
    assert acc.Tensors("train/mfu_peak/text_summary")[0].tensor_proto.string_val[0].decode() == \
        "0.5 TFLOP/s per device (--peak_tflops, training in fp32)"

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows] == [(2, 0), (4, 0), (6, 1)]  # 5 steps per epoch
    assert all({"loss", "accuracy"} <= r.keys() for r in rows)
    assert sorted(p.name for p in (folder / "checkpoints").glob("global_step*")) == ["global_step3", "global_step6"]
    for name in ("final_model", "best_model"):
        assert (folder / name / "model.safetensors").is_file() and (folder / name / "config.json").is_file()


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    proc = train(tmp_path, "--max_steps", "5", "--save_every_n_steps", "2", "--nan_at_step", "3", check=False)
    assert proc.returncode != 0
    assert "training loss is nan at step 3" in proc.stderr
    assert (run_dir(tmp_path) / "checkpoints" / "latest").read_text() == "global_step2"


def test_fp16_loss_scale_is_read_from_zero_and_zero0_optimizers():
    """ZeRO's fp16 optimizers have cur_scale; ZeRO-0's FP16_Optimizer keeps it in loss_scale_config."""
    for optimizer, scale in ((SimpleNamespace(cur_scale=1024.0), 1024.0),
                             (SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=512.0)), 512.0)):
        engine = SimpleNamespace(fp16_enabled=lambda: True, optimizer=optimizer)
        assert Trainer._step_extras(SimpleNamespace(engine=engine))["train/loss_scale"] == scale


def test_resume_with_another_world_size_trains_the_planned_epochs(tmp_path):
    """Two ranks (ZeRO-0) crash while saving step 4; one process resumes from step 2 in the same
    run folder. An epoch is 4 steps on two ranks, 8 on one: the rest of epoch 0 (the 4 samples left
    per rank) then all of epoch 1 make 2 + 4 + 8 = 14 steps, and every step and validation is
    logged once although the crashed run had already logged steps 3-4."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--epochs", "2", "--n_train", "8", "--batch_size", "1", "--save_every_n_steps", "2",
             "--val_check_interval", "2", "--best_mode", "max"]  # max: the loss falls, so the best is not the last
    crashed = train(tmp_path, *flags, "--crash_during_save_at", "4", nproc=2, check=False)
    assert crashed.returncode != 0 and (run_dir(tmp_path) / "checkpoints" / "latest").read_text() == "global_step2"
    train(tmp_path, *flags, "--resume", "latest")
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert (summary["global_step"], summary["epoch"]) == (14, 2)

    rows = [json.loads(line) for line in (run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 14]
    best = max(rows, key=lambda r: r["loss"])  # best_metric loss, mode max, across the resume
    assert best["step"] != rows[-1]["step"]
    assert (summary["best_step"], summary["best_value"]) == (best["step"], pytest.approx(best["loss"]))
    ckpts = sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").glob("global_step*"))
    assert ckpts == ["global_step12", "global_step14"]  # keep_last_k 2 of the 7 saves, the crashed run's too
    acc = EventAccumulator(str(run_dir(tmp_path)))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 15))
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4, 6, 8, 10, 12, 14]


def test_log_every_n_steps_must_be_positive(tmp_path):
    proc = train(tmp_path, "--max_steps", "2", "--log_every_n_steps", "0", check=False)
    assert proc.returncode != 0 and "--log_every_n_steps must be at least 1" in proc.stderr


def test_rolled_back_run_never_leaves_latest_on_a_half_written_checkpoint(tmp_path):
    """Resumed from step 2 while `latest` names step 4: re-saving step 4 first moves `latest` back
    to step 2, so a crash in that save leaves a resumable folder."""
    flags = ["--max_steps", "4", "--save_every_n_steps", "2"]
    train(tmp_path, *flags)
    ckpts = run_dir(tmp_path) / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step4"
    crashed = train(tmp_path, *flags, "--resume", str(ckpts / "global_step2"), "--crash_during_save_at", "4",
                    check=False)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    assert (ckpts / "latest").read_text() == "global_step2"
    assert (ckpts / "global_step2" / "trainer_state.json").is_file()


def test_resume_drops_a_best_model_exported_after_the_checkpoint(tmp_path):
    """The crashed run exported best_model/ at step 4 (mode min), after its last complete
    checkpoint (step 2, whose best was step 2): the resumed run must not keep step 4's weights as
    the best of its own history."""
    flags = ["--max_steps", "4", "--save_every_n_steps", "2", "--val_check_interval", "2", "--best_mode", "min",
             "--n_train", "8", "--batch_size", "1"]
    crashed = train(tmp_path, *flags, "--crash_during_save_at", "4", check=False)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    marker = run_dir(tmp_path) / "best_model" / "best_step.json"
    assert json.loads(marker.read_text())["step"] == 4  # the loss fell from step 2 to 4 (seeded)
    train(tmp_path, *flags, "--resume", "latest")
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    # best_model/ is either gone (the resumed run never beat step 2) or its own best, never the crashed run's
    assert summary["best_model"] is None or json.loads(marker.read_text())["step"] == summary["best_step"]
