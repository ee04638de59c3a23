"""Extractive QA: examples -> model windows with span labels; model scores -> answer text.

Shared by the SQuAD (``squad``) and TriviaQA (``triviaqa``) loaders, which both return
``QAExample``s, and by the synthetic long-range task (``ds_longformer.synthetic_qa``).

Examples
--------
``AnswerSpan(text, start)``
    A character span of the context: ``context[start:end] == text`` with ``end = start + len(text)``.
``QAExample(id, question, context, answers, gold_answers, question_id, title="", is_impossible=False)``
    ``answers``: the training targets, character spans of ``context`` (SQuAD: the published
    answers; TriviaQA: every occurrence of an answer alias, distant supervision); ``[]`` for a
    SQuAD v2 unanswerable question or a document where no alias occurs.
    ``gold_answers``: the strings a prediction is scored against (``qa_metrics``).
    ``question_id``: the prediction's key in ``predictions.json``. Several examples may share it
    (TriviaQA Wikipedia: one example per evidence document of a question); the prediction is then
    the best span over all their windows.

Model input (one window)
------------------------
The question and the context are tokenized once (``tokenize_qa``, the cached format: independent
of the window length), then cut into windows (``QAWindowDataset``)::

    window k = [prefix] question [middle] context[k*step : k*step + budget] [suffix]
    budget   = max_seq_len - len(question) - (number of special tokens)
    step     = budget - doc_stride

so consecutive windows share ``doc_stride`` context tokens (the overlap, as transformers'
``run_qa.py`` and the tokenizer's ``stride`` mean it) and no window exceeds ``max_seq_len``.
The special tokens are the tokenizer's own pair template: ``<s> q </s></s> c </s>`` (RoBERTa),
``[CLS] q [SEP] c [SEP]`` (BERT). ``max_windows`` keeps only the first windows of a document
(the paper read the first 4,096 tokens of a TriviaQA document: ``max_windows=1``).
Global attention is on the question and the token before it (``<s>``), as transformers'
``LongformerForQuestionAnswering`` and the paper put it; none for the RoBERTa baseline
(``global_question=False``), which must stay exactly RoBERTa.

Labels: ``start_positions`` / ``end_positions`` list, for each answer span that lies entirely
in the window, the input positions of its first and last token (the tokens that contain its first
and last character; an answer that covers no token is dropped). A window without an answer
points at position 0 (``<s>``/``[CLS]``), as ``run_qa.py`` does. SQuAD training examples have
one answer, so one target per window; TriviaQA windows may hold several (every occurrence).
``collate_qa`` pads them to ``(rows, K)`` with -100; ``LongformerForQuestionAnswering`` takes
them as they are (its loss, ``ds_longformer.losses.span_loss``, is the marginal likelihood of all
the targets of a row; with one target per row, transformers' cross-entropy).

Answer extraction
-----------------
``score_window`` finds a window's n best spans exactly (every start <= end within
``max_answer_len`` tokens, over context tokens only, score = start logit + end logit;
transformers' ``postprocess_qa_predictions`` searches only the top-n starts x top-n ends, which
can miss the best span) and its null score (``<s>`` start + end logits). ``select_answers``
takes the best span over all windows of a question (mapped back to the original text through the
tokenizer's offsets, surrounding whitespace dropped) and, for SQuAD v2, answers ``""`` when the
question's null score (the minimum over its windows, as transformers does) exceeds the best
span's score by more than ``null_threshold``.

API
---
``tokenize_qa(examples, tokenizer, num_proc=None) -> datasets.Dataset``
    Columns ``id``, ``question_ids``, ``context_ids``, ``context_starts``/``context_ends`` (each
    context token's character offsets), ``answer_token_starts``/``answer_token_ends`` (context
    token indices of the answer spans, deduplicated), ``question_len``, ``context_len``.
``load_tokenized_qa(examples, tokenizer, cache_dir=None, name="qa", num_proc=None) -> datasets.Dataset``
    The same, cached under ``cache_dir/<name>-<key>/`` (key: a hash of the examples and the tokenizer).
``QAWindowDataset(tokenized, tokenizer, max_seq_len, doc_stride=128, global_question=True, max_windows=None, skip_long=False)``
    ``torch.utils.data.Dataset`` of windows (one row of the batch each, in example order):
    ``{"input_ids", "attention_mask", "global_attention_mask", "start_positions",
    "end_positions", "feature_index"}``. ``.windows[i]`` is the ``QAWindow`` of row ``i``. A
    question that leaves no room for ``doc_stride + 1`` context tokens raises
    ``QuestionTooLongError`` (a ValueError naming the question) at construction, before any
    training; ``skip_long=True`` leaves such questions out instead (``.skipped`` lists their ids).
``collate_qa(features, pad_token_id, pad_to_multiple_of=None) -> dict``
    ``input_ids``, ``attention_mask``, ``global_attention_mask`` ``(rows, length)``;
    ``start_positions``/``end_positions`` ``(rows, K)`` padded with -100; ``feature_index`` ``(rows,)``.
``score_window(dataset, feature_index, start_logits, end_logits, n_best_size=20, max_answer_len=30) -> WindowScores``
``score_batch(dataset, batch, start_logits, end_logits, n_best_size=20, max_answer_len=30) -> list[WindowScores]``
    ``WindowScores`` are small and picklable: gather them from every rank, then
``select_answers(examples, window_scores, version_2=False, null_threshold=0.0, n_best_size=20) -> dict[str, QAPrediction]``
    Keyed by ``question_id``; ``QAPrediction(text, score, null_score, example_id, start, end, n_best)``.
``prediction_texts(predictions) -> dict[str, str]``: ``{question_id: text}``, the official format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import datasets
import numpy as np
import torch

from .collate import pad_batch
from .common import cached_dataset, tokenizer_fingerprint

IGNORE_INDEX = -100  # padding of start/end positions: no target
_CACHE_VERSION = 1


@dataclass(frozen=True)
class AnswerSpan:
    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[AnswerSpan]
    gold_answers: list[str]
    question_id: str
    title: str = ""
    is_impossible: bool = False


@dataclass(frozen=True)
class QAWindow:
    example: int  # row of the tokenized dataset (= index of the example)
    first_token: int  # index of the window's first context token among the example's context tokens
    num_tokens: int  # context tokens in the window
    context_position: int  # input position of the window's first context token


@dataclass
class SpanCandidate:
    score: float
    start: int  # character offsets in the example's context
    end: int


@dataclass
class WindowScores:
    example: int
    null_score: float
    spans: list[SpanCandidate]


@dataclass
class QAPrediction:
    text: str
    score: float  # the best span's start + end logit (-inf when no span was found)
    null_score: float
    example_id: str
    start: int  # character offsets of `text` in the example's context; -1 for ""
    end: int
    n_best: list[tuple[str, float]] = field(default_factory=list)


class QuestionTooLongError(ValueError):
    """A question leaves no room for context in a window of ``max_seq_len`` tokens."""


# ---------------------------------------------------------------------------------------------
# tokenization


def _token_span(starts: np.ndarray, ends: np.ndarray, char_start: int, char_end: int) -> tuple[int, int] | None:
    """Indices of the first and last token that overlap ``[char_start, char_end)``; None if none does.
    Tokens with an empty span (e.g. a lone byte-level space) never count."""
    real = ends > starts
    first = np.flatnonzero(real & (ends > char_start))
    last = np.flatnonzero(real & (starts < char_end))
    if not len(first) or not len(last) or last[-1] < first[0]:
        return None
    return int(first[0]), int(last[-1])


class _Tokenize:
    """Batched map function (a class, so it pickles cleanly into ``num_proc`` workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        questions = self.tokenizer([q.strip() for q in batch["question"]], add_special_tokens=False, verbose=False)
        contexts = self.tokenizer(batch["context"], add_special_tokens=False, return_offsets_mapping=True,
                                  verbose=False)
        out = {k: [] for k in ("question_ids", "context_ids", "context_starts", "context_ends",
                               "answer_token_starts", "answer_token_ends", "question_len", "context_len")}
        for q_ids, c_ids, offsets, char_starts, char_ends in zip(
                questions["input_ids"], contexts["input_ids"], contexts["offset_mapping"],
                batch["answer_starts"], batch["answer_ends"]):
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            spans = {_token_span(offsets[:, 0], offsets[:, 1], s, e) for s, e in zip(char_starts, char_ends)}
            spans = sorted(s for s in spans if s is not None)
            out["question_ids"].append(q_ids)
            out["context_ids"].append(c_ids)
            out["context_starts"].append(offsets[:, 0].tolist())
            out["context_ends"].append(offsets[:, 1].tolist())
            out["answer_token_starts"].append([s for s, _ in spans])
            out["answer_token_ends"].append([e for _, e in spans])
            out["question_len"].append(len(q_ids))
            out["context_len"].append(len(c_ids))
        return out


_TOKENIZED_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    **{name: datasets.Sequence(datasets.Value("int32")) for name in (
        "question_ids", "context_ids", "context_starts", "context_ends", "answer_token_starts", "answer_token_ends")},
    "question_len": datasets.Value("int32"),
    "context_len": datasets.Value("int32"),
})


