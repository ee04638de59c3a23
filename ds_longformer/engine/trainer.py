"""The train loop: deepspeed.initialize around the model, then steps, validations and checkpoints.

Usage
-----
    parser = argparse.ArgumentParser()
    add_trainer_args(parser)                   # --deepspeed_config --batch_size --lr ... (args.py)
    parser.set_defaults(lr=3e-5, project_name="classify")   # task defaults
    args = TrainerArgs.from_namespace(parser.parse_args())
    setup_logging(args.log_level)
    args = preflight(args, metrics=("loss", "accuracy"))   # flags, config, resume, folder: before any data
    seed_everything(args.seed)                 # before building the model (DeepSpeed also
    model = LongformerForMaskedLM(config)      # broadcasts rank 0's weights at start)
    trainer = Trainer(model, args, train_ds, val_ds, collate_fn=collator,
                      compute_metrics=batch_stats, reduce_metrics=reduce, tokenizer=tokenizer)
    summary = trainer.fit()                    # dict: global_step, best_value, final_model, ...
    metrics = trainer.evaluate(test_ds)        # dict: loss + the task's metrics (evaluation.py)
    trainer.log_record({"test/f1": ...})       # metrics.jsonl + TensorBoard (metrics.py)
    trainer.export("some/dir")                 # Hugging Face folder from any ZeRO stage

Batches are dicts from ``collate_fn``; the tensors the model's ``forward`` accepts are passed to it
(other keys may carry data for metrics), and it returns an object with ``.loss``/``.logits``.

Attributes tasks may read: ``args`` (the values the run uses: a DeepSpeed config's own values
included), ``rank``, ``world_size``, ``parallel`` (sequence parallelism and the data-parallel
ranks, parallel.py), ``global_step``, ``epoch``, ``run_dir``, ``total_steps``, ``engine`` (the
DeepSpeed engine; ``engine.module`` is the model), ``metrics`` (its MetricsWriter).

Run folder ``<default_root_dir>/<project_name>/`` (= ``trainer.run_dir``): TensorBoard events (rank
0: train/loss, lr, grad_norm, loss_scale (fp16), tokens_per_s, samples_per_s, step_time, tflops and
mfu_percent (per device, model FLOPs from the model's ``train_flops``, see flops.py; MFU only against a
known peak: --peak_tflops or a known GPU's, see metrics.device_peak_flops), gpu_peak_mem_gb or rss_gb;
val/<metric>), ``metrics.jsonl`` (one object per validation: step, epoch, metrics),
``checkpoints/`` (checkpointing.py), ``best_model/`` and ``final_model/`` (Hugging Face folders).

Each step: forward and backward of ``gradient_accumulation_steps`` micro batches (TrainingLoader,
loader.py: collation seeded per batch), one all-reduce of the step's loss, tokens, samples and FLOPs
(every rank logs the same values), the optimizer step; then, in this order, logging,
validation every ``val_check_interval`` steps (or at each epoch's end), the epoch's end, a
checkpoint every ``save_every_n_steps``: a checkpoint holds the state the next step starts from.
Without a ``scheduler`` section in the DeepSpeed config the lr follows transformers' linear warmup +
linear decay. A run resumed with another number of ranks re-plans the steps --epochs still needs.

Divergence stops every rank at its step (``DivergenceError``, naming the step and the checkpoint to
resume from): a non-finite loss (before the optimizer step), a non-finite gradient norm (fp32
without ZeRO: before the update; bf16 and ZeRO: DeepSpeed has skipped the update), fp16's loss
scaler giving up at its minimum scale (a step it skips is its own business). No checkpoint is
written after it (and none from non-finite weights: checkpointing.py). Measuring (FLOP counts, the
MFU's peak) runs inside ``rng.untouched()``: it never changes what trains.

With ``--sequence_parallel_size P`` the ranks of a group share every batch (parallel.py): data,
seeds and sample counts follow the data-parallel rank, and the model gets the group.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import Dataset

from . import ds_config, parallel
from .args import TrainerArgs
from .batches import ModelInputs, batch_size, batch_tokens
from .checkpointing import Checkpointer
from .distributed import init_distributed, reduce_across_ranks
from .errors import DivergenceError
from .evaluation import BestTracker, evaluate
from .loader import ResumableDistributedSampler, TrainingLoader  # noqa: F401 (the sampler: importable here too)
from .metrics import MFU, MetricsWriter, Progress, device_peak_flops, plain_grad_norm, step_extras
from .preflight import check_training_set
from .rng import seed_everything, untouched

logger = logging.getLogger(__name__)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases and LayerNorm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Train `model` with DeepSpeed; see the module docstring for the API and the run folder."""

    def __init__(self, model: torch.nn.Module, args: TrainerArgs, train_dataset: Dataset,
                 val_dataset: Dataset | None = None, collate_fn: Callable | None = None,
                 compute_metrics: Callable[[Any, Mapping], Mapping[str, float]] | None = None,
                 reduce_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
                 tokenizer=None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.tokenizer, self.val_dataset, self.collate_fn = tokenizer, val_dataset, collate_fn
        self.compute_metrics, self.reduce_metrics = compute_metrics, reduce_metrics
        self.rank, self.world_size = init_distributed()
        self.on_cpu = get_accelerator().device_name() == "cpu"
        self.run_dir = Path(args.default_root_dir) / args.project_name
        config, args = ds_config.resolve(args, self.world_size, self.on_cpu, self.run_dir)
        self.args = args
        self.parallel = parallel.setup(self.rank, self.world_size, args.sequence_parallel_size)
        replicas, data_rank = self.parallel.data_world_size, self.parallel.data_rank  # = world, rank without SP
        seed_everything(args.seed + data_rank)  # dropout etc. differ per replica, reproducibly

        self.train_loader = TrainingLoader(train_dataset, args.batch_size, collate_fn, args.num_workers, args.seed,
                                           data_rank, replicas, pin_memory=not self.on_cpu)
        self.sampler = self.train_loader.epoch_sampler
        check_training_set(len(train_dataset), args, replicas)
        self.steps_per_epoch = len(self.train_loader) // args.gradient_accumulation_steps
        self.total_steps = args.max_steps if args.max_steps > 0 else args.epochs * self.steps_per_epoch

        if args.gradient_checkpointing:  # transformers' switch (gradient_checkpointing_enable before 5.x)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()  # from_pretrained gives eval mode, as transformers does
        parallel.attach(model, self.parallel)
        parallel.prepare_ds_config(config, model, args.sequence_parallel_size)
        ds_config.finalize(config, self.total_steps, getattr(getattr(model, "config", None), "hidden_size", None))
        self.checkpoints = Checkpointer(self.run_dir, self.rank, self.world_size, args.keep_last_k)
        resume_from = self.checkpoints.find(args.resume)
        if resume_from is not None and resume_from.universal:
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}

        def linear_warmup_decay(step: int) -> float:
            """transformers' get_linear_schedule_with_warmup, reading total_steps when called: a
            run resumed with another number of ranks re-plans its steps (see _planned_total_steps)."""
            if step < args.warmup_steps:
                return step / max(1, args.warmup_steps)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - args.warmup_steps))

        scheduler = None if "scheduler" in config else (
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, args.weight_decay), config=config,
            lr_scheduler=scheduler, mpu=self.parallel.mpu)
        self._inputs = ModelInputs(self.engine.module, self.engine.device)
        self._train_flops = getattr(self.engine.module, "train_flops", None)  # None: no tflops/MFU logged
        self._mfu = None  # train/mfu_percent against the device's peak (rank 0, from fit)

        self.epoch, self.epoch_samples = 0, 0  # epoch_samples: global samples used in this epoch
        self.best = BestTracker(args.best_metric, args.best_mode)
        self.last_val_metrics = None
        self._validated_at = -1  # step of the last validation
        self._last_logged: dict = {}
        state = {}
        if resume_from is not None:
            state = self.checkpoints.load(self.engine, resume_from, args.seed)
            if (state["world_size"], state.get("sequence_parallel_size", 1)) != (self.world_size,
                                                                                  args.sequence_parallel_size):
                seed_everything(args.seed + data_rank + self.global_step)  # new RNG streams, one per replica
            self.epoch, self.epoch_samples = state["epoch"], state["epoch_samples"]
            self.best.value, self.best.step = state["best_value"], state["best_step"]
            self._validated_at = state.get("validated_at", -1)  # a finished run resumed does not validate again
            if args.max_steps <= 0:
                planned = self._planned_total_steps()
                if planned != self.total_steps and "scheduler" in config:
                    logger.warning("resumed with another number of ranks: %d steps left instead of %d, but the "
                                   "DeepSpeed config's scheduler keeps total_num_steps=%d", planned - self.global_step,
                                   self.total_steps - self.global_step, self.total_steps)
                self.total_steps = planned
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, keep_until=self.global_step if state else -1,
                                     keep_records=state.get("records"))

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    def _planned_total_steps(self) -> int:
        """--epochs after a resume: the steps taken so far plus those the rest of the epochs take at
        this world size (a step's global batch, and so steps_per_epoch, changes with the ranks)."""
        if self.epoch >= self.args.epochs:
            return self.global_step
        per_rank_left = self.sampler.num_samples - self.epoch_samples // self.parallel.data_world_size
        left_this_epoch = per_rank_left // self.args.batch_size // self.args.gradient_accumulation_steps
        return self.global_step + left_this_epoch + (self.args.epochs - self.epoch - 1) * self.steps_per_epoch

    # ---- training -------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to max_steps / epochs; returns a summary (steps, last losses, best, paths)."""
        progress = Progress(self.rank == 0, self.total_steps, self.global_step)
        if self.rank == 0 and self._train_flops is not None and self._mfu is None:
            self._mfu = MFU(*device_peak_flops(self.engine, self.args.peak_tflops))
            if self._mfu.peak:
                self.metrics.text("train/mfu_peak", f"{self._mfu.peak / 1e12:.4g} TFLOP/s per device "
                                                    f"({self._mfu.source})")
        started = time.perf_counter()
        try:
            while self.global_step < self.total_steps:
                self._train_epoch(progress)
            if self.val_dataset is not None and self._validated_at != self.global_step:
                self._validate()
            if self.checkpoints.saved_at != self.global_step:
                self.save_checkpoint()
            final = self.export(self.run_dir / "final_model")
        finally:
            progress.close()
            self.metrics.close()
        best_model = self.run_dir / "best_model"
        return {"global_step": self.global_step, "epoch": self.epoch,
                "train_loss": self._last_logged.get("train/loss"), "val_metrics": self.last_val_metrics,
                "best_metric": self.args.best_metric, "best_value": self.best.value, "best_step": self.best.step,
                "best_model": str(best_model) if best_model.is_dir() else None,
                "final_model": str(final), "run_dir": str(self.run_dir),
                "train_time_s": time.perf_counter() - started}

    def _train_epoch(self, progress: Progress) -> None:
        """The rest of the current epoch (all of it unless resumed mid-epoch), in whole optimizer
        steps; stops early at total_steps."""
        ga = self.args.gradient_accumulation_steps
        self.train_loader.start_epoch(self.epoch, skip=self.epoch_samples // self.parallel.data_world_size)
        micro_batches = len(self.train_loader) // ga * ga
        if micro_batches == 0:
            self.epoch, self.epoch_samples = self.epoch + 1, 0
            return
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, samples, model FLOPs on this rank
        counted = float(self.parallel.counts_data)  # (sequence parallelism: a group's batch counts once)
        step_start = time.perf_counter()
        for micro, batch in zip(range(micro_batches), self.train_loader):
            boundary = (micro + 1) % ga == 0
            lr = self.engine.get_lr()[0]
            if micro == 0:  # (batches follow from the epoch's seeds: its first one tells; not every step's cost)
                parallel.check_same_batch(batch, self.parallel)
            outputs = self.engine(**self._inputs(batch))
            totals += torch.tensor([outputs.loss.item(), counted * batch_tokens(batch), counted * batch_size(batch),
                                    counted * self._batch_flops(batch)], dtype=torch.float64)
            if boundary:  # one all-reduce per step: every rank logs the same values and stops together
                totals = reduce_across_ranks(totals)
                loss = totals[0].item() / (ga * self.world_size)
                if not math.isfinite(loss):
                    raise DivergenceError(self._divergence_message(f"the training loss is {loss}"))
            self.engine.backward(outputs.loss)
            grad_norm = plain_grad_norm(self.engine) if boundary else None
            if grad_norm is not None and not math.isfinite(grad_norm):  # fp32 without ZeRO: before the update
                raise DivergenceError(self._divergence_message(f"the gradient norm is {grad_norm}"))
            self._optimizer_step()
            if not boundary:
                continue
            step_time = time.perf_counter() - step_start
            grad_norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
            if grad_norm is not None and not math.isfinite(grad_norm) and not self.engine.fp16_enabled():
                # (bf16, ZeRO: DeepSpeed skipped the update; fp16: a skipped step is the loss scaler's business)
                raise DivergenceError(self._divergence_message(f"the gradient norm is {grad_norm}", self.global_step))
            logged = {"train/loss": loss, "train/lr": lr, "train/step_time": step_time,
                      "train/tokens_per_s": totals[1].item() / step_time,
                      "train/samples_per_s": totals[2].item() / step_time}
            if grad_norm is not None:
                logged["train/grad_norm"] = float(grad_norm)
            if totals[3] > 0:
                per_device = totals[3].item() / self.world_size / step_time  # model FLOP/s
                logged["train/tflops"] = per_device / 1e12
                logged.update(self._mfu(per_device) if self._mfu else {})
            self._after_step(progress, logged, epoch_done=micro + 1 == micro_batches)
            if self.global_step >= self.total_steps:
                return
            totals.zero_()
            step_start = time.perf_counter()

    def _after_step(self, progress: Progress, logged: dict, epoch_done: bool) -> None:
        """Log, validate, advance the epoch, save: in this order, so a checkpoint holds the state
        the next step starts from."""
        args, step = self.args, self.global_step
        self.epoch_samples += args.batch_size * args.gradient_accumulation_steps * self.parallel.data_world_size
        self._last_logged = logged = {**logged, **step_extras(self.engine)}
        if step % args.log_every_n_steps == 0 or step == self.total_steps:
            self.metrics.scalars(logged, step)
        progress.update(step, logged["train/loss"], logged["train/tokens_per_s"])
        interval = args.val_check_interval
        if self.val_dataset is not None and (step % interval == 0 if interval > 0 else epoch_done):
            self._validate()
        if epoch_done:
            self.epoch, self.epoch_samples = self.epoch + 1, 0
        if args.save_every_n_steps > 0 and step % args.save_every_n_steps == 0:
            self.save_checkpoint()
            self.metrics.flush()  # a crash after this loses no logged step before the checkpoint

    def _optimizer_step(self) -> None:
        """engine.step(); DeepSpeed's fp16 loss scaler giving up (an overflow at its minimum scale)
        stops the run as a divergence."""
        try:
            self.engine.step()
        except Exception as err:
            if self.engine.fp16_enabled() and "loss scale already at minimum" in str(err):
                raise DivergenceError(self._divergence_message(
                    "the fp16 gradients overflow at the loss scaler's minimum scale")) from err
            raise

    def _batch_flops(self, batch: Mapping) -> float:
        if self._train_flops is None or not torch.is_tensor(batch.get("input_ids")):
            return 0.0
        with untouched():  # measuring never changes what trains
            return self._train_flops(**{k: v for k, v in batch.items() if torch.is_tensor(v)})

    def _divergence_message(self, what: str, step: int | None = None) -> str:
        step = self.global_step + 1 if step is None else step
        return (f"training diverged at step {step} (epoch {self.epoch}): {what}; stopped before any checkpoint of "
                f"it, {self.checkpoints.latest_note()}. Try a lower --lr, more --warmup_steps, a smaller "
                "--grad_clip, or bf16/fp32 instead of fp16, and check the data of this step.")

    # ---- validation, records, checkpoints, export --------------------------------------------------
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Metrics over `dataset` (each sample once, split over the ranks): loss + the task's."""
        self.engine.eval()
        try:
            return evaluate(lambda batch: self.engine(**self._inputs(batch)), dataset, self.args.batch_size,
                            self.collate_fn, self.args.num_workers, self.compute_metrics, self.reduce_metrics,
                            (self.parallel.data_rank, self.parallel.data_world_size), self.parallel.counts_data)
        finally:
            self.engine.train()

    def _validate(self) -> None:
        metrics = self.evaluate(self.val_dataset)
        self.last_val_metrics, self._validated_at = metrics, self.global_step
        self.log_record(metrics)
        if self.best.update(metrics, self.global_step):
            self.checkpoints.export_best(self.engine, self.global_step, self.tokenizer)

    def log_record(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """A record of this step (or ``step``) in metrics.jsonl and TensorBoard (see metrics.py)."""
        self.metrics.record(metrics, self.global_step if step is None else step, self.epoch)

    def save_checkpoint(self) -> Path:
        """A checkpoint of this step (checkpointing.py). Collective."""
        state = {"global_step": self.global_step, "epoch": self.epoch, "epoch_samples": self.epoch_samples,
                 "world_size": self.world_size, "zero_stage": self.engine.zero_optimization_stage(),
                 "sequence_parallel_size": self.args.sequence_parallel_size,
                 "best_value": self.best.value, "best_step": self.best.step, "validated_at": self._validated_at,
                 "records": self.metrics.records}
        return self.checkpoints.save(self.engine, state)

    def export(self, folder: str | Path) -> Path:
        """A Hugging Face folder of the model (and tokenizer) from any ZeRO stage. Collective."""
        return self.checkpoints.export(self.engine, folder, self.tokenizer)
