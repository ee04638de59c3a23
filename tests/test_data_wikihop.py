"""WikiHop: validation, the [q]/[ent] input layout, chunking, global attention, score averaging."""

import json
import math

import pytest
import torch
from data_fixtures import (
    WIKIHOP_RECORDS,
    bert_tokenizer_path,
    make_tiny_roberta_tokenizer,
    make_tokenizer_without_vocabulary,
    make_wikihop_records,
    write_wikihop_json,
)
from transformers import AutoTokenizer

from ds_longformer.data import DataFormatError, DatasetNotFoundError
from ds_longformer.data import wikihop as wikihop_data
from ds_longformer.data.wikihop import (
    WIKIHOP_TOKENS,
    WikiHopChunkDataset,
    add_wikihop_tokens,
    average_chunk_scores,
    build_chunks,
    candidate_logits,
    collate_wikihop,
    format_query,
    load_wikihop,
    load_wikihop_json,
    tokenize_wikihop,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(make_tiny_roberta_tokenizer(tmp_path_factory.mktemp("tok")))
    add_wikihop_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def bert():
    tok = AutoTokenizer.from_pretrained(bert_tokenizer_path())
    add_wikihop_tokens(tok)
    return tok


def ids_of(tok):
    return dict(zip(WIKIHOP_TOKENS, tok.convert_tokens_to_ids(list(WIKIHOP_TOKENS))))


# ---------------------------------------------------------------- reading and validation


def test_load_validates_and_indexes_the_answer(tmp_path):
    examples = load_wikihop_json(write_wikihop_json(tmp_path))
    assert [ex.id for ex in examples] == ["WH_dev_0", "WH_dev_1"]
    assert [ex.label for ex in examples] == [0, 1]
    assert examples[1].candidates[examples[1].label] == "portugal"


def test_query_relation_underscores_become_spaces():
    assert format_query("country_of_citizenship robert boulter") == "country of citizenship robert boulter"
    assert format_query("located_in_the_administrative_territorial_entity lisbon_x") == (
        "located in the administrative territorial entity lisbon_x"
    )


def _record(**changes):
    record = json.loads(json.dumps(WIKIHOP_RECORDS[1]))
    record.update(changes)
    return record


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({k: v for k, v in WIKIHOP_RECORDS[1].items() if k != "supports"}, r"id 'WH_dev_1': missing field 'supports'"),
        ({k: v for k, v in WIKIHOP_RECORDS[1].items() if k != "id"}, r"record #1: missing field 'id'"),
        (_record(answer="lisbon"), r"id 'WH_dev_1': answer 'lisbon' is not among the candidates"),
        (_record(supports=[]), r"id 'WH_dev_1': 'supports' must be a non-empty list"),
        (_record(supports=["Lisbon is big .", "   "]), r"id 'WH_dev_1': empty support document \(supports\[1\]\)"),
        (_record(candidates=[]), r"id 'WH_dev_1': 'candidates' must be a non-empty list"),
    ],
)
def test_malformed_records_name_file_and_record(tmp_path, record, pattern):
    path = write_wikihop_json(tmp_path, [WIKIHOP_RECORDS[0], record])
    with pytest.raises(DataFormatError, match=r"dev\.json: " + pattern):
        load_wikihop_json(path)


def test_broken_json_and_missing_file(tmp_path):
    path = write_wikihop_json(tmp_path)
    path.write_text('[\n{"id": 1,\n')
    with pytest.raises(DataFormatError, match=r"dev\.json: line \d+: invalid JSON"):
        load_wikihop_json(path)
    with pytest.raises(DatasetNotFoundError) as e:
        load_wikihop_json(tmp_path / "train.json")
    assert "train.json" in str(e.value) and "qangaroo" in str(e.value)


def test_empty_file_and_empty_record_list_are_named(tmp_path):
    path = write_wikihop_json(tmp_path, [])
    with pytest.raises(DataFormatError, match=r"dev\.json: no records \(an empty list\)"):
        load_wikihop_json(path)
    path.write_text(" \n")
    with pytest.raises(DataFormatError, match=r"dev\.json: empty file"):
        load_wikihop_json(path)


def test_a_tokenizer_that_yields_no_tokens_is_named_and_nothing_is_cached(tmp_path):
    empty = AutoTokenizer.from_pretrained(make_tokenizer_without_vocabulary(tmp_path))
    add_wikihop_tokens(empty)
    path = write_wikihop_json(tmp_path)
    for cache_dir in (None, tmp_path / "cache"):
        with pytest.raises(DataFormatError, match=r"dev\.json: the tokenizer '.*tokenizer_without_vocabulary' yields "
                                                  r"no tokens for this text \(\d+ characters\)"):
            load_wikihop(path, empty, cache_dir=cache_dir)
    assert not list((tmp_path / "cache").glob("wikihop-*"))