def tokenize_qa(examples: Sequence[QAExample], tokenizer, num_proc: int | None = None) -> datasets.Dataset:
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: QA needs its offset mapping")
    raw = datasets.Dataset.from_dict({
        "id": [ex.id for ex in examples],
        "question": [ex.question for ex in examples],
        "context": [ex.context for ex in examples],
        "answer_starts": [[a.start for a in ex.answers] for ex in examples],
        "answer_ends": [[a.end for a in ex.answers] for ex in examples],
    })
    return raw.map(_Tokenize(tokenizer), batched=True, batch_size=100, num_proc=num_proc, features=_TOKENIZED_FEATURES,
                   remove_columns=["question", "context", "answer_starts", "answer_ends"], desc="Tokenizing QA")


def _examples_key(examples: Sequence[QAExample], tokenizer) -> str:
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}".encode())
    for ex in examples:
        digest.update(json.dumps([ex.id, ex.question, ex.context, [(a.start, a.text) for a in ex.answers]]).encode())
    return digest.hexdigest()[:16]


def load_tokenized_qa(examples: Sequence[QAExample], tokenizer, cache_dir: str | Path | None = None,
                      name: str = "qa", num_proc: int | None = None) -> datasets.Dataset:
    if cache_dir is None:
        return tokenize_qa(examples, tokenizer, num_proc)

    def build():
        dataset = tokenize_qa(examples, tokenizer, num_proc)
        return dataset, {"name": name, "tokenizer": tokenizer.name_or_path, "examples": len(dataset)}

    dataset, _ = cached_dataset(Path(cache_dir) / f"{name}-{_examples_key(examples, tokenizer)}", build)
    return dataset


