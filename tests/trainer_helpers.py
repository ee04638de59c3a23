"""A tiny MLM run of the Trainer, for the engine and launcher tests.

As a module it gives the tiny model and random data, and runs the program below in subprocesses
(`start`/`finish`/`train`: one process, or two ranks through torch.distributed.run + gloo; ~6 s
and ~15 s) and reads what they leave (`params`, `scalars`, `run_dir`). As a program (`python -m
tests.trainer_helpers [trainer flags] [--dump DIR ...]`, also under torchrun, SLURM or
launch/cpu.sh) it trains through the shared CLI flags and writes what the tests compare into
--dump: params_rank<r>.pt (full parameters as each rank holds them), summary.json, logits.pt
(the engine's logits on a fixed batch, rank 0). `spawn`/`reap` run the tests' subprocesses in
their own session, so a timeout stops a launcher together with its ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from ds_longformer import LongformerConfig, LongformerForMaskedLM
from ds_longformer.engine import Trainer, TrainerArgs, add_trainer_args, load_ds_config, seed_everything, setup_logging
from ds_longformer.engine.log import EVERY_RANK

VOCAB, SEQ = 100, 16
REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("ds_longformer.tests")  # under the package's logger, as the tasks' are
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    """Start `cmd` in its own session (so `reap` can stop a launcher together with its ranks)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def reap(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def child_env(**extra) -> dict:
    """This environment without the launch variables (in-process runs set them), one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def start(out: Path, *flags: str, nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    """Start the tiny MLM training with `flags`, its run folder under `out`, dumps in `out/dump`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "tests.trainer_helpers", "--default_root_dir", str(out), "--dump", str(out / "dump"),
           *flags]
    return spawn(cmd, cwd=REPO, env=child_env(**(env or {})))


def finish(proc: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    done = reap(proc)
    if check:
        assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stderr[-4000:]}"
    return done


def train(out: Path, *flags: str, nproc: int = 1, check: bool = True, env: dict | None = None
          ) -> subprocess.CompletedProcess:
    return finish(start(out, *flags, nproc=nproc, env=env), check)


def params(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / "dump" / f"params_rank{rank}.pt")


def assert_params_close(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def assert_params_equal(a: dict, b: dict):
    """Bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def run_dir(out: Path) -> Path:
    return out / "ds-longformer"


def records(out: Path) -> list[dict]:
    """The run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir(out) / "metrics.jsonl").read_text().splitlines()]


def tiny_model(dropout: float = 0.0, attention_backend: str = "blocked") -> LongformerForMaskedLM:
    return LongformerForMaskedLM(LongformerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, attention_window=8, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attention_backend=attention_backend))


def masking_collate(samples: list[dict]) -> dict:
    """As an MLM collator: each label kept with probability 1/2, drawn from torch's global generator."""
    batch = torch.utils.data.default_collate(samples)
    keep = torch.rand(batch["labels"].shape) < 0.5
    batch["labels"] = torch.where(keep, batch["labels"], torch.full_like(batch["labels"], -100))
    return batch


def loss_log(path: Path) -> list[tuple]:
    """The lines of --loss_log: ("loss", step, loss) per step, ("save", step) / ("saved", step) around
    each checkpoint (rank 0), across every process that appended to it."""
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        kind, step, *value = line.split()
        if kind == "loss" and value:  # (a line a kill cut short has no value)
            rows.append((kind, int(step), float.fromhex(value[0])))
        elif kind in ("save", "saved"):
            rows.append((kind, int(step)))
    return rows


def random_mlm_data(n: int, seed: int) -> list[dict]:
    """Every token is a label, so every sample weighs the same in a batch's mean loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": x.roll(1)}
            for x in ids]


def token_accuracy(outputs, batch) -> dict:
    labels = batch["labels"].to(outputs.logits.device)
    return {"correct": (outputs.logits.argmax(-1) == labels).sum().item(), "tokens": labels.numel()}


def reduce_accuracy(totals: dict) -> dict:
    return {"accuracy": totals["correct"] / totals["tokens"]}


def merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters as this rank sees them, gathered first under ZeRO-3 (collective)."""
    import deepspeed

    module = trainer.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()),
                                           enabled=trainer.engine.zero_optimization_partition_weights()):
        return {k: v.detach().float().clone() for k, v in module.named_parameters()}


def poison_loss(model: torch.nn.Module, at_call: int) -> None:
    """Turn the loss of the `at_call`-th training forward (1-based) into NaN."""
    calls = 0

    def hook(module, inputs, output):
        nonlocal calls
        if module.training:
            calls += 1
            if calls == at_call:
                output.loss = output.loss * float("nan")

    model.register_forward_hook(hook)


def poison_gradients(model: torch.nn.Module, at_call: int, later: bool = False) -> None:
    """Make the gradients of the `at_call`-th training backward (1-based), and with `later` of every
    later one, non-finite."""
    calls = 0

    def hook(grad):
        nonlocal calls
        calls += 1
        return grad * float("inf") if calls == at_call or later and calls > at_call else grad

    model.longformer.embeddings.word_embeddings.weight.register_hook(hook)


