"""WikiText-103 loading: every published layout gives the same rows, characters and blocks."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    WIKITEXT_SPLITS,
    bert_tokenizer_path,
    make_tiny_roberta_tokenizer,
    make_tokenizer_without_vocabulary,
    write_wikitext_parquet,
    write_wikitext_raw,
    write_wikitext_txt,
)
from transformers import AutoTokenizer

from ds_longformer.data import DataFormatError, DatasetNotFoundError
from ds_longformer.data import wikitext
from ds_longformer.data.wikitext import bits_per_character, find_wikitext_files, load_wikitext, read_wikitext


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_roberta_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("wikitext")
    return {
        "raw": write_wikitext_raw(root / "raw"),
        "tokens": write_wikitext_raw(root / "tokens", suffix="tokens"),
        "parquet": write_wikitext_parquet(root / "parquet"),
        "txt_files": write_wikitext_txt(root / "txt_files"),
        "txt_folders": write_wikitext_txt(root / "txt_folders", layout="folders"),
    }


def expected_rows(split):
    return [line if line.strip() else "" for line in WIKITEXT_SPLITS[split]]


def test_every_layout_reads_the_same_rows(layouts):
    for name, path in layouts.items():
        files = find_wikitext_files(path)
        assert sorted(files) == ["test", "train", "validation"], name
        for split in files:
            assert read_wikitext(files[split]).column("text").to_pylist() == expected_rows(split), (name, split)
    assert len(find_wikitext_files(layouts["parquet"])["train"]) == 2  # shards read in order


def test_txt_files_without_split_names_are_the_train_split(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    assert find_wikitext_files(tmp_path) == {"train": [tmp_path / "a.txt", tmp_path / "b.txt"]}
    (tmp_path / "dev.txt").write_text("held out\n")
    assert find_wikitext_files(tmp_path) == {"validation": [tmp_path / "dev.txt"]}


def test_every_layout_gives_the_same_blocks_and_counts(layouts, tokenizer):
    results = {name: load_wikitext(path, tokenizer, max_seq_len=16) for name, path in layouts.items()}
    reference = results["raw"]
    for name, result in results.items():
        for split in ("train", "validation", "test"):
            assert result[split].blocks["input_ids"] == reference[split].blocks["input_ids"], (name, split)
            assert result[split].n_chars == reference[split].n_chars
            assert result[split].n_tokens == reference[split].n_tokens
    assert reference["train"].n_chars == sum(len(r) for r in expected_rows("train"))


@pytest.mark.parametrize("max_seq_len", [8, 16, 64, 4096])
def test_blocks_cover_the_tokenized_text_in_order(layouts, tokenizer, max_seq_len):
    split = load_wikitext(layouts["raw"], tokenizer, max_seq_len=max_seq_len, splits=["validation"])["validation"]
    rows = expected_rows("validation")
    expected = [t for row in rows for t in tokenizer(row, add_special_tokens=False)["input_ids"]]
    blocks = split.blocks["input_ids"]
    assert all(b[0] == tokenizer.bos_token_id and b[-1] == tokenizer.eos_token_id for b in blocks)
    assert all(len(b) == max_seq_len for b in blocks[:-1]) and 3 <= len(blocks[-1]) <= max_seq_len
    assert [t for b in blocks for t in b[1:-1]] == expected
    assert split.n_tokens == len(expected)


def test_bert_tokenizer_blocks_use_cls_and_sep(layouts):
    bert = AutoTokenizer.from_pretrained(bert_tokenizer_path())
    split = load_wikitext(layouts["parquet"], bert, max_seq_len=12, splits=["train"])["train"]
    blocks = split.blocks["input_ids"]
    assert all(b[0] == bert.cls_token_id and b[-1] == bert.sep_token_id for b in blocks)
    assert all(len(b) <= 12 for b in blocks)
    assert bert.unk_token_id not in {t for b in blocks for t in b}  # lower-cased WordPiece knows these words


def test_cache_is_written_reused_and_keyed(tmp_path, tokenizer, monkeypatch):
    data = write_wikitext_raw(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_wikitext(data, tokenizer, max_seq_len=16, cache_dir=cache, splits=["train", "valid"])
    assert len(list(cache.glob("wikitext-train-*"))) == 1 and len(list(cache.glob("wikitext-validation-*"))) == 1
    with monkeypatch.context() as m:  # loaded, not rebuilt: tokenizing again would fail
        m.setattr(wikitext, "_tokenize_split", lambda *a, **k: pytest.fail("the cache was rebuilt"))
        again = load_wikitext(data, tokenizer, max_seq_len=16, cache_dir=cache, splits=["train"])
    assert again["train"].blocks["input_ids"] == first["train"].blocks["input_ids"]
    assert again["train"].n_chars == first["train"].n_chars
    assert len(list(cache.glob("wikitext-train-*"))) == 1

    load_wikitext(data, tokenizer, max_seq_len=32, cache_dir=cache, splits=["train"])
    assert len(list(cache.glob("wikitext-train-*"))) == 2  # max_seq_len is part of the key
    (data / "wikitext-103-raw" / "wiki.train.raw").write_text(" new text \n", encoding="utf-8")
    changed = load_wikitext(data, tokenizer, max_seq_len=16, cache_dir=cache, splits=["train"])
    assert changed["train"].n_chars == len(" new text \n")


def test_num_proc_gives_the_same_blocks(layouts, tokenizer):
    one = load_wikitext(layouts["raw"], tokenizer, max_seq_len=16, splits=["train"])["train"]
    two = load_wikitext(layouts["raw"], tokenizer, max_seq_len=16, splits=["train"], num_proc=2)["train"]
    assert one.blocks["input_ids"] == two.blocks["input_ids"]


def test_missing_files_say_what_is_expected_and_where_to_get_it(tmp_path, tokenizer):
    with pytest.raises(DatasetNotFoundError) as e:
        load_wikitext(tmp_path, tokenizer, max_seq_len=16)
    message = str(e.value)
    assert str(tmp_path) in message and "wiki.train.raw" in message and "wikitext-103-raw-v1" in message


def test_missing_split_is_named(tmp_path, tokenizer):
    write_wikitext_raw(tmp_path)
    (tmp_path / "wikitext-103-raw" / "wiki.test.raw").unlink()
    with pytest.raises(DatasetNotFoundError, match="split 'test'"):
        load_wikitext(tmp_path, tokenizer, max_seq_len=16, splits=["train", "test"])


def test_parquet_without_text_column_names_the_file(tmp_path, tokenizer):
    folder = tmp_path / "wikitext-103-raw-v1"
    folder.mkdir()
    pq.write_table(pa.table({"content": ["x"]}), folder / "train-00000-of-00001.parquet")
    with pytest.raises(DataFormatError, match="train-00000-of-00001.parquet.*no 'text' column"):
        load_wikitext(tmp_path, tokenizer, max_seq_len=16, splits=["train"])


def test_non_utf8_file_names_the_file(tmp_path, tokenizer):
    write_wikitext_raw(tmp_path)
    (tmp_path / "wikitext-103-raw" / "wiki.valid.raw").write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(DataFormatError, match="wiki.valid.raw.*not UTF-8"):
        load_wikitext(tmp_path, tokenizer, max_seq_len=16, splits=["validation"])


@pytest.mark.parametrize("text", ["", " \n\n \t\n"], ids=["empty", "blank_lines"])
@pytest.mark.parametrize("name", ["wiki.train.raw", "wiki.valid.raw"])
def test_a_split_without_text_names_its_file_before_tokenizing(tmp_path, tokenizer, monkeypatch, text, name):
    write_wikitext_raw(tmp_path)
    (tmp_path / "wikitext-103-raw" / name).write_text(text)
    monkeypatch.setattr(wikitext, "_Tokenize", None)  # never reached
    with pytest.raises(DataFormatError, match=rf"{name}: no text \(empty, or only blank lines\)"):
        load_wikitext(tmp_path, tokenizer, max_seq_len=16, cache_dir=tmp_path / "cache",
                      splits=["train", "validation"] if name == "wiki.valid.raw" else ["train"])


def test_parquet_shards_without_text_are_all_named(tmp_path, tokenizer):
    write_wikitext_parquet(tmp_path, splits={**WIKITEXT_SPLITS, "train": [" \n", "", "\t\n"]}, train_shards=2)
    with pytest.raises(DataFormatError, match=r"train-00000-of-00002.parquet, \S*train-00001-of-00002.parquet: no text"):
        load_wikitext(tmp_path, tokenizer, max_seq_len=16, splits=["train"])


def test_a_tokenizer_that_yields_no_tokens_is_named_and_nothing_is_cached(tmp_path):
    empty = AutoTokenizer.from_pretrained(make_tokenizer_without_vocabulary(tmp_path))
    write_wikitext_raw(tmp_path)
    with pytest.raises(DataFormatError, match=r"wiki.train.raw: the tokenizer '.*tokenizer_without_vocabulary' "
                                              r"yields no tokens for this text \(\d+ characters\)"):
        load_wikitext(tmp_path, empty, max_seq_len=16, cache_dir=tmp_path / "cache", splits=["train"])
    assert not list((tmp_path / "cache").glob("wikitext-*"))  # a later run does not load an empty cache


def test_bits_per_character():
    # 1000 tokens over 4000 characters at ln(2) nats per token: 1000 bits in all -> 0.25 BPC.
    assert bits_per_character(math.log(2), n_tokens=1000, n_chars=4000) == pytest.approx(0.25)
    # A uniform guess over V tokens costs log2(V) bits per token.
    assert bits_per_character(math.log(50265), 300, 1200) == pytest.approx(math.log2(50265) * 300 / 1200)
    with pytest.raises(ValueError):
        bits_per_character(1.0, 10, 0)
