"""Extractive question answering over long documents (SQuAD-format data, TriviaQA): the Longformer
against the RoBERTa baseline, as in the paper.

    python -m ds_longformer.qa --data_dir data/triviaqa-rc --model Longformer --model_path data/long_model
    python -m ds_longformer.qa --data_dir data/squad --model Roberta --model_path distilbert/distilroberta-base
    torchrun --nproc_per_node 4 -m ds_longformer.qa ... --deepspeed_config zero2

Data (--data_dir; --dataset says which layout, default: triviaqa when the folder has qa/, else squad):

* squad: a folder with the SQuAD JSON files (train-v1.1.json, dev-v1.1.json; train-v2.0.json,
  dev-v2.0.json; or train.json, dev.json, test.json: a file's split is its name up to the first
  "-" or "."), or the Hugging Face parquet layout (<split>-*.parquet, directly or one folder down);
  see ds_longformer.data.squad. train and dev are needed, test is used when present. SQuAD v2.0
  (unanswerable questions) is recognised from the data: "" is then a prediction (--null_threshold).
* triviaqa: the unpacked triviaqa-rc release: qa/<domain>-train.json, qa/<domain>-dev.json
  (qa/<domain>-test-without-answers.json: predictions only) with evidence/wikipedia/ and
  evidence/web/ next to qa/ (--triviaqa_domain); read as the paper did (data.triviaqa: one example
  per question and evidence document, every occurrence of an answer alias a target).

Model input: question and document in windows of --max_seq_len tokens (default: the model's
length; the Roberta baseline reads 512) that overlap by --doc_stride tokens (data.qa_features);
the Longformer has global attention on the question (and <s>), the baseline none (it must stay
exactly RoBERTa). --max_windows 1 reads only each document's first window (the paper's TriviaQA
setting: the first 4,096 tokens). Loss: the marginal likelihood of all gold spans in a window
(LongformerForQuestionAnswering with (rows, K) positions). The tokenized splits are cached under
--cache_dir.

Answer: the best span over all windows of a question (all evidence documents of a TriviaQA
Wikipedia question), start <= end, at most --max_answer_len tokens, mapped back to the original
text through the fast tokenizer's offsets; SQuAD v2.0 answers "" when the question's no-answer
score beats the best span by more than --null_threshold.

Metrics (percent, as the official scripts): exact_match and f1 (SQuAD v2.0 also HasAns_* and
NoAns_*; TriviaQA: its normalisation, the best over the aliases) on dev at every
--val_check_interval steps (the best model is kept by --best_metric, default f1), and on test once
training ends (test/exact_match, test/f1 in metrics.jsonl; printed). The final model's answers are
written in the official format ({question id: answer text}) to predictions.json (dev) and
test_predictions.json (test) in the run folder.

How evaluation finds the best span over all windows when the ranks share the windows out: each
rank scores its own windows (the n best spans of each, with character offsets: small and
picklable; SpanScorer.compute_metrics), then every rank gathers all ranks' window scores
(all_gather_object, in the trainer's reduce_metrics hook, which every rank calls) and picks each
question's best span over them (data.qa_features.select_answers). So windows of one question may
lie on several ranks and every rank computes the same metrics; the forward passes stay sharded
(evaluating on rank 0 alone would leave the other devices idle, and a ZeRO-3 forward needs all
ranks anyway).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

import torch.distributed as dist

from . import LongformerForQuestionAnswering
from .data import DatasetNotFoundError
from .data.common import canonical_split
from .data.qa_features import (
    QAExample,
    QAWindowDataset,
    QuestionTooLongError,
    collate_qa,
    load_tokenized_qa,
    prediction_texts,
    score_batch,
    select_answers,
)
from .data.squad import load_squad
from .data.triviaqa import load_triviaqa
from .engine import Trainer, rank_zero_first, seed_everything, setup_logging
from .engine.args import ranged
from .qa_metrics import evaluate_squad, evaluate_triviaqa, gold_answers, write_predictions
from .tasks_common import (
    TaskError,
    add_model_choice,
    chosen_model_path,
    cli,
    load_chosen_model,
    load_tokenizer,
    task_parser,
    task_preflight,
)

logger = logging.getLogger("ds_longformer.qa")  # (not __name__: "__main__" as a program)

METRICS = ("loss", "exact_match", "f1")  # what every validation reports (SQuAD v2.0 adds HasAns_*, NoAns_*)
N_BEST = 20  # spans kept per window and per question (transformers' run_qa default)
SPLITS = ("train", "dev", "test")


def build_parser():
    parser = task_parser("qa", __doc__, batch_size=8, lr=3e-5, epochs=2, weight_decay=0.01, val_check_interval=500,
                         default_root_dir="./logs", project_name="QA", best_metric="f1", best_mode="max")
    g = parser.add_argument_group("question answering")
    g.add_argument("--dataset", choices=("squad", "triviaqa"), default=None,
                   help="the layout of --data_dir; None: triviaqa when it has a qa/ folder, else squad")
    g.add_argument("--data_dir", default="./data/squad", help="the dataset folder (see above)")
    g.add_argument("--triviaqa_domain", choices=("wikipedia", "web"), default="wikipedia")
    add_model_choice(g, "512-token windows without global attention")
    g.add_argument("--doc_stride", type=ranged(int, "doc_stride", minimum=0), default=128,
                   help="context tokens shared by consecutive windows of a long document")
    g.add_argument("--max_windows", type=ranged(int, "max_windows", minimum=1), default=None,
                   help="read only the first N windows of each document (None: all)")
    g.add_argument("--max_answer_len", type=ranged(int, "max_answer_len", minimum=1), default=30,
                   help="longest answer span predicted, in tokens")
    g.add_argument("--null_threshold", type=ranged(float, "null_threshold"), default=0.0,
                   help="SQuAD v2.0: answer \"\" when the no-answer score beats the best span's by more than this")
    g.add_argument("--skip_long_questions", action="store_true",
                   help="leave out (and count) the questions that leave no room for context in a window; without "
                        "it such a question stops the run before training. They then score 0")
    return parser


# ---- data ---------------------------------------------------------------------------------------
def detect_dataset(data_dir: Path) -> str:
    return "triviaqa" if (data_dir / "qa").is_dir() else "squad"


def _squad_json_files(data_dir: Path) -> dict[str, Path]:
    """{split: file} of the SQuAD JSON files in the folder (split: the name up to the first - or .)."""
    files: dict[str, list[Path]] = {}
    for path in sorted(data_dir.glob("*.json")):
        split = canonical_split(path.name.split("-", 1)[0].split(".", 1)[0])
        if split is not None:
            files.setdefault(split, []).append(path)
    for split, paths in files.items():
        if len(paths) > 1:
            raise TaskError(f"--data_dir {data_dir} holds several {split} files ({', '.join(p.name for p in paths)}): "
                            "keep one per split")
    return {split: paths[0] for split, paths in files.items()}


def load_splits(dataset: str, data_dir: Path, domain: str) -> dict[str, tuple[list[QAExample], Path]]:
    """{split: (examples, the file or folder they came from)}: train and dev (required), test if present."""
    if dataset == "triviaqa":
        qa = data_dir / "qa"
        names = {"train": f"{domain}-train.json", "dev": f"{domain}-dev.json",
                 "test": f"{domain}-test-without-answers.json"}
        return {split: (load_triviaqa(qa / name), qa / name) for split, name in names.items()
                if split != "test" or (qa / name).is_file()}
    if not data_dir.is_dir():
        raise DatasetNotFoundError(f"SQuAD folder {data_dir}", [data_dir.parent], "a folder with train and dev SQuAD "
                                   "JSON files (train-v1.1.json, dev-v1.1.json...) or <split>-*.parquet files",
                                   "the SQuAD page or the Hugging Face datasets rajpurkar/squad(_v2)")
    json_files = _squad_json_files(data_dir)
    splits = {}
    for split in SPLITS:
        source = json_files.get(canonical_split(split), data_dir)
        try:
            splits[split] = (load_squad(source, None if source != data_dir else split), source)
        except DatasetNotFoundError:
            if split != "test":
                raise
    return splits


@dataclass
class QASplit:
    examples: list[QAExample]
    windows: QAWindowDataset
    source: Path
    scorable: bool  # gold answers to score against (not a test file without answers)


# ---- metrics ------------------------------------------------------------------------------------
class SpanScorer:
    """The trainer's metric hooks (see the module docstring): ``compute_metrics`` keeps the n best
    spans of each window of this rank, ``reduce_metrics`` gathers all ranks' and scores the best
    span per question. ``evaluating(split)`` says which split the next evaluations are of (dev by
    default); ``predictions[split]`` holds the last answers ({question id: text})."""

    def __init__(self, splits: dict[str, QASplit], triviaqa: bool, version_2: bool, null_threshold: float,
                 max_answer_len: int):
        self.splits, self.triviaqa, self.version_2 = splits, triviaqa, version_2
        self.null_threshold, self.max_answer_len = null_threshold, max_answer_len
        self.split = "dev"
        self.predictions: dict[str, dict[str, str]] = {}
        self._windows = []

    @contextlib.contextmanager
    def evaluating(self, split: str):
        self.split = split
        try:
            yield
        finally:
            self.split = "dev"

    def compute_metrics(self, outputs, batch) -> dict:
        # (a batch evaluate repeats to even out the ranks adds nothing: select_answers keeps one of each span)
        self._windows += score_batch(self.splits[self.split].windows, batch, outputs.start_logits,
                                     outputs.end_logits, N_BEST, self.max_answer_len)
        return {}

    def reduce_metrics(self, totals: dict) -> dict:
        mine, self._windows = self._windows, []
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            mine = list(chain.from_iterable(gathered))
        split = self.splits[self.split]
        answers = prediction_texts(select_answers(split.examples, mine, self.version_2, self.null_threshold, N_BEST))
        self.predictions[self.split] = answers
        if not split.scorable:
            return {}
        gold = gold_answers(split.examples)
        if self.triviaqa:
            scores = evaluate_triviaqa(gold, answers)
        else:
            scores = evaluate_squad(gold, answers, self.version_2)
        return {k: v for k, v in scores.items() if k in ("exact_match", "f1") or k.endswith(("_exact", "_f1"))}


# ---- the program --------------------------------------------------------------------------------
def build_windows(args, name: str, examples: list[QAExample], source: Path, tokenizer, max_len: int) -> QAWindowDataset:
    with rank_zero_first():  # rank 0 tokenizes into --cache_dir, the others read it
        try:
            tokenized = load_tokenized_qa(examples, tokenizer, args.cache_dir, f"qa-{args.dataset}-{name}",
                                          args.num_workers or None)
        except ValueError as err:  # a slow tokenizer (no offsets)
            raise TaskError(f"--tokenizer_name / --model_path: {err}") from err
    try:  # global attention on the question for the Longformer; none for the baseline (exactly RoBERTa)
        windows = QAWindowDataset(tokenized, tokenizer, max_len, args.doc_stride, args.model == "Longformer",
                                  args.max_windows, skip_long=args.skip_long_questions)
    except QuestionTooLongError as err:
        raise TaskError(f"{source}: {err}; give a longer --max_seq_len (this model reads up to {max_len} tokens), "
                        "a smaller --doc_stride, or pass --skip_long_questions to leave them out") from err
    if windows.skipped:
        logger.warning("--skip_long_questions: left out %d of %d questions of %s (no room for context in %d tokens)",
                       len(windows.skipped), len(examples), source, max_len)
    return windows


def main(argv=None) -> dict:
    """Train, test, write the predictions; returns the trainer's summary plus ``test_metrics``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    model_path = chosen_model_path(args)
    trainer_args = task_preflight(args, METRICS)
    if trainer_args.sequence_parallel_size > 1:
        raise TaskError(f"--sequence_parallel_size {trainer_args.sequence_parallel_size}: the question-answering head "
                        "scores every token and has no sequence-parallel support; use 1 (data parallelism only)")
    data_dir = Path(args.data_dir)
    args.dataset = args.dataset or detect_dataset(data_dir)
    loaded = load_splits(args.dataset, data_dir, args.triviaqa_domain)  # fails fast: before any model is loaded
    version_2 = any(ex.is_impossible for examples, _ in loaded.values() for ex in examples)

    seed_everything(args.seed)  # the new qa_outputs head
    model, max_len = load_chosen_model(args, LongformerForQuestionAnswering, model_path)
    tokenizer = load_tokenizer(args.tokenizer_name or model_path)
    splits = {name: QASplit(examples, build_windows(args, name, examples, source, tokenizer, max_len), source,
                            version_2 or any(ex.gold_answers for ex in examples))
              for name, (examples, source) in loaded.items()}
    scorer = SpanScorer(splits, args.dataset == "triviaqa", version_2, args.null_threshold, args.max_answer_len)

    trainer = Trainer(model, trainer_args, splits["train"].windows, splits["dev"].windows,
                      collate_fn=partial(collate_qa, pad_token_id=tokenizer.pad_token_id),
                      compute_metrics=scorer.compute_metrics, reduce_metrics=scorer.reduce_metrics,
                      tokenizer=tokenizer)
    summary = trainer.fit()  # (its last validation is the final model's: scorer.predictions["dev"])
    if "dev" not in scorer.predictions:  # a finished run resumed: no validation ran
        trainer.evaluate(splits["dev"].windows)
    test = {}
    if "test" in splits:
        with scorer.evaluating("test"):
            metrics = trainer.evaluate(splits["test"].windows)
        if splits["test"].scorable:  # (a test file without answers: only its predictions)
            test = {f"test/{k}": v for k, v in metrics.items()}
            trainer.log_record(test)
    if trainer.rank == 0:
        for split, name in (("dev", "predictions.json"), ("test", "test_predictions.json")):
            if split in scorer.predictions:
                write_predictions(trainer.run_dir / name, scorer.predictions[split])
        print(json.dumps({"model": args.model, "dataset": args.dataset, "max_seq_len": max_len, "version_2": version_2,
                          **{f"dev/{k}": v for k, v in (summary["val_metrics"] or {}).items()}, **test}))
    return {**summary, "test_metrics": test, "predictions": str(trainer.run_dir / "predictions.json")}


if __name__ == "__main__":
    cli(main)
