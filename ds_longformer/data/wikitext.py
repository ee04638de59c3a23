"""WikiText-103 for MLM pretraining: find the files, tokenize once, cache, cut into blocks.

Accepted layouts (``path`` is a folder; it may also hold the layout one level down in
``wikitext-103-raw/``, ``wikitext-103/`` or ``wikitext-103-raw-v1/``):

* the published archives: ``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``
  (``wiki.*.tokens`` from the tokenized archive are used when no ``.raw`` file is there);
* the Hugging Face ``wikitext-103-raw-v1`` parquet files: ``train-00000-of-00002.parquet``,
  ``validation-00000-of-00001.parquet``, ``test-...``, column ``text``;
* ``.txt`` files: either sub-folders named after the splits (``train/``, ``valid/`` or
  ``validation/`` or ``dev/``, ``test/``) holding ``*.txt``, or files whose name starts
  with a split name (``train.txt``, ``valid_01.txt``, ``test-a.txt`` ...); if no name
  says a split, every ``*.txt`` file of the folder is the train split.

Text rows are lines, newline included, exactly as the Hugging Face parquet files hold
them: a line of only whitespace becomes the empty row ``""``. All formats of the same
text therefore give the same rows, characters and tokens.

Tokenization (``datasets.Dataset.map``, batched, ``num_proc`` processes) runs each row
through the tokenizer without special tokens. The token ids of a split are concatenated
in file order and cut into blocks of ``max_seq_len`` tokens, each ``start + body + end``
where start/end are ``<s>``/``</s>`` (RoBERTa) or ``[CLS]``/``[SEP]`` (BERT) and the body
holds ``max_seq_len - 2`` text tokens. The last block holds the remainder and may be
shorter, so every text token is in exactly one block. With ``cache_dir`` the blocks are
saved under ``cache_dir/wikitext-<split>-<key>/`` (``common.cached_dataset``)
where the key hashes the tokenizer (vocabulary and rules), the files (path, size, mtime)
and ``max_seq_len``; later calls load them memory-mapped. The cache folder appears by an
atomic rename, so concurrent ranks never read a half-written one; still, in a distributed
run let rank 0 build it first and the others call after a barrier, to tokenize only once.

Bits per character
------------------
MLM evaluation gives the mean negative log-likelihood, in nats, of the masked tokens
(``loss_per_token``: the masked-LM loss averaged over all masked positions of the
evaluated blocks). That is the estimate of the NLL per text token. Over a split of
``n_tokens`` text tokens (special tokens excluded: they are never masked) and
``n_chars`` characters (``len`` of all rows, newlines included)::

    total_NLL_nats = loss_per_token * n_tokens
    BPC = total_NLL_nats / (n_chars * ln 2)

Because the blocks cover every text token of the split, ``n_tokens`` is exactly the
number of tokens that can be evaluated, and ``n_chars`` the characters they encode.

API
---
``find_wikitext_files(path) -> dict[str, list[Path]]``
    Files per split (``"train"``, ``"validation"``, ``"test"``; only splits present).
``read_wikitext(files) -> pyarrow.Table``
    One ``text`` column, one row per line, across ``files`` in order.
``load_wikitext(path, tokenizer, max_seq_len, cache_dir=None, splits=SPLITS,
num_proc=None) -> dict[str, WikiTextSplit]``
    ``WikiTextSplit.blocks`` is a ``datasets.Dataset`` with one column ``input_ids``
    (ready for ``mlm.MLMCollator``), ``.n_chars`` and ``.n_tokens`` as above.
``bits_per_character(loss_per_token, n_tokens, n_chars) -> float``
Missing files raise ``common.DatasetNotFoundError``; unreadable ones
``common.DataFormatError`` naming the file (and line or row), as do a split whose files hold
no text (empty, or only blank lines; found before tokenizing) and a tokenizer that turns the
text into no tokens (found before the blocks are cut or cached).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .common import (
    DataFormatError,
    DatasetNotFoundError,
    cache_key,
    cached_dataset,
    canonical_split,
    require_tokens,
    sequence_bounds,
    tokenizer_fingerprint,
)

SPLITS = ("train", "validation", "test")
_RAW_NAMES = {"train": "train", "validation": "valid", "test": "test"}
_SUBFOLDERS = ("wikitext-103-raw", "wikitext-103", "wikitext-103-raw-v1")
_EXPECTED = (
    "wiki.train.raw, wiki.valid.raw, wiki.test.raw (or wiki.*.tokens); or the parquet files "
    "train-*.parquet, validation-*.parquet, test-*.parquet (column 'text'); or .txt files per split"
)
_SOURCE = (
    "the WikiText-103 archives (wikitext-103-raw-v1.zip) from the Salesforce WikiText page "
    "(https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/), "
    "or the parquet files of the Hugging Face dataset Salesforce/wikitext, config wikitext-103-raw-v1"
)
_CACHE_VERSION = 1


@dataclass
class WikiTextSplit:
    blocks: datasets.Dataset
    n_chars: int
    n_tokens: int


def _split_of_name(name: str) -> str | None:
    return canonical_split(re.split(r"[-_.]", name, maxsplit=1)[0])


def _find_in(folder: Path) -> dict[str, list[Path]]:
    raw = {}
    for split, name in _RAW_NAMES.items():
        for suffix in ("raw", "tokens"):
            f = folder / f"wiki.{name}.{suffix}"
            if f.is_file():
                raw[split] = [f]
                break
    if raw:
        return raw

    parquet: dict[str, list[Path]] = {}
    for f in sorted(folder.glob("*.parquet")):
        split = _split_of_name(f.name)
        if split:
            parquet.setdefault(split, []).append(f)
    if parquet:
        return parquet

    txt: dict[str, list[Path]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        split = canonical_split(sub.name)
        if split and any(sub.glob("*.txt")):
            txt.setdefault(split, []).extend(sorted(sub.glob("*.txt")))
    if txt:
        return txt
    loose = sorted(folder.glob("*.txt"))
    for f in loose:
        split = _split_of_name(f.name)
        if split:
            txt.setdefault(split, []).append(f)
    if txt:
        return txt
    return {"train": loose} if loose else {}


def find_wikitext_files(path: str | Path) -> dict[str, list[Path]]:
    root = Path(path)
    folders = [root] + [root / sub for sub in _SUBFOLDERS]
    for folder in folders:
        if folder.is_dir():
            found = _find_in(folder)
            if found:
                return found
    raise DatasetNotFoundError("WikiText-103", [f for f in folders if f.is_dir()] or [root], _EXPECTED, _SOURCE)


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            # The Hugging Face wikitext rows: every line kept, whitespace-only lines emptied.
            return [line if line.strip() else "" for line in f]
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_parquet(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:
        raise DataFormatError(path, None, f"cannot read parquet ({e})") from None
    if "text" not in table.column_names:
        raise DataFormatError(path, None, f"no 'text' column (columns: {table.column_names})")
    text = table.column("text")
    if not pa.types.is_string(text.type) and not pa.types.is_large_string(text.type):
        raise DataFormatError(path, None, f"column 'text' has type {text.type}, expected strings")
    if text.null_count:
        row = pc.index(pc.is_null(text), True).as_py()
        raise DataFormatError(path, f"row {row}", "'text' is null")
    return pa.table({"text": text.cast(pa.large_string())})


def _has_text(path: Path) -> bool:
    """Whether the file holds a character other than whitespace; a text file is read only up to it."""
    if path.suffix == ".parquet":
        longest = pc.max(pc.utf8_length(pc.utf8_trim_whitespace(_read_parquet(path).column("text")))).as_py()
        return bool(longest)  # None when there are no rows
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes are _read_lines' to report
        while chunk := f.read(1 << 16):
            if not chunk.isspace():
                return True
    return False


def read_wikitext(files: Iterable[str | Path]) -> pa.Table:
    tables = []
    for f in map(Path, files):
        if f.suffix == ".parquet":
            tables.append(_read_parquet(f))
        else:
            tables.append(pa.table({"text": pa.array(_read_lines(f), pa.large_string())}))
    return pa.concat_tables(tables) if tables else pa.table({"text": pa.array([], pa.large_string())})


class _Tokenize:
    """Batched map function (a class, so it pickles cleanly into ``num_proc`` workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        # verbose=False: long lines are expected here; they are cut into blocks afterwards.
        encoded = self.tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": encoded["input_ids"]}


def _blocks(ids: np.ndarray, max_seq_len: int, start: int, end: int) -> pa.Array:
    body = max_seq_len - 2
    n_full, rest = divmod(len(ids), body)
    full = np.empty((n_full, max_seq_len), dtype=np.int32)
    full[:, 0], full[:, -1] = start, end
    full[:, 1:-1] = ids[: n_full * body].reshape(n_full, body)
    values, offsets = [full.ravel()], list(range(0, (n_full + 1) * max_seq_len, max_seq_len))
    if rest:
        values.append(np.concatenate([[start], ids[n_full * body :], [end]]).astype(np.int32))
        offsets.append(offsets[-1] + rest + 2)
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} tokens do not fit one block column; split the data into smaller files")
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.concatenate(values), pa.int32()))


