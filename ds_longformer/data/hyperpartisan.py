"""SemEval-2019 Task 4 Hyperpartisan News Detection, by-article part (645 articles).

Accepted layouts in ``data_dir``:

* the published XML files plus the Longformer split file:
  ``articles-training-byarticle-20181122.xml``
  (``<articles><article id=".." title=".." published-at="..">`` HTML-like body with
  ``<p>``, ``<a href>``, ``<q>`` ... ``</article>``),
  ``ground-truth-training-byarticle-20181122.xml``
  (``<articles><article id=".." hyperpartisan="true|false" labeled-by="byarticle" url=".."/>``)
  and ``hp-splits.json`` = ``{"train": [ids], "dev": [ids], "test": [ids]}``. Ids are
  compared as numbers when they are digits (``"0000042"`` == ``42``). Articles in no split
  are left out.
* ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` with lines
  ``{"text": str, "label": "true"|"false", "id": ...}`` (what Longformer's ``hp_preprocess.py``
  writes; JSON booleans are accepted too).

Text cleaning (``clean_text``) follows Longformer's ``hp_preprocess.py`` (its ``clean_txt``),
after first turning the XML body into plain text as it did (the text of the article element: the
``title`` attribute is not part of it; it stands in only for an empty body), with a space around
each block element (``<p>``, ``<q>``, ``<br>`` ...), HTML entities unescaped and escaped markup
(``&lt;tag&gt;``: ``<`` then a letter or ``/``) removed, while a lone ``<`` or ``>`` (``5 < 6``) stays. Then, as Longformer did:
``word/word`` -> space, URLs (``http...``, ``www...``, ``href...``) removed, whitespace runs
-> one space, repeated ``!?.`` -> one, a character repeated 3+ times at a word's end -> one
(this also shortens e.g. ``1000`` to ``10``, as the original did). jsonl texts go through
the same function (idempotent on already-cleaned text). Labels: ``true`` -> 1, ``false`` -> 0.

API
---
``load_hyperpartisan(data_dir) -> dict[str, list[dict]]``
    Keys ``"train"``, ``"dev"``, ``"test"``; each example ``{"text": str, "label": int,
    "id": str}``. Feed them to ``classification.encode_classification``.
``read_articles(path) -> dict[str, str]`` / ``read_labels(path) -> dict[str, int]``
    The two XML files, by normalised id.
``clean_text(text) -> str``
Errors: ``common.DatasetNotFoundError`` for missing files; ``common.DataFormatError``
naming the file and record for a missing id or field, an empty article, an unknown label,
a label file whose ids differ from the articles', split ids that are unknown or repeated, a
split without examples, and a training split without one of the two classes. A dev or test
split of one class is accepted: the published dev and test splits hold 64 and 65 articles, and a
small evaluation set may lack a class without being wrong (accuracy still means what it says).
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import (
    DataFormatError,
    DatasetNotFoundError,
    read_json,
    read_jsonl,
    require_every_class,
    require_examples,
)

ARTICLES_FILE = "articles-training-byarticle-20181122.xml"
LABELS_FILE = "ground-truth-training-byarticle-20181122.xml"
SPLITS_FILE = "hp-splits.json"
SPLITS = ("train", "dev", "test")
_LABELS = {"true": 1, "false": 0}
_CLASSES = {label: name for name, label in _LABELS.items()}
_EXPECTED = (
    f"{ARTICLES_FILE}, {LABELS_FILE} and {SPLITS_FILE}; or train.jsonl, dev.jsonl, test.jsonl "
    '(lines {"text", "label": "true"|"false", "id"})'
)
_SOURCE = (
    "the by-article XML files from the SemEval-2019 Task 4 data on Zenodo (https://zenodo.org/record/1489920); "
    "hp-splits.json from the Longformer repository (https://github.com/allenai/longformer)"
)
_BLOCK_TAGS = {"p", "q", "br", "div", "li", "ul", "ol", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table"}
_FLAGS = re.MULTILINE | re.DOTALL


def clean_text(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"</?[A-Za-z][^<>]*>", " ", text)  # markup that was escaped inside the XML text
    # Longformer's clean_txt, in its order.
    text = re.sub(r"[a-zA-Z]+/[a-zA-Z]+", " ", text)
    text = text.replace("\n", " ")
    text = re.sub(r"(http)\S+", "", text, flags=_FLAGS)
    text = re.sub(r"(www)\S+", "", text, flags=_FLAGS)
    text = re.sub(r"(href)\S+", "", text, flags=_FLAGS)
    text = re.sub(r"\s+", " ", text, flags=_FLAGS)
    text = re.sub(r"([!?.]){2,}", r"\1", text, flags=_FLAGS)
    text = re.sub(r"\b(\S*?)(.)\2{2,}\b", r"\1\2", text, flags=_FLAGS)
    return text.strip()


def _id_key(value) -> str:
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _parse_label(value, path, record) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise DataFormatError(path, record, f"unknown label {value!r} (expected 'true' or 'false')")


def _parse_xml(path: Path) -> list[ET.Element]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, column = e.position
        raise DataFormatError(path, f"line {line}", f"invalid XML at column {column}") from None
    return root.findall("article")


def _body_text(element: ET.Element) -> str:
    parts = []

    def walk(e: ET.Element) -> None:
        parts.append(e.text or "")
        for child in e:
            separator = " " if child.tag in _BLOCK_TAGS else ""
            parts.append(separator)
            walk(child)
            parts.append(separator + (child.tail or ""))

    walk(element)
    return "".join(parts)


def _article_id(element: ET.Element, index: int, path: Path) -> str:
    value = element.get("id")
    if value is None or not value.strip():
        raise DataFormatError(path, f"article #{index + 1}", "missing attribute 'id'")
    return _id_key(value)


def read_articles(path: str | Path) -> dict[str, str]:
    path = Path(path)
    articles: dict[str, str] = {}
    for index, element in enumerate(_parse_xml(path)):
        key = _article_id(element, index, path)
        if key in articles:
            raise DataFormatError(path, f"id {key!r}", "duplicate article id")
        # The body's text, as Longformer's preprocessing took it (no title); the title only if the body is empty.
        text = clean_text(_body_text(element)) or clean_text(element.get("title", ""))
        if not text:
            raise DataFormatError(path, f"id {key!r}", "empty article (no title and no text)")
        articles[key] = text
    return articles


def read_labels(path: str | Path) -> dict[str, int]:
    path = Path(path)
    labels: dict[str, int] = {}
    for index, element in enumerate(_parse_xml(path)):
        key = _article_id(element, index, path)
        if key in labels:
            raise DataFormatError(path, f"id {key!r}", "duplicate label")
        if element.get("hyperpartisan") is None:
            raise DataFormatError(path, f"id {key!r}", "missing attribute 'hyperpartisan'")
        labels[key] = _parse_label(element.get("hyperpartisan"), path, f"id {key!r}")
    return labels


def _preview(ids) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:5]) + (f" ... ({len(ids)} in all)" if len(ids) > 5 else "")


def _read_splits(path: Path, known: set[str]) -> dict[str, list[str]]:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataFormatError(path, None, 'expected {"train": [ids], "dev": [ids], "test": [ids]}')
    splits, seen = {}, {}
    for split in SPLITS:
        if not isinstance(raw.get(split), list):
            raise DataFormatError(path, f"split {split!r}", "missing, or not a list of ids")
        ids = [_id_key(i) for i in raw[split]]
        unknown = set(ids) - known
        if unknown:
            raise DataFormatError(path, f"split {split!r}", f"ids not among the articles: {_preview(unknown)}")
        for key in ids:
            if key in seen:
                raise DataFormatError(path, f"split {split!r}", f"id {key!r} already listed in split {seen[key]!r}")
            seen[key] = split
        splits[split] = ids
    return splits


def _check_splits(labels: dict[str, list[int]], where) -> None:
    """Every split has examples and train has both classes; ``where(split)`` -> (file, record)."""
    for split, split_labels in labels.items():
        require_examples(split_labels, *where(split))
    require_every_class(labels["train"], _CLASSES, *where("train"))


def _load_xml(data_dir: Path) -> dict[str, list[dict]]:
    articles_path, labels_path, splits_path = data_dir / ARTICLES_FILE, data_dir / LABELS_FILE, data_dir / SPLITS_FILE
    missing = [p.name for p in (articles_path, labels_path, splits_path) if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"Hyperpartisan (missing {', '.join(missing)})", [data_dir], _EXPECTED, _SOURCE)
    articles = read_articles(articles_path)
    labels = read_labels(labels_path)
    if articles.keys() != labels.keys():
        problems = []
        if articles.keys() - labels.keys():
            problems.append(f"articles without a label: {_preview(articles.keys() - labels.keys())}")
        if labels.keys() - articles.keys():
            problems.append(f"labels of unknown articles: {_preview(labels.keys() - articles.keys())}")
        raise DataFormatError(labels_path, None, f"ids do not match {ARTICLES_FILE}: " + "; ".join(problems))
    splits = _read_splits(splits_path, set(articles))
    _check_splits({split: [labels[key] for key in ids] for split, ids in splits.items()},
                  lambda split: (splits_path, f"split {split!r}"))
    return {
        split: [{"text": articles[key], "label": labels[key], "id": key} for key in ids]
        for split, ids in splits.items()
    }


def _load_jsonl(data_dir: Path) -> dict[str, list[dict]]:
    result = {}
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        examples, seen = [], set()
        for line_number, record in read_jsonl(path):
            where = f"line {line_number}"
            for field in ("text", "label", "id"):
                if field not in record:
                    raise DataFormatError(path, where, f"missing field {field!r}")
            text = clean_text(record["text"]) if isinstance(record["text"], str) else ""
            if not text:
                raise DataFormatError(path, where, "empty text")
            key = _id_key(record["id"])
            if key in seen:
                raise DataFormatError(path, where, f"duplicate id {key!r}")
            seen.add(key)
            examples.append({"text": text, "label": _parse_label(record["label"], path, where), "id": key})
        result[split] = examples
    _check_splits({split: [ex["label"] for ex in examples] for split, examples in result.items()},
                  lambda split: (data_dir / f"{split}.jsonl", None))
    return result


def load_hyperpartisan(data_dir: str | Path) -> dict[str, list[dict]]:
    data_dir = Path(data_dir)
    if (data_dir / ARTICLES_FILE).is_file() or (data_dir / LABELS_FILE).is_file():
        return _load_xml(data_dir)
    if all((data_dir / f"{split}.jsonl").is_file() for split in SPLITS):
        return _load_jsonl(data_dir)
    raise DatasetNotFoundError("Hyperpartisan", [data_dir], _EXPECTED, _SOURCE)
