"""A synthetic long-range QA task: the clue and the answer lie more than 512 tokens apart.

Each document opens with a passage set in one *room* (its words are mostly the room's name,
the rest filler), continues with at least ``min_gap`` tokens of filler, and ends with a list of
``num_items`` items, one belonging in each room, in random order and separated by filler::

    question: Looking at the list of things near the end of this document, which one of them
              belongs in the room that the long opening passage keeps talking about?
    context:  kitchen kitchen the kitchen kitchen of kitchen ...        (128 words: the clue)
              the of and to in is ...                                 (>= 520 tokens of filler)
              ... pillow ... shovel ... spoon ... towel ...           (the items)
    answer:   spoon

The answer is the item of the opening's room (kitchen -> spoon, garden -> shovel, bathroom ->
towel, bedroom -> pillow, ...). It never occurs in the opening, so a window that holds the
opening cannot copy it from there; and the opening ends more than ``min_gap`` (default 520)
tokens before the first item, so no input window of at most 512 tokens holds both the clue and
any item. A reader that cannot see the opening -- the RoBERTa baseline, whose 512-token windows
each hold either the opening or the items -- finds the items but nothing that tells them apart:
every document lists the same items in a uniformly random order, and the room is uniform and
independent of everything in the items' windows, so whatever such a reader does its expected
exact match and F1 are ``1 / num_items`` (0.25 with the default 4 items; the answers are single
words, so EM and F1 agree). The Longformer reads the whole document in one window with global
attention on the question: the question tokens can gather the room from the opening and every
item can read it back from them.

Why this shape (measured with a 2-layer, 32-wide model trained from scratch on the CPU): the
link must go clue -> question tokens (global attention) -> item (local attention to the global
tokens), which such a model learns reliably only when the clue is a large part of the document
(128 words here) and the question is long (many global tokens to carry it); one clue word and one
item per room keep the mapping to learn to ``num_items`` pairs.

The documents are written in SQuAD v1.1 JSON (``data.squad.write_squad_json``), so they go
through the real loader. Every word is a plain English word; a tokenizer that encodes each as one
token (one trained on ``vocabulary()``, or RoBERTa's) gives inputs of 800-880 tokens with the
33-token question and the defaults (so ``max_seq_len`` 1024 reads one in one window); any
tokenizer works: ``make_examples`` checks the gap in its tokens.

API
---
``ROOMS``: ``[(room, item), ...]``; ``FILLER``: the filler words; ``QUESTION``.
``vocabulary(num_items=4) -> list[str]``: every word the documents and the question use.
``make_examples(tokenizer, num_docs, num_items=4, opening_words=128, opening_density=1.0,
min_gap=520, item_spacing=24, seed=0, id_prefix="longrange") -> list[QAExample]``
    Reproducible for a given ``seed``; the rooms are balanced (as evenly as ``num_docs``
    allows) and shuffled. Raises ValueError if the tokenizer leaves the opening within
    ``min_gap`` tokens of an item (never with a tokenizer that gives every word a token).
``clue_answer_distance(tokenizer, example) -> int``
    Tokens from the opening's last clue word to the first item: more than any window that
    holds both would need.
``write_long_range_qa(path, tokenizer, num_docs, **make_examples_kwargs) -> Path``
"""

from __future__ import annotations

import random
from pathlib import Path

from .data.qa_features import AnswerSpan, QAExample
from .data.squad import write_squad_json

ROOMS = [("kitchen", "spoon"), ("garden", "shovel"), ("bathroom", "towel"), ("bedroom", "pillow"),
         ("office", "stapler"), ("garage", "wrench")]
FILLER = ("the", "of", "and", "to", "in", "is", "was", "it", "that", "on")
QUESTION = ("Looking at the list of things near the end of this document, which one of them belongs in the "
            "room that the long opening passage keeps talking about?")


def vocabulary(num_items: int = 4) -> list[str]:
    question = QUESTION.replace(",", " ,").replace("?", " ?").split()
    return list(dict.fromkeys([*FILLER, *(w for pair in ROOMS[:num_items] for w in pair), *question]))


def _document(rng: random.Random, room: int, num_items: int, opening_words: int, opening_density: float,
              gap_words: int, item_spacing: int) -> tuple[list[str], int]:
    """The words of one document and the index of the answer word."""
    clue = ROOMS[room][0]
    words = [clue if rng.random() < opening_density else rng.choice(FILLER) for _ in range(opening_words - 1)]
    words.append(clue)  # the opening ends on the clue: the gap is measured from it
    words += [rng.choice(FILLER) for _ in range(gap_words)]
    order = list(range(num_items))
    rng.shuffle(order)
    answer = -1
    for r in order:
        words += [rng.choice(FILLER) for _ in range(rng.randint(item_spacing, 2 * item_spacing))]
        if r == room:
            answer = len(words)
        words.append(ROOMS[r][1])
    words += [rng.choice(FILLER) for _ in range(rng.randint(1, item_spacing))]
    return words, answer


def _char_starts(words: list[str]) -> list[int]:
    starts, position = [], 0
    for w in words:
        starts.append(position)
        position += len(w) + 1
    return starts


def clue_answer_distance(tokenizer, example: QAExample) -> int:
    words = example.context.split(" ")
    starts = _char_starts(words)
    clues, items = {room for room, _ in ROOMS}, {item for _, item in ROOMS}
    first_item = next(i for i, w in enumerate(words) if w in items)
    last_clue = max(i for i, w in enumerate(words[:first_item]) if w in clues)
    offsets = tokenizer(example.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    clue_end, item_start = starts[last_clue] + len(words[last_clue]), starts[first_item]
    last_clue_token = max(i for i, (s, e) in enumerate(offsets) if e > s and s < clue_end)
    first_item_token = min(i for i, (s, e) in enumerate(offsets) if e > s and e > item_start)
    return first_item_token - last_clue_token


def make_examples(tokenizer, num_docs: int, num_items: int = 4, opening_words: int = 128,
                  opening_density: float = 1.0, min_gap: int = 520, item_spacing: int = 24, seed: int = 0,
                  id_prefix: str = "longrange") -> list[QAExample]:
    if not 2 <= num_items <= len(ROOMS):
        raise ValueError(f"num_items must be in [2, {len(ROOMS)}] (one item per room), got {num_items}")
    if opening_words < 1 or not 0 < opening_density <= 1 or item_spacing < 1:
        raise ValueError(f"need opening_words >= 1, 0 < opening_density <= 1 and item_spacing >= 1, got "
                         f"{opening_words}, {opening_density}, {item_spacing}")
    rng = random.Random(seed)
    rooms = [i % num_items for i in range(num_docs)]
    rng.shuffle(rooms)
    examples = []
    for n, room in enumerate(rooms):
        words, answer = _document(rng, room, num_items, opening_words, opening_density, min_gap, item_spacing)
        qid = f"{id_prefix}-{n:05d}"
        span = AnswerSpan(words[answer], _char_starts(words)[answer])
        example = QAExample(qid, QUESTION, " ".join(words), [span], [span.text], qid, title=ROOMS[room][0])
        distance = clue_answer_distance(tokenizer, example)
        if distance <= min_gap:  # cannot happen when every word is at least one token
            raise ValueError(f"{qid}: the clue is only {distance} tokens from the first item")
        examples.append(example)
    return examples


def write_long_range_qa(path: str | Path, tokenizer, num_docs: int, **kwargs) -> Path:
    return write_squad_json(path, make_examples(tokenizer, num_docs, **kwargs), version="1.1")
