"""DeepSpeed trainer shared by every task (pretrain, classify, wikihop, quickstart).

Usage
-----
    parser = argparse.ArgumentParser()
    add_trainer_args(parser)                   # --deepspeed_config --batch_size --lr ... (below)
    parser.set_defaults(lr=3e-5, project_name="classify")   # task defaults
    args = TrainerArgs.from_namespace(parser.parse_args())
    seed_everything(args.seed)                 # before building the model (DeepSpeed also
    model = LongformerForMaskedLM(config)      # broadcasts rank 0's weights at start)
    trainer = Trainer(model, args, train_ds, val_ds, collate_fn=collator,
                      compute_metrics=batch_stats, reduce_metrics=reduce, tokenizer=tokenizer)
    summary = trainer.fit()                    # dict: global_step, best_value, final_model, ...
    metrics = trainer.evaluate(test_ds)        # dict: loss + the task's metrics
    trainer.export("some/dir")                 # Hugging Face folder from any ZeRO stage

Batches are dicts from ``collate_fn``; the tensors the model's ``forward`` accepts are passed
to it (other keys may carry data for metrics), and it returns an object with ``.loss``/``.logits``.

Metrics: ``compute_metrics(outputs, batch) -> {name: additive statistic}`` (sums over the batch,
e.g. ``{"correct": 7, "nll": 52.1, "chars": 900}``); the trainer sums them over batches and ranks.
``reduce_metrics(totals) -> {name: value}`` turns the totals (plus ``"samples"``) into metrics,
e.g. bits per character ``totals["nll"] / totals["chars"] / ln 2``; without it each total is
divided by the number of samples. The validation loss (``loss``, the sample-weighted mean of the
model's batch losses) is always reported.

Attributes tasks may read: ``rank``, ``world_size``, ``global_step``, ``epoch``, ``run_dir``,
``engine`` (the DeepSpeed engine; ``engine.module`` is the model), ``total_steps``.

Run folder ``<default_root_dir>/<project_name>/`` (= ``trainer.run_dir``): TensorBoard events
(rank 0: train/loss, lr, grad_norm, loss_scale (fp16), tokens_per_s, samples_per_s, step_time,
tflops and mfu_percent (per device, model FLOPs from the model's ``train_flops``, see flops.py),
gpu_peak_mem_gb or rss_gb; val/<metric>), ``metrics.jsonl`` (one object per validation: step,
epoch, metrics), ``checkpoints/global_step<N>/`` (DeepSpeed files, per-rank RNG states and, written
last, ``trainer_state.json``; ``checkpoints/latest`` names the newest complete one; the last
``keep_last_k`` are kept), ``best_model/`` (with ``best_step.json``: the step it holds) and
``final_model/`` (Hugging Face folders).

DeepSpeed config (``--deepspeed_config``: a path, a name in ``ds_configs/`` such as ``zero3``, or a
dict): run-dependent keys (micro batch, accumulation, clipping, lr, weight decay, scheduler
values) always come from TrainerArgs; the files say "auto" there. Without a ``scheduler``
section the lr follows transformers' linear warmup + linear decay.

Exact resume (``--resume latest|PATH``) restores weights, optimizer, lr schedule, the position in
the epoch's data order and every rank's python/numpy/torch RNG; randomness drawn inside
DataLoader workers (``num_workers > 0``) restarts at the resume point instead. With another
number of ranks, a ZeRO-0 checkpoint or a ``ds_to_universal`` folder loads (same samples, new RNG;
with --epochs the steps left are re-planned for the new global batch); a ZeRO-1/2/3 checkpoint
stops with the conversion command. A resumed run first drops the records the interrupted one
logged after its checkpoint (TensorBoard purge_step, metrics.jsonl), so each step is logged once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from . import flops

logger = logging.getLogger(__name__)

def find_config_dir() -> Path:
    """ds_configs/: packaged inside ds_longformer/ by `pip install .`, beside it in a checkout (and an
    editable install)."""
    package = Path(__file__).resolve().parent
    return package / "ds_configs" if (package / "ds_configs").is_dir() else package.parent / "ds_configs"


CONFIG_DIR = find_config_dir()
CKPT_PREFIX = "global_step"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: marks it complete
BEST_STEP_FILE = "best_step.json"  # in best_model/: the step whose weights it holds


@dataclasses.dataclass
class TrainerArgs:
    deepspeed_config: str | dict | None = None  # None: ds_configs/cpu.json on CPU, zero2.json on GPU
    batch_size: int = 8  # per rank, per micro step
    gradient_accumulation_steps: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights (1-D tensors)
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int = -1  # > 0: train this many optimizer steps, whatever `epochs` says
    val_check_interval: int = 0  # validate every N optimizer steps; 0: at the end of each epoch
    default_root_dir: str = "runs"
    project_name: str = "ds-longformer"
    seed: int = 42
    gradient_checkpointing: bool = False
    resume: str | None = None  # None, "latest", or a checkpoint path
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    save_every_n_steps: int = 1000  # 0: only at the end
    keep_last_k: int = 2  # DeepSpeed checkpoints kept; <= 0 keeps all
    best_metric: str = "loss"  # validation metric that picks best_model/
    best_mode: str = "min"
    num_workers: int = 0
    precision: str = "auto"  # auto (the config's; "auto" there = bf16 on a bf16 GPU), fp32, bf16, fp16
    log_every_n_steps: int = 1
    peak_tflops: float = 0.0  # per device, for train/mfu_percent; 0: a known GPU's, else a measured matmul rate

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainerArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def add_trainer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags every task CLI shares; defaults are TrainerArgs' (tasks override them with
    ``parser.set_defaults``)."""
    d = TrainerArgs()
    g = parser.add_argument_group("trainer")
    g.add_argument("--deepspeed_config", default=d.deepspeed_config,
                   help="DeepSpeed JSON: a path or a name in ds_configs/ (zero0..zero3, zero2_offload, "
                        "zero3_offload, fp16, bf16, cpu); default cpu on CPU, zero2 on GPU")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="micro batch per rank")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--max_steps", type=int, default=d.max_steps, help="> 0 overrides --epochs")
    g.add_argument("--val_check_interval", type=int, default=d.val_check_interval,
                   help="validate every N optimizer steps (0: every epoch)")
    g.add_argument("--default_root_dir", default=d.default_root_dir)
    g.add_argument("--project_name", default=d.project_name)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--gradient_checkpointing", action="store_true", default=d.gradient_checkpointing)
    g.add_argument("--resume", default=d.resume, help="'latest' or a checkpoint folder")
    g.add_argument("--grad_clip", type=float, default=d.grad_clip)
    g.add_argument("--save_every_n_steps", type=int, default=d.save_every_n_steps)
    g.add_argument("--keep_last_k", type=int, default=d.keep_last_k)
    g.add_argument("--best_metric", default=d.best_metric)
    g.add_argument("--best_mode", choices=("min", "max"), default=d.best_mode)
    g.add_argument("--num_workers", type=int, default=d.num_workers)
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=d.precision)
    g.add_argument("--log_every_n_steps", type=int, default=d.log_every_n_steps)
    g.add_argument("--peak_tflops", type=float, default=d.peak_tflops,
                   help="peak TFLOP/s of one device in the training precision, for train/mfu_percent; default: "
                        "a known GPU's datasheet figure, else a matmul rate measured at start")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; returns (rank, world_size).

    A plain ``python -m ...`` run has no RANK/WORLD_SIZE; without them DeepSpeed would try MPI
    discovery, so a single-process environment is filled in first.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        if get_accelerator().device_name() == "cpu":
            # DeepSpeed JIT-compiles a shared-memory all-reduce (~1 min) at init on CPU; training
            # never uses it (only inference_all_reduce does), so gloo does all the communication.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


