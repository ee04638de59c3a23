"""Helpers shared by the dataset loaders: errors, split names, jsonl reading, tokenizer facts.

Errors
------
``DataFormatError(ValueError)``
    A dataset file is malformed. The message starts with the file and the record:
    ``"<file>: line 7: <problem>"`` or ``"<file>: id '42': <problem>"``.
``DatasetNotFoundError(FileNotFoundError)``
    The expected files are not where the user pointed. The message lists the expected
    file names, the folders searched and where the dataset is published.

Other helpers
-------------
``canonical_split(name) -> str | None``
    ``"valid"``/``"val"``/``"dev"``/``"validation"`` -> ``"validation"``, ``"train"``,
    ``"test"``; any other name -> ``None``.
``read_utf8(path) -> str``
    The file's text; bytes that are not UTF-8 -> ``DataFormatError`` naming the byte offset.
``read_json(path) -> object``
    The file's JSON value; bad JSON -> ``DataFormatError`` naming the line.
``read_jsonl(path) -> list[tuple[int, dict]]``
    ``(line_number, record)`` pairs, blank lines skipped, bad JSON -> ``DataFormatError``.
``hash_holdout(examples, fraction, key) -> (kept, held_out)``
    A deterministic hold-out that depends only on each example's content, so every
    published format of a dataset yields the same split.
``sequence_bounds(tokenizer) -> (start_id, end_id)``
    ``<s>``/``</s>`` for RoBERTa-style tokenizers, ``[CLS]``/``[SEP]`` for BERT-style ones.
``tokenizer_fingerprint(tokenizer) -> str``
    A short hash identifying the tokenizer's vocabulary, rules and added tokens (for cache keys).
``cached_dataset(target, build) -> (datasets.Dataset, meta dict)``
    Load ``target/`` (``dataset/`` saved by ``datasets`` + ``meta.json``) or, if absent, call
    ``build()`` -> ``(dataset, meta)`` and save it there. The folder appears by an atomic
    rename, so concurrent processes never read a half-written cache; in a distributed run
    let rank 0 build it before the others call, so the work is done once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import datasets

T = TypeVar("T")

_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


class DataFormatError(ValueError):
    """A dataset file is malformed; the message names the file and the record."""

    def __init__(self, path: str | Path, record: str | None, problem: str):
        """``record`` says which record, e.g. ``"line 7"`` or ``"id '42'"``; None for the whole file."""
        where = f"{path}" if record is None else f"{path}: {record}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.record = record
        self.problem = problem


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are missing; the message says which files and where to get them."""

    def __init__(self, dataset: str, searched: Iterable[str | Path], expected: str, source: str):
        places = ", ".join(str(p) for p in searched)
        super().__init__(
            f"{dataset} not found (looked in: {places}).\n"
            f"Expected: {expected}\n"
            f"Download: {source}"
        )


def canonical_split(name: str) -> str | None:
    return _SPLIT_ALIASES.get(name.lower())


def read_utf8(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path):
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"line {e.lineno}", f"invalid JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    records = []
    for line_number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"line {line_number}", f"invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, f"line {line_number}", "expected a JSON object")
        records.append((line_number, record))
    return records


def hash_holdout(examples: Sequence[T], fraction: float, key: Callable[[T], str]) -> tuple[list[T], list[T]]:
    """Hold out ``round(fraction * len(examples))`` examples: those whose key has the
    smallest SHA-1. The remaining examples keep their original order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1), got {fraction}")
    n_held = round(fraction * len(examples))
    ranked = sorted(range(len(examples)), key=lambda i: hashlib.sha1(key(examples[i]).encode("utf-8")).hexdigest())
    held = set(ranked[:n_held])
    kept = [ex for i, ex in enumerate(examples) if i not in held]
    held_out = [examples[i] for i in sorted(held)]
    return kept, held_out


def sequence_bounds(tokenizer) -> tuple[int, int]:
    # cls/sep first: they are what RoBERTa (<s>, </s>) and BERT ([CLS], [SEP]) put around a sequence.
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has neither cls/sep nor bos/eos tokens; "
            "cannot mark the start and end of a sequence"
        )
    return start, end


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The serialised fast tokenizer holds the vocabulary, merges, rules and added tokens.
        description = backend.to_str()
    else:
        description = f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}"
    return hashlib.sha256(description.encode("utf-8")).hexdigest()[:16]


def cached_dataset(
    target: str | Path, build: Callable[[], tuple[datasets.Dataset, dict]]
) -> tuple[datasets.Dataset, dict]:
    target = Path(target)
    if not (target / "meta.json").is_file():
        dataset, meta = build()
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp / "dataset"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((target / "meta.json").read_text())
    return datasets.load_from_disk(str(target / "dataset")), meta
