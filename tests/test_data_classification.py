"""IMDB and Hyperpartisan loaders, text cleaning, classification encoding and the padding collator."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_fixtures import (
    HYPERPARTISAN_ARTICLES,
    IMDB_DOCS,
    bert_tokenizer_path,
    make_tiny_roberta_tokenizer,
    write_hyperpartisan_jsonl,
    write_hyperpartisan_xml,
    write_imdb_folders,
    write_imdb_parquet,
)
from transformers import AutoTokenizer

from ds_longformer.data import DataFormatError, DatasetNotFoundError
from ds_longformer.data.classification import encode_classification
from ds_longformer.data.collate import PaddingCollator
from ds_longformer.data.hyperpartisan import clean_text, load_hyperpartisan
from ds_longformer.data.imdb import load_imdb


def content(examples):
    return sorted((ex["text"], ex["label"]) for ex in examples)


# ---------------------------------------------------------------- IMDB


def test_imdb_folders_and_parquet_agree(tmp_path):
    folders = load_imdb(write_imdb_folders(tmp_path / "f"), dev_fraction=0.2)
    parquet = load_imdb(write_imdb_parquet(tmp_path / "p"), dev_fraction=0.2)
    for split in ("train", "dev", "test"):
        assert content(folders[split]) == content(parquet[split]), split
    assert len(folders["dev"]) == 2 and len(folders["train"]) == 8 and len(folders["test"]) == 4
    assert content(folders["train"] + folders["dev"]) == content(d for d in IMDB_DOCS if d["split"] == "train")
    assert "An unlabelled review." not in {ex["text"] for s in folders.values() for ex in s}
    assert all(isinstance(ex["label"], int) and ex["label"] in (0, 1) for ex in folders["train"])
    assert {ex["id"] for ex in folders["test"]} == {"test/pos/10_9", "test/neg/11_2", "test/pos/12_9", "test/neg/13_2"}


def test_imdb_folder_may_be_the_aclimdb_folder_itself(tmp_path):
    write_imdb_folders(tmp_path)
    assert content(load_imdb(tmp_path / "aclImdb")["test"]) == content(load_imdb(tmp_path)["test"])


def test_imdb_dev_holdout_is_deterministic(tmp_path):
    a = load_imdb(write_imdb_folders(tmp_path), dev_fraction=0.3)
    b = load_imdb(tmp_path, dev_fraction=0.3)
    assert [ex["id"] for ex in a["dev"]] == [ex["id"] for ex in b["dev"]] and len(a["dev"]) == 3


def test_imdb_published_validation_split_is_used(tmp_path):
    folder = write_imdb_parquet(tmp_path) / "plain_text"
    pq.write_table(pa.table({"text": ["Fine."], "label": [1]}), folder / "validation-00000-of-00001.parquet")
    data = load_imdb(tmp_path)
    assert content(data["dev"]) == [("Fine.", 1)] and len(data["train"]) == 10


def test_imdb_errors_name_file_and_record(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_imdb(tmp_path)
    assert "aclImdb" in str(e.value) and "ai.stanford.edu" in str(e.value)

    folder = write_imdb_parquet(tmp_path / "bad_label") / "plain_text"
    pq.write_table(pa.table({"text": ["ok", "odd"], "label": [1, 2]}), folder / "test-00000-of-00001.parquet")
    with pytest.raises(DataFormatError, match=r"test-00000-of-00001.parquet: row 1: unknown label 2"):
        load_imdb(tmp_path / "bad_label")

    folder = write_imdb_parquet(tmp_path / "no_label") / "plain_text"
    pq.write_table(pa.table({"text": ["ok"]}), folder / "train-00000-of-00001.parquet")
    with pytest.raises(DataFormatError, match=r"train-00000-of-00001.parquet: missing column\(s\) \['label'\]"):
        load_imdb(tmp_path / "no_label")

    root = write_imdb_folders(tmp_path / "empty")
    (root / "aclImdb" / "test" / "neg" / "11_2.txt").write_text("  \n")
    with pytest.raises(DataFormatError, match=r"11_2.txt: empty review"):
        load_imdb(root)


@pytest.mark.parametrize("folder", ["train/pos", "test/neg"])
def test_imdb_class_folder_without_reviews_is_named(tmp_path, folder):
    root = write_imdb_folders(tmp_path)
    for review in (root / "aclImdb" / folder).glob("*.txt"):
        review.unlink()
    with pytest.raises(DataFormatError, match=rf"aclImdb/{folder}: no reviews \(\*\.txt\) of class '{folder[-3:]}'"):
        load_imdb(root)


def test_imdb_parquet_training_split_needs_both_classes(tmp_path):
    folder = write_imdb_parquet(tmp_path) / "plain_text"
    pq.write_table(pa.table({"text": ["Great.", "Superb."], "label": [1, 1]}), folder / "train-00000-of-00001.parquet")
    with pytest.raises(DataFormatError, match=r"train-00000-of-00001.parquet: no example of class 0 \('neg'\)"):
        load_imdb(tmp_path)


def test_imdb_empty_splits_are_named(tmp_path):
    folder = write_imdb_parquet(tmp_path) / "plain_text"
    test_file = folder / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), test_file)
    with pytest.raises(DataFormatError, match=r"test-00000-of-00001.parquet: no examples"):
        load_imdb(tmp_path)
    write_imdb_parquet(tmp_path)
    with pytest.raises(DataFormatError, match=r"train-00000-of-00001.parquet: no dev examples \(holding out 0.01 "
                                              r"of 10 training reviews leaves none\)"):
        load_imdb(tmp_path, dev_fraction=0.01)


# ---------------------------------------------------------------- Hyperpartisan


def test_clean_text_follows_longformer():
    assert clean_text("Hello&nbsp;world &amp; co\n\nnext   line") == "Hello world & co next line"
    assert clean_text("see https://x.org?b=1 and www.y.com now") == "see and now"
    # Longformer's order: "word/word" goes first, so a URL path can leave its query behind.
    assert clean_text("see https://x.org/a?b=1 now") == "see ?b=1 now"
    assert clean_text("What?!?! No way...") == "What! No way."  # the last mark of a run stays
    assert clean_text("&lt;b&gt;bold&lt;/b&gt; text") == "bold text"
    assert clean_text("He said 5 &lt; 6 and 7 &gt; 3 today") == "He said 5 < 6 and 7 > 3 today"
    assert clean_text("sooooo good") == "so good"
    assert clean_text(clean_text("A and/or B!!! Visit www.z.com")) == clean_text("A and/or B!!! Visit www.z.com")


def test_hyperpartisan_xml_reads_body_labels_and_splits(tmp_path):
    """The article's text without its title, as Longformer's hp_preprocess.py took it."""
    data = load_hyperpartisan(write_hyperpartisan_xml(tmp_path))
    assert [len(data[s]) for s in ("train", "dev", "test")] == [3, 1, 2]
    first = data["train"][0]
    assert first["id"] == "0" and first["label"] == 1
    assert first["text"] == (
        "Money rules the world. read more The Fed & the banks have taken over!"
    )
    assert data["train"][2]["text"] == "Wake up, people! Nobody believes them anymore Share this."
    assert data["test"][1]["text"].endswith("on weekdays. Entry is free.")
    assert [ex["label"] for ex in data["test"]] == [1, 0]


def test_hyperpartisan_xml_and_jsonl_agree(tmp_path):
    from_xml = load_hyperpartisan(write_hyperpartisan_xml(tmp_path / "xml"))
    from_jsonl = load_hyperpartisan(write_hyperpartisan_jsonl(tmp_path / "jsonl", from_xml))
    assert from_jsonl == from_xml


def test_hyperpartisan_jsonl_accepts_longformer_output(tmp_path):
    splits = {
        "train": [{"text": "Some text", "label": "true", "id": 7}, {"text": "More", "label": False, "id": 6}],
        "dev": [{"text": "Other text", "label": "False", "id": 8}],
        "test": [{"text": "Third", "label": "false", "id": "0000009"}],
    }
    data = load_hyperpartisan(write_hyperpartisan_jsonl(tmp_path, splits))
    assert data["train"] == [{"text": "Some text", "label": 1, "id": "7"}, {"text": "More", "label": 0, "id": "6"}]
    assert data["dev"][0]["label"] == 0 and data["test"][0]["id"] == "9"


def _articles(**changes):
    articles = [dict(a) for a in HYPERPARTISAN_ARTICLES]
    for index, fields in changes.items():
        articles[int(index[1:])].update(fields)
    return articles


@pytest.mark.parametrize(
    "articles, splits, pattern",
    [
        (_articles(a2={"hyperpartisan": "maybe"}), None,
         r"ground-truth-training-byarticle-20181122.xml: id '2': unknown label 'maybe'"),
        (_articles(a3={"title": "", "body": "<p> </p>"}), None,
         r"articles-training-byarticle-20181122.xml: id '3': empty article"),
        (_articles(), {"train": [0, 1, 2], "dev": [3, 99], "test": [4, 5]},
         r"hp-splits.json: split 'dev': ids not among the articles: 99"),
        (_articles(), {"train": [0, 1, 2], "dev": [3], "test": [3, 4]},
         r"hp-splits.json: split 'test': id '3' already listed in split 'dev'"),
        (_articles(), {"train": [0, 1, 2], "test": [4, 5]}, r"hp-splits.json: split 'dev': missing"),
    ],
)
def test_hyperpartisan_xml_errors_name_file_and_record(tmp_path, articles, splits, pattern):
    write_hyperpartisan_xml(tmp_path, articles, splits)
    with pytest.raises(DataFormatError, match=pattern):
        load_hyperpartisan(tmp_path)


def test_hyperpartisan_label_file_must_match_articles(tmp_path):
    write_hyperpartisan_xml(tmp_path / "labels", HYPERPARTISAN_ARTICLES[:5])
    write_hyperpartisan_xml(tmp_path / "articles", HYPERPARTISAN_ARTICLES)
    labels = "ground-truth-training-byarticle-20181122.xml"
    (tmp_path / "articles" / labels).write_bytes((tmp_path / "labels" / labels).read_bytes())
    with pytest.raises(DataFormatError, match=rf"{labels}: ids do not match .*articles without a label: 5"):
        load_hyperpartisan(tmp_path / "articles")


def test_hyperpartisan_article_without_id_and_broken_xml(tmp_path):
    write_hyperpartisan_xml(tmp_path)
    path = tmp_path / "articles-training-byarticle-20181122.xml"
    path.write_text(path.read_text().replace('<article id="0000002" ', "<article "))
    with pytest.raises(DataFormatError, match=r"byarticle-20181122.xml: article #3: missing attribute 'id'"):
        load_hyperpartisan(tmp_path)
    path.write_text("<articles><article id='1'>unclosed</articles>")
    with pytest.raises(DataFormatError, match=r"articles-training-byarticle-20181122.xml: line 1: invalid XML"):
        load_hyperpartisan(tmp_path)


def test_hyperpartisan_jsonl_errors_name_file_and_line(tmp_path):
    good = [{"text": "t", "label": "true", "id": 1}]
    write_hyperpartisan_jsonl(tmp_path, {"train": good, "dev": good, "test": good})
    bad = {"text": "x", "label": "yes", "id": 2}
    (tmp_path / "dev.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match=r"dev.jsonl: line 2: unknown label 'yes'"):
        load_hyperpartisan(tmp_path)
    (tmp_path / "dev.jsonl").write_text('{"text": "x", "id": 2}\n')
    with pytest.raises(DataFormatError, match=r"dev.jsonl: line 1: missing field 'label'"):
        load_hyperpartisan(tmp_path)
    (tmp_path / "dev.jsonl").write_text('{"text": "x", "label": "true", "id": 2}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"dev.jsonl: line 2: invalid JSON"):
        load_hyperpartisan(tmp_path)
    (tmp_path / "dev.jsonl").write_text('{"text": "  ", "label": "true", "id": 2}\n')
    with pytest.raises(DataFormatError, match=r"dev.jsonl: line 1: empty text"):
        load_hyperpartisan(tmp_path)


@pytest.mark.parametrize("splits, pattern", [
    ({"train": [0, 2], "dev": [3], "test": [4, 5]}, r"split 'train': no example of class 0 \('false'\)"),
    ({"train": [0, 1, 2], "dev": [3], "test": []}, r"split 'test': no examples"),
])
def test_hyperpartisan_xml_splits_without_examples_or_a_training_class(tmp_path, splits, pattern):
    write_hyperpartisan_xml(tmp_path, splits=splits)
    with pytest.raises(DataFormatError, match=r"hp-splits.json: " + pattern):
        load_hyperpartisan(tmp_path)


def test_hyperpartisan_jsonl_splits_without_examples_or_a_training_class(tmp_path):
    both = [{"text": "t", "label": "true", "id": 1}, {"text": "u", "label": "false", "id": 2}]
    write_hyperpartisan_jsonl(tmp_path, {"train": both, "dev": both[:1], "test": both[1:]})
    data = load_hyperpartisan(tmp_path)  # one class in dev or test is allowed (small evaluation sets)
    assert [ex["label"] for ex in data["dev"] + data["test"]] == [1, 0]
    (tmp_path / "dev.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match=r"dev.jsonl: no examples"):
        load_hyperpartisan(tmp_path)
    write_hyperpartisan_jsonl(tmp_path, {"train": both[:1], "dev": both, "test": both})
    with pytest.raises(DataFormatError, match=r"train.jsonl: no example of class 0 \('false'\)"):
        load_hyperpartisan(tmp_path)


def test_hyperpartisan_missing_files_say_which_and_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_hyperpartisan(tmp_path)
    assert "articles-training-byarticle-20181122.xml" in str(e.value) and "zenodo.org/record/1489920" in str(e.value)
    write_hyperpartisan_xml(tmp_path)
    (tmp_path / "hp-splits.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing hp-splits.json"):
        load_hyperpartisan(tmp_path)


# ---------------------------------------------------------------- encoding and padding


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_roberta_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("which", ["roberta", "bert"])
def test_encode_classification_truncates_and_marks_global_start(tmp_path, tokenizer, which):
    tok = tokenizer if which == "roberta" else AutoTokenizer.from_pretrained(bert_tokenizer_path())
    examples = [{"text": "word " * 600, "label": 1, "id": "long"}, {"text": "short text", "label": 0, "id": "short"}]
    encoded = encode_classification(examples, tok, max_seq_len=512)
    long, short = encoded[0], encoded[1]
    assert len(long["input_ids"]) == 512 and long["input_ids"][0] == tok.cls_token_id
    assert long["input_ids"][-1] == tok.sep_token_id
    assert long["global_attention_mask"] == [1] + [0] * 511 and sum(long["attention_mask"]) == 512
    assert short["labels"] == 0 and short["id"] == "short" and len(short["input_ids"]) < 10
    baseline = encode_classification(examples, tok, max_seq_len=512, global_first=False)  # no global rows
    assert baseline[0]["global_attention_mask"] == [0] * 512 and baseline[0]["input_ids"] == long["input_ids"]

    batch = PaddingCollator(tok.pad_token_id, pad_to_multiple_of=64)([short, long])
    assert batch["input_ids"].shape == (2, 512) and batch["labels"].tolist() == [0, 1]
    assert batch["id"] == ["short", "long"]


def test_padding_collator_rounds_up_and_pads_each_field():
    features = [
        {"input_ids": [0, 5, 6, 2], "global_attention_mask": [1, 0, 0, 0], "labels": [-100, 5, -100, -100], "id": "a"},
        {"input_ids": torch.tensor([0, 7, 2]), "global_attention_mask": [1, 0, 0], "labels": [-100, 7, -100],
         "id": "b"},
    ]
    batch = PaddingCollator(pad_token_id=1, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 2, 1, 1, 1, 1], [0, 7, 2, 1, 1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5]
    assert batch["global_attention_mask"][1].tolist() == [1] + [0] * 7
    assert batch["labels"][1].tolist() == [-100, 7] + [-100] * 6
    assert batch["id"] == ["a", "b"]
    assert PaddingCollator(1)(features)["input_ids"].shape == (2, 4)


def test_hyperpartisan_title_stands_in_for_an_empty_body(tmp_path):
    write_hyperpartisan_xml(tmp_path, _articles(a3={"body": "<p> </p>"}))
    texts = {ex["id"]: ex["text"] for split in load_hyperpartisan(tmp_path).values() for ex in split}
    assert texts["3"] == HYPERPARTISAN_ARTICLES[3]["title"]


def test_unreadable_files_name_the_file(tmp_path):
    folder = write_imdb_parquet(tmp_path / "truncated") / "plain_text"
    (folder / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataFormatError, match=r"test-00000-of-00001.parquet: cannot read parquet"):
        load_imdb(tmp_path / "truncated")
    good = [{"text": "t", "label": "true", "id": 1}]
    write_hyperpartisan_jsonl(tmp_path / "latin1", {"train": good, "dev": good, "test": good})
    (tmp_path / "latin1" / "dev.jsonl").write_bytes('{"text": "caf\u00e9", "label": "true", "id": 2}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"dev.jsonl: not UTF-8 text"):
        load_hyperpartisan(tmp_path / "latin1")