def _tokenize_split(files: Sequence[Path], tokenizer, max_seq_len: int, num_proc: int | None, key: str):
    table = read_wikitext(files)
    n_chars = pc.sum(pc.utf8_length(table.column("text"))).as_py() or 0
    tokenized = datasets.Dataset(table).map(
        _Tokenize(tokenizer),
        batched=True,
        num_proc=num_proc,
        remove_columns=["text"],
        new_fingerprint=key,  # skips hashing the tokenizer to fingerprint the map
        desc="Tokenizing WikiText",
    )
    ids = pc.list_flatten(tokenized.data.column("input_ids")).to_numpy()
    require_tokens(len(ids), n_chars, tokenizer, files)
    start, end = sequence_bounds(tokenizer)
    blocks = datasets.Dataset(pa.table({"input_ids": _blocks(ids, max_seq_len, start, end)}))
    return blocks, n_chars, len(ids)


def _cache_key(files: Sequence[Path], tokenizer, max_seq_len: int) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return cache_key(_CACHE_VERSION, tokenizer_fingerprint(tokenizer), stats, max_seq_len)


def _load_split(files, split, tokenizer, max_seq_len, cache_dir, num_proc) -> WikiTextSplit:
    key = _cache_key(files, tokenizer, max_seq_len)
    if cache_dir is None:
        return WikiTextSplit(*_tokenize_split(files, tokenizer, max_seq_len, num_proc, key))

    def build():
        blocks, n_chars, n_tokens = _tokenize_split(files, tokenizer, max_seq_len, num_proc, key)
        meta = {
            "split": split,
            "n_chars": n_chars,
            "n_tokens": n_tokens,
            "max_seq_len": max_seq_len,
            "tokenizer": tokenizer.name_or_path,
            "files": [str(f) for f in files],
        }
        return blocks, meta

    blocks, meta = cached_dataset(Path(cache_dir) / f"wikitext-{split}-{key}", build)
    return WikiTextSplit(blocks, meta["n_chars"], meta["n_tokens"])


