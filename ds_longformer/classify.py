"""Document classification (IMDB, Hyperpartisan): the Longformer against the RoBERTa baseline.

    python -m ds_longformer.classify --dataset Hyperpartisan --data_dir data/hyperpartisan \\
        --model Longformer --model_path data/long_model
    python -m ds_longformer.classify --dataset IMDB --data_dir data/imdb --model Roberta \\
        --model_path distilbert/distilroberta-base
    torchrun --nproc_per_node 4 -m ds_longformer.classify ... --deepspeed_config zero2

Longformer: global attention on <s>, inputs up to --max_seq_len (default: the model's length);
--model_path must be a Longformer folder (see ds_longformer.convert / ds_longformer.pretrain).
Roberta: the short model with the same classification head, full attention, inputs truncated to
512 tokens. Data (--data_dir, default ./data/<dataset in lower case>, e.g. ./data/hyperpartisan): see ds_longformer.data.imdb and
ds_longformer.data.hyperpartisan for the accepted published layouts.

The tokenized splits are cached under --cache_dir (rank 0 tokenizes, the other ranks and later
runs read the cache; keyed by the tokenizer, the examples' text and labels, and the input length).

Metrics: accuracy, F1 of the positive class (f1; IMDB: positive review, Hyperpartisan: "true")
and the mean F1 of both classes (f1_macro), on dev at every --val_check_interval steps and on test
once training ends (printed and appended to metrics.jsonl as test/accuracy, test/f1,
test/f1_macro). The final model is tested. The Longformer has global attention on <s>; the
RoBERTa baseline none (it must stay exactly RoBERTa).
"""

from __future__ import annotations

import json

import pyarrow.compute as pc

from . import LongformerForSequenceClassification
from .data.classification import encode_classification
from .data.collate import PaddingCollator
from .data.common import require_tokens, tokenizer_fingerprint
from .data.hyperpartisan import load_hyperpartisan
from .data.imdb import load_imdb
from .engine import Trainer, check_training_set, seed_everything, setup_logging
from .engine.distributed import find_launch
from .tasks_common import (
    accuracy_stats,
    add_model_choice,
    chosen_model_path,
    cli,
    load_chosen_model,
    load_tokenizer,
    reduce_accuracy,
    task_parser,
    task_preflight,
    tokenized_once,
)

DATASETS = {  # name -> (loader, id2label)
    "IMDB": (load_imdb, {0: "negative", 1: "positive"}),
    "Hyperpartisan": (load_hyperpartisan, {0: "false", 1: "true"}),
}


def build_parser():
    parser = task_parser("classify", __doc__, batch_size=8, lr=5e-5, epochs=3, gradient_accumulation_steps=1,
                         val_check_interval=200, default_root_dir="./logs", project_name="Classification",
                         best_metric="accuracy", best_mode="max")
    g = parser.add_argument_group("classification")
    g.add_argument("--dataset", choices=sorted(DATASETS), default="Hyperpartisan")
    add_model_choice(g, "inputs truncated to 512 tokens")
    g.add_argument("--data_dir", default=None, help="dataset folder; None: ./data/<dataset in lower case>")
    return parser


def classification_stats(outputs, batch) -> dict:
    """Per-batch sums: correct predictions, examples and the confusion counts of class 1."""
    predicted, gold = outputs.logits.argmax(-1).cpu() == 1, batch["labels"] == 1
    return {**accuracy_stats(outputs, batch), "tp": (predicted & gold).sum().item(),
            "fp": (predicted & ~gold).sum().item(), "fn": (~predicted & gold).sum().item(),
            "tn": (~predicted & ~gold).sum().item()}


def _f1(hits: float, false_positives: float, false_negatives: float) -> float:
    return 2 * hits / (2 * hits + false_positives + false_negatives) if hits else 0.0


METRICS = ("loss", "accuracy", "f1", "f1_macro")  # what a validation reports (reduce_classification's, and loss)


def reduce_classification(totals: dict) -> dict:
    """accuracy; f1: F1 of class 1 (hyperpartisan / positive); f1_macro: the mean of both classes'
    F1 (scikit-learn's average='macro')."""
    tp, fp, fn, tn = totals["tp"], totals["fp"], totals["fn"], totals["tn"]
    f1, f1_negative = _f1(tp, fp, fn), _f1(tn, fn, fp)
    return {**reduce_accuracy(totals), "f1": f1, "f1_macro": (f1 + f1_negative) / 2}


def encode_split(args, name: str, examples: list[dict], tokenizer, max_len: int):
    """One split, tokenized once (tasks_common.tokenized_once) for this tokenizer, data and length."""
    global_first = args.model == "Longformer"  # global attention on <s>; none for the baseline (exactly RoBERTa)
    content = [(ex["text"], ex["label"], str(ex["id"])) for ex in examples]
    key = [1, tokenizer_fingerprint(tokenizer), max_len, global_first, content]
    encoded = tokenized_once(args.cache_dir, f"classify-{args.dataset.lower()}-{name}", key,
                             lambda: encode_classification(examples, tokenizer, max_len, args.num_workers or None,
                                                           global_first=global_first))
    special = len(tokenizer("")["input_ids"])  # <s> </s> around each text
    text_tokens = pc.sum(pc.list_value_length(encoded.data.column("input_ids"))).as_py() - special * len(encoded)
    require_tokens(text_tokens, sum(len(ex["text"]) for ex in examples), tokenizer, data_dir(args))
    return encoded


def data_dir(args) -> str:
    return args.data_dir or f"./data/{args.dataset.lower()}"


def main(argv=None) -> dict:
    """Train and test; returns the trainer's summary plus ``test_metrics``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    model_path = chosen_model_path(args)
    trainer_args = task_preflight(args, METRICS)
    load_examples, id2label = DATASETS[args.dataset]
    examples = load_examples(data_dir(args))  # fails fast if missing
    check_training_set(len(examples["train"]), trainer_args,  # (data-parallel ranks: a group shares its batch)
                       max(1, find_launch().world_size // trainer_args.sequence_parallel_size))

    seed_everything(args.seed)  # the new classification head
    model, max_len = load_chosen_model(args, LongformerForSequenceClassification, model_path,
                                       num_labels=len(id2label), id2label=id2label)
    tokenizer = load_tokenizer(args.tokenizer_name or model_path)
    encoded = {split: encode_split(args, split, examples[split], tokenizer, max_len)
               for split in ("train", "dev", "test")}

    trainer = Trainer(model, trainer_args, encoded["train"], encoded["dev"],
                      collate_fn=PaddingCollator(tokenizer.pad_token_id), compute_metrics=classification_stats,
                      reduce_metrics=reduce_classification, tokenizer=tokenizer)
    summary = trainer.fit()
    test = {f"test/{k}": v for k, v in trainer.evaluate(encoded["test"]).items()}
    trainer.log_record(test)
    if trainer.rank == 0:
        print(json.dumps({"model": args.model, "dataset": args.dataset, "max_seq_len": max_len, **test}))
    return {**summary, "test_metrics": test}


if __name__ == "__main__":
    cli(main)
