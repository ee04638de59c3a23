"""Extractive QA data: SQuAD JSON / parquet and TriviaQA loaders, windows and span labels for
RoBERTa- and BERT-style tokenizers, exact span mapping on unicode text, answer extraction."""

import json
import random

import pytest
import torch
from data_fixtures import bert_tokenizer_path, make_tiny_roberta_tokenizer
from qa_fixtures import (
    BEYONCE,
    NILE,
    SQUAD_V1,
    SQUAD_V2,
    TRIVIAQA_RECORDS,
    WEB_PAGE,
    WEBBER,
    ZURICH,
    write_squad_json,
    write_squad_parquet,
    write_triviaqa,
)
from transformers import AutoTokenizer

from ds_longformer.data import DataFormatError, DatasetNotFoundError
from ds_longformer.data.qa_features import (
    IGNORE_INDEX,
    AnswerSpan,
    QAExample,
    QAWindowDataset,
    QuestionTooLongError,
    SpanCandidate,
    WindowScores,
    collate_qa,
    load_tokenized_qa,
    pair_template,
    prediction_texts,
    score_batch,
    score_window,
    select_answers,
    tokenize_qa,
)
from ds_longformer.data.squad import load_squad, load_squad_json, write_squad_json as write_examples
from ds_longformer.data.triviaqa import find_answer_spans, load_triviaqa


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_roberta_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def bert():
    return AutoTokenizer.from_pretrained(bert_tokenizer_path())


@pytest.fixture(params=["roberta", "bert"])
def tokenizer(request, roberta, bert):
    return {"roberta": roberta, "bert": bert}[request.param]


def example(context: str, answer: str, qid: str = "q", question: str = "Where is it?", occurrence: int = 0) -> QAExample:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return QAExample(qid, question, context, [AnswerSpan(answer, start)], [answer], qid)


