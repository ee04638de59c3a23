"""TriviaQA reading comprehension (Joshi et al., 2017), read as the Longformer paper did.

Published layout (``triviaqa-rc.tar.gz``)::

    qa/wikipedia-train.json  qa/wikipedia-dev.json  qa/wikipedia-test-without-answers.json
    qa/web-train.json  qa/web-dev.json  ...  qa/verified-wikipedia-dev.json  qa/verified-web-dev.json
    evidence/wikipedia/<Filename>   evidence/web/<Filename>

A qa file is ``{"Domain": "Wikipedia" | "Web", "VerifiedEval": bool, "Version": 1.0, "Data": [...]}``;
each record::

    {"QuestionId": "tc_33", "Question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
     "Answer": {"Value": "Sunset Boulevard", "NormalizedValue": "sunset boulevard",
                "Aliases": ["Sunset Blvd", "West Sunset Boulevard", ...],
                "NormalizedAliases": ["sunset blvd", "west sunset boulevard", ...], "HumanAnswers": [...]},
     "EntityPages":   [{"Filename": "Andrew_Lloyd_Webber.txt", "Title": ..., "DocSource": ...}],
     "SearchResults": [{"Filename": "35/35_995.txt", "Rank": 0, "Url": ..., ...}]}

``EntityPages`` files live under ``evidence/wikipedia``, ``SearchResults`` files under
``evidence/web``. ``Answer`` is absent in the test files (their examples have no targets). In a
``VerifiedEval`` file only the questions with ``QuestionPartOfVerifiedEval`` (and, for Wikipedia,
the documents with ``DocPartOfVerifiedEval``) are kept, as the official ``read_triviaqa_data`` does.

How it is read (allenai/longformer's ``scripts/triviaqa.py`` and its ``convert_to_squad_format``)
------------------------------------------------------------------------------------------------
* One example per (question, evidence document): the paper's "question, answer, document
  triplets". Example id ``"<QuestionId>--<Filename>"``. The prediction key (``question_id``) is
  the official one: ``QuestionId`` for Wikipedia (the answer is the best span over all the
  question's documents), ``"<QuestionId>--<Filename>"`` for Web (each document is scored).
  ``concatenate=True`` instead joins a question's documents (blank line between them) into one
  context, id ``QuestionId`` (Wikipedia only: the Web evaluation scores each document).
* Distant supervision: no span is annotated, so every occurrence in the document of any answer
  alias (``Aliases`` and ``NormalizedAliases``, case-insensitive, at word boundaries) is a
  training target (``find_answer_spans``); a document with none has no target. The Longformer
  script matched ``NormalizedAliases`` as lower-case substrings of NLTK-retokenised text; here
  the text is kept as published so predictions are substrings of the original document, and
  word boundaries keep ``"art"`` from matching inside ``"start"``.
* ``gold_answers`` = ``NormalizedAliases`` + ``HumanAnswers``, what the official evaluation
  compares a prediction with (``qa_metrics.evaluate_triviaqa``).
* The paper read the first 4,096 tokens of each document; here the whole document is kept and
  ``qa_features.QAWindowDataset(max_windows=1)`` reproduces that cut.

API
---
``load_triviaqa(qa_file, evidence_dir=None, concatenate=False) -> list[QAExample]``
    ``evidence_dir`` defaults to ``<qa_file>/../../evidence`` (the published layout).
``find_answer_spans(context, aliases) -> list[AnswerSpan]``
    Every occurrence of every alias, sorted by position (nested matches of different aliases kept).
Errors: ``DatasetNotFoundError`` for a missing qa file or evidence file (naming the file and the
question that names it), ``DataFormatError`` naming the file and the record for a malformed record.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .common import DataFormatError, DatasetNotFoundError, read_json, read_utf8
from .qa_features import AnswerSpan, QAExample

_SOURCE = "triviaqa-rc.tar.gz from the TriviaQA page (https://nlp.cs.washington.edu/triviaqa/); unpack it"
_EXPECTED = "qa/<domain>-<split>.json with evidence/wikipedia/ and evidence/web/ next to qa/"
_EVIDENCE_FOLDERS = {"EntityPages": "wikipedia", "SearchResults": "web"}


def find_answer_spans(context: str, aliases: Iterable[str]) -> list[AnswerSpan]:
    spans = set()
    lowered = context.lower()
    for alias in {a.strip() for a in aliases if isinstance(a, str) and a.strip()}:
        if alias.lower() not in lowered:  # a cheap test first: most aliases do not occur at all
            continue
        for match in re.finditer(rf"(?<!\w){re.escape(alias)}(?!\w)", context, re.IGNORECASE):
            spans.add((match.start(), match.group()))
    return [AnswerSpan(text, start) for start, text in sorted(spans)]


def _read_records(qa_file: Path) -> tuple[str, bool, list[dict]]:
    if not qa_file.is_file():
        raise DatasetNotFoundError(f"TriviaQA file {qa_file.name}", [qa_file.parent], _EXPECTED, _SOURCE)
    document = read_json(qa_file)
    if not isinstance(document, dict) or not isinstance(document.get("Data"), list):
        raise DataFormatError(qa_file, None, "expected a JSON object with a 'Data' list (the TriviaQA layout)")
    domain = document.get("Domain", "Web" if qa_file.name.startswith(("web", "verified-web")) else "Wikipedia")
    if domain not in ("Wikipedia", "Web"):
        raise DataFormatError(qa_file, None, f"unknown Domain {domain!r} (expected Wikipedia or Web)")
    records, verified = document["Data"], bool(document.get("VerifiedEval"))
    if verified:
        records = [r for r in records if isinstance(r, dict) and r.get("QuestionPartOfVerifiedEval")]
    return domain, verified, records


def _documents(record: dict, verified_wikipedia: bool, qa_file: Path, where: str) -> list[tuple[str, str]]:
    """(folder, Filename) of the record's evidence documents, in the file's order."""
    documents = []
    for key, folder in _EVIDENCE_FOLDERS.items():
        pages = record.get(key, [])
        if not isinstance(pages, list):
            raise DataFormatError(qa_file, where, f"'{key}' must be a list")
        for page in pages:
            if not isinstance(page, dict) or not isinstance(page.get("Filename"), str) or not page["Filename"]:
                raise DataFormatError(qa_file, where, f"every entry of '{key}' needs a 'Filename', got {page!r}")
            if verified_wikipedia and not page.get("DocPartOfVerifiedEval"):
                continue
            documents.append((folder, page["Filename"]))
    return documents


def _answer(record: dict, qa_file: Path, where: str) -> tuple[list[str], list[str]]:
    """(aliases to match in the evidence, gold answers of the metric); empty without an Answer."""
    answer = record.get("Answer")
    if answer is None:
        return [], []
    if not isinstance(answer, dict):
        raise DataFormatError(qa_file, where, "'Answer' must be an object")
    lists = {}
    for key in ("Aliases", "NormalizedAliases", "HumanAnswers"):
        value = answer.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataFormatError(qa_file, where, f"Answer.{key} must be a list of strings")
        lists[key] = value
    values = [v for v in (answer.get("Value"), answer.get("NormalizedValue")) if isinstance(v, str)]
    aliases = lists["Aliases"] + lists["NormalizedAliases"] + values
    gold = (lists["NormalizedAliases"] or lists["Aliases"] or values) + lists["HumanAnswers"]
    if not gold:
        raise DataFormatError(qa_file, where, "the Answer has no Aliases, NormalizedAliases or Value")
    return aliases, gold


def load_triviaqa(qa_file: str | Path, evidence_dir: str | Path | None = None,
                  concatenate: bool = False) -> list[QAExample]:
    qa_file = Path(qa_file)
    evidence_dir = Path(evidence_dir) if evidence_dir is not None else qa_file.parent.parent / "evidence"
    domain, verified, records = _read_records(qa_file)
    if concatenate and domain != "Wikipedia":
        raise ValueError(f"{qa_file}: concatenate=True needs a Wikipedia file (the Web evaluation scores each "
                         "document on its own)")
    texts: dict[Path, str] = {}  # one string per evidence file, however many questions name it

    def read(folder: str, filename: str, qid: str) -> str:
        path = evidence_dir / folder / filename
        if path not in texts:
            if not path.is_file():
                raise DatasetNotFoundError(f"TriviaQA evidence file {folder}/{filename} (named by question {qid!r} "
                                           f"in {qa_file})", [evidence_dir / folder], _EXPECTED, _SOURCE)
            texts[path] = read_utf8(path)
        return texts[path]

    examples, seen = [], set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataFormatError(qa_file, f"Data[{index}]", "expected a JSON object")
        qid = record.get("QuestionId")
        if not isinstance(qid, str) or not qid:
            raise DataFormatError(qa_file, f"Data[{index}]", "missing QuestionId")
        where = f"QuestionId {qid!r}"
        if qid in seen:
            raise DataFormatError(qa_file, where, "duplicate QuestionId")
        seen.add(qid)
        question = record.get("Question")
        if not isinstance(question, str) or not question.strip():
            raise DataFormatError(qa_file, where, "missing or empty Question")
        aliases, gold = _answer(record, qa_file, where)
        documents = _documents(record, verified and domain == "Wikipedia", qa_file, where)
        if concatenate:
            context = "\n\n".join(read(folder, name, qid) for folder, name in documents)
            examples.append(QAExample(qid, question, context, find_answer_spans(context, aliases), gold, qid))
            continue
        for folder, name in documents:
            context = read(folder, name, qid)
            example_id = f"{qid}--{name}"
            examples.append(QAExample(example_id, question, context, find_answer_spans(context, aliases), gold,
                                      qid if domain == "Wikipedia" else example_id))
    return examples
