"""Exact match and F1 of extractive QA, as the official evaluation scripts compute them.

* SQuAD v1.1 (``evaluate-v1.1.py``): an answer is normalised by lower-casing, deleting the
  punctuation characters of ``string.punctuation``, replacing the articles a/an/the (whole words)
  with a space and collapsing whitespace. EM: normalised strings equal; F1: the harmonic mean of
  the precision and recall of the shared tokens (a multiset) of the normalised strings, 0 when none
  are shared. Each is the maximum over a question's gold answers.
* SQuAD v2.0 (``evaluate-v2.0.py``): the same normalisation; gold answers that normalise to ""
  are dropped and an unanswerable question's gold is ``[""]``; F1 is 1 when both the prediction
  and a gold answer are empty (0 when only one is). Reports ``HasAns_*`` and ``NoAns_*`` too.
* TriviaQA (``triviaqa_evaluation.py``): its own normalisation: ``_`` -> space, lower-case,
  punctuation (``string.punctuation`` and the quotes ‘ ’ ´ `) replaced by a space, articles removed,
  whitespace collapsed; EM/F1 as SQuAD v1.1, maximum over the gold answers (``NormalizedAliases``
  + ``HumanAnswers``).

All scores are percentages (0..100) averaged over the gold questions, as the scripts print them. A
question without a prediction scores 0 (v1.1 and TriviaQA count it in the denominator; v2.0's
script assumes every question has a prediction -- ``select_answers`` gives one to each).

API
---
``normalize_squad(text) -> str`` / ``normalize_triviaqa(text) -> str``
``exact_match(prediction, gold, normalize=normalize_squad) -> float``  (1.0 or 0.0)
``f1(prediction, gold, normalize=normalize_squad, empty_matches_empty=False) -> float``
``evaluate_squad(gold, predictions, version_2=False) -> dict``
    ``gold``: ``{question_id: [answer texts]}`` (``[]`` = unanswerable); ``predictions``:
    ``{question_id: text}``. Returns ``exact_match``, ``f1``, ``total`` (and for v2.0
    ``HasAns_exact``, ``HasAns_f1``, ``HasAns_total``, ``NoAns_*`` where such questions exist).
``evaluate_triviaqa(gold, predictions) -> dict``
    ``exact_match``, ``f1``, ``common`` (questions with a prediction), ``denominator``.
``gold_answers(examples) -> dict``: ``{question_id: gold_answers}`` of ``data.qa_features.QAExample``s.
``write_predictions(path, predictions)``: ``predictions.json`` (``{question_id: text}``), written
    to a temporary name and renamed, so it is never half-written.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

_SQUAD_PUNCTUATION = set(string.punctuation)
_TRIVIAQA_PUNCTUATION = set(string.punctuation) | {"‘", "’", "´", "`"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_squad(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_triviaqa(text: str) -> str:
    text = "".join(" " if ch in _TRIVIAQA_PUNCTUATION else ch for ch in text.replace("_", " ").lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad) -> float:
    return float(normalize(prediction) == normalize(gold))


def f1(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad,
       empty_matches_empty: bool = False) -> float:
    predicted, expected = normalize(prediction).split(), normalize(gold).split()
    if empty_matches_empty and (not predicted or not expected):  # SQuAD v2.0's rule for no-answer
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def _question_scores(qid: str, gold: Sequence[str], prediction: str | None, normalize,
                     version_2: bool) -> tuple[float, float]:
    if version_2:
        gold = [g for g in gold if normalize(g)] or [""]
    elif not gold:
        raise ValueError(f"question {qid!r} has no gold answer: only SQuAD v2.0 scoring (version_2=True) "
                         "accepts unanswerable questions, and a file without answers cannot be scored")
    if prediction is None:
        return 0.0, 0.0
    return (max(exact_match(prediction, g, normalize) for g in gold),
            max(f1(prediction, g, normalize, empty_matches_empty=version_2) for g in gold))


def _percent(scores: list[tuple[float, float]]) -> dict:
    n = len(scores)
    return {"exact_match": 100.0 * sum(s[0] for s in scores) / n if n else 0.0,
            "f1": 100.0 * sum(s[1] for s in scores) / n if n else 0.0, "total": n}


def evaluate_squad(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str], version_2: bool = False) -> dict:
    scores = {qid: _question_scores(qid, answers, predictions.get(qid), normalize_squad, version_2)
              for qid, answers in gold.items()}
    result = _percent(list(scores.values()))
    if version_2:
        for name, has_answer in (("HasAns", True), ("NoAns", False)):
            part = [scores[q] for q, answers in gold.items() if bool(answers) == has_answer]
            if part:
                sub = _percent(part)
                result.update({f"{name}_exact": sub["exact_match"], f"{name}_f1": sub["f1"], f"{name}_total": len(part)})
    return result


def evaluate_triviaqa(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict:
    scores = [_question_scores(qid, answers, predictions.get(qid), normalize_triviaqa, version_2=False)
              for qid, answers in gold.items()]
    result = _percent(scores)
    return {"exact_match": result["exact_match"], "f1": result["f1"],
            "common": sum(qid in predictions for qid in gold), "denominator": len(gold)}


def gold_answers(examples: Iterable) -> dict[str, list[str]]:
    return {ex.question_id: list(ex.gold_answers) for ex in examples}


def write_predictions(path: str | Path, predictions: Mapping[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dict(predictions), ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path
