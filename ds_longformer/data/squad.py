"""SQuAD v1.1 / v2.0 (Rajpurkar et al., 2016 and 2018): extractive QA over Wikipedia paragraphs.

Accepted inputs (``load_squad(path, split=None)``):

* the published JSON (``train-v1.1.json``, ``dev-v1.1.json``, ``train-v2.0.json``,
  ``dev-v2.0.json``), also the format of any SQuAD-style file (``synthetic_qa`` writes it)::

      {"version": "v2.0",
       "data": [{"title": "Normans",
                 "paragraphs": [{"context": "The Normans ... were the people who ...",
                                 "qas": [{"id": "56ddde6b9a695914005b9628",
                                          "question": "In what country is Normandy located?",
                                          "answers": [{"text": "France", "answer_start": 159}],
                                          "is_impossible": false},
                                         {"id": "5ad39d53604f3c001a3fe8d1", "question": "...",
                                          "answers": [], "is_impossible": true,
                                          "plausible_answers": [{"text": "...", "answer_start": 137}]}]}]}]}

  v1.1 has no ``is_impossible`` (every question is answerable); a v2.0 unanswerable question has
  ``answers: []``; its ``plausible_answers`` are ignored (never a target nor a gold answer, as in
  the official evaluation).
* the Hugging Face parquet layout (datasets ``squad`` / ``squad_v2``): a ``.parquet`` file, or a
  folder holding ``<split>-00000-of-0000n.parquet`` (directly or one folder down, e.g.
  ``plain_text/``; ``split`` then picks ``train`` or ``validation``/``dev``), with columns ``id``,
  ``title``, ``context``, ``question``, ``answers`` = ``{"text": [str], "answer_start": [int]}``.
  A question with no answers is unanswerable (v2.0).

Every answer must occur in its context at ``answer_start`` (``context[answer_start:][:len(text)]
== text``, character offsets); otherwise ``DataFormatError`` names the file and the question id,
with what the context holds there. So do a missing field, an empty context or question, a
duplicate question id and an unanswerable question that has answers.

``QAExample`` (``qa_features``): ``id`` = ``question_id`` = the question's id; ``answers`` = the
published answers (train: one; dev: one per annotator, duplicates kept); ``gold_answers`` = their
texts (``[]`` for an unanswerable question, which the v2.0 metric scores against ``""``).

API
---
``load_squad(path, split=None) -> list[QAExample]``
``load_squad_json(path) -> list[QAExample]`` / ``load_squad_parquet(paths) -> list[QAExample]``
``squad_json(examples, version="1.1") -> dict`` / ``write_squad_json(path, examples, version="1.1")``
    The examples back in the published JSON layout (one paragraph per example, grouped by title).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .common import DataFormatError, DatasetNotFoundError, canonical_split, read_json
from .qa_features import AnswerSpan, QAExample

_SOURCE = ("train-v1.1.json / dev-v1.1.json or train-v2.0.json / dev-v2.0.json from the SQuAD page "
           "(https://rajpurkar.github.io/SQuAD-explorer/), or the parquet files of the Hugging Face "
           "datasets rajpurkar/squad and rajpurkar/squad_v2")
_EXPECTED = ("a SQuAD JSON file ({data: [{paragraphs: [{context, qas}]}]}), a .parquet file, or a folder of "
             "<split>-*.parquet files (columns id, title, context, question, answers)")


class _Reader:
    """Validation shared by both layouts; one instance per file (it knows the file and the ids seen)."""

    def __init__(self, path: Path, seen: set[str]):
        self.path, self.seen = path, seen

    def error(self, qid, problem: str) -> DataFormatError:
        return DataFormatError(self.path, f"question id {qid!r}", problem)

    def answers(self, qid: str, context: str, raw) -> list[AnswerSpan]:
        spans = []
        for k, answer in enumerate(raw):
            if not isinstance(answer, dict) or not isinstance(answer.get("text"), str) \
                    or isinstance(answer.get("answer_start"), bool) or not isinstance(answer.get("answer_start"), int):
                raise self.error(qid, f"answers[{k}] must be {{'text': str, 'answer_start': int}}, got {answer!r}")
            text, start = answer["text"], answer["answer_start"]
            if not text.strip():
                raise self.error(qid, f"answers[{k}] has an empty text")
            found = context[start : start + len(text)] if 0 <= start <= len(context) else None
            if found != text:
                there = "is past the end of the context" if found is None else f"holds {found!r}"
                raise self.error(qid, f"answers[{k}] {text!r} does not occur at answer_start {start} "
                                      f"(the context {there})")
            spans.append(AnswerSpan(text, start))
        return spans

    def example(self, qid, title, context, question, answers, is_impossible) -> QAExample:
        if not isinstance(qid, str) or not qid:
            raise self.error(qid, "missing or empty question id")
        if qid in self.seen:
            raise self.error(qid, "duplicate question id")
        self.seen.add(qid)
        if not isinstance(question, str) or not question.strip():
            raise self.error(qid, "missing or empty question")
        if not isinstance(context, str) or not context.strip():
            raise self.error(qid, "missing or empty context")
        if is_impossible and answers:
            raise self.error(qid, "is_impossible is true but the question has answers")
        if not is_impossible and not answers:
            raise self.error(qid, "no answers (an unanswerable SQuAD v2.0 question says is_impossible: true)")
        return QAExample(id=qid, question=question, context=context, answers=answers,
                         gold_answers=[a.text for a in answers], question_id=qid,
                         title=title if isinstance(title, str) else "", is_impossible=bool(is_impossible))


def _list_field(record: dict, key: str, reader: _Reader, where: str) -> list:
    value = record.get(key)
    if not isinstance(value, list):
        raise DataFormatError(reader.path, where, f"'{key}' must be a list")
    return value


def load_squad_json(path: str | Path) -> list[QAExample]:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"SQuAD file {path.name}", [path.parent], _EXPECTED, _SOURCE)
    document = read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataFormatError(path, None, "expected a JSON object with a 'data' list (the SQuAD layout)")
    reader = _Reader(path, set())
    examples = []
    for a, article in enumerate(document["data"]):
        if not isinstance(article, dict):
            raise DataFormatError(path, f"data[{a}]", "expected an object with 'paragraphs'")
        for p, paragraph in enumerate(_list_field(article, "paragraphs", reader, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                raise DataFormatError(path, where, "expected an object with 'context' and 'qas'")
            context = paragraph.get("context")
            for qa in _list_field(paragraph, "qas", reader, where):
                if not isinstance(qa, dict):
                    raise DataFormatError(path, where, f"expected question objects in 'qas', got {qa!r}")
                qid = qa.get("id")
                if not isinstance(qa.get("answers"), list):
                    raise reader.error(qid, "'answers' must be a list")
                answers = reader.answers(qid, context, qa["answers"]) if isinstance(context, str) else []
                examples.append(reader.example(qid, article.get("title"), context, qa.get("question"), answers,
                                               qa.get("is_impossible", False)))
    return examples


def load_squad_parquet(paths: Sequence[str | Path]) -> list[QAExample]:
    seen: set[str] = set()  # ids must be unique over all the files of a split
    examples = []
    for path in map(Path, paths):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataFormatError(path, None, f"cannot read parquet ({e})") from None
        missing = {"id", "context", "question", "answers"} - set(table.column_names)
        if missing:
            raise DataFormatError(path, None, f"missing column(s) {sorted(missing)} (columns: {table.column_names})")
        reader = _Reader(path, seen)
        titles = table.column("title").to_pylist() if "title" in table.column_names else [""] * table.num_rows
        columns = zip(table.column("id").to_pylist(), titles, table.column("context").to_pylist(),
                      table.column("question").to_pylist(), table.column("answers").to_pylist())
        for qid, title, context, question, answers in columns:
            if not isinstance(answers, dict) or len(answers.get("text") or []) != len(answers.get("answer_start") or []):
                raise reader.error(qid, f"'answers' must be {{'text': [str], 'answer_start': [int]}} of equal "
                                        f"lengths, got {answers!r}")
            raw = [{"text": t, "answer_start": s} for t, s in zip(answers["text"] or [], answers["answer_start"] or [])]
            spans = reader.answers(qid, context, raw) if isinstance(context, str) else []
            examples.append(reader.example(qid, title, context, question, spans, is_impossible=not raw))
    return examples


def _parquet_split_files(folder: Path, split: str | None) -> list[Path]:
    wanted = canonical_split(split) if split else None
    if split and wanted is None:
        raise ValueError(f"unknown split {split!r}: use train, validation (dev) or test")
    for place in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        files = sorted(place.glob("*.parquet"))
        if not files:
            continue
        by_split: dict[str, list[Path]] = {}
        for f in files:
            by_split.setdefault(canonical_split(f.name.split("-", 1)[0]) or "", []).append(f)
        if wanted is None:
            if len(by_split) > 1:
                raise DataFormatError(place, None, f"holds parquet files of several splits ({sorted(by_split)}): "
                                                   "name the split")
            return files
        if wanted in by_split:
            return by_split[wanted]
    return []


def load_squad(path: str | Path, split: str | None = None) -> list[QAExample]:
    path = Path(path)
    if path.is_file():
        return load_squad_parquet([path]) if path.suffix == ".parquet" else load_squad_json(path)
    if path.is_dir():
        files = _parquet_split_files(path, split)
        if files:
            return load_squad_parquet(files)
    where = f"{split} split of " if split else ""
    raise DatasetNotFoundError(f"SQuAD {where}{path.name}", [path if path.is_dir() else path.parent], _EXPECTED,
                               _SOURCE)


def squad_json(examples: Sequence[QAExample], version: str = "1.1") -> dict:
    articles: dict[str, list[dict]] = {}
    for ex in examples:
        qa = {"id": ex.id, "question": ex.question,
              "answers": [{"text": a.text, "answer_start": a.start} for a in ex.answers]}
        if version.startswith("2"):
            qa["is_impossible"] = ex.is_impossible
        articles.setdefault(ex.title, []).append({"context": ex.context, "qas": [qa]})
    return {"version": version, "data": [{"title": t, "paragraphs": ps} for t, ps in articles.items()]}


def write_squad_json(path: str | Path, examples: Sequence[QAExample], version: str = "1.1") -> Path:
    """Written to a temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(squad_json(examples, version), ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return path
