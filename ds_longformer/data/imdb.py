"""IMDB movie reviews (Maas et al., 2011) for binary sentiment classification.

Accepted layouts in ``data_dir``:

* the published archive: ``aclImdb/{train,test}/{pos,neg}/<n>_<rating>.txt`` (``data_dir``
  may also be the ``aclImdb`` folder itself). Label: ``pos`` -> 1, ``neg`` -> 0; id:
  ``"train/pos/<n>_<rating>"``. The ``unsup`` folder is ignored.
* the Hugging Face parquet files (in ``data_dir`` or ``data_dir/plain_text``):
  ``train-00000-of-00001.parquet``, ``test-...``, optionally ``validation-...``/``dev-...``,
  columns ``text`` (string) and ``label`` (0 = negative, 1 = positive); ``unsupervised-...``
  files are ignored. Id: ``"<split>/<row>"`` counted over the split's files in order.

Texts are returned as published (IMDB's ``<br />`` tags included).

Dev split: IMDB publishes none, so unless dev/validation parquet files exist, ``dev`` is
held out from train deterministically -- the ``round(dev_fraction * n_train)`` reviews whose
text has the smallest SHA-1 (``common.hash_holdout``). It depends only on the texts, so
every layout of the same data gives the same dev set.

API
---
``load_imdb(data_dir, dev_fraction=0.1) -> dict[str, list[dict]]``
    Keys ``"train"``, ``"dev"``, ``"test"``; each example ``{"text": str, "label": int
    (0/1), "id": str}``. Feed them to ``classification.encode_classification``.
Missing files raise ``common.DatasetNotFoundError``; an empty review, a missing column or
an unknown label raises ``common.DataFormatError`` naming the file and the row, and so does data
that would train or evaluate on nothing: a class folder without reviews (``train/pos`` ...), a
split without examples (a dev hold-out that rounds to none included), a training split without
one of the classes (``common.require_every_class``).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .common import (
    DataFormatError,
    DatasetNotFoundError,
    canonical_split,
    hash_holdout,
    read_utf8,
    require_every_class,
    require_examples,
)

_LABELS = {"neg": 0, "pos": 1}
_CLASSES = {label: name for name, label in _LABELS.items()}
_EXPECTED = (
    "aclImdb/train/{pos,neg}/*.txt and aclImdb/test/{pos,neg}/*.txt, or the parquet files "
    "train-*.parquet and test-*.parquet (columns text, label)"
)
_SOURCE = (
    "aclImdb_v1.tar.gz from the Large Movie Review Dataset page (https://ai.stanford.edu/~amaas/data/sentiment/), "
    "or the parquet files of the Hugging Face dataset stanfordnlp/imdb"
)


def _folder_root(data_dir: Path) -> Path | None:
    for root in (data_dir / "aclImdb", data_dir):
        if (root / "train" / "pos").is_dir() or (root / "test" / "pos").is_dir():
            return root
    return None


def _read_folders(root: Path) -> dict[str, list[dict]]:
    splits = {}
    for split in ("train", "test"):
        examples = []
        for polarity, label in _LABELS.items():
            folder = root / split / polarity
            if not folder.is_dir():
                raise DatasetNotFoundError(f"IMDB folder {split}/{polarity}", [root], _EXPECTED, _SOURCE)
            reviews = sorted(folder.glob("*.txt"))
            require_examples(reviews, folder, what=f"reviews (*.txt) of class {polarity!r}")
            for f in reviews:
                text = read_utf8(f)
                if not text.strip():
                    raise DataFormatError(f, None, "empty review")
                examples.append({"text": text, "label": label, "id": f"{split}/{polarity}/{f.stem}"})
        splits[split] = examples
    return splits


def _parquet_files(data_dir: Path) -> dict[str, list[Path]]:
    for folder in (data_dir, data_dir / "plain_text"):
        files: dict[str, list[Path]] = {}
        for f in sorted(folder.glob("*.parquet")):
            split = canonical_split(f.name.split("-", 1)[0])
            if split:  # "unsupervised-..." and unrelated files are skipped
                files.setdefault(split, []).append(f)
        if files:
            return files
    return {}


def _read_parquet_split(split: str, files: list[Path]) -> list[dict]:
    examples = []
    for f in files:
        try:
            table = pq.read_table(f)
        except pa.ArrowException as e:
            raise DataFormatError(f, None, f"cannot read parquet ({e})") from None
        missing = {"text", "label"} - set(table.column_names)
        if missing:
            raise DataFormatError(f, None, f"missing column(s) {sorted(missing)} (columns: {table.column_names})")
        texts = table.column("text").to_pylist()
        labels = table.column("label").to_pylist()
        for row, (text, label) in enumerate(zip(texts, labels)):
            if not isinstance(text, str) or not text.strip():
                raise DataFormatError(f, f"row {row}", "empty or missing text")
            if isinstance(label, bool) or label not in (0, 1):
                raise DataFormatError(f, f"row {row}", f"unknown label {label!r} (expected 0 or 1)")
            examples.append({"text": text, "label": int(label), "id": f"{split}/{len(examples)}"})
    return examples


def load_imdb(data_dir: str | Path, dev_fraction: float = 0.1) -> dict[str, list[dict]]:
    data_dir = Path(data_dir)
    root = _folder_root(data_dir)
    if root is not None:
        splits = _read_folders(root)
        sources = {split: root / split for split in splits}
    else:
        files = _parquet_files(data_dir)
        if "train" not in files or "test" not in files:
            raise DatasetNotFoundError("IMDB", [data_dir], _EXPECTED, _SOURCE)
        splits = {split: _read_parquet_split(split, paths) for split, paths in files.items()}
        sources = files
    for split, examples in splits.items():
        require_examples(examples, sources[split])
    require_every_class((ex["label"] for ex in splits["train"]), _CLASSES, sources["train"])
    if "validation" in splits:
        splits["dev"] = splits.pop("validation")
    else:
        n_train = len(splits["train"])
        splits["train"], splits["dev"] = hash_holdout(splits["train"], dev_fraction, key=lambda ex: ex["text"])
        require_examples(splits["dev"], sources["train"], what=f"dev examples (holding out {dev_fraction:g} of "
                                                               f"{n_train} training reviews leaves none)")
    return {name: splits[name] for name in ("train", "dev", "test")}
