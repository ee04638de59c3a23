"""The synthetic long-range QA documents: the clue lies more than 512 tokens before every item, the
answer is the item of the opening's room, nothing in the items' windows tells which one it is,
and the file goes through the real SQuAD loader and the window builder."""

import collections

import pytest
from qa_fixtures import make_word_tokenizer
from transformers import AutoTokenizer

from ds_longformer.data.qa_features import QAWindowDataset, tokenize_qa
from ds_longformer.data.squad import load_squad
from ds_longformer.synthetic_qa import (
    FILLER,
    QUESTION,
    ROOMS,
    clue_answer_distance,
    make_examples,
    vocabulary,
    write_long_range_qa,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_word_tokenizer(tmp_path_factory.mktemp("tok"), vocabulary(6)))


def test_every_word_is_one_token_of_the_word_tokenizer(tokenizer):
    assert all(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in vocabulary(6))


def test_documents_put_the_clue_out_of_reach_of_any_512_token_window(tmp_path, tokenizer):
    path = write_long_range_qa(tmp_path / "train.json", tokenizer, 40, seed=3)
    examples = load_squad(path)  # the real loader checks every answer at its answer_start
    assert len(examples) == 40 and len({ex.id for ex in examples}) == 40
    items = {item: room for room, item in ROOMS[:4]}
    for ex in examples:
        words = ex.context.split(" ")
        (answer,) = ex.answers
        assert ex.question == QUESTION and ex.gold_answers == [answer.text]
        assert items[answer.text] == ex.title  # the item of the opening's room
        assert words[:128].count(ex.title) == 128  # the opening: the room, 128 times
        assert answer.text not in words[:128]  # ... never the answer itself
        assert sorted(w for w in words if w in items) == sorted(items)  # every item once
        assert set(words) <= set(FILLER) | {ex.title} | set(items)
        assert clue_answer_distance(tokenizer, ex) > 520
        assert len(tokenizer(ex.question, ex.context)["input_ids"]) <= 1024
    # rooms are balanced, and the answer's place in the list is spread over all of them
    assert collections.Counter(ex.title for ex in examples) == {room: 10 for room, _ in ROOMS[:4]}
    places = collections.Counter(
        [w for w in ex.context.split(" ") if w in items].index(ex.answers[0].text) for ex in examples)
    assert set(places) == {0, 1, 2, 3}


def test_no_baseline_window_holds_the_clue_and_an_item(tokenizer):
    examples = make_examples(tokenizer, 12, seed=1)
    dataset = QAWindowDataset(tokenize_qa(examples, tokenizer), tokenizer, max_seq_len=512, doc_stride=128,
                              global_question=False)
    assert len(dataset) > len(examples)  # the baseline needs several windows per document
    rooms = {room for room, _ in ROOMS}
    items = {item for _, item in ROOMS}
    holds_answer = collections.Counter()
    for index, window in enumerate(dataset.windows):
        starts, ends = dataset.context_offsets(index)
        text = examples[window.example].context[starts[0] : ends[-1]]
        words = set(text.split(" "))
        assert not (words & rooms and words & items), (examples[window.example].id, index)
        holds_answer[window.example] += dataset[index]["start_positions"] != [0]
    assert all(holds_answer[e] >= 1 for e in range(len(examples)))
    # The Longformer reads each document in one window.
    long = QAWindowDataset(tokenize_qa(examples, tokenizer), tokenizer, max_seq_len=1024)
    assert len(long) == len(examples)


def test_reproducible_and_checked(tokenizer):
    first = make_examples(tokenizer, 5, seed=7)
    assert first == make_examples(tokenizer, 5, seed=7) != make_examples(tokenizer, 5, seed=8)
    three = make_examples(tokenizer, 6, num_items=3, opening_words=32, opening_density=0.5, seed=0)
    assert {ex.answers[0].text for ex in three} <= {item for _, item in ROOMS[:3]}
    with pytest.raises(ValueError, match="num_items"):
        make_examples(tokenizer, 2, num_items=7)