def load_wikitext(
    path: str | Path,
    tokenizer,
    max_seq_len: int,
    cache_dir: str | Path | None = None,
    splits: Sequence[str] = SPLITS,
    num_proc: int | None = None,
) -> dict[str, WikiTextSplit]:
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must leave room for start, end and one token, got {max_seq_len}")
    found = find_wikitext_files(path)
    files = {}
    for name in splits:
        split = canonical_split(name)
        if split not in found:
            raise DatasetNotFoundError(
                f"WikiText-103 split {name!r}", [path], f"{_EXPECTED} (found splits: {sorted(found)})", _SOURCE
            )
        files[split] = found[split]
    for split_files in files.values():  # every split, before tokenizing any (train takes long)
        if not any(map(_has_text, split_files)):
            raise DataFormatError(split_files, None, "no text (empty, or only blank lines)")
    return {split: _load_split(split_files, split, tokenizer, max_seq_len, cache_dir, num_proc)
            for split, split_files in files.items()}


def bits_per_character(loss_per_token: float, n_tokens: int, n_chars: int) -> float:
    """BPC from the mean masked-token NLL in nats; see the module docstring."""
    if n_chars <= 0:
        raise ValueError("n_chars must be positive")
    return loss_per_token * n_tokens / (n_chars * math.log(2))