# ---------------------------------------------------------------------------------------------
# windows and labels


def pair_template(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """The special tokens the tokenizer puts before, between and after a pair of sequences."""
    encoding = tokenizer("a", "b")
    ids, sequence = encoding["input_ids"], encoding.sequence_ids()
    first = [i for i, s in enumerate(sequence) if s == 0]
    second = [i for i, s in enumerate(sequence) if s == 1]
    if not first or not second:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} does not encode pairs of sequences")
    return ids[: first[0]], ids[first[-1] + 1 : second[0]], ids[second[-1] + 1 :]


class QAWindowDataset(torch.utils.data.Dataset):
    def __init__(self, tokenized: datasets.Dataset, tokenizer, max_seq_len: int, doc_stride: int = 128,
                 global_question: bool = True, max_windows: int | None = None, skip_long: bool = False):
        if doc_stride < 0:
            raise ValueError(f"doc_stride must be >= 0, got {doc_stride}")
        self.tokenized = tokenized
        self.prefix, self.middle, self.suffix = pair_template(tokenizer)
        self.max_seq_len, self.doc_stride, self.global_question = max_seq_len, doc_stride, global_question
        n_special = len(self.prefix) + len(self.middle) + len(self.suffix)
        question_lens = np.asarray(tokenized["question_len"], dtype=np.int64)
        budgets = max_seq_len - n_special - question_lens
        context_lens = np.asarray(tokenized["context_len"], dtype=np.int64)
        too_long = np.flatnonzero(budgets <= doc_stride)
        if len(too_long) and not skip_long:
            worst = int(too_long[np.argmin(budgets[too_long])])
            raise QuestionTooLongError(
                f"{len(too_long)} question(s) leave no room for more than doc_stride={doc_stride} context tokens "
                f"per window of max_seq_len={max_seq_len} (the longest: id {tokenized[worst]['id']!r}, "
                f"{tokenized[worst]['question_len']} question tokens + {n_special} special tokens)")
        self.skipped = [tokenized[int(i)]["id"] for i in too_long]
        windows = []
        for example, (budget, n_question, n_context) in enumerate(
                zip(budgets.tolist(), question_lens.tolist(), context_lens.tolist())):
            if budget <= doc_stride:
                continue
            step = budget - doc_stride
            n_windows = 1 + max(0, -(-(n_context - budget) // step))
            if max_windows is not None:
                n_windows = min(n_windows, max_windows)
            context_position = len(self.prefix) + n_question + len(self.middle)
            for k in range(n_windows):
                first = k * step
                windows.append(QAWindow(example, first, min(budget, n_context - first), context_position))
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        window = self.windows[index]
        row = self.tokenized[window.example]
        question = list(row["question_ids"])
        context = list(row["context_ids"][window.first_token : window.first_token + window.num_tokens])
        ids = self.prefix + question + self.middle + context + self.suffix
        n_global = len(self.prefix) + len(question) if self.global_question else 0
        starts, ends = [], []
        shift = window.context_position - window.first_token
        for s, e in zip(row["answer_token_starts"], row["answer_token_ends"]):
            if window.first_token <= s and e < window.first_token + window.num_tokens:
                starts.append(s + shift)
                ends.append(e + shift)
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "global_attention_mask": [1] * n_global + [0] * (len(ids) - n_global),
            "start_positions": starts or [0],  # no answer in this window: point at <s>/[CLS]
            "end_positions": ends or [0],
            "feature_index": index,
        }

    def context_offsets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Character offsets (starts, ends) of the context tokens of window ``index``."""
        window = self.windows[index]
        row = self.tokenized[window.example]
        part = slice(window.first_token, window.first_token + window.num_tokens)
        return np.asarray(row["context_starts"][part]), np.asarray(row["context_ends"][part])


def collate_qa(features: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    token_fields = ("input_ids", "attention_mask", "global_attention_mask")
    batch = pad_batch([{k: f[k] for k in token_fields} for f in features], pad_token_id, pad_to_multiple_of)
    n_targets = max(len(f["start_positions"]) for f in features)
    for key in ("start_positions", "end_positions"):
        positions = torch.full((len(features), n_targets), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            positions[row, : len(f[key])] = torch.tensor(f[key])
        batch[key] = positions
    batch["feature_index"] = torch.tensor([f["feature_index"] for f in features], dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------
# answer extraction


def score_window(dataset: QAWindowDataset, feature_index: int, start_logits, end_logits,
                 n_best_size: int = 20, max_answer_len: int = 30) -> WindowScores:
    window = dataset.windows[feature_index]
    start_logits = torch.as_tensor(start_logits).detach().float().cpu()
    end_logits = torch.as_tensor(end_logits).detach().float().cpu()
    null_score = float(start_logits[0] + end_logits[0])
    char_starts, char_ends = dataset.context_offsets(feature_index)
    context = slice(window.context_position, window.context_position + window.num_tokens)
    starts, ends = start_logits[context].clone(), end_logits[context].clone()
    empty = torch.from_numpy(char_ends <= char_starts)  # a token with no characters cannot bound an answer
    starts[empty] = float("-inf")
    ends[empty] = float("-inf")
    n, width = len(starts), min(max_answer_len, len(starts))
    if n == 0 or width <= 0:
        return WindowScores(window.example, null_score, [])
    # scores[i, l]: the span of tokens i .. i + l (every start, every length up to max_answer_len).
    padded_ends = torch.cat([ends, torch.full((width - 1,), float("-inf"))])
    scores = starts[:, None] + padded_ends.unfold(0, width, 1)
    flat = scores.flatten()
    k = min(n_best_size, int(torch.isfinite(flat).sum()))
    best = torch.topk(flat, k)
    spans = []
    for score, index in zip(best.values.tolist(), best.indices.tolist()):
        i, length = divmod(index, width)
        spans.append(SpanCandidate(score, int(char_starts[i]), int(char_ends[i + length])))
    return WindowScores(window.example, null_score, spans)


def score_batch(dataset: QAWindowDataset, batch: dict, start_logits: torch.Tensor, end_logits: torch.Tensor,
                n_best_size: int = 20, max_answer_len: int = 30) -> list[WindowScores]:
    return [score_window(dataset, int(f), start_logits[row], end_logits[row], n_best_size, max_answer_len)
            for row, f in enumerate(batch["feature_index"].tolist())]


def _strip(context: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace (byte-level BPE offsets include a word's leading space)."""
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return start, end


def select_answers(examples: Sequence[QAExample], window_scores: Iterable[WindowScores], version_2: bool = False,
                   null_threshold: float = 0.0, n_best_size: int = 20) -> dict[str, QAPrediction]:
    by_question: dict[str, dict] = {}
    for scores in window_scores:
        example = examples[scores.example]
        entry = by_question.setdefault(example.question_id, {"null": float("inf"), "spans": {}})
        entry["null"] = min(entry["null"], scores.null_score)
        for span in scores.spans:
            start, end = _strip(example.context, span.start, span.end)
            if start == end:
                continue
            key = (scores.example, start, end)  # the same span seen from two overlapping windows counts once
            entry["spans"][key] = max(entry["spans"].get(key, float("-inf")), span.score)
    predictions = {}
    for question_id, entry in by_question.items():
        ranked = sorted(entry["spans"].items(), key=lambda kv: -kv[1])[:n_best_size]
        n_best = [(examples[e].context[s:t], score) for (e, s, t), score in ranked]
        if ranked:
            (example, start, end), score = ranked[0]
            best = QAPrediction(examples[example].context[start:end], score, entry["null"], examples[example].id,
                                start, end, n_best)
        else:
            best = QAPrediction("", float("-inf"), entry["null"], "", -1, -1, n_best)
        if version_2 and entry["null"] - best.score > null_threshold:
            best = QAPrediction("", best.score, entry["null"], best.example_id, -1, -1, n_best)
        predictions[question_id] = best
    return predictions


def prediction_texts(predictions: dict[str, QAPrediction]) -> dict[str, str]:
    return {question_id: p.text for question_id, p in predictions.items()}
