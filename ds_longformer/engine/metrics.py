"""What a run records: rank 0's TensorBoard events and metrics.jsonl, its progress bar, and the
per-step measurements (memory, loss scale, gradient norm, the peak FLOP/s behind MFU).

``MetricsWriter(run_dir, enabled, keep_until)`` is the one writer of a run folder, used by the
Trainer and by the tasks (pretrain's step-0 report, classify's test metrics); it does nothing where
``enabled`` is False (ranks > 0). ``keep_until``: the step the run starts from. Records the folder
holds from after it are dropped (a resumed run repeats those steps; a run started from scratch
keeps none), so every step is recorded once: metrics.jsonl is rewritten, TensorBoard's
``purge_step`` hides the old events. ``keep_records``: where the checkpoint resumed from noted how
many records preceded it (``records``), exactly those are kept (so a record written at the
checkpoint's step after it, e.g. classify's test metrics, is not kept twice). A line a crash cut
short is dropped.

* ``scalars({tag: value}, step)``: TensorBoard only (the training curves);
* ``record(metrics, step, epoch)``: one line ``{"step", "epoch", **metrics}`` of metrics.jsonl, and
  each value in TensorBoard: an unprefixed name is a validation metric (tag ``val/<name>``), a
  prefixed one (``test/f1``, ``short_model/bpc``) is its own tag.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import torch

from .. import flops
from .files import atomic_write_text
from .rng import untouched

logger = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, keep_until: int = -1, keep_records: int | None = None):
        self.run_dir, self.enabled, self.keep_until = Path(run_dir), enabled, keep_until
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.records = 0  # lines of metrics.jsonl: a checkpoint notes how many it follows (keep_records)
        self._writer = None
        self._purge = True  # the first SummaryWriter purges the events after keep_until
        if enabled and self.jsonl.is_file():
            rows = self.jsonl.read_text().splitlines()
            kept = [row for row in rows if _parsed(row) is not None][:keep_records]
            if keep_records is None:
                kept = [row for row in kept if _parsed(row)["step"] <= keep_until]
            if len(kept) < len(rows):
                if keep_until < 0:
                    logger.warning("%s holds records of an earlier run, which starts again from scratch here: "
                                   "they are replaced", self.run_dir)
                atomic_write_text(self.jsonl, "".join(row + "\n" for row in kept))
            self.records = len(kept)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            purge = self.keep_until + 1 if self._purge else None
            self._writer, self._purge = SummaryWriter(str(self.run_dir), purge_step=purge), False
        return self._writer

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.enabled:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def record(self, metrics: Mapping[str, float], step: int, epoch: int) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        self.scalars({k if "/" in k else f"val/{k}": v for k, v in metrics.items()}, step)
        self.writer.flush()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
        self.records += 1

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def flush(self) -> None:
        if self.enabled and self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the event file (a later record opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _parsed(row: str) -> dict | None:
    """A metrics.jsonl line, or None for one a crash cut short."""
    try:
        record = json.loads(row)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


class Progress:
    """Rank 0's progress bar over optimizer steps (nothing elsewhere)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", mininterval=1.0, dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- per-step measurements -----------------------------------------------------------------------
def training_precision(engine) -> str:
    return "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32"


def device_peak_flops(engine, peak_tflops: float) -> tuple[float | None, str]:
    """(FLOP/s or None, its source), the peak train/mfu_percent divides by: ``peak_tflops``, else a
    known GPU's datasheet figure, else a GPU's measured matmul rate (flops.peak_flops); on a CPU
    only ``peak_tflops`` (a CPU's peak is not known to us, and a matmul rate measured on a shared
    machine reads low: the MFU would read high, above 100%), else None: no MFU."""
    precision = training_precision(engine)
    if peak_tflops > 0:
        peak, source = peak_tflops * 1e12, "--peak_tflops"
    elif torch.device(engine.device).type == "cpu":
        logger.info("no MFU on CPU without --peak_tflops (the peak TFLOP/s of one process in %s)", precision)
        return None, "no MFU on CPU without --peak_tflops"
    else:
        with untouched():  # a measured rate draws random matrices: never from the training's generators
            peak, source = flops.peak_flops(engine.device, precision)
    source = f"{source}, training in {precision}"
    logger.info("MFU against %.4g TFLOP/s per device (%s)", peak / 1e12, source)
    return peak, source


class MFU:
    """train/mfu_percent of a model FLOP rate against ``peak`` (None: no MFU). Above 100% the peak is
    wrong (a --peak_tflops below the device's real one): said once, and no MFU is logged from then on."""

    def __init__(self, peak: float | None, source: str):
        self.peak, self.source = peak, source

    def __call__(self, flops_per_s: float) -> dict:
        if not self.peak:
            return {}
        mfu = 100 * flops_per_s / self.peak
        if mfu > 100:
            logger.warning("train/mfu_percent would read %.0f%%: the peak of %.4g TFLOP/s (%s) is below what this "
                           "device just did, %.4g TFLOP/s; give --peak_tflops this device's peak. No MFU is logged.",
                           mfu, self.peak / 1e12, self.source, flops_per_s / 1e12)
            self.peak = None
            return {}
        return {"train/mfu_percent": mfu}


def plain_grad_norm(engine) -> float | None:
    """Pre-clipping global grad norm where DeepSpeed reports none (fp32 without ZeRO: its optimizer
    is the bare torch one). Gradients are already all-reduced at the boundary."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else None


def step_extras(engine) -> dict:
    """train/loss_scale (fp16) and the memory high-water mark (GPU) or resident memory (CPU)."""
    extras = {}
    if engine.fp16_enabled():
        # ZeRO's optimizers keep it in cur_scale, ZeRO-0's FP16_Optimizer in loss_scale_config
        optimizer = engine.optimizer
        config = getattr(optimizer, "loss_scale_config", None)
        extras["train/loss_scale"] = float(config.cur_scale if config is not None else optimizer.cur_scale)
    if torch.cuda.is_available():
        extras["train/gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import psutil

        extras["train/rss_gb"] = psutil.Process().memory_info().rss / 2**30
    return extras
