"""WikiHop (QAngaroo v1.1) for the Longformer paper's multi-hop QA model.

Input file: ``qangaroo_v1.1/wikihop/train.json`` / ``dev.json``, a JSON list of
``{"id", "query", "answer", "candidates": [str], "supports": [str]}``. The query is
``"<relation> <subject>"`` with underscores in the relation
(``"country_of_citizenship john smith"``); it is read as ``"country of citizenship john smith"``.
Texts are normalised as Longformer's ``wikihop.py`` did (space before ``.,!?)'s`` and
after ``(`` removed, whitespace collapsed).

Model input (one example)
-------------------------
Four tokens are added to the tokenizer: ``[q] [/q] [ent] [/ent]`` (``add_wikihop_tokens``; the
model grows its embeddings to ``len(tokenizer)`` itself, with ``resize_token_embeddings``).
``start``/``end`` are ``<s>``/``</s>`` (RoBERTa) or
``[CLS]``/``[SEP]`` (BERT)::

    prefix  = start [q] question [/q] [ent] c1 [/ent] [ent] c2 [/ent] ... end
    content = support1 end support2 end ... supportN
    chunk k = prefix + content[k*b : (k+1)*b] + end,   b = max_len - len(prefix) - 1

so no chunk exceeds ``max_len`` and every chunk repeats the prefix; content shorter than
``b`` gives one chunk. Global attention covers the whole prefix (none for the RoBERTa
baseline, ``global_prefix=False``, which must stay exactly RoBERTa); the candidate positions
are the indices of the ``[ent]`` tokens (the same in every chunk). The model scores the
``[ent]`` tokens with a linear layer and the scores of a candidate are averaged over the
chunks of its example; the label is the index of the answer among the candidates. The
RoBERTa baseline is the same with ``max_len=512``.

API
---
``WIKIHOP_TOKENS = ("[q]", "[/q]", "[ent]", "[/ent]")``
``load_wikihop_json(path) -> list[WikiHopExample]``
    Validated records (``id, query, answer, candidates, supports, label``).
``format_query(query) -> str`` / ``normalize_string(text) -> str``
    The text normalisation above.
``add_wikihop_tokens(tokenizer) -> list[int]``
    Adds the four tokens (idempotent); returns their ids.
``tokenize_wikihop(examples, tokenizer, num_proc=None) -> datasets.Dataset``
    Columns ``id``, ``prefix_ids``, ``candidate_positions``, ``support_ids`` (the content
    above), ``label``. This is the tokenized cache format: independent of ``max_len``.
``load_wikihop(path, tokenizer, cache_dir=None, num_proc=None) -> datasets.Dataset``
    ``load_wikihop_json`` + ``tokenize_wikihop``, cached under
    ``cache_dir/wikihop-<file stem>-<key>/`` (``common.cached_dataset``; key: file path,
    size, mtime and the tokenizer with its added tokens).
``build_chunks(row, max_len, end_id, max_chunks=None, global_prefix=True) -> WikiHopFeatures``
    ``row``: one row of the tokenized dataset. ``WikiHopFeatures.chunks`` is a list of
    ``{"input_ids", "attention_mask", "global_attention_mask"}`` (lists of ints),
    ``.candidate_positions`` one list per chunk, ``.label`` the answer index.
    ``max_chunks`` keeps only the first chunks (a cap on compute per example).
``WikiHopChunkDataset(tokenized, tokenizer, max_len, max_chunks=None, global_prefix=True, skip_long=False)``
    ``torch.utils.data.Dataset`` of ``WikiHopFeatures``. An example whose prefix alone fills
    ``max_len`` raises ValueError at construction, before any training; ``skip_long=True``
    leaves such examples out instead (``.skipped`` counts them).
``collate_wikihop(features, pad_token_id, pad_to_multiple_of=None) -> dict``
    All chunks of all examples as rows: ``input_ids``, ``attention_mask``,
    ``global_attention_mask`` ``(n_rows, length)``; ``candidate_positions``
    ``(n_rows, max_candidates)`` (0 where an example has fewer candidates);
    ``chunk_to_example`` ``(n_rows,)``; ``candidate_mask`` ``(n_examples, max_candidates)``;
    ``labels`` ``(n_examples,)``; ``ids`` (list).
``candidate_logits(token_scores, batch) -> (n_examples, max_candidates)``
    ``token_scores``: the model's score of every token ``(n_rows, length)``. Gathers the
    ``[ent]`` scores and averages them over each example's chunks
    (``average_chunk_scores``); padded candidates get the dtype's minimum, so
    ``cross_entropy(logits, batch["labels"])`` and ``argmax`` work directly.
``average_chunk_scores(chunk_scores, chunk_to_example=None, candidate_mask=None)``
    ``chunk_scores`` ``(n_rows, n_candidates)``; without ``chunk_to_example`` all rows are
    one example and the result is ``(n_candidates,)``.
Errors: ``common.DatasetNotFoundError`` for a missing file; ``common.DataFormatError``
naming the file and the record (id, or position when the id is missing) for a missing
field, an answer not among the candidates, no supports or an empty support document; naming
the file for an empty file or record list, and (``load_wikihop``, before caching) with the
tokenizer for a tokenizer that turns all of the file's text into no tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import datasets
import torch

from .collate import pad_batch
from .common import (
    DataFormatError,
    DatasetNotFoundError,
    cache_key,
    cached_dataset,
    read_json,
    require_examples,
    require_tokens,
    sequence_bounds,
    tokenizer_fingerprint,
)

WIKIHOP_TOKENS = ("[q]", "[/q]", "[ent]", "[/ent]")
_FIELDS = ("id", "query", "answer", "candidates", "supports")
_SOURCE = "qangaroo_v1.1.zip from the QAngaroo page (http://qangaroo.cs.ucl.ac.uk/); unzip it"
_CACHE_VERSION = 1


@dataclass
class WikiHopExample:
    id: str
    query: str
    answer: str
    candidates: list[str]
    supports: list[str]
    label: int


@dataclass
class WikiHopFeatures:
    id: str
    chunks: list[dict[str, list[int]]]
    candidate_positions: list[list[int]]
    label: int


def normalize_string(s: str) -> str:
    for before, after in ((" .", "."), (" ,", ","), (" !", "!"), (" ?", "?"), ("( ", "("), (" )", ")"), (" 's", "'s")):
        s = s.replace(before, after)
    return " ".join(s.split())


def format_query(query: str) -> str:
    relation, _, subject = query.strip().partition(" ")
    return normalize_string(f"{relation.replace('_', ' ')} {subject}")


def _is_text_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _validate(record, index: int, path: Path) -> WikiHopExample:
    if not isinstance(record, dict):
        raise DataFormatError(path, f"record #{index}", "expected a JSON object")
    where = f"id {record['id']!r}" if "id" in record else f"record #{index}"
    for field in _FIELDS:
        if field not in record:
            raise DataFormatError(path, where, f"missing field {field!r}")
    if not isinstance(record["query"], str) or not record["query"].strip():
        raise DataFormatError(path, where, "empty query")
    if not _is_text_list(record["candidates"]) or not record["candidates"]:
        raise DataFormatError(path, where, "'candidates' must be a non-empty list of strings")
    if not isinstance(record["answer"], str) or record["answer"] not in record["candidates"]:
        raise DataFormatError(path, where, f"answer {record['answer']!r} is not among the candidates")
    if not _is_text_list(record["supports"]) or not record["supports"]:
        raise DataFormatError(path, where, "'supports' must be a non-empty list of strings")
    for k, support in enumerate(record["supports"]):
        if not normalize_string(support):
            raise DataFormatError(path, where, f"empty support document (supports[{k}])")
    return WikiHopExample(
        id=str(record["id"]),
        query=record["query"],
        answer=record["answer"],
        candidates=list(record["candidates"]),
        supports=list(record["supports"]),
        label=record["candidates"].index(record["answer"]),
    )


def load_wikihop_json(path: str | Path) -> list[WikiHopExample]:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"WikiHop file {path.name}",
            [path.parent],
            "qangaroo_v1.1/wikihop/train.json and dev.json (JSON lists of {id, query, answer, candidates, supports})",
            _SOURCE,
        )
    records = read_json(path)
    if not isinstance(records, list):
        raise DataFormatError(path, None, "expected a JSON list of records")
    require_examples(records, path, what="records (an empty list)")
    return [_validate(record, index, path) for index, record in enumerate(records)]


def add_wikihop_tokens(tokenizer) -> list[int]:
    # special_tokens=True: never split or lower-cased by the tokenizer's normaliser.
    tokenizer.add_tokens(list(WIKIHOP_TOKENS), special_tokens=True)
    return tokenizer.convert_tokens_to_ids(list(WIKIHOP_TOKENS))


def _marker_ids(tokenizer) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(WIKIHOP_TOKENS))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("the tokenizer lacks the WikiHop tokens; call add_wikihop_tokens(tokenizer) first")
    return ids


class _Tokenize:
    """Batched map function (a class, so it pickles cleanly into ``num_proc`` workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.q, self.q_end, self.ent, self.ent_end = _marker_ids(tokenizer)
        self.start, self.end = sequence_bounds(tokenizer)

    def __call__(self, batch: dict) -> dict:
        texts, spans = [], []
        for query, candidates, supports in zip(batch["query"], batch["candidates"], batch["supports"]):
            first = len(texts)
            texts.append(format_query(query))
            texts.extend(normalize_string(c) for c in candidates)
            texts.extend(normalize_string(s) for s in supports)
            spans.append((first, len(candidates), len(supports)))
        # The leading space makes byte-level BPE (RoBERTa) encode each text as a word start.
        encoded = self.tokenizer([" " + t for t in texts], add_special_tokens=False, verbose=False)["input_ids"]

        out = {"prefix_ids": [], "candidate_positions": [], "support_ids": []}
        for first, n_candidates, n_supports in spans:
            prefix = [self.start, self.q, *encoded[first], self.q_end]
            positions = []
            for candidate in encoded[first + 1 : first + 1 + n_candidates]:
                positions.append(len(prefix))
                prefix += [self.ent, *candidate, self.ent_end]
            prefix.append(self.end)
            content = []
            for k, support in enumerate(encoded[first + 1 + n_candidates : first + 1 + n_candidates + n_supports]):
                content += ([self.end] if k else []) + support
            out["prefix_ids"].append(prefix)
            out["candidate_positions"].append(positions)
            out["support_ids"].append(content)
        return out


def tokenize_wikihop(examples: Sequence[WikiHopExample], tokenizer, num_proc: int | None = None) -> datasets.Dataset:
    raw = datasets.Dataset.from_dict(
        {
            "id": [ex.id for ex in examples],
            "query": [ex.query for ex in examples],
            "candidates": [ex.candidates for ex in examples],
            "supports": [ex.supports for ex in examples],
            "label": [ex.label for ex in examples],
        }
    )
    return raw.map(
        _Tokenize(tokenizer),
        batched=True,
        batch_size=100,
        num_proc=num_proc,
        remove_columns=["query", "candidates", "supports"],
        desc="Tokenizing WikiHop",
    )


def _tokenize_file(path: Path, tokenizer, num_proc: int | None) -> datasets.Dataset:
    examples = load_wikihop_json(path)
    dataset = tokenize_wikihop(examples, tokenizer, num_proc)
    n_chars = sum(len(text) for ex in examples for text in [ex.query, *ex.candidates, *ex.supports])
    # Not the text's: start [q] [/q] end, [ent] [/ent] around each candidate, an end between supports.
    n_markers = sum(4 + 2 * len(ex.candidates) + len(ex.supports) - 1 for ex in examples)
    n_tokens = sum(map(len, dataset["prefix_ids"])) + sum(map(len, dataset["support_ids"])) - n_markers
    require_tokens(n_tokens, n_chars, tokenizer, path)
    return dataset


def load_wikihop(
    path: str | Path, tokenizer, cache_dir: str | Path | None = None, num_proc: int | None = None
) -> datasets.Dataset:
    path = Path(path)
    if cache_dir is None or not path.is_file():  # a missing file gets load_wikihop_json's message
        return _tokenize_file(path, tokenizer, num_proc)
    stat = path.stat()
    key = cache_key(_CACHE_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                    tokenizer_fingerprint(tokenizer))

    def build():
        dataset = _tokenize_file(path, tokenizer, num_proc)
        return dataset, {"source": str(path), "tokenizer": tokenizer.name_or_path, "examples": len(dataset)}

    dataset, _ = cached_dataset(Path(cache_dir) / f"wikihop-{path.stem}-{key}", build)
    return dataset


def build_chunks(row: dict, max_len: int, end_id: int, max_chunks: int | None = None,
                 global_prefix: bool = True) -> WikiHopFeatures:
    prefix, content = list(row["prefix_ids"]), list(row["support_ids"])
    budget = max_len - len(prefix) - 1
    if budget < 1:
        raise ValueError(
            f"WikiHop example {row['id']!r}: the question and its {len(row['candidate_positions'])} candidates take "
            f"{len(prefix)} tokens, leaving no room for supports within max_len={max_len}"
        )
    starts = range(0, max(len(content), 1), budget)
    if max_chunks is not None:
        starts = starts[:max_chunks]
    chunks = []
    for start in starts:
        ids = prefix + content[start : start + budget] + [end_id]
        chunks.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "global_attention_mask": [int(global_prefix)] * len(prefix) + [0] * (len(ids) - len(prefix)),
            }
        )
    positions = list(row["candidate_positions"])
    return WikiHopFeatures(str(row["id"]), chunks, [positions] * len(chunks), int(row["label"]))


