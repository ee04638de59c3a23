"""QA metrics against hand-computed examples of the official SQuAD v1.1 / v2.0 and TriviaQA scripts."""

import json

import pytest

from ds_longformer.qa_metrics import (
    evaluate_squad,
    evaluate_triviaqa,
    exact_match,
    f1,
    gold_answers,
    normalize_squad,
    normalize_triviaqa,
    write_predictions,
)


def test_squad_normalisation_deletes_punctuation_and_articles():
    assert normalize_squad("  The Denver  Broncos!") == "denver broncos"
    assert normalize_squad("Levi's Stadium, in the Bay-Area") == "levis stadium in bayarea"  # deleted, not spaced
    assert normalize_squad("a theatre an anthem") == "theatre anthem"  # whole words only
    assert normalize_squad("Zürich‘s “Großmünster”") == "zürich‘s “großmünster”"  # not in string.punctuation


def test_triviaqa_normalisation_spaces_punctuation_and_underscores():
    assert normalize_triviaqa("Sunset_Boulevard (musical)") == "sunset boulevard musical"
    assert normalize_triviaqa("Levi's Stadium, in the Bay-Area") == "levi s stadium in bay area"
    assert normalize_triviaqa("‘The Nile’") == "nile"


def test_token_f1_by_hand():
    # "cat sat on mat" vs "cat on mat": 3 shared, precision 3/4, recall 1 -> 6/7
    assert f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert f1("Denver Broncos", "denver broncos!") == 1.0
    assert f1("", "Denver") == 0.0 and f1("the", "a") == 0.0  # both normalise to nothing: v1.1 gives 0
    assert f1("the", "a", empty_matches_empty=True) == 1.0  # v2.0's no-answer rule
    assert f1("x y y", "y y z") == pytest.approx(2 / 3)  # shared tokens are a multiset: 2 of 3 each way
    assert exact_match("The Broncos.", "broncos") == 1.0 and exact_match("Broncos", "Denver Broncos") == 0.0


def test_squad_v1_evaluation_by_hand():
    gold = {"q1": ["Denver Broncos", "Denver Broncos"], "q2": ["Santa Clara, California", "Levi's Stadium"],
            "q3": ["gold"]}
    predictions = {"q1": "the Denver Broncos", "q2": "Levi's Stadium in the San Francisco Bay Area"}
    # q1: EM 1, F1 1. q2: "levis stadium in san francisco bay area" vs "levis stadium": 2 shared,
    # precision 2/7, recall 1 -> F1 4/9; 0 against "santa clara california". q3 missing: 0.
    result = evaluate_squad(gold, predictions)
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 4 / 9) / 3)
    assert result["total"] == 3
    with pytest.raises(ValueError, match="question 'q4' has no gold answer"):
        evaluate_squad({**gold, "q4": []}, predictions)


def test_squad_v2_evaluation_by_hand():
    gold = {"a": ["Normandy", "the Normandy"], "b": [], "c": [], "d": ["France"]}
    predictions = {"a": "Normandy", "b": "", "c": "France", "d": ""}
    result = evaluate_squad(gold, predictions, version_2=True)
    # a: 1/1; b: "" vs [""]: 1/1; c: an answer to an unanswerable question: 0/0; d: "" vs "France": 0/0
    assert result["exact_match"] == 50.0 and result["f1"] == 50.0 and result["total"] == 4
    assert (result["HasAns_exact"], result["HasAns_f1"], result["HasAns_total"]) == (50.0, 50.0, 2)
    assert (result["NoAns_exact"], result["NoAns_f1"], result["NoAns_total"]) == (50.0, 50.0, 2)
    # gold answers that normalise to nothing are dropped: "the" alone counts as no answer
    assert evaluate_squad({"e": ["the"]}, {"e": ""}, version_2=True)["exact_match"] == 100.0


def test_triviaqa_evaluation_by_hand():
    gold = {"tc_33": ["west sunset boulevard", "sunset blvd", "sunset boulevard"], "qb_101": ["nile", "river nile"],
            "qb_102": ["everest"]}
    predictions = {"tc_33": "Sunset_Boulevard (musical)", "qb_101": "The Nile", "unknown": "x"}
    # tc_33: "sunset boulevard musical" vs "sunset boulevard": precision 2/3, recall 1 -> 0.8 (EM 0);
    # qb_101: EM 1; qb_102 missing: 0.
    result = evaluate_triviaqa(gold, predictions)
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * 1.8 / 3)
    assert (result["common"], result["denominator"]) == (2, 3)


def test_gold_answers_and_predictions_file(tmp_path):
    from ds_longformer.data.qa_features import QAExample

    examples = [QAExample("q--a", "?", "c", [], ["x"], "q"), QAExample("q--b", "?", "c", [], ["x"], "q"),
                QAExample("r", "?", "c", [], [], "r")]
    assert gold_answers(examples) == {"q": ["x"], "r": []}
    path = write_predictions(tmp_path / "run" / "predictions.json", {"q": "Zürich", "r": ""})
    assert json.loads(path.read_text(encoding="utf-8")) == {"q": "Zürich", "r": ""}
    assert [p.name for p in path.parent.iterdir()] == ["predictions.json"]
