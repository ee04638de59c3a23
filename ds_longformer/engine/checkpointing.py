"""Checkpoints of a run, resuming from them, and the Hugging Face folders it exports.

Layout under ``<run_dir>/checkpoints/``: ``global_step<N>/`` holds DeepSpeed's files, one
``rng_state_rank<r>.pt`` per rank and, written last, ``trainer_state.json`` (the Trainer's counters;
its presence marks the checkpoint complete). ``latest`` names the newest complete one; it is
replaced atomically, after every rank has finished writing, so a crash mid-save leaves it on the
previous checkpoint. The newest ``keep_last_k`` complete checkpoints up to the saved step are kept.

Resuming (``Checkpointer.find`` before ``deepspeed.initialize``, ``load`` after): ``latest`` or a
folder; the same world size restores every rank's RNG too (exact resume); another world size loads a
ZeRO-0 checkpoint or a ``ds_to_universal`` folder (new RNG streams), and stops at a ZeRO-1/2/3 one
with the conversion command. Resuming from a checkpoint older than ``latest`` (a roll-back) moves
``latest`` back to this run's own checkpoint before a newer folder is rewritten, and drops a
best_model/ exported after the resumed checkpoint.

``export`` writes a Hugging Face folder (config.json, model.safetensors, tokenizer) from any ZeRO
stage; ``best_model/best_step.json`` says which step best_model/ holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import UserError
from .files import atomic_write_text
from .rng import rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

CKPT_PREFIX = "global_step"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: marks it complete
BEST_STEP_FILE = "best_step.json"  # in best_model/: the step whose weights it holds


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

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, engine, state: dict) -> Path:
        """DeepSpeed checkpoint of ``state["global_step"]``, with ``state`` (the Trainer's counters)
        and every rank's RNG. Collective."""
        step = state["global_step"]
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
        torch.save(rng_state(), tag_dir / f"rng_state_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            atomic_write_text(tag_dir / STATE_FILE, json.dumps(state, indent=2))
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
        """The checkpoint ``--resume`` names (None: start from scratch), checked before
        deepspeed.initialize."""
        if resume is None:
            return None
        if resume == "latest":
            if not (self.ckpt_dir / "latest").is_file():
                logger.warning("--resume latest: no checkpoint in %s, starting from scratch", self.ckpt_dir)
                return None
            path = self.ckpt_dir / (self.ckpt_dir / "latest").read_text().strip()
        else:
            path = Path(resume)
            if (path / "latest").is_file():
                path = path / (path / "latest").read_text().strip()
        if not path.is_dir():
            raise UserError(f"--resume {resume}: checkpoint folder {path} does not exist")
        if (path / "zero").is_dir():  # written by ds_to_universal: loads at any world size
            return ResumePoint(path.parent, path.name, universal=True)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume {resume}: {path} has no {STATE_FILE}, so it is not a complete "
                            "checkpoint of this trainer (a save interrupted by a crash?); resume from "
                            f"'latest' or another {CKPT_PREFIX}<N> folder")
        saved = json.loads((path / STATE_FILE).read_text())
        if saved["world_size"] != self.world_size and saved["zero_stage"] > 0:
            raise UserError(
                f"--resume {path}: written by {saved['world_size']} ranks with ZeRO stage {saved['zero_stage']}, "
                f"which shards the optimizer state per rank, but this run has {self.world_size} ranks. Convert it "
                f"once to a universal checkpoint, which loads at any world size:\n"
                f"  python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder {path} "
                f"--output_folder {path}_universal\nthen resume with --resume {path}_universal "
                f"(or resume with {saved['world_size']} ranks).")
        return ResumePoint(path.parent, path.name, universal=False)

    def load(self, engine, point: ResumePoint, seed: int) -> dict:
        """Load weights, optimizer and schedule into ``engine``, restore this rank's RNG (same world
        size) or reseed it from ``seed``; returns the Trainer's saved counters."""
        loaded, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {point.load_dir / point.tag}")
        state = client["trainer"]
        rng_file = point.load_dir / point.tag / f"rng_state_rank{self.rank}.pt"
        if state["world_size"] == self.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("resuming with %d ranks from %d: the epoch continues after the samples already "
                           "seen, but RNG streams restart (not bit-exact)", self.world_size, state["world_size"])
            seed_everything(seed + self.rank + engine.global_steps)
        self.saved_at = engine.global_steps
        self._drop_best_model_after(state["best_step"])
        logger.info("resumed from %s at step %d (epoch %d)", point.load_dir / point.tag, engine.global_steps,
                    state["epoch"])
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
        """best_model/ with the weights of ``step`` and best_step.json naming it. Collective."""
        folder = self.export(engine, self.run_dir / "best_model", tokenizer)
        if self.rank == 0:  # which step it holds: a resume from an earlier checkpoint checks it
            atomic_write_text(folder / BEST_STEP_FILE, json.dumps({"step": step}))
        return folder
