"""WikiHop multi-hop QA (QAngaroo v1.1): the Longformer against the RoBERTa baseline, as in the paper.

    python -m ds_longformer.wikihop --longformer --model_path data/long_model \\
        --train_data data/wikihop/train.json --val_data data/wikihop/dev.json
    python -m ds_longformer.wikihop --model_path distilbert/distilroberta-base     # RoBERTa baseline
    torchrun --nproc_per_node 4 -m ds_longformer.wikihop --longformer ... --deepspeed_config zero2

Input (see ds_longformer.data.wikihop): the tokens [q] [/q] [ent] [/ent] are added (the model's
resize_token_embeddings draws their embeddings around the existing ones' mean);
``<s> [q] question [/q] [ent] c1 [/ent] ... </s> support1 </s> support2 ...``; global attention on
the whole question + candidates prefix; a linear score on each candidate's [ent] token. Documents
longer than the input length (--max_seq_len, default the model's length; 512 for the baseline) are
split into chunks that each repeat the prefix, and a candidate's scores are averaged over the
chunks; cross-entropy over the candidates; metric: accuracy. --longformer needs a Longformer folder
(ds_longformer.convert / ds_longformer.pretrain); without it the short model reads 512-token
chunks with full attention. The tokenized examples are cached under --cache_dir.
The saved models are Longformer folders (encoder ``longformer.*`` + the ``qa_score`` head) with the
extended tokenizer; transformers' LongformerModel loads the encoder.
"""

from __future__ import annotations

import logging
from functools import partial

import torch.nn.functional as F

from . import LongformerForCandidateScoring
from .data.wikihop import WikiHopChunkDataset, add_wikihop_tokens, average_chunk_scores, collate_wikihop, load_wikihop
from .engine import Trainer, rank_zero_first, seed_everything, setup_logging
from .engine.args import ranged
from .model import LongformerSequenceClassifierOutput
from .tasks_common import (
    ACCURACY_METRICS,
    SHORT_MODEL,
    TaskError,
    accuracy_stats,
    cli,
    load_baseline,
    load_longformer,
    load_tokenizer,
    reduce_accuracy,
    task_parser,
    task_preflight,
)

logger = logging.getLogger("ds_longformer.wikihop")  # (not __name__: "__main__" as a program)


class WikiHopModel(LongformerForCandidateScoring):
    """The candidate scorer over chunked examples: each row of the batch is one chunk, and
    ``chunk_to_example`` (rows,) says whose. Logits (examples, candidates) are the chunk scores
    averaged per example; padded candidates (``candidate_mask`` False) get the dtype's minimum."""

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, candidate_positions=None,
                chunk_to_example=None, candidate_mask=None, labels=None,
                token_type_ids=None) -> LongformerSequenceClassifierOutput:
        if chunk_to_example is None:
            raise ValueError("WikiHopModel needs chunk_to_example (rows,): see data.wikihop.collate_wikihop")
        chunk_scores = super().forward(input_ids, attention_mask, global_attention_mask, candidate_positions,
                                       token_type_ids=token_type_ids)
        logits = average_chunk_scores(chunk_scores.logits, chunk_to_example, candidate_mask)
        # (replicated_loss: under sequence parallelism every rank computes this loss alike)
        loss = self.replicated_loss(F.cross_entropy(logits, labels)) if labels is not None else None
        return LongformerSequenceClassifierOutput(loss=loss, logits=logits)


def build_parser():
    parser = task_parser("wikihop", __doc__, lr=3e-5, weight_decay=0.01, epochs=5, batch_size=1,
                         default_root_dir="./model/", val_check_interval=10, project_name="WikihopQA",
                         best_metric="accuracy", best_mode="max")
    g = parser.add_argument_group("wikihop")
    g.add_argument("--train_data", default="data/wikihop/train.json")
    g.add_argument("--val_data", default="data/wikihop/dev.json")
    g.add_argument("--longformer", action="store_true",
                   help="train the Longformer (--model_path: a Longformer folder); default: the RoBERTa "
                        f"baseline (--model_path default {SHORT_MODEL})")
    g.add_argument("--max_chunks", type=ranged(int, "max_chunks", minimum=1), default=None,
                   help="keep only the first N chunks of an example")
    g.add_argument("--skip_long_questions", action="store_true",
                   help="leave out (and count) the examples whose question and candidates alone fill the input "
                        "(possible at the baseline's 512 tokens); without it such an example stops the run "
                        "before training. Validation accuracy is then over the examples kept")
    return parser


def main(argv=None) -> dict:
    """Train; returns the trainer's summary."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.longformer and not args.model_path:
        raise TaskError("--longformer needs --model_path: the folder of a Longformer (e.g. the --save_model_to "
                        "folder of ds_longformer.pretrain)")
    trainer_args = task_preflight(args, ACCURACY_METRICS)
    model_path = args.model_path or SHORT_MODEL
    tokenizer = load_tokenizer(args.tokenizer_name or model_path)
    add_wikihop_tokens(tokenizer)
    with rank_zero_first():  # data first: a missing file fails before any model is loaded
        tokenized = {split: load_wikihop(path, tokenizer, args.cache_dir, args.num_workers or None)
                     for split, path in (("train", args.train_data), ("val", args.val_data))}

    seed_everything(args.seed)  # the scoring head and the new embedding rows
    load_model = load_longformer if args.longformer else load_baseline
    model, max_len = load_model(WikiHopModel, model_path, args.max_seq_len)
    model.resize_token_embeddings(len(tokenizer))  # the WikiHop tokens' rows
    splits = {}
    for split in ("train", "val"):
        try:  # global attention on the prefix for the Longformer; none for the baseline (exactly RoBERTa)
            splits[split] = WikiHopChunkDataset(tokenized[split], tokenizer, max_len, args.max_chunks,
                                                global_prefix=args.longformer, skip_long=args.skip_long_questions)
        except ValueError as err:
            raise TaskError(f"--{split}_data: {err}; give a longer --max_seq_len (this model reads up to "
                            f"{max_len} tokens) or pass --skip_long_questions to leave them out") from err
        if splits[split].skipped:
            logger.warning("--skip_long_questions: left out %d of %d --%s_data examples (question and candidates "
                           "longer than %d tokens)", splits[split].skipped, len(tokenized[split]), split, max_len - 2)
    train, val = splits["train"], splits["val"]
    trainer = Trainer(model, trainer_args, train, val,
                      collate_fn=partial(collate_wikihop, pad_token_id=tokenizer.pad_token_id),
                      compute_metrics=accuracy_stats, reduce_metrics=reduce_accuracy, tokenizer=tokenizer)
    return trainer.fit()


if __name__ == "__main__":
    cli(main)
