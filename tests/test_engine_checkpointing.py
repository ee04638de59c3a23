"""engine/checkpointing.py: exact kill-and-resume, `latest` never on a half-written checkpoint, roll-back,
best_model/ after a resume, another world size (re-planned epochs, or the conversion command), a
checkpoint --resume cannot use. Runs: tests.trainer_helpers in subprocesses (conftest's resume_runs)."""

import json

import pytest

from ds_longformer.engine import UserError
from ds_longformer.engine.checkpointing import Checkpointer
from tests.trainer_helpers import assert_params_close, params, records, run_dir, scalars, train


def test_kill_and_resume_is_exact(resume_runs):
    root, killed, _ = resume_runs
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


def test_resume_is_logged(resume_runs):
    _, _, resumed = resume_runs
    assert "INFO ds_longformer.engine.checkpointing: resumed from" in resumed.stderr
    assert "global_step3 at step 3 (epoch 0)" in resumed.stderr


def test_other_world_size_says_how_to_convert(parallel_runs, tmp_path):
    ckpt = run_dir(parallel_runs / "zero2") / "checkpoints"
    proc = train(tmp_path, "--max_steps", "6", "--deepspeed_config", "zero2", "--resume", str(ckpt), check=False)
    assert proc.returncode != 0
    assert "written by 2 ranks" in proc.stderr and "deepspeed.checkpoint.ds_to_universal" in proc.stderr


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

    rows = records(tmp_path)
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


def test_resume_refuses_what_is_not_a_complete_checkpoint(tmp_path):
    checkpoints = Checkpointer(tmp_path, rank=0, world_size=1, keep_last_k=2)
    assert checkpoints.find(None) is None and checkpoints.find("latest") is None  # nothing yet: from scratch
    with pytest.raises(UserError, match="does not exist"):
        checkpoints.find(str(tmp_path / "nowhere"))
    (tmp_path / "checkpoints" / "global_step3").mkdir(parents=True)
    with pytest.raises(UserError, match="has no trainer_state.json"):
        checkpoints.find(str(tmp_path / "checkpoints" / "global_step3"))
