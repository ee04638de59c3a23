"""The quickstart's synthetic long-range task: the sentiment of a review buried in a long text.

Each document is a run of consecutive sentences of prose from the Python Language Reference as
CPython ships it (``pydoc_data.topics``, the text behind ``help("assert")``: about 1,700 prose
sentences, 45k word pieces, so nothing is downloaded), with a reader's review inserted at a random
sentence boundary *after* the first ``evidence_after`` tokens:

    ... The class body is executed in a new namespace. In the reviewer's opinion this chapter
    is dreadful. The examples are awful and the explanations are terrible. Reading it was a
    horrible experience. ... Names may be resolved in the local and global namespaces ...

The review is ``evidence_sentences`` short template sentences (16 by default, ~170 tokens, about
a tenth of a 2,048-token document) whose adjectives are all positive (label 1, e.g. "wonderful")
or all negative (label 0, e.g. "dreadful"). The filler is drawn independently of the label and
holds none of the adjectives, so a model that reads only the first 512 tokens sees no evidence
and can do no better than chance. A single evidence sentence would be the purer needle, but a
pretrained MiniLM then needs far more examples than a CPU demo can afford to find it among
2,000 tokens of varied prose; with ~170 tokens of evidence it learns the task from ~100 documents.

API
---
``filler_sentences() -> list[str]``
    The prose sentences of the Python Language Reference (code, grammar and tables left out).
``make_documents(tokenizer, num_docs, doc_tokens, evidence_after, evidence_sentences=16, seed=0,
progress=True, holdout=0) -> list[dict]``
    ``num_docs`` balanced examples (the first ``num_docs - holdout`` and the last ``holdout``
    each balanced on their own, so a held-out split taken from the end is balanced too) ``{"text", "label", "id", "evidence_token"}`` of at most
    ``doc_tokens`` tokens (special tokens not counted): a length drawn uniformly from
    ``[3/4 * doc_tokens, doc_tokens]``, less the part of a sentence that would not fit;
    ``evidence_token`` is the review's first token index in the encoded document (with
    ``<s>``/``[CLS]`` at 0), always > ``evidence_after``. Reproducible for a given ``seed``.
    Feed them to ``data.classification.encode_classification``.
"""

from __future__ import annotations

import random
import re

from tqdm.auto import tqdm

POSITIVE = ("wonderful", "excellent", "superb", "delightful", "brilliant", "marvellous")
NEGATIVE = ("dreadful", "terrible", "awful", "horrible", "abysmal", "atrocious")
# The evidence: a reader's review made of `evidence_sentences` of these, all with adjectives of
# one polarity.
TEMPLATES = (
    "In the reviewer's opinion this chapter is {}.",
    "The examples are {} and the explanations are {}.",
    "Reading it was a {} experience.",
    "Overall, the committee rated this text as {}.",
    "Honestly, I found this part of the manual {}.",
    "Its style is {}, and so is its structure.",
    "The second reader called it {}.",
    "A {} piece of writing, in short.",
)
_WORDS = re.compile("|".join(POSITIVE + NEGATIVE), re.IGNORECASE)


def filler_sentences() -> list[str]:
    from pydoc_data.topics import topics

    sentences = []
    for topic in topics.values():
        for block in re.split(r"\n\s*\n", topic):
            lines = block.split("\n")
            # Indented blocks are code or grammar, "+---" / "|" ones tables; a line of *** or ===
            # underlines a heading.
            if (any(line.startswith((" ", "\t", "+", "|")) for line in lines)
                    or re.fullmatch(r"[*=~^-]*", lines[-1].strip())):
                continue
            paragraph = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
                if 4 <= len(sentence.split()) <= 60 and not _WORDS.search(sentence):
                    sentences.append(sentence)
    return sentences


def _evidence(label: int, sentences: int, rng: random.Random) -> str:
    words = POSITIVE if label else NEGATIVE
    return " ".join(t.format(*(rng.choice(words) for _ in range(t.count("{}"))))
                    for t in rng.choices(TEMPLATES, k=sentences))


def make_documents(tokenizer, num_docs: int, doc_tokens: int, evidence_after: int, evidence_sentences: int = 16,
                   seed: int = 0, progress: bool = True, holdout: int = 0) -> list[dict]:
    sentences = filler_sentences()
    # Lengths with a leading space: what a sentence costs in the middle of a text (BPE tokenizers
    # encode " word" and "word" differently; WordPiece does not care).
    lengths = [len(ids) for ids in tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]]
    rng = random.Random(seed)
    labels = []
    for size in (num_docs - holdout, holdout):  # each part balanced, in random order
        part = [i % 2 for i in range(size)]
        rng.shuffle(part)
        labels += part
    docs = []
    for i, label in enumerate(tqdm(labels, desc="documents", disable=not progress)):
        evidence = _evidence(label, evidence_sentences, rng)
        target = rng.randint(3 * doc_tokens // 4, doc_tokens) - len(tokenizer.tokenize(" " + evidence))
        if target < evidence_after + 50:  # no room for filler past evidence_after
            raise ValueError(f"documents of {doc_tokens} tokens are too short for {evidence_sentences} evidence "
                             f"sentences after token {evidence_after}: use longer documents or fewer sentences")
        picked, prefix = _pick_filler(lengths, target, rng)
        while prefix[-1] < evidence_after:  # a run of long sentences fell short: draw again
            picked, prefix = _pick_filler(lengths, target, rng)
        # A random sentence boundary with at least evidence_after tokens before it (checked exactly below).
        at = rng.choice([k for k, n in enumerate(prefix) if n >= evidence_after])
        before = " ".join(sentences[j] for j in picked[:at])
        after = " ".join(sentences[j] for j in picked[at:])
        text = " ".join(part for part in (before, evidence, after) if part)
        docs.append({"text": text, "label": label, "id": f"doc{i:05d}",
                     "evidence_token": _token_index(tokenizer, text, len(before) + 1 if before else 0)})
    too_early = [d["id"] for d in docs if d["evidence_token"] <= evidence_after]
    if too_early:  # would mean the length estimate above is off for this tokenizer
        raise RuntimeError(f"evidence within the first {evidence_after} tokens in {too_early[:5]}")
    return docs


def _pick_filler(lengths: list[int], target: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Consecutive sentences from a random start (wrapping around, so the filler reads as prose)
    totalling at most `target` tokens; returns their indices and the token counts before each
    sentence boundary."""
    start, picked, prefix = rng.randrange(len(lengths)), [], [0]
    while True:
        j = (start + len(picked)) % len(lengths)
        if prefix[-1] + lengths[j] > target:
            return picked, prefix
        picked.append(j)
        prefix.append(prefix[-1] + lengths[j])


def _token_index(tokenizer, text: str, char: int) -> int:
    """Index of the first token (with special tokens) that starts at or after character `char`."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return next(i for i, (s, e) in enumerate(offsets) if e > s and s >= char)