def oracle_logits(batch: dict, high: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that put all the mass on the labelled start/end of each row."""
    start = torch.full(batch["input_ids"].shape, -10.0)
    end = start.clone()
    for row in range(len(start)):
        start[row, batch["start_positions"][row, 0]] = high
        end[row, batch["end_positions"][row, 0]] = high
    return start, end


def predict_with_oracle(examples, tokenizer, max_seq_len=512, doc_stride=16, **kw):
    dataset = QAWindowDataset(tokenize_qa(examples, tokenizer), tokenizer, max_seq_len, doc_stride, **kw)
    batch = collate_qa([dataset[i] for i in range(len(dataset))], tokenizer.pad_token_id)
    start, end = oracle_logits(batch)
    return dataset, batch, select_answers(examples, score_batch(dataset, batch, start, end))


# ---------------------------------------------------------------- SQuAD


def test_squad_v1_json_examples_and_offsets(tmp_path):
    examples = load_squad(write_squad_json(tmp_path, SQUAD_V1))
    assert [ex.id for ex in examples] == ["56be85543aeaaa14008c9063", "56be85543aeaaa14008c9065", "zurich-1",
                                          "zurich-2", "zurich-3"]
    houston = examples[1]
    assert houston.question_id == houston.id and houston.title == "Beyoncé" and not houston.is_impossible
    assert houston.gold_answers == ["Houston, Texas", "Houston"]
    assert [(a.text, a.start) for a in houston.answers] == [("Houston, Texas", BEYONCE.index("Houston")),
                                                            ("Houston", BEYONCE.index("Houston"))]
    # unicode before the answer: character offsets, not UTF-8 byte offsets
    church = examples[2].answers[0]
    assert ZURICH[church.start : church.end] == "Großmünster"
    assert len(ZURICH[: church.start].encode("utf-8")) != church.start


def test_squad_v2_unanswerable_and_plausible_answers(tmp_path):
    examples = load_squad_json(write_squad_json(tmp_path, SQUAD_V2, "dev-v2.0.json"))
    answerable, impossible = examples
    assert not answerable.is_impossible and [a.text for a in answerable.answers] == ["France", "France"]
    assert impossible.is_impossible and impossible.answers == [] and impossible.gold_answers == []


@pytest.mark.parametrize("document", [SQUAD_V1, SQUAD_V2], ids=["v1.1", "v2.0"])
def test_squad_parquet_layout_gives_the_same_examples_as_the_json(tmp_path, document):
    from_json = load_squad(write_squad_json(tmp_path / "json", document))
    data_dir = write_squad_parquet(tmp_path / "parquet", document, split="validation")
    write_squad_parquet(tmp_path / "parquet", {"data": []}, split="train")
    from_parquet = load_squad(data_dir, split="dev")
    assert from_parquet == from_json
    assert load_squad(data_dir / "plain_text" / "validation-00000-of-00001.parquet") == from_json


def test_squad_written_back_reads_the_same(tmp_path):
    examples = load_squad(write_squad_json(tmp_path, SQUAD_V2, "dev-v2.0.json"))
    assert load_squad(write_examples(tmp_path / "again.json", examples, version="2.0")) == examples


def _edited(document, change):
    document = json.loads(json.dumps(document))
    change(document["data"][0]["paragraphs"][0]["qas"])
    return document


@pytest.mark.parametrize("change, pattern", [
    (lambda qas: qas[0]["answers"][0].update(answer_start=BEYONCE.index("September") + 1),
     r"question id '56be85543aeaaa14008c9063': answers\[0\] 'September 4, 1981' does not occur at answer_start "
     r"\d+ \(the context holds 'eptember 4, 1981\)'\)"),
    (lambda qas: qas[1]["answers"][1].update(answer_start=10_000),
     r"question id '56be85543aeaaa14008c9065': answers\[1\] 'Houston' does not occur at answer_start 10000 "
     r"\(the context is past the end"),
    (lambda qas: qas[0].update(answers=[]), r"question id '56be85543aeaaa14008c9063': no answers"),
    (lambda qas: qas[1].update(id=qas[0]["id"]), r"question id '56be85543aeaaa14008c9063': duplicate question id"),
    (lambda qas: qas[0].update(question=" "), r"question id '56be85543aeaaa14008c9063': missing or empty question"),
    (lambda qas: qas[0].update(is_impossible=True),
     r"question id '56be85543aeaaa14008c9063': is_impossible is true but the question has answers"),
], ids=["wrong-start", "past-the-end", "no-answers", "duplicate-id", "empty-question", "impossible-with-answer"])
def test_squad_errors_name_the_file_and_the_question(tmp_path, change, pattern):
    path = write_squad_json(tmp_path, _edited(SQUAD_V1, change))
    with pytest.raises(DataFormatError, match=r"dev-v1\.1\.json: " + pattern):
        load_squad(path)


def test_squad_parquet_answer_not_at_answer_start_names_the_file_and_question(tmp_path):
    document = _edited(SQUAD_V1, lambda qas: qas[1]["answers"][0].update(answer_start=0))
    data_dir = write_squad_parquet(tmp_path, document)
    with pytest.raises(DataFormatError, match=r"validation-00000-of-00001\.parquet: question id "
                                              r"'56be85543aeaaa14008c9065': answers\[0\] 'Houston, Texas' does not"):
        load_squad(data_dir, split="validation")


def test_squad_missing_file_and_split(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dev-v1.1.json"):
        load_squad(tmp_path / "dev-v1.1.json")
    write_squad_parquet(tmp_path, SQUAD_V1, split="train")
    with pytest.raises(DatasetNotFoundError, match="validation split"):
        load_squad(tmp_path, split="validation")


# ---------------------------------------------------------------- TriviaQA


def test_alias_matching_finds_every_occurrence_case_insensitively_at_word_boundaries():
    text = "Sunset Boulevard, WEST SUNSET BOULEVARD and sunset boulevardier; Sunset Blvd. again: Sunset Boulevard."
    spans = find_answer_spans(text, ["Sunset Boulevard", "west sunset boulevard", "Sunset Blvd", "Sunset Blvd.", ""])
    blvd = text.index("Sunset Blvd")
    assert [(s.start, s.text) for s in spans] == [
        (0, "Sunset Boulevard"),
        (18, "WEST SUNSET BOULEVARD"),
        (23, "SUNSET BOULEVARD"),  # nested in the longer alias: a target of its own
        (blvd, "Sunset Blvd"),
        (blvd, "Sunset Blvd."),
        (text.rindex("Sunset Boulevard"), "Sunset Boulevard"),
    ]  # not "sunset boulevard" inside "boulevardier"
    assert all(text[s.start : s.end] == s.text for s in spans)
    assert find_answer_spans("the start of art", ["art"]) == [AnswerSpan("art", 13)]


def test_triviaqa_wikipedia_one_example_per_document_keyed_by_question(tmp_path):
    examples = load_triviaqa(write_triviaqa(tmp_path))
    assert [(ex.id, ex.question_id) for ex in examples] == [
        ("tc_33--Andrew_Lloyd_Webber.txt", "tc_33"),
        ("qb_101--Nile.txt", "qb_101"),
        ("qb_101--Andrew_Lloyd_Webber.txt", "qb_101"),
    ]
    webber, nile, no_nile = examples
    assert webber.context == WEBBER and nile.context == NILE
    assert webber.context is no_nile.context  # one string per evidence file
    expected = sorted({(WEBBER.index("Sunset Boulevard"), "Sunset Boulevard"),
                       (WEBBER.index("Sunset Boulevard", WEBBER.index("Sunset Boulevard") + 1), "Sunset Boulevard"),
                       (WEBBER.index("West Sunset Boulevard"), "West Sunset Boulevard"),
                       (WEBBER.index("West Sunset Boulevard") + 5, "Sunset Boulevard"),
                       (WEBBER.index("SUNSET BLVD"), "SUNSET BLVD"), (WEBBER.index("SUNSET BLVD"), "SUNSET BLVD.")})
    assert [(a.start, a.text) for a in webber.answers] == expected
    assert webber.gold_answers == TRIVIAQA_RECORDS[0]["Answer"]["NormalizedAliases"]
    assert [a.text for a in nile.answers] == ["Nile"] and no_nile.answers == []  # distant supervision


def test_triviaqa_web_scores_each_document(tmp_path):
    examples = load_triviaqa(write_triviaqa(tmp_path, domain="web"))
    assert [ex.question_id for ex in examples] == ["tc_33--Andrew_Lloyd_Webber.txt", "tc_33--35/35_995.txt",
                                                   "qb_101--Nile.txt", "qb_101--Andrew_Lloyd_Webber.txt"]
    assert examples[1].context == WEB_PAGE and [a.text for a in examples[1].answers] == ["Sunset Boulevard"]


def test_triviaqa_concatenated_evidence(tmp_path):
    examples = load_triviaqa(write_triviaqa(tmp_path), concatenate=True)
    assert [ex.id for ex in examples] == ["tc_33", "qb_101"]
    assert examples[1].context == NILE + "\n\n" + WEBBER
    assert [a.text for a in examples[1].answers] == ["Nile"]
    with pytest.raises(ValueError, match="Wikipedia"):
        load_triviaqa(write_triviaqa(tmp_path / "web", domain="web"), concatenate=True)


def test_triviaqa_verified_and_test_files(tmp_path):
    records = json.loads(json.dumps(TRIVIAQA_RECORDS))
    records[0]["QuestionPartOfVerifiedEval"] = False
    records[1]["QuestionPartOfVerifiedEval"] = True
    records[1]["EntityPages"][0]["DocPartOfVerifiedEval"] = True
    records[1]["EntityPages"][1]["DocPartOfVerifiedEval"] = False
    records[1]["Answer"]["HumanAnswers"] = ["The Nile"]
    examples = load_triviaqa(write_triviaqa(tmp_path, records=records, verified=True))
    assert [ex.id for ex in examples] == ["qb_101--Nile.txt"]
    assert examples[0].gold_answers == ["nile", "river nile", "nile river", "The Nile"]
    for record in records:
        del record["Answer"]
    examples = load_triviaqa(write_triviaqa(tmp_path / "test", split="test-without-answers", records=records))
    assert all(ex.answers == [] and ex.gold_answers == [] for ex in examples)


def test_triviaqa_missing_evidence_file_is_named(tmp_path):
    qa_file = write_triviaqa(tmp_path, evidence={"wikipedia/Andrew_Lloyd_Webber.txt": WEBBER})
    with pytest.raises(DatasetNotFoundError, match=r"evidence file wikipedia/Nile\.txt \(named by question "
                                                   r"'qb_101' in .*wikipedia-dev\.json\)"):
        load_triviaqa(qa_file)


def test_triviaqa_format_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="wikipedia-train.json"):
        load_triviaqa(tmp_path / "qa" / "wikipedia-train.json")
    records = json.loads(json.dumps(TRIVIAQA_RECORDS))
    records[1]["Answer"]["Aliases"] = "Nile"
    with pytest.raises(DataFormatError, match=r"wikipedia-dev\.json: QuestionId 'qb_101': Answer\.Aliases must be"):
        load_triviaqa(write_triviaqa(tmp_path, records=records))
    records = json.loads(json.dumps(TRIVIAQA_RECORDS))
    del records[1]["QuestionId"]
    with pytest.raises(DataFormatError, match=r"Data\[1\]: missing QuestionId"):
        load_triviaqa(write_triviaqa(tmp_path, records=records))


# ---------------------------------------------------------------- windows and labels


def test_pair_templates(roberta, bert):
    assert pair_template(roberta) == ([0], [2, 2], [2])  # <s> q </s></s> c </s>
    cls, sep = bert.cls_token_id, bert.sep_token_id
    assert pair_template(bert) == ([cls], [sep], [sep])  # [CLS] q [SEP] c [SEP]


def long_document(answer_sentence: str, filler_sentences: int = 30) -> str:
    filler = " ".join(f"The game began development in {2000 + k}, carrying over the work." for k in range(filler_sentences))
    return f"{filler} {answer_sentence} It met with positive sales in Japan."


def test_windows_overlap_by_doc_stride_and_cover_the_context(tokenizer):
    ex = example(long_document("The actor was born in Zürich."), "Zürich")
    tokenized = tokenize_qa([ex], tokenizer)
    n_context = tokenized[0]["context_len"]
    dataset = QAWindowDataset(tokenized, tokenizer, max_seq_len=64, doc_stride=16)
    prefix, middle, suffix = pair_template(tokenizer)
    question = tokenized[0]["question_ids"]
    budget = 64 - len(prefix) - len(middle) - len(suffix) - len(question)
    assert len(dataset) > 3
    for k, window in enumerate(dataset.windows):
        assert window.first_token == k * (budget - 16)
        features = dataset[k]
        assert len(features["input_ids"]) <= 64
        assert features["input_ids"] == prefix + question + middle + tokenized[0]["context_ids"][
            window.first_token : window.first_token + window.num_tokens] + suffix
        n_global = len(prefix) + len(question)
        assert features["global_attention_mask"] == [1] * n_global + [0] * (len(features["input_ids"]) - n_global)
    assert dataset.windows[-1].first_token + dataset.windows[-1].num_tokens == n_context
    assert dataset.windows[-2].first_token + dataset.windows[-2].num_tokens < n_context
    assert len(QAWindowDataset(tokenized, tokenizer, 64, 16, max_windows=2)) == 2
    baseline = QAWindowDataset(tokenized, tokenizer, 64, 16, global_question=False)
    assert all(sum(baseline[k]["global_attention_mask"]) == 0 for k in range(len(baseline)))


def test_answer_only_in_the_second_window_labels_that_window_and_maps_back_exactly(tokenizer):
    ex = example(long_document("The actor Knowles-Carter was born in Zürich.", filler_sentences=4), "Knowles-Carter")
    tokenized = tokenize_qa([ex], tokenizer)
    # windows whose first one ends just before the answer's first token
    n_special = sum(map(len, pair_template(tokenizer)))
    max_seq_len = n_special + tokenized[0]["question_len"] + tokenized[0]["answer_token_starts"][0]
    dataset, batch, predictions = predict_with_oracle([ex], tokenizer, max_seq_len=max_seq_len, doc_stride=8)
    assert len(dataset) == 2
    answer_token = ex.answers[0]
    first, second = dataset[0], dataset[1]
    # the first window does not reach the answer: it points at <s>/[CLS]
    starts, ends = dataset.context_offsets(0)
    assert ends.max() <= answer_token.start
    assert first["start_positions"] == [0] and first["end_positions"] == [0]
    (s,), (e,) = second["start_positions"], second["end_positions"]
    assert s > 0 and e >= s
    assert tokenizer.decode(second["input_ids"][s : e + 1]).replace(" ", "").lower() == "knowles-carter"
    prediction = predictions["q"]
    assert (prediction.text, prediction.start, prediction.end) == ("Knowles-Carter", answer_token.start, answer_token.end)
    assert prediction.example_id == "q"


def test_unicode_answers_map_back_to_exact_character_spans(tmp_path, tokenizer):
    examples = load_squad(write_squad_json(tmp_path, SQUAD_V1))
    cases = [ex for ex in examples if ex.id != "56be85543aeaaa14008c9065"]  # one answer each
    cases.append(example(ZURICH, "Zürich", "zurich-second", occurrence=1))  # after the emoji
    dataset, batch, predictions = predict_with_oracle(cases, tokenizer, max_seq_len=64, doc_stride=16)
    assert max(w.first_token for w in dataset.windows) > 0  # several windows per context
    for ex in cases:
        (gold,) = ex.answers
        got = predictions[ex.question_id]
        assert (got.text, got.start, got.end) == (gold.text, gold.start, gold.end), ex.id


def test_several_occurrences_are_all_targets(tokenizer):
    context = "Sunset Boulevard opened in 1993. " + "It ran for years. " * 3 + "Sunset Boulevard closed in 1997."
    ex = QAExample("tc", "Which musical?", context, find_answer_spans(context, ["sunset boulevard"]), ["x"], "tc")
    tokenized = tokenize_qa([ex], tokenizer)
    assert len(tokenized[0]["answer_token_starts"]) == 2
    dataset = QAWindowDataset(tokenized, tokenizer, max_seq_len=128, doc_stride=16)
    (window,) = [dataset[0]]
    assert len(window["start_positions"]) == 2 and 0 not in window["start_positions"]
    batch = collate_qa([window, *QAWindowDataset(tokenize_qa([example("Only here.", "here")], tokenizer),
                                                 tokenizer, 128, 16)], tokenizer.pad_token_id)
    assert batch["start_positions"].shape == (2, 2)
    assert batch["start_positions"][1, 1] == IGNORE_INDEX and batch["end_positions"][1, 1] == IGNORE_INDEX
    assert batch["feature_index"].tolist() == [0, 0]


def test_question_too_long_is_refused_before_training(tokenizer):
    long_question = "Which " + "very " * 80 + "long question is this?"
    examples = [example("A short context about Zürich.", "Zürich", "ok"),
                example("A short context about Zürich.", "Zürich", "too-long", question=long_question)]
    tokenized = tokenize_qa(examples, tokenizer)
    with pytest.raises(QuestionTooLongError, match=r"1 question\(s\) .* max_seq_len=64 .*id 'too-long'"):
        QAWindowDataset(tokenized, tokenizer, max_seq_len=64, doc_stride=8)
    dataset = QAWindowDataset(tokenized, tokenizer, max_seq_len=64, doc_stride=8, skip_long=True)
    assert dataset.skipped == ["too-long"] and {w.example for w in dataset.windows} == {0}


def test_tokenized_cache_is_reused_and_keyed_by_content(tmp_path, roberta):
    examples = [example(BEYONCE, "Houston")]
    first = load_tokenized_qa(examples, roberta, tmp_path, name="dev")
    (folder,) = tmp_path.iterdir()
    again = load_tokenized_qa(examples, roberta, tmp_path, name="dev")
    assert again[0] == first[0] and len(list(tmp_path.iterdir())) == 1
    load_tokenized_qa([example(BEYONCE, "Texas")], roberta, tmp_path, name="dev")
    assert len(list(tmp_path.iterdir())) == 2 and folder.name.startswith("dev-")


# ---------------------------------------------------------------- answer extraction


def test_score_window_is_the_exact_n_best_of_all_valid_spans(roberta):
    ex = example(long_document("The actor was born in Zürich.", filler_sentences=2), "Zürich")
    dataset = QAWindowDataset(tokenize_qa([ex], roberta), roberta, max_seq_len=256)
    window = dataset.windows[0]
    starts, ends = dataset.context_offsets(0)
    generator = torch.Generator().manual_seed(0)
    length = len(dataset[0]["input_ids"])
    for max_answer_len in (1, 4, 30):
        start_logits, end_logits = torch.randn(length, generator=generator), torch.randn(length, generator=generator)
        scores = score_window(dataset, 0, start_logits, end_logits, n_best_size=5, max_answer_len=max_answer_len)
        brute = sorted(
            ((float(start_logits[window.context_position + i] + end_logits[window.context_position + j]),
              int(starts[i]), int(ends[j]))
             for i in range(window.num_tokens) for j in range(i, min(i + max_answer_len, window.num_tokens))
             if ends[i] > starts[i] and ends[j] > starts[j]), reverse=True)[:5]
        assert [(round(s.score, 5), s.start, s.end) for s in scores.spans] == [(round(s, 5), a, b) for s, a, b in brute]
        assert scores.null_score == pytest.approx(float(start_logits[0] + end_logits[0]))


def test_best_span_over_windows_and_documents_of_one_question():
    context_a, context_b = "alpha beta gamma", "delta epsilon"
    examples = [QAExample("q--a", "?", context_a, [], ["x"], "q"), QAExample("q--b", "?", context_b, [], ["x"], "q"),
                QAExample("r", "?", context_a, [], ["x"], "r")]
    scores = [
        WindowScores(0, 1.0, [SpanCandidate(3.0, 6, 10), SpanCandidate(2.0, 0, 5)]),
        WindowScores(0, 0.5, [SpanCandidate(2.5, 5, 10)]),  # " beta": the same span once stripped; max score kept
        WindowScores(1, 2.0, [SpanCandidate(4.0, 0, 5)]),
        WindowScores(2, 9.0, [SpanCandidate(1.0, 0, 5)]),
    ]
    predictions = select_answers(examples, scores)
    assert (predictions["q"].text, predictions["q"].example_id, predictions["q"].score) == ("delta", "q--b", 4.0)
    assert predictions["q"].n_best == [("delta", 4.0), ("beta", 3.0), ("alpha", 2.0)]
    assert predictions["q"].null_score == 0.5  # the minimum over the question's windows
    assert prediction_texts(predictions) == {"q": "delta", "r": "alpha"}
    # SQuAD v2.0: no answer when the null score beats the best span by more than the threshold
    v2 = select_answers(examples, scores, version_2=True)
    assert prediction_texts(v2) == {"q": "delta", "r": ""}
    assert prediction_texts(select_answers(examples, scores, version_2=True, null_threshold=8.0))["r"] == "alpha"


def test_v2_unanswerable_question_trains_on_cls_and_predicts_empty(tmp_path, roberta):
    examples = load_squad(write_squad_json(tmp_path, SQUAD_V2, "dev-v2.0.json"))
    dataset = QAWindowDataset(tokenize_qa(examples, roberta), roberta, max_seq_len=128, doc_stride=16)
    batch = collate_qa([dataset[i] for i in range(len(dataset))], roberta.pad_token_id)
    assert batch["start_positions"][1].tolist() == [0] and batch["end_positions"][1].tolist() == [0]
    start, end = oracle_logits(batch)
    predictions = prediction_texts(select_answers(examples, score_batch(dataset, batch, start, end), version_2=True))
    assert predictions == {"56ddde6b9a695914005b9628": "France", "5ad39d53604f3c001a3fe8d1": ""}


def test_oracle_predictions_score_perfectly_end_to_end(tmp_path, roberta):
    from ds_longformer.qa_metrics import evaluate_triviaqa, gold_answers

    examples = load_triviaqa(write_triviaqa(tmp_path))
    dataset = QAWindowDataset(tokenize_qa(examples, roberta), roberta, max_seq_len=96, doc_stride=16)
    batch = collate_qa([dataset[i] for i in range(len(dataset))], roberta.pad_token_id)
    rng = random.Random(0)
    start, end = oracle_logits(batch)
    start += torch.tensor([[rng.random() for _ in range(start.shape[1])] for _ in range(len(start))]) * 0.1
    predictions = prediction_texts(select_answers(examples, score_batch(dataset, batch, start, end)))
    assert set(predictions) == {"tc_33", "qb_101"}
    assert evaluate_triviaqa(gold_answers(examples), predictions)["exact_match"] == 100.0