# ---------------------------------------------------------------- tokens and embeddings


def test_add_tokens_is_idempotent_and_never_split(tmp_path):
    """The data layer adds tokens only; the model grows its own embeddings (resize_token_embeddings,
    tested with the model)."""
    tok = AutoTokenizer.from_pretrained(make_tiny_roberta_tokenizer(tmp_path))
    n = len(tok)
    new_ids = add_wikihop_tokens(tok)
    assert new_ids == list(range(n, n + 4)) and add_wikihop_tokens(tok) == new_ids and len(tok) == n + 4
    assert "[ent]" in tok.tokenize("a [ent] b")  # the new tokens are never split


def test_tokenizer_without_the_tokens_is_refused(tmp_path):
    tok = AutoTokenizer.from_pretrained(make_tiny_roberta_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="add_wikihop_tokens"):
        tokenize_wikihop(load_wikihop_json(write_wikihop_json(tmp_path)), tok)


# ---------------------------------------------------------------- input layout and chunking


def test_prefix_layout(tmp_path, tokenizer):
    row = tokenize_wikihop(load_wikihop_json(write_wikihop_json(tmp_path)), tokenizer)[0]
    special = ids_of(tokenizer)
    prefix, positions = row["prefix_ids"], row["candidate_positions"]
    assert prefix[0] == tokenizer.cls_token_id and prefix[1] == special["[q]"] and prefix[-1] == tokenizer.sep_token_id
    q_end = prefix.index(special["[/q]"])
    assert tokenizer.decode(prefix[2:q_end]).strip() == "country of citizenship robert boulter"
    assert positions == [i for i, t in enumerate(prefix) if t == special["[ent]"]] and len(positions) == 3
    assert positions[0] == q_end + 1
    ends = [i for i, t in enumerate(prefix) if t == special["[/ent]"]]
    names = [tokenizer.decode(prefix[p + 1 : e]).strip() for p, e in zip(positions, ends)]
    assert names == ["england", "france", "united states of america"] and ends[-1] == len(prefix) - 2
    supports = tokenizer.decode(row["support_ids"])
    assert supports == (" Robert Boulter is an English film, television and theatre actor."
                        "</s> England is a country that is part of the United Kingdom.")

    features = build_chunks(row, max_len=4096, end_id=tokenizer.sep_token_id)
    assert len(features.chunks) == 1 and features.label == 0
    chunk = features.chunks[0]
    assert chunk["input_ids"] == prefix + row["support_ids"] + [tokenizer.sep_token_id]
    assert chunk["global_attention_mask"] == [1] * len(prefix) + [0] * (len(row["support_ids"]) + 1)


def check_chunks(features, row, max_len, end_id, ent_id):
    prefix, content = row["prefix_ids"], row["support_ids"]
    budget = max_len - len(prefix) - 1
    assert len(features.chunks) == math.ceil(len(content) / budget)
    bodies = []
    for chunk, positions in zip(features.chunks, features.candidate_positions):
        ids, glob = chunk["input_ids"], chunk["global_attention_mask"]
        assert len(ids) <= max_len and len(glob) == len(ids) == sum(chunk["attention_mask"])
        assert ids[: len(prefix)] == prefix and ids[-1] == end_id
        assert glob == [1] * len(prefix) + [0] * (len(ids) - len(prefix))
        assert all(ids[p] == ent_id and glob[p] == 1 for p in positions) and len(positions) == 4
        bodies += ids[len(prefix) : -1]
    assert bodies == content  # every support token once, in order


@pytest.mark.parametrize(
    "which, max_len", [("roberta", 512), ("roberta", 120), ("roberta", 97), ("bert", 512), ("bert", 150)]
)
def test_long_supports_are_chunked_with_the_prefix_repeated(tmp_path, tokenizer, bert, which, max_len):
    tok = tokenizer if which == "roberta" else bert
    records = make_wikihop_records(3, n_candidates=4, n_supports=6, words_per_support=120)
    tokenized = tokenize_wikihop(load_wikihop_json(write_wikihop_json(tmp_path, records)), tok)
    dataset = WikiHopChunkDataset(tokenized, tok, max_len=max_len)
    for index in range(len(dataset)):
        features = dataset[index]
        assert len(features.chunks) > 1
        assert features.label == records[index]["candidates"].index(records[index]["answer"])
        check_chunks(features, tokenized[index], max_len, tok.sep_token_id, ids_of(tok)["[ent]"])