class WikiHopChunkDataset(torch.utils.data.Dataset):
    def __init__(self, tokenized: datasets.Dataset, tokenizer, max_len: int, max_chunks: int | None = None,
                 global_prefix: bool = True, skip_long: bool = False):
        # build_chunks would fail on such an example mid-epoch: refuse (or leave out) them all now.
        too_long = [(i, n) for i, n in enumerate(map(len, tokenized["prefix_ids"])) if n > max_len - 2]
        if too_long and not skip_long:
            i, n = max(too_long, key=lambda t: t[1])
            raise ValueError(
                f"{len(too_long)} WikiHop example(s) have a question and candidates that fill max_len={max_len} "
                f"on their own, leaving no room for supports (the longest: id {tokenized[i]['id']!r}, {n} tokens)")
        if too_long:
            dropped = {i for i, _ in too_long}
            tokenized = tokenized.select([i for i in range(len(tokenized)) if i not in dropped])
        self.tokenized, self.skipped = tokenized, len(too_long)
        self.end_id = sequence_bounds(tokenizer)[1]
        self.max_len, self.max_chunks, self.global_prefix = max_len, max_chunks, global_prefix

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> WikiHopFeatures:
        return build_chunks(self.tokenized[index], self.max_len, self.end_id, self.max_chunks, self.global_prefix)


