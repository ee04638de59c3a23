"""engine/checkpointing.py: exact kill-and-resume (dropout on, 1 and 2 ranks, ZeRO-0 and ZeRO-2, random kills),
`latest` never on a half-written checkpoint, damaged checkpoints (checked, fallen back from, refused), roll-back,
best_model/ replaced whole, another world size (re-planned epochs, or the conversion command), non-finite weights
never saved. Runs: tests.trainer_helpers in subprocesses (conftest's resume_runs, two_rank_straight)."""

import json
import os
import random
import shutil
import signal
import time

import pytest
import torch

from ds_longformer.engine import UserError
from ds_longformer.engine.checkpointing import Checkpointer
from ds_longformer.engine.files import recover_folder, replace_folder
from tests.conftest import TWO_RANK_RESUME_FLAGS
from tests.trainer_helpers import (assert_params_equal, finish, loss_log, params, records, run_dir, scalars, start,
                                   train)


def test_kill_and_resume_is_exact(resume_runs):
    """One process, dropout on, accumulation 2: killed while saving step 6, resumed from step 3."""
    root, killed, _ = resume_runs
    assert killed.returncode == 3, killed.stderr[-3000:]
    ckpts = run_dir(root / "killed") / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step3"  # not the half-written global_step6
    assert not (ckpts / "global_step6" / "trainer_state.json").exists()

    straight = scalars(run_dir(root / "straight"), "train/loss")
    first, second = scalars(run_dir(root / "killed"), "train/loss"), scalars(run_dir(root / "resumed"), "train/loss")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and sorted(second) == [4, 5, 6]
    assert [first[s] for s in (1, 2, 3)] + [second[s] for s in (4, 5, 6)] == [straight[s] for s in range(1, 7)]
    assert scalars(run_dir(root / "resumed"), "train/lr") == {
        s: v for s, v in scalars(run_dir(root / "straight"), "train/lr").items() if s > 3}
    assert_params_equal(params(root / "resumed"), params(root / "straight"))


def step_losses(log) -> dict[int, float]:
    """{step: loss} of a loss log, checking that every run that logged a step logged the same loss."""
    losses = {}
    for row in loss_log(log):
        if row[0] == "loss":
            _, step, loss = row
            assert losses.setdefault(step, loss) == loss, f"step {step}: {loss} after {losses[step]}"
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_two_ranks_killed_mid_epoch_resume_bit_exact(two_rank_straight, tmp_path, stage):
    """Two ranks (dropout, masks drawn in collate, accumulation) killed while saving step 9 (3 steps
    into the second epoch) resume from step 8: every step's loss and both ranks' final weights are
    bit-identical to the uninterrupted run's."""
    straight = two_rank_straight / f"zero{stage}"
    flags = [*TWO_RANK_RESUME_FLAGS, "--deepspeed_config", f"zero{stage}", "--loss_log", str(tmp_path / "loss.log")]
    crashed = train(tmp_path, *flags, "--crash_during_save_at", "9", nproc=2, check=False)
    assert crashed.returncode != 0
    assert (run_dir(tmp_path) / "checkpoints" / "latest").read_text() == "global_step8"
    train(tmp_path, *flags, "--resume", "latest", nproc=2)
    reference, logged = step_losses(straight / "loss.log"), step_losses(tmp_path / "loss.log")
    assert sorted(reference) == list(range(1, 25)) and sorted(logged) == list(range(1, 25))
    assert logged == reference  # steps 9 (logged twice: before the kill and after the resume) to 24 included
    for rank in (0, 1):
        assert_params_equal(params(tmp_path, rank), params(straight, rank))
    assert records(tmp_path) == records(straight)  # every validation once, the same values