def test_max_chunks_and_a_prefix_too_long(tmp_path, tokenizer):
    row = tokenize_wikihop(load_wikihop_json(write_wikihop_json(tmp_path, make_wikihop_records(1))), tokenizer)[0]
    assert len(build_chunks(row, 100, tokenizer.sep_token_id, max_chunks=2).chunks) == 2
    with pytest.raises(ValueError, match="WH_train_0.*4 candidates.*max_len=20"):
        build_chunks(row, 20, tokenizer.sep_token_id)


def test_dataset_refuses_or_skips_prefixes_that_fill_the_input(tmp_path, tokenizer):
    records = make_wikihop_records(2, n_candidates=3) + make_wikihop_records(1, n_candidates=12, seed=5)
    for i, record in enumerate(records):
        record["id"] = f"WH_{i}"
    tokenized = tokenize_wikihop(load_wikihop_json(write_wikihop_json(tmp_path, records)), tokenizer)
    lengths = [len(p) for p in tokenized["prefix_ids"]]
    max_len = max(lengths[:2]) + 10  # room for the two short prefixes, not for the long one
    assert lengths[2] > max_len - 2
    with pytest.raises(ValueError, match=r"1 WikiHop example\(s\).*max_len=.*id 'WH_2'"):
        WikiHopChunkDataset(tokenized, tokenizer, max_len=max_len)
    kept = WikiHopChunkDataset(tokenized, tokenizer, max_len=max_len, skip_long=True)
    assert (len(kept), kept.skipped) == (2, 1) and [kept[i].id for i in range(2)] == ["WH_0", "WH_1"]
    baseline = WikiHopChunkDataset(tokenized, tokenizer, max_len=max_len, global_prefix=False, skip_long=True)
    assert all(set(chunk["global_attention_mask"]) == {0} for chunk in baseline[0].chunks)
    assert any(set(chunk["global_attention_mask"]) == {0, 1} for chunk in kept[0].chunks)


def test_tokenized_cache_is_reused(tmp_path, tokenizer, monkeypatch):
    path = write_wikihop_json(tmp_path, make_wikihop_records(4))
    first = load_wikihop(path, tokenizer, cache_dir=tmp_path / "cache")
    with monkeypatch.context() as m:  # loaded, not rebuilt: tokenizing again would fail
        m.setattr(wikihop_data, "tokenize_wikihop", lambda *a, **k: pytest.fail("the cache was rebuilt"))
        again = load_wikihop(path, tokenizer, cache_dir=tmp_path / "cache", num_proc=2)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    fresh = tokenize_wikihop(load_wikihop_json(path), tokenizer, num_proc=2)
    assert first.to_list() == again.to_list() == fresh.to_list()


# ---------------------------------------------------------------- batching and score averaging


def test_average_chunk_scores_single_example():
    scores = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -3.0]])
    assert torch.equal(average_chunk_scores(scores), torch.tensor([2.0, 1.0, 0.0]))


def test_candidate_logits_average_each_examples_chunks(tmp_path, tokenizer):
    records = make_wikihop_records(1, n_candidates=4, n_supports=6, words_per_support=80)
    records += make_wikihop_records(1, n_candidates=2, n_supports=1, words_per_support=5, seed=1)
    tokenized = tokenize_wikihop(load_wikihop_json(write_wikihop_json(tmp_path, records)), tokenizer)
    dataset = WikiHopChunkDataset(tokenized, tokenizer, max_len=128)
    features = [dataset[0], dataset[1]]
    n0 = len(features[0].chunks)
    assert n0 > 1 and len(features[1].chunks) == 1

    batch = collate_wikihop(features, tokenizer.pad_token_id, pad_to_multiple_of=32)
    assert batch["input_ids"].shape == (n0 + 1, 128)
    assert batch["chunk_to_example"].tolist() == [0] * n0 + [1]
    assert batch["candidate_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["labels"].tolist() == [features[0].label, features[1].label]
    assert batch["ids"] == ["WH_train_0", "WH_train_0"]
    ent = ids_of(tokenizer)["[ent]"]
    rows = torch.arange(n0 + 1)[:, None]
    assert (batch["input_ids"][rows, batch["candidate_positions"][:, :2]] == ent).all()
    assert (batch["global_attention_mask"][rows, batch["candidate_positions"][:, :2]] == 1).all()

    token_scores = torch.randn(n0 + 1, 128, requires_grad=True)
    logits = candidate_logits(token_scores, batch)
    positions0 = features[0].candidate_positions[0]
    expected0 = torch.stack([token_scores[r, positions0] for r in range(n0)]).mean(0)
    assert torch.allclose(logits[0], expected0)
    assert torch.allclose(logits[1, :2], token_scores[n0, features[1].candidate_positions[0]])
    assert (logits[1, 2:] == torch.finfo(logits.dtype).min).all()
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(token_scores.grad).all()
