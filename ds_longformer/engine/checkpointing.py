"""Checkpoints of a run, resuming from them, and the Hugging Face folders it exports.

Layout under ``<run_dir>/checkpoints/``: ``global_step<N>/`` holds DeepSpeed's files, one
``rng_state_rank<r>.pt`` per rank and, written last, ``trainer_state.json`` (the Trainer's counters
and the size of every other file of the checkpoint; its presence marks the checkpoint complete).
``latest`` names the newest complete one; it is replaced atomically, after every rank has finished
writing, so a crash mid-save leaves it on the previous checkpoint. The newest ``keep_last_k``
complete checkpoints up to the saved step are kept. A checkpoint is never written from weights that
are not finite (``DivergenceError``).

Resuming (``Checkpointer.find`` before ``deepspeed.initialize``, ``load`` after): every file of the
checkpoint is checked first (``problem``: trainer_state.json readable, each file it lists present,
of its recorded size and readable, an RNG file for every rank). ``--resume latest`` takes the
newest such checkpoint, from ``latest`` back, saying in one warning what was damaged; ``--resume
PATH`` to a damaged one stops naming the file (``UserError``). The same world size restores every
rank's RNG too (exact resume); another world size loads a ZeRO-0 checkpoint or a
``ds_to_universal`` folder (new RNG streams), and stops at a ZeRO-1/2/3 one with the conversion
command. Resuming from a checkpoint older than ``latest`` (a roll-back) moves ``latest`` back to
this run's own checkpoint before a newer folder is rewritten, and drops a best_model/ exported
after the resumed checkpoint.

``export`` writes a Hugging Face folder (config.json, model.safetensors, tokenizer) from any ZeRO
stage; ``export_best`` replaces ``best_model/`` as a whole folder (files.replace_folder), its
``best_step.json`` saying which step it holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import reduce_across_ranks
from .errors import DivergenceError, UserError
from .files import atomic_write_text, recover_folder, replace_folder, staging_folder
from .rng import rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

CKPT_PREFIX = "global_step"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: marks it complete
BEST_STEP_FILE = "best_step.json"  # in best_model/: the step whose weights it holds
STATE_KEYS = ("global_step", "epoch", "epoch_samples", "world_size", "zero_stage", "best_value", "best_step")


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def step_of(tag_dir: Path) -> int:
    """N of a global_step<N> folder; -1 for anything else."""
    m = re.fullmatch(rf"{CKPT_PREFIX}(\d+)", tag_dir.name)
    return int(m.group(1)) if m else -1


@dataclasses.dataclass
class ResumePoint:
    load_dir: Path  # DeepSpeed's load_checkpoint(load_dir, tag)
    tag: str
    universal: bool  # a ds_to_universal folder (the DeepSpeed config must say load_universal)


class Checkpointer:
    def __init__(self, run_dir: Path, rank: int, world_size: int, keep_last_k: int):
        self.run_dir, self.ckpt_dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last_k = rank, world_size, keep_last_k
        self.saved_at = -1  # step of this run's last checkpoint (or of the one it resumed from)
        if rank == 0:
            recover_folder(self.run_dir / "best_model")  # an export_best a crash interrupted

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, engine, state: dict) -> Path:
        """DeepSpeed checkpoint of ``state["global_step"]``, with ``state`` (the Trainer's counters)
        and every rank's RNG. Collective."""
        step = state["global_step"]
        if not weights_are_finite(engine):
            raise DivergenceError(f"the weights at step {step} are not finite: no checkpoint written, "
                                  f"{self.latest_note()}")
        tag = f"{CKPT_PREFIX}{step}"
        tag_dir = self.ckpt_dir / tag
        if self.rank == 0 and tag_dir.exists():  # leftovers of a save that crashed, or of a run rolled back
            latest = self.ckpt_dir / "latest"
            if latest.is_file() and latest.read_text().strip() == tag:  # rolled back past it: `latest`
                # must not name a folder being rewritten: this run's own last checkpoint (or resume point)
                own = self.ckpt_dir / f"{CKPT_PREFIX}{self.saved_at}"
                if self.saved_at >= 0 and own != tag_dir and (own / STATE_FILE).is_file():
                    atomic_write_text(latest, own.name)
                else:
                    latest.unlink()
            shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"trainer": state}, save_latest=False)
        torch.save(rng_state(), tag_dir / rng_file(self.rank))
        dist.barrier()
        if self.rank == 0:  # every rank has written its files: record them, then mark the checkpoint complete
            files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
            atomic_write_text(tag_dir / STATE_FILE, json.dumps({**state, "files": files}, indent=2))
            atomic_write_text(self.ckpt_dir / "latest", tag)
            self._prune(keep=tag_dir)
        dist.barrier()
        self.saved_at = step
        return tag_dir

    def _complete(self, below: int) -> list[Path]:
        """Complete checkpoint folders of steps <= below, oldest first."""
        return sorted((p for p in self.ckpt_dir.iterdir() if 0 <= step_of(p) <= below and (p / STATE_FILE).is_file()),
                      key=step_of)

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last_k` complete checkpoints up to this step; drop older and
        unfinished ones. Later steps (left by a run that was rolled back to an earlier checkpoint)
        are neither counted nor deleted: the run overwrites them as it reaches them."""
        if self.keep_last_k <= 0:
            return
        step = step_of(keep)
        tags = [p for p in self.ckpt_dir.iterdir() if 0 <= step_of(p) <= step]
        kept = set(self._complete(below=step)[-self.keep_last_k:]) | {keep}
        for path in tags:
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)

    def latest_note(self) -> str:
        """Where a stopped run can resume from, for error messages."""
        latest = self.ckpt_dir / "latest"
        if latest.is_file():
            return f"the last complete checkpoint is {self.ckpt_dir / latest.read_text().strip()} (--resume latest)"
        return "no checkpoint was written yet"

    # ---- resuming -------------------------------------------------------------------------------
    def find(self, resume: str | None) -> ResumePoint | None:
        """The checkpoint ``--resume`` names (None: start from scratch), its files checked, before
        deepspeed.initialize (see the module docstring)."""
        if resume is None:
            return None
        if resume == "latest":
            path = self._newest_sound()
            if path is None:
                return None
        else:
            path = Path(resume)
            if (path / "latest").is_file():
                path = path / (path / "latest").read_text().strip()
            if not path.is_dir():
                raise UserError(f"--resume {resume}: checkpoint folder {path} does not exist")
            if (path / "zero").is_dir():  # written by ds_to_universal: loads at any world size
                return ResumePoint(path.parent, path.name, universal=True)
            damage = problem(path)
            if damage is not None:
                raise UserError(f"--resume {resume}: {damage}; resume from another {CKPT_PREFIX}<N> folder "
                                "(or 'latest', which takes the newest sound one)")
        saved = read_state(path)
        if saved["world_size"] != self.world_size and saved["zero_stage"] > 0:
            raise UserError(
                f"--resume {path}: written by {saved['world_size']} ranks with ZeRO stage {saved['zero_stage']}, "
                f"which shards the optimizer state per rank, but this run has {self.world_size} ranks. Convert it "
                f"once to a universal checkpoint, which loads at any world size:\n"
                f"  python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder {path} "
                f"--output_folder {path}_universal\nthen resume with --resume {path}_universal "
                f"(or resume with {saved['world_size']} ranks).")
        return ResumePoint(path.parent, path.name, universal=False)

    def _newest_sound(self) -> Path | None:
        """--resume latest: the checkpoint ``latest`` names or, where that one is damaged, the newest
        sound one before it (one warning naming the damage); None where there is no checkpoint (a
        run killed before its first save finished starts from scratch)."""
        latest = self.ckpt_dir / "latest"
        folders = sorted((p for p in self.ckpt_dir.iterdir() if step_of(p) >= 0), key=step_of,
                         reverse=True) if self.ckpt_dir.is_dir() else []
        named, damaged = None, []
        if latest.is_file():
            named = self.ckpt_dir / latest.read_text().strip()
            if step_of(named) < 0:
                damaged.append(f"{latest} names {named.name!r}, not a {CKPT_PREFIX}<N> folder")
            else:  # and older ones: a folder after `latest` belongs to a run that was rolled back past it
                folders = [named] + [p for p in folders if step_of(p) < step_of(named)]
        for path in folders:
            damage = problem(path) if path.is_dir() else f"{path} does not exist"
            if damage is None:
                if damaged:
                    logger.warning("--resume latest: %s; resuming from %s instead", "; ".join(damaged), path)
                return path
            if path == named or (path / STATE_FILE).exists():  # (a save that never finished is no damage)
                damaged.append(damage)
        if damaged:
            raise UserError(f"--resume latest: no sound checkpoint in {self.ckpt_dir}: {'; '.join(damaged)}. "
                            "Remove the damaged folders to start from scratch.")
        logger.warning("--resume latest: no checkpoint in %s, starting from scratch", self.ckpt_dir)
        return None

    def load(self, engine, point: ResumePoint, seed: int) -> dict:
        """Load weights, optimizer and schedule into ``engine``, restore this rank's RNG (same world
        size) or reseed it from ``seed``; returns the Trainer's saved counters."""
        where = point.load_dir / point.tag
        try:
            loaded, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag)
        except Exception as err:  # a file damaged in a way its size does not show
            raise UserError(f"--resume: DeepSpeed could not load checkpoint {where} ({type(err).__name__}: "
                            f"{err}); resume from another checkpoint folder") from err
        if loaded is None:
            raise UserError(f"--resume: DeepSpeed found no checkpoint to load in {where}")
        state = read_state(where) if (where / STATE_FILE).is_file() else client["trainer"]
        rng = where / rng_file(self.rank)
        if state["world_size"] == self.world_size and rng.is_file():
            try:
                set_rng_state(torch.load(rng, weights_only=False))
            except Exception as err:
                raise UserError(f"--resume: {rng} cannot be read ({type(err).__name__}: {err})") from err
        else:
            logger.warning("resuming with %d ranks from %d: the epoch continues after the samples already "
                           "seen, but RNG streams restart (not bit-exact)", self.world_size, state["world_size"])
            seed_everything(seed + self.rank + engine.global_steps)
        self.saved_at = engine.global_steps
        self._drop_best_model_after(state["best_step"])
        logger.info("resumed from %s at step %d (epoch %d)", where, engine.global_steps, state["epoch"])
        return state

    def _drop_best_model_after(self, best_step: int | None) -> None:
        """best_model/ exported after the checkpoint we resume from (by the interrupted run, or by
        the one rolled back) is not the restored best_step's: remove it; the next better validation
        writes it again. Rank 0's business, as the export's writing is."""
        folder = self.run_dir / "best_model"
        marker = folder / BEST_STEP_FILE
        if self.rank == 0 and marker.is_file() and json.loads(marker.read_text())["step"] != best_step:
            logger.warning("%s holds a step after the resumed checkpoint (best_step %s): removed", folder, best_step)
            shutil.rmtree(folder, ignore_errors=True)

    # ---- exporting ------------------------------------------------------------------------------
    def export(self, engine, folder: str | Path, tokenizer=None) -> Path:
        """Write a Hugging Face folder (config.json, model.safetensors, tokenizer if given).
        Collective: every rank must call it (ZeRO-3 gathers the shards onto rank 0)."""
        folder = Path(folder)
        state = (engine._zero3_consolidated_16bit_state_dict()
                 if engine.zero_optimization_partition_weights() else None)
        if self.rank == 0:
            engine.module.save_pretrained(folder, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        dist.barrier()
        return folder

    def export_best(self, engine, step: int, tokenizer=None) -> Path:
        """best_model/ with the weights of ``step`` and best_step.json naming it, replaced as a whole
        folder: its model and its best_step.json always agree. Collective."""
        folder = self.run_dir / "best_model"
        new = staging_folder(folder) if self.rank == 0 else folder.with_name(f".{folder.name}.new")
        self.export(engine, new, tokenizer)
        if self.rank == 0:
            atomic_write_text(new / BEST_STEP_FILE, json.dumps({"step": step}))
            replace_folder(new, folder)
        return folder


# ---- checking a checkpoint ------------------------------------------------------------------------
def read_state(path: Path) -> dict:
    """The trainer_state.json of a checkpoint that ``problem`` found sound."""
    return json.loads((path / STATE_FILE).read_text())


def problem(path: Path) -> str | None:
    """What makes the checkpoint folder ``path`` unusable (naming the file), or None: trainer_state.json
    missing or unreadable, a file it lists missing, of another size or unreadable, an RNG file of some
    rank missing. (Checkpoints written before trainer_state.json listed the files: their .pt files.)"""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"{state_file} is missing (a save that did not finish)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{state_file} is not readable JSON ({err})"
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        return f"{state_file} lacks the trainer's counters ({', '.join(STATE_KEYS)})"
    files = state.get("files")
    if not isinstance(files, dict):
        files = {p.name: None for p in path.glob("*.pt")}
    for rank in range(state["world_size"]):
        if rng_file(rank) not in files:
            return f"{path / rng_file(rank)} is missing (rank {rank}'s random state: the resume would not be exact)"
    if not any(name.endswith("model_states.pt") for name in files):
        return f"{path} holds no DeepSpeed model states (*model_states.pt)"
    for name, size in files.items():
        damage = _file_problem(path / name, size)
        if damage is not None:
            return damage
    return None


def _file_problem(file: Path, size: int | None) -> str | None:
    if not file.is_file():
        return f"{file} is missing"
    actual = file.stat().st_size
    if size is not None and actual != size:
        return f"{file} is truncated or changed ({actual} bytes, {size} when saved)"
    try:  # torch.save writes zip archives, whose directory is at the end: a cut file has none
        if file.suffix == ".pt" and not zipfile.is_zipfile(file):
            return f"{file} is not a readable torch file (truncated?)"
        with file.open("rb"):
            pass
    except OSError as err:
        return f"{file} cannot be read ({err.strerror or err})"
    return None


def weights_are_finite(engine) -> bool:
    """Whether every rank's parameters (its ZeRO-3 partitions) are finite. Collective."""
    bad = sum(int(not torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()) for p in engine.module.parameters()
              if getattr(p, "ds_tensor", p).numel())
    return reduce_across_ranks(torch.tensor([bad])).item() == 0