def wait_for(predicate, proc, timeout=120.0) -> bool:
    """Poll `predicate` until it holds (True) or `proc` ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the run made no progress")


@pytest.mark.slow
def test_random_kills_of_two_ranks_resume_bit_identical(two_rank_straight, tmp_path):
    """The acceptance fault test: two ranks (ZeRO-0, dropout, a checkpoint every step) killed with
    SIGKILL (the whole process group) 12 times, each run resumed with --resume latest: half at a
    random moment after the run's first new step, half just after a checkpoint began (mid-save,
    unless the save was quicker than the kill: at least 3 are).
    Every step's loss any run logged, the final weights of both ranks and the validation records
    equal the uninterrupted run's, bit for bit."""
    rng = random.Random(1234)
    log = tmp_path / "loss.log"
    flags = [*TWO_RANK_RESUME_FLAGS, "--deepspeed_config", "zero0", "--loss_log", str(log), "--resume", "latest"]
    kills, mid_save = [], 0
    while len(kills) < 12:
        before = loss_log(log)
        proc = start(tmp_path, *flags, nproc=2)
        if not wait_for(lambda: any(r[0] == "loss" for r in loss_log(log)[len(before):]), proc):
            break  # finished before a new step was logged
        if len(kills) % 2:  # just after a save began
            if not wait_for(lambda: (loss_log(log)[-1][0] == "save"), proc):
                break
            time.sleep(rng.uniform(0, 0.01))
        else:
            time.sleep(rng.uniform(0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rows = loss_log(log)
        last_save = next((r for r in reversed(rows) if r[0] in ("save", "saved")), None)
        mid_save += last_save is not None and last_save[0] == "save"
        kills.append(rows[-1])
    finish(start(tmp_path, *flags, nproc=2))
    print(f"{len(kills)} kills, {mid_save} mid-save; the last line each killed run logged: {kills}")
    assert len(kills) == 12 and mid_save >= 3, (kills, mid_save)

    straight = two_rank_straight / "zero0"
    assert step_losses(log) == step_losses(straight / "loss.log")  # also: each step the same in every run
    for rank in (0, 1):
        assert_params_equal(params(tmp_path, rank), params(straight, rank))
    assert records(tmp_path) == records(straight)
    assert scalars(run_dir(tmp_path), "train/loss") == scalars(run_dir(straight), "train/loss")


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
    with pytest.raises(UserError, match="trainer_state.json is missing"):
        checkpoints.find(str(tmp_path / "checkpoints" / "global_step3"))
    assert checkpoints.find("latest") is None  # a save that never finished: still from scratch


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """One process, dropout on, 6 steps, checkpoints at steps 2, 4 and 6 (all kept)."""
    out = tmp_path_factory.mktemp("three_checkpoints")
    train(out, "--max_steps", "6", "--save_every_n_steps", "2", "--keep_last_k", "3", "--dropout", "0.1")
    return out


def truncate(path, keep: float = 0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


# How a checkpoint gets damaged (the fault campaign), and the file the message must name.
DAMAGE = {
    "truncated model states": (lambda d: truncate(d / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt"),
    "deleted model states": (lambda d: (d / "mp_rank_00_model_states.pt").unlink(), "mp_rank_00_model_states.pt"),
    "truncated trainer_state.json": (lambda d: truncate(d / "trainer_state.json"), "trainer_state.json"),
    "truncated rng file": (lambda d: truncate(d / "rng_state_rank0.pt"), "rng_state_rank0.pt"),
    "a byte more": (lambda d: (d / "rng_state_rank0.pt").open("ab").write(b"x"), "rng_state_rank0.pt"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(three_checkpoints, tmp_path, caplog, damage):
    run = run_dir(tmp_path)
    shutil.copytree(run_dir(three_checkpoints), run)
    spoil, file = DAMAGE[damage]
    spoil(run / "checkpoints" / "global_step6")
    checkpoints = Checkpointer(run, rank=0, world_size=1, keep_last_k=3)
    with pytest.raises(UserError, match=f"global_step6/{file}"):
        checkpoints.find(str(run / "checkpoints" / "global_step6"))  # named explicitly: stop, naming the file
    point = checkpoints.find("latest")
    assert point.tag == "global_step4"
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"global_step6/{file}" in warning and "resuming from" in warning and "global_step4" in warning
    spoil(run / "checkpoints" / "global_step4")
    spoil(run / "checkpoints" / "global_step2")
    with pytest.raises(UserError, match="no sound checkpoint"):
        checkpoints.find("latest")


def test_a_missing_rng_file_of_another_rank_is_damage(two_rank_straight, tmp_path):
    """A deleted rng_state_rank1.pt was accepted: rank 1 then resumed with new RNG streams, not exactly."""
    run = run_dir(tmp_path)
    shutil.copytree(run_dir(two_rank_straight / "zero0"), run)
    (run / "checkpoints" / "global_step24" / "rng_state_rank1.pt").unlink()
    for rank in (0, 1):
        with pytest.raises(UserError, match="global_step24/rng_state_rank1.pt is missing"):
            Checkpointer(run, rank=rank, world_size=2, keep_last_k=2).find(str(run / "checkpoints" / "global_step24"))
        assert Checkpointer(run, rank=rank, world_size=2, keep_last_k=2).find("latest").tag == "global_step23"


def test_resume_latest_past_a_damaged_checkpoint_is_exact(three_checkpoints, tmp_path):
    """The newest checkpoint truncated: --resume latest warns, resumes from the one before and ends
    where the uninterrupted run ended, bit for bit."""
    shutil.copytree(run_dir(three_checkpoints), run_dir(tmp_path))
    truncate(run_dir(tmp_path) / "checkpoints" / "global_step6" / "mp_rank_00_model_states.pt")
    resumed = train(tmp_path, "--max_steps", "6", "--save_every_n_steps", "2", "--keep_last_k", "3", "--dropout",
                    "0.1", "--resume", "latest")
    assert "global_step6/mp_rank_00_model_states.pt is truncated" in resumed.stderr
    assert "resumed from" in resumed.stderr and "global_step4 at step 4" in resumed.stderr
    assert_params_equal(params(tmp_path), params(three_checkpoints))


def test_best_model_is_replaced_as_a_whole(tmp_path):
    """Killed while exporting a new best model: best_model/ still holds the previous export whole
    (it used to hold the new weights with the old best_step.json)."""
    flags = ["--max_steps", "3", "--val_check_interval", "1", "--save_every_n_steps", "1"]
    crashed = train(tmp_path, *flags, "--crash_in_best_export_at", "2", check=False)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    best, before = run_dir(tmp_path) / "best_model", tmp_path / "dump" / "best_before"
    assert json.loads((before / "best_step.json").read_text()) == {"step": 1}  # (every validation is the best here)
    assert json.loads((best / "best_step.json").read_text()) == {"step": 1}
    assert (best / "model.safetensors").read_bytes() == (before / "model.safetensors").read_bytes()


def test_a_folder_replacement_interrupted_anywhere_recovers_whole(tmp_path):
    """replace_folder's two renames, a crash before, between and after them: recover_folder leaves the
    old folder or the new one, whole."""
    def folder(name, step):
        (tmp_path / name).mkdir()
        (tmp_path / name / "best_step.json").write_text(str(step))

    target = tmp_path / "best_model"
    for state, expected in (("new written", 1), ("old moved aside", 2), ("renamed", 2), ("done", 2)):
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        folder("best_model", 1)
        folder(".best_model.new", 2)
        if state != "new written":
            os.rename(target, tmp_path / ".best_model.old")
        if state in ("renamed", "done"):
            os.rename(tmp_path / ".best_model.new", target)
        if state == "done":
            shutil.rmtree(tmp_path / ".best_model.old")
        recover_folder(target)
        assert (target / "best_step.json").read_text() == str(expected), state
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"], state
    folder(".best_model.new", 3)
    replace_folder(tmp_path / ".best_model.new", target)
    assert (target / "best_step.json").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == [
        "best_model"]


def test_non_finite_weights_are_never_saved(tmp_path):
    """A step made the weights non-finite (a NaN-poisoned optimizer update): the save refuses."""
    from ds_longformer.engine import DivergenceError
    from ds_longformer.engine.checkpointing import weights_are_finite
    from ds_longformer.engine.distributed import init_distributed
    from types import SimpleNamespace

    init_distributed()
    model = torch.nn.Linear(2, 2)
    engine = SimpleNamespace(module=model)
    assert weights_are_finite(engine)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not weights_are_finite(engine)
    checkpoints = Checkpointer(tmp_path, rank=0, world_size=1, keep_last_k=2)
    with pytest.raises(DivergenceError, match="weights at step 7 are not finite: no checkpoint written"):
        checkpoints.save(engine, {"global_step": 7})
    assert not (tmp_path / "checkpoints").exists()