def reduce_across_ranks(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """all_reduce of a small CPU tensor (counts, sums), returned on CPU. It travels on the
    accelerator: NCCL reduces CUDA tensors only (gloo, on CPU, reduces them in place)."""
    from deepspeed.accelerator import get_accelerator

    on_device = values.to(get_accelerator().current_device_name())
    dist.all_reduce(on_device, op=op)
    return on_device.cpu()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- DeepSpeed config ---------------------------------------------------------------------------
def load_ds_config(config: str | dict | None, on_cpu: bool) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if config is None:
        config = "cpu" if on_cpu else "zero2"
    path = Path(config)
    if not path.is_file():
        path = CONFIG_DIR / f"{config}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise FileNotFoundError(f"DeepSpeed config {config!r} not found: give a JSON path or one of: {names}")
    return json.loads(path.read_text())


def _set_run_value(section: dict, key: str, value, where: str) -> None:
    """Run-dependent values always come from TrainerArgs; say so when a config disagrees."""
    old = section.get(key, "auto")
    if old != "auto" and old != value:
        logger.warning("DeepSpeed config %s%s=%r replaced by the command line's %r", where, key, old, value)
    section[key] = value


def build_ds_config(args: TrainerArgs, total_steps: int, on_cpu: bool) -> dict:
    """The config for deepspeed.initialize: the chosen file with its "auto" values filled in."""
    cfg = load_ds_config(args.deepspeed_config, on_cpu)
    cfg.pop("train_batch_size", None)  # DeepSpeed derives it: micro batch x accumulation x ranks
    _set_run_value(cfg, "train_micro_batch_size_per_gpu", args.batch_size, "")
    _set_run_value(cfg, "gradient_accumulation_steps", args.gradient_accumulation_steps, "")
    # Set even when the file omits it: this DeepSpeed clips at 1.0 when not told.
    _set_run_value(cfg, "gradient_clipping", args.grad_clip, "")
    opt = cfg.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    _set_run_value(opt, "lr", args.lr, "optimizer.params.")
    _set_run_value(opt, "weight_decay", args.weight_decay, "optimizer.params.")
    if on_cpu:  # DeepSpeed's CPU FusedAdam is a ~2 min JIT compile; torch's AdamW is as good here
        opt.setdefault("torch_adam", True)
        if opt["torch_adam"] and "foreach" not in opt:  # (torch refuses fused with foreach)
            # torch's fused CPU AdamW: one pass over each tensor, 5x faster than its default per-tensor
            # loop (82 vs 422 ms a step for 53M parameters, one thread); the same update up to rounding
            opt.setdefault("fused", True)
    if "scheduler" in cfg:  # fill the run-dependent keys the section has (WarmupLR, WarmupDecayLR, ...)
        sched = cfg["scheduler"].setdefault("params", {})
        for key, value in (("warmup_max_lr", args.lr), ("warmup_num_steps", args.warmup_steps),
                           ("total_num_steps", total_steps)):
            if key in sched:
                _set_run_value(sched, key, value, "scheduler.params.")
    _set_precision(cfg, args.precision, on_cpu)
    cfg.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed's step prints off
    return cfg


def _set_precision(cfg: dict, precision: str, on_cpu: bool) -> None:
    if precision != "auto":
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
        cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": precision == "fp16"}
    for name in ("bf16", "fp16"):
        if cfg.get(name, {}).get("enabled") == "auto":
            cfg[name]["enabled"] = name == "bf16" and not on_cpu and torch.cuda.is_bf16_supported()
    fp16, bf16 = cfg.get("fp16", {}).get("enabled", False), cfg.get("bf16", {}).get("enabled", False)
    if fp16 and bf16:
        raise ValueError("the DeepSpeed config enables both fp16 and bf16: choose one (--precision)")
    if fp16 and on_cpu:
        raise ValueError("fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use --precision bf16 or fp32")


# ---- data ---------------------------------------------------------------------------------------
class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `skip` indices (on resume),
    so the rest of the epoch sees exactly the data order of an uninterrupted run."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _batch_size(batch: Mapping) -> int:
    """Samples in a batch: the labels' length (one per example, also when an example spans
    several input rows, as WikiHop's chunks do), else the first tensor's."""
    if torch.is_tensor(batch.get("labels")) and batch["labels"].dim() > 0:
        return batch["labels"].shape[0]
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def _batch_tokens(batch: Mapping) -> int:
    """Non-padding tokens: attention_mask.sum(), or every input id without a mask."""
    if torch.is_tensor(batch.get("attention_mask")):
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel() if torch.is_tensor(batch.get("input_ids")) else 0


# ---- RNG ----------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_of(tag_dir: Path) -> int:
    m = re.fullmatch(rf"{CKPT_PREFIX}(\d+)", tag_dir.name)
    return int(m.group(1)) if m else -1


class _Monitor:
    """Rank 0's TensorBoard writer, metrics.jsonl and progress bar (no-ops on other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool, total: int, initial: int, resumed: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run repeats the steps after its checkpoint: drop what the interrupted run
        # logged for them, so every step has one record (TensorBoard's purge_step does it there).
        self.writer = SummaryWriter(str(run_dir), purge_step=initial + 1 if resumed else None)
        self.jsonl = run_dir / "metrics.jsonl"
        if resumed and self.jsonl.is_file():
            rows = [line for line in self.jsonl.read_text().splitlines() if json.loads(line)["step"] <= initial]
            _atomic_write_text(self.jsonl, "".join(row + "\n" for row in rows))
        self.bar = tqdm(total=total, initial=initial, desc="train", mininterval=1.0, dynamic_ncols=True)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.enabled:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.enabled:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def validation(self, metrics: Mapping[str, float], step: int, epoch: int) -> None:
        if self.enabled:
            self.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
            self.writer.flush()
            with self.jsonl.open("a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


class Trainer:
    """Train `model` with DeepSpeed; see the module docstring for the API and the run folder."""

    def __init__(self, model: torch.nn.Module, args: TrainerArgs, train_dataset: Dataset,
                 val_dataset: Dataset | None = None, collate_fn: Callable | None = None,
                 compute_metrics: Callable[[Any, Mapping], Mapping[str, float]] | None = None,
                 reduce_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
                 tokenizer=None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if args.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {args.best_mode!r}")
        if args.log_every_n_steps < 1:
            raise ValueError(f"--log_every_n_steps must be at least 1, got {args.log_every_n_steps}")
        if args.peak_tflops < 0:
            raise ValueError(f"--peak_tflops must be positive (or 0: known GPU / measured), got {args.peak_tflops}")
        self.args, self.tokenizer = args, tokenizer
        self.val_dataset, self.collate_fn = val_dataset, collate_fn
        self.compute_metrics, self.reduce_metrics = compute_metrics, reduce_metrics
        self.rank, self.world_size = init_distributed()
        self.on_cpu = get_accelerator().device_name() == "cpu"
        self.run_dir = Path(args.default_root_dir) / args.project_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        seed_everything(args.seed + self.rank)  # dropout etc. differ per rank, reproducibly

        self.sampler = ResumableDistributedSampler(train_dataset, self.world_size, self.rank,
                                                   shuffle=True, seed=args.seed)
        self._loader_generator = torch.Generator()  # worker seeds, reseeded per epoch
        self.train_loader = DataLoader(train_dataset, args.batch_size, sampler=self.sampler,
                                       collate_fn=collate_fn, num_workers=args.num_workers, drop_last=True,
                                       generator=self._loader_generator, pin_memory=not self.on_cpu)
        self.steps_per_epoch = len(self.train_loader) // args.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(train_dataset)} samples) is smaller than one optimizer step "
                f"({self.world_size} ranks x batch_size {args.batch_size} x gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps})")
        self.total_steps = args.max_steps if args.max_steps > 0 else args.epochs * self.steps_per_epoch

        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        config = build_ds_config(args, self.total_steps, self.on_cpu)
        resume_from = self._find_checkpoint(args.resume, config)
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]

        def linear_warmup_decay(step: int) -> float:
            """transformers' get_linear_schedule_with_warmup, reading total_steps when called: a
            run resumed with another number of ranks re-plans its steps (see _planned_total_steps)."""
            if step < args.warmup_steps:
                return step / max(1, args.warmup_steps)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - args.warmup_steps))

        scheduler = None if "scheduler" in config else (
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay))
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config,
                                                    lr_scheduler=scheduler)
        forward = inspect.signature(self.engine.module.forward).parameters
        self._takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in forward.values())
        self._forward_args = set(forward)
        self._train_flops = getattr(self.engine.module, "train_flops", None)  # None: no tflops/MFU logged
        self._peak_flops = None  # FLOP/s one device can do (rank 0, at fit)

        self.epoch, self.epoch_samples = 0, 0  # epoch_samples: global samples used in this epoch
        self.best_value, self.best_step, self.last_val_metrics = None, None, None
        self._validated_at = self._saved_at = -1  # steps of the last validation / checkpoint
        self._last_logged: dict = {}
        self._resumed = resume_from is not None
        if resume_from is not None:
            self._load_checkpoint(*resume_from)
            self._saved_at = self.global_step
            if args.max_steps <= 0:
                planned = self._planned_total_steps()
                if planned != self.total_steps and "scheduler" in config:
                    logger.warning("resumed with another number of ranks: %d steps left instead of %d, but the "
                                   "DeepSpeed config's scheduler keeps total_num_steps=%d", planned - self.global_step,
                                   self.total_steps - self.global_step, self.total_steps)
                self.total_steps = planned

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    def _planned_total_steps(self) -> int:
        """--epochs after a resume: the steps taken so far plus those the rest of the epochs take at
        this world size (a step's global batch, and so steps_per_epoch, changes with the ranks)."""
        if self.epoch >= self.args.epochs:
            return self.global_step
        per_rank_left = self.sampler.num_samples - self.epoch_samples // self.world_size
        left_this_epoch = per_rank_left // self.args.batch_size // self.args.gradient_accumulation_steps
        return self.global_step + left_this_epoch + (self.args.epochs - self.epoch - 1) * self.steps_per_epoch

    # ---- training -------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to max_steps / epochs; returns a summary (steps, last losses, best, paths)."""
        monitor = _Monitor(self.run_dir, self.rank == 0, self.total_steps, self.global_step,
                           resumed=self._resumed)
        if self.rank == 0 and self._train_flops is not None and self._peak_flops is None:
            self._peak_flops, source = self._device_peak_flops()
            monitor.text("train/mfu_peak", f"{self._peak_flops / 1e12:.4g} TFLOP/s per device ({source})")
        started = time.perf_counter()
        try:
            while self.global_step < self.total_steps:
                self._train_epoch(monitor)
            if self.val_dataset is not None and self._validated_at != self.global_step:
                self._validate(monitor)
            if self._saved_at != self.global_step:
                self.save_checkpoint()
            final = self.export(self.run_dir / "final_model")
        finally:
            monitor.close()
        return {"global_step": self.global_step, "epoch": self.epoch,
                "train_loss": self._last_logged.get("train/loss"), "val_metrics": self.last_val_metrics,
                "best_metric": self.args.best_metric, "best_value": self.best_value, "best_step": self.best_step,
                "best_model": str(self.run_dir / "best_model") if (self.run_dir / "best_model").is_dir() else None,
                "final_model": str(final), "run_dir": str(self.run_dir),
                "train_time_s": time.perf_counter() - started}

    def _train_epoch(self, monitor: _Monitor) -> None:
        """The rest of the current epoch (all of it unless resumed mid-epoch), in whole optimizer
        steps; stops early at total_steps."""
        args, ga = self.args, self.args.gradient_accumulation_steps
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.epoch_samples // self.world_size
        self._loader_generator.manual_seed(args.seed + 1_000_003 * self.epoch + self.rank)
        micro_batches = (len(self.sampler) // args.batch_size) // ga * ga
        if micro_batches == 0:
            self.epoch, self.epoch_samples = self.epoch + 1, 0
            return
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, samples, model FLOPs on this rank
        step_start = time.perf_counter()
        for micro, batch in zip(range(micro_batches), self.train_loader):
            boundary = (micro + 1) % ga == 0
            lr = self.engine.get_lr()[0]
            outputs = self.engine(**self._model_inputs(batch))
            totals += torch.tensor([outputs.loss.item(), _batch_tokens(batch), _batch_size(batch),
                                    self._batch_flops(batch)], dtype=torch.float64)
            if boundary:  # one all-reduce per step: every rank logs the same values and stops together
                totals = reduce_across_ranks(totals)
                loss = totals[0].item() / (ga * self.world_size)
                if not math.isfinite(loss):
                    raise FloatingPointError(self._nan_message(loss))
            self.engine.backward(outputs.loss)
            grad_norm = self._plain_grad_norm() if boundary else None
            self.engine.step()
            if not boundary:
                continue
            step_time = time.perf_counter() - step_start
            grad_norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
            logged = {"train/loss": loss, "train/lr": lr, "train/step_time": step_time,
                      "train/tokens_per_s": totals[1].item() / step_time,
                      "train/samples_per_s": totals[2].item() / step_time}
            if grad_norm is not None:
                logged["train/grad_norm"] = float(grad_norm)
            if totals[3] > 0:
                per_device = totals[3].item() / self.world_size / step_time  # model FLOP/s
                logged["train/tflops"] = per_device / 1e12
                if self._peak_flops:
                    logged["train/mfu_percent"] = 100 * per_device / self._peak_flops
            self._after_step(monitor, logged, epoch_done=micro + 1 == micro_batches)
            if self.global_step >= self.total_steps:
                return
            totals.zero_()
            step_start = time.perf_counter()

    def _after_step(self, monitor: _Monitor, logged: dict, epoch_done: bool) -> None:
        """Log, validate, advance the epoch, save: in this order, so a checkpoint holds the state
        the next step starts from."""
        args, step = self.args, self.global_step
        self.epoch_samples += args.batch_size * args.gradient_accumulation_steps * self.world_size
        self._last_logged = logged = {**logged, **self._step_extras()}
        if step % args.log_every_n_steps == 0 or step == self.total_steps:
            monitor.scalars(logged, step)
        monitor.progress(step, logged["train/loss"], logged["train/tokens_per_s"])
        interval = args.val_check_interval
        if self.val_dataset is not None and (step % interval == 0 if interval > 0 else epoch_done):
            self._validate(monitor)
        if epoch_done:
            self.epoch, self.epoch_samples = self.epoch + 1, 0
        if args.save_every_n_steps > 0 and step % args.save_every_n_steps == 0:
            self.save_checkpoint()
            monitor.flush()  # a crash after this loses no logged step before the checkpoint

    def _model_inputs(self, batch: Mapping) -> dict:
        device = self.engine.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()
                if torch.is_tensor(v) and (self._takes_kwargs or k in self._forward_args)}

    def _batch_flops(self, batch: Mapping) -> float:
        if self._train_flops is None or not torch.is_tensor(batch.get("input_ids")):
            return 0.0
        return self._train_flops(**{k: v for k, v in batch.items() if torch.is_tensor(v)})

    def _device_peak_flops(self) -> tuple[float, str]:
        """(FLOP/s, its source): --peak_tflops, else flops.peak_flops for this device and precision
        (recorded: an MFU is only as meaningful as the peak it divides by)."""
        e = self.engine
        precision = "fp16" if e.fp16_enabled() else "bf16" if e.bfloat16_enabled() else "fp32"
        if self.args.peak_tflops > 0:
            peak, source = self.args.peak_tflops * 1e12, "--peak_tflops"
        else:
            peak, source = flops.peak_flops(e.device, precision)
        source = f"{source}, training in {precision}"
        logger.info("MFU against %.4g TFLOP/s per device (%s)", peak / 1e12, source)
        return peak, source

    def _plain_grad_norm(self) -> float | None:
        """Pre-clipping global grad norm where DeepSpeed reports none (fp32 without ZeRO: its
        optimizer is the bare torch one). Gradients are already all-reduced at the boundary."""
        e = self.engine
        if e.zero_optimization() or e.fp16_enabled() or e.bfloat16_enabled():
            return None
        norms = [p.grad.detach().float().norm() for p in e.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else None

    def _step_extras(self) -> dict:
        extras = {}
        if self.engine.fp16_enabled():
            # ZeRO's optimizers keep it in cur_scale, ZeRO-0's FP16_Optimizer in loss_scale_config
            optimizer = self.engine.optimizer
            config = getattr(optimizer, "loss_scale_config", None)
            extras["train/loss_scale"] = float(config.cur_scale if config is not None else optimizer.cur_scale)
        if torch.cuda.is_available():
            extras["train/gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import psutil

            extras["train/rss_gb"] = psutil.Process().memory_info().rss / 2**30
        return extras

    def _nan_message(self, loss: float) -> str:
        latest = self.ckpt_dir / "latest"
        resume = (f"the last complete checkpoint is {self.ckpt_dir / latest.read_text().strip()} "
                  "(--resume latest)"
                  if latest.is_file() else "no checkpoint was written yet")
        return (f"training loss is {loss} at step {self.global_step + 1} (epoch {self.epoch}); stopping "
                f"before the optimizer step, {resume}. Try a lower --lr, more --warmup_steps, a smaller "
                "--grad_clip, or bf16/fp32 instead of fp16, and check the data of this step.")

    # ---- validation -----------------------------------------------------------------------------
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Metrics over `dataset` (each sample once, split over the ranks): loss + the task's."""
        self.engine.eval()
        sums: dict[str, float] = {"samples": 0.0, "loss_sum": 0.0, "loss_samples": 0.0}
        with torch.no_grad():
            for batch, keep in self._eval_batches(dataset):
                outputs = self.engine(**self._model_inputs(batch))
                n = _batch_size(batch) * keep
                stats = {"samples": n}
                if outputs.loss is not None:
                    stats.update(loss_sum=outputs.loss.item() * n, loss_samples=n)
                if self.compute_metrics is not None:
                    stats.update({k: float(v) * keep for k, v in self.compute_metrics(outputs, batch).items()})
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        self.engine.train()
        keys = sorted(sums)
        reduced = reduce_across_ranks(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        totals = dict(zip(keys, reduced.tolist()))
        metrics = {"loss": totals["loss_sum"] / totals["loss_samples"]} if totals["loss_samples"] else {}
        task = {k: v for k, v in totals.items() if k not in ("loss_sum", "loss_samples")}
        if self.reduce_metrics is not None:
            metrics.update(self.reduce_metrics(task))
        else:
            metrics.update({k: v / totals["samples"] for k, v in task.items() if k != "samples"})
        return metrics

    def _eval_batches(self, dataset: Dataset) -> Iterator[tuple[dict, int]]:
        """(batch, keep) pairs. Ranks hold dataset[rank::world] (no duplicates) and all run the same
        number of forwards, as ZeRO-3 needs: a rank with fewer batches repeats one with keep=0."""
        shard = list(range(self.rank, len(dataset), self.world_size))
        loader = DataLoader(Subset(dataset, shard or [0]), self.args.batch_size, collate_fn=self.collate_fn,
                            num_workers=self.args.num_workers, generator=torch.Generator().manual_seed(0))
        real = len(loader) if shard else 0
        most = reduce_across_ranks(torch.tensor([real]), op=dist.ReduceOp.MAX)
        batch = None
        for i, batch in enumerate(loader):
            if i == real:
                break
            yield batch, 1
        for _ in range(most.item() - real):
            yield batch, 0

    def _validate(self, monitor: _Monitor) -> None:
        metrics = self.evaluate(self.val_dataset)
        self.last_val_metrics, self._validated_at = metrics, self.global_step
        monitor.validation(metrics, self.global_step, self.epoch)
        name = self.args.best_metric.removeprefix("val/")
        if name not in metrics:
            raise KeyError(f"--best_metric {name!r} is not a validation metric; have {sorted(metrics)}")
        value = metrics[name]
        better = self.best_value is None or (value < self.best_value if self.args.best_mode == "min"
                                             else value > self.best_value)
        if better and math.isfinite(value):
            self.best_value, self.best_step = value, self.global_step
            self.export(self.run_dir / "best_model")
            if self.rank == 0:  # which step it holds: a resume from an earlier checkpoint checks it
                _atomic_write_text(self.run_dir / "best_model" / BEST_STEP_FILE, json.dumps({"step": self.global_step}))

    # ---- checkpoints ----------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "epoch_samples": self.epoch_samples,
                "world_size": self.world_size, "zero_stage": self.engine.zero_optimization_stage(),
                "best_value": self.best_value, "best_step": self.best_step, "validated_at": self._validated_at}

    def save_checkpoint(self) -> Path:
        """DeepSpeed checkpoint of this step. `latest` moves to it only once every rank has
        finished writing (a crash mid-save leaves `latest` on the previous one)."""
        tag = f"{CKPT_PREFIX}{self.global_step}"
        tag_dir = self.ckpt_dir / tag
        if self.rank == 0 and tag_dir.exists():  # leftovers of a save that crashed, or of a run rolled back
            latest = self.ckpt_dir / "latest"
            if latest.is_file() and latest.read_text().strip() == tag:  # rolled back past it: `latest`
                # must not name a folder being rewritten: this run's own last checkpoint (or resume point)
                own = self.ckpt_dir / f"{CKPT_PREFIX}{self._saved_at}"
                if self._saved_at >= 0 and own != tag_dir and (own / STATE_FILE).is_file():
                    _atomic_write_text(latest, own.name)
                else:
                    latest.unlink()
            shutil.rmtree(tag_dir)
        dist.barrier()
        state = self._trainer_state()
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"trainer": state},
                                    save_latest=False)
        torch.save(_rng_state(), tag_dir / f"rng_state_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            _atomic_write_text(tag_dir / STATE_FILE, json.dumps(state, indent=2))
            _atomic_write_text(self.ckpt_dir / "latest", tag)
            self._prune_checkpoints(keep=tag_dir)
        dist.barrier()
        self._saved_at = self.global_step
        return tag_dir

    def _complete_checkpoints(self, below: int) -> list[Path]:
        """Complete checkpoint folders of steps <= below, oldest first."""
        return sorted((p for p in self.ckpt_dir.iterdir() if 0 <= _step_of(p) <= below and (p / STATE_FILE).is_file()),
                      key=_step_of)

    def _prune_checkpoints(self, keep: Path) -> None:
        """Keep the newest `keep_last_k` complete checkpoints up to this step; drop older and
        unfinished ones. Later steps (left by a run that was rolled back to an earlier checkpoint)
        are neither counted nor deleted: the run overwrites them as it reaches them."""
        if self.args.keep_last_k <= 0:
            return
        step = _step_of(keep)
        tags = [p for p in self.ckpt_dir.iterdir() if 0 <= _step_of(p) <= step]
        kept = set(self._complete_checkpoints(below=step)[-self.args.keep_last_k:]) | {keep}
        for path in tags:
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)

    def _find_checkpoint(self, resume: str | None, config: dict) -> tuple[Path, str] | None:
        """(load_dir, tag) to resume from, checked before deepspeed.initialize (a universal
        checkpoint must be declared in the config)."""
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
            raise FileNotFoundError(f"--resume {resume}: checkpoint folder {path} does not exist")
        if (path / "zero").is_dir():  # written by ds_to_universal: loads at any world size
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
            return path.parent, path.name
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"--resume {resume}: {path} has no {STATE_FILE}, so it is not a complete "
                             "checkpoint of this trainer (a save interrupted by a crash?); resume from "
                             f"'latest' or another {CKPT_PREFIX}<N> folder")
        saved = json.loads((path / STATE_FILE).read_text())
        if saved["world_size"] != self.world_size and saved["zero_stage"] > 0:
            raise ValueError(
                f"--resume {path}: written by {saved['world_size']} ranks with ZeRO stage {saved['zero_stage']}, "
                f"which shards the optimizer state per rank, but this run has {self.world_size} ranks. Convert it "
                f"once to a universal checkpoint, which loads at any world size:\n"
                f"  python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder {path} "
                f"--output_folder {path}_universal\nthen resume with --resume {path}_universal "
                f"(or resume with {saved['world_size']} ranks).")
        return path.parent, path.name

    def _drop_best_model_from_later_steps(self) -> None:
        """best_model/ exported after the checkpoint we resume from (by the interrupted run, or by
        the one rolled back) is not the restored best_step's: remove it; the next better validation
        writes it again. Rank 0's business, as the export's writing is."""
        folder = self.run_dir / "best_model"
        marker = folder / BEST_STEP_FILE
        if self.rank == 0 and marker.is_file() and json.loads(marker.read_text())["step"] != self.best_step:
            logger.warning("%s holds a step after the resumed checkpoint (best_step %s): removed", folder,
                           self.best_step)
            shutil.rmtree(folder, ignore_errors=True)

    def _load_checkpoint(self, load_dir: Path, tag: str) -> None:
        loaded, client = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        state = client["trainer"]
        self.epoch, self.epoch_samples = state["epoch"], state["epoch_samples"]
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self._validated_at = state.get("validated_at", -1)  # a finished run resumed does not validate again
        self._drop_best_model_from_later_steps()
        rng_file = load_dir / tag / f"rng_state_rank{self.rank}.pt"
        if state["world_size"] == self.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("resuming with %d ranks from %d: the epoch continues after the samples already "
                           "seen, but RNG streams restart (not bit-exact)", self.world_size, state["world_size"])
            seed_everything(self.args.seed + self.rank + self.global_step)
        if self.rank == 0:
            logger.info("resumed from %s at step %d (epoch %d)", load_dir / tag, self.global_step, self.epoch)

    # ---- export ---------------------------------------------------------------------------------
    def export(self, folder: str | Path) -> Path:
        """Write a Hugging Face folder (config.json, model.safetensors, tokenizer if given).
        Collective: every rank must call it (ZeRO-3 gathers the shards onto rank 0)."""
        folder = Path(folder)
        state = (self.engine._zero3_consolidated_16bit_state_dict()
                 if self.engine.zero_optimization_partition_weights() else None)
        if self.rank == 0:
            self.engine.module.save_pretrained(folder, state_dict=state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
        dist.barrier()
        return folder