def collate_wikihop(
    features: Sequence[WikiHopFeatures], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict:
    rows = [chunk for f in features for chunk in f.chunks]
    batch = pad_batch(rows, pad_token_id, pad_to_multiple_of)
    max_candidates = max(len(f.candidate_positions[0]) for f in features)
    positions = torch.zeros((len(rows), max_candidates), dtype=torch.long)
    candidate_mask = torch.zeros((len(features), max_candidates), dtype=torch.bool)
    chunk_to_example = []
    row = 0
    for example, f in enumerate(features):
        candidate_mask[example, : len(f.candidate_positions[0])] = True
        for chunk_positions in f.candidate_positions:
            positions[row, : len(chunk_positions)] = torch.tensor(chunk_positions)
            chunk_to_example.append(example)
            row += 1
    batch.update(
        candidate_positions=positions,
        chunk_to_example=torch.tensor(chunk_to_example, dtype=torch.long),
        candidate_mask=candidate_mask,
        labels=torch.tensor([f.label for f in features], dtype=torch.long),
        ids=[f.id for f in features],
    )
    return batch


def average_chunk_scores(
    chunk_scores: torch.Tensor,
    chunk_to_example: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    if chunk_to_example is None:
        return chunk_scores.mean(dim=0)
    n_examples = int(chunk_to_example.max()) + 1 if candidate_mask is None else candidate_mask.shape[0]
    index = chunk_to_example.to(chunk_scores.device)
    sums = chunk_scores.new_zeros((n_examples, chunk_scores.shape[1])).index_add(0, index, chunk_scores)
    counts = torch.bincount(index, minlength=n_examples).clamp(min=1).to(chunk_scores.dtype)
    mean = sums / counts[:, None]
    if candidate_mask is not None:
        mean = mean.masked_fill(~candidate_mask.to(mean.device), torch.finfo(mean.dtype).min)
    return mean


def candidate_logits(token_scores: torch.Tensor, batch: dict) -> torch.Tensor:
    chunk_scores = token_scores.gather(1, batch["candidate_positions"].to(token_scores.device))
    return average_chunk_scores(chunk_scores, batch["chunk_to_example"], batch["candidate_mask"])