def log_losses(trainer: Trainer, path: Path) -> None:
    """Rank 0 appends "loss <step> <hex>" per step and "save <step>" / "saved <step>" around each
    checkpoint to `path`, flushed at once (a kill -9 loses no line already written)."""
    if trainer.rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a")
    scalars, save = trainer.metrics.scalars, trainer.checkpoints.save

    def logged_scalars(values, step):
        if "train/loss" in values:
            log.write(f"loss {step} {float(values['train/loss']).hex()}\n")
            log.flush()
        scalars(values, step)

    def logged_save(engine, state):
        log.write(f"save {state['global_step']}\n")
        log.flush()
        out = save(engine, state)
        log.write(f"saved {state['global_step']}\n")
        log.flush()
        return out

    trainer.metrics.scalars, trainer.checkpoints.save = logged_scalars, logged_save


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_trainer_args(parser)
    parser.add_argument("--n_train", type=int, default=16)
    parser.add_argument("--n_val", type=int, default=6)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--ds_override", type=json.loads, default={}, help="JSON merged into the config")
    parser.add_argument("--crash_during_save_at", type=int, default=-1,
                        help="die (os._exit) after DeepSpeed wrote the files of this step's checkpoint")
    parser.add_argument("--nan_at_step", type=int, default=-1, help="make the loss NaN at this optimizer step")
    parser.add_argument("--inf_grad_at_step", type=int, default=-1,
                        help="make the gradients non-finite at this optimizer step (its loss stays finite)")
    parser.add_argument("--inf_grads_from_step", type=int, default=-1,
                        help="make the gradients non-finite at this optimizer step and every later one")
    parser.add_argument("--attention_backend", default="blocked")
    parser.add_argument("--mask_in_collate", action="store_true",
                        help="collate with masking_collate (random labels dropped, as MLM masking)")
    parser.add_argument("--measure_draws", action="store_true",
                        help="the model's FLOP count draws from torch's global generator (a measurement that does)")
    parser.add_argument("--crash_in_best_export_at", type=int, default=-1,
                        help="die after the model of this step's best_model/ export is written (a copy of the "
                             "best_model/ before it goes to DUMP/best_before)")
    parser.add_argument("--loss_log", type=Path, help="append each step's loss and each save's start and end here")
    parser.add_argument("--warn", action="store_true",
                        help="log a Python warning and a logging warning on every rank, and a rank-specific one")
    parser.add_argument("--dump", type=Path)
    parser.set_defaults(batch_size=2, lr=1e-3, weight_decay=0.0, save_every_n_steps=0, log_every_n_steps=1)
    ns = parser.parse_args(argv)
    setup_logging(ns.log_level)
    if ns.warn:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
        warnings.warn("a Python warning that every rank meets")
        logger.warning("a warning that every rank meets")
        logger.warning("a warning of rank %d alone", rank, extra=EVERY_RANK)
    args = TrainerArgs.from_namespace(ns)
    if ns.ds_override:
        args.deepspeed_config = merge(load_ds_config(args.deepspeed_config, on_cpu=not torch.cuda.is_available()),
                                      ns.ds_override)
    seed_everything(args.seed)
    model = tiny_model(ns.dropout, ns.attention_backend)
    if ns.nan_at_step > 0:
        poison_loss(model, (ns.nan_at_step - 1) * args.gradient_accumulation_steps + 1)
    if ns.inf_grad_at_step > 0 or ns.inf_grads_from_step > 0:
        step = max(ns.inf_grad_at_step, ns.inf_grads_from_step)
        poison_gradients(model, (step - 1) * args.gradient_accumulation_steps + 1, later=ns.inf_grads_from_step > 0)
    if ns.measure_draws:
        count = model.train_flops
        model.train_flops = lambda *a, **kw: count(*a, **kw) + 0 * torch.rand(()).item()
    per_token = args.sequence_parallel_size == 1  # (sequence parallelism: no logits, the loss only)
    trainer = Trainer(model, args, random_mlm_data(ns.n_train, 1), random_mlm_data(ns.n_val, 2),
                      collate_fn=masking_collate if ns.mask_in_collate else None,
                      compute_metrics=token_accuracy if per_token else None,
                      reduce_metrics=reduce_accuracy if per_token else None)
    if ns.crash_during_save_at > 0:
        save = trainer.engine.save_checkpoint

        def save_then_crash(*a, **kw):
            save(*a, **kw)
            if trainer.global_step == ns.crash_during_save_at:
                os._exit(3)

        trainer.engine.save_checkpoint = save_then_crash
    if ns.crash_in_best_export_at > 0:
        export = trainer.checkpoints.export
        # Every validation counts as the best, whatever the losses: each step exports best_model/.
        trainer.best.update = lambda metrics, step: True

        def export_then_crash(engine, folder, tokenizer=None):
            best = trainer.run_dir / "best_model"
            if trainer.global_step == ns.crash_in_best_export_at and trainer.rank == 0 and best.is_dir():
                shutil.copytree(best, ns.dump / "best_before")
            out = export(engine, folder, tokenizer)
            if trainer.global_step == ns.crash_in_best_export_at:
                os._exit(3)
            return out

        trainer.checkpoints.export = export_then_crash
    if ns.loss_log is not None:
        log_losses(trainer, ns.loss_log)
    summary = trainer.fit()
    if ns.dump is None:
        return
    ns.dump.mkdir(parents=True, exist_ok=True)
    torch.save(full_params(trainer), ns.dump / f"params_rank{trainer.rank}.pt")
    probe = {k: v.to(trainer.engine.device) for k, v in
             torch.utils.data.default_collate(random_mlm_data(2, 3)).items()}
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(**probe).logits
    if trainer.rank == 0:
        if logits is not None:
            torch.save(logits.float().cpu(), ns.dump / "logits.pt")
        optimizer = trainer.engine.basic_optimizer  # the torch optimizer under DeepSpeed's wrappers
        summary["optimizer"] = {"class": type(optimizer).__name__, "fused": optimizer.defaults.get("fused")}
        summary["args"] = {k: v for k, v in dataclasses.asdict(trainer.args).items() if k != "given"}
        summary["world_size"] = trainer.world_size
        (ns.dump / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
