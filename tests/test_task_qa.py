"""The QA task program end to end: python -m ds_longformer.qa on tiny SQuAD v1.1, SQuAD v2.0 and
TriviaQA files written by the tests, at one rank and at two CPU ranks under torchrun, with a tiny
random RoBERTa (the baseline) and its Longformer conversion; bad input is one message and exit 1.

Every window here is short (--max_seq_len 48, --doc_stride 8), so the documents span several
windows and the answer lies in one of them only: the predictions must come from the best span over
all windows (and, at two ranks, over the windows of both ranks)."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from qa_fixtures import (
    SQUAD_V1,
    SQUAD_V2,
    TRIVIAQA_RECORDS,
    write_squad_json,
    write_squad_parquet,
    write_triviaqa,
)
from test_tasks import metrics, run_two_ranks, tensorboard_tags, tiny_models
from transformers import AutoTokenizer

from ds_longformer import LongformerForQuestionAnswering, qa
from ds_longformer.data.qa_features import QAWindowDataset, collate_qa, score_batch, select_answers, tokenize_qa
from ds_longformer.data.squad import load_squad
from ds_longformer.data.triviaqa import load_triviaqa
from ds_longformer.qa_metrics import evaluate_squad, evaluate_triviaqa, gold_answers
from ds_longformer.tasks_common import cli

SHORT_WINDOWS = ["--max_seq_len", "48", "--doc_stride", "8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):  # (local folders only: nothing is fetched)
    return tiny_models(tmp_path_factory.mktemp("models"))


def squad_folder(root: Path, document: dict, version: str = "v1.1") -> Path:
    folder = root / "squad"
    for split in ("train", "dev", "test"):
        write_squad_json(folder, document, f"{split}-{version}.json")
    return folder


def triviaqa_folder(root: Path, test: bool = False) -> Path:
    for split in ("train", "dev"):
        write_triviaqa(root, split=split)
    if test:  # as published: the records without their Answer
        records = [{k: v for k, v in record.items() if k != "Answer"} for record in TRIVIAQA_RECORDS]
        write_triviaqa(root, split="test-without-answers", records=records)
    return root / "triviaqa-rc"


def run_qa(tmp_path, data_dir, model_path, *extra, name="run") -> tuple[dict, Path]:
    result = qa.main(["--data_dir", str(data_dir), "--model_path", str(model_path), "--max_steps", "4",
                      "--batch_size", "2", "--val_check_interval", "2", "--save_every_n_steps", "0", "--lr", "1e-3",
                      "--default_root_dir", str(tmp_path), "--project_name", name, "--cache_dir",
                      str(tmp_path / "cache"), *SHORT_WINDOWS, *extra])
    return result, Path(result["run_dir"])


def final_model_answers(folder: Path, examples, max_seq_len=48) -> dict:
    """The answers of an exported Longformer, computed here without the trainer: all windows at once."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = QAWindowDataset(tokenize_qa(examples, tokenizer), tokenizer, max_seq_len, 8)
    batch = collate_qa([windows[i] for i in range(len(windows))], tokenizer.pad_token_id)
    model = LongformerForQuestionAnswering.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["global_attention_mask"])
    scores = score_batch(windows, batch, out.start_logits, out.end_logits)
    return {q: p.text for q, p in select_answers(examples, scores).items()}


# ---- end to end ---------------------------------------------------------------------------------
def test_squad_v1_longformer_end_to_end(tmp_path, models):
    data = squad_folder(tmp_path, SQUAD_V1)
    result, run_dir = run_qa(tmp_path, data, models.long, "--model", "Longformer")
    examples = load_squad(data / "dev-v1.1.json")
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert set(predictions) == {ex.id for ex in examples}
    contexts = {ex.id: ex.context for ex in examples}
    assert all(text and text in contexts[qid] for qid, text in predictions.items())  # spans of the original text
    # several windows per document: the tiny windows cannot hold any context whole
    tokenizer = AutoTokenizer.from_pretrained(models.long)
    windows = QAWindowDataset(tokenize_qa(examples, tokenizer), tokenizer, 48, 8)
    assert len(windows) >= 3 * len(examples)

    records = metrics(run_dir)
    validations = [r for r in records if "f1" in r]
    assert [r["step"] for r in validations] == [2, 4]
    assert all({"loss", "exact_match", "f1"} <= set(r) for r in validations)
    # the metrics are the official script's on the written predictions, which are the final model's
    assert validations[-1]["f1"] == pytest.approx(evaluate_squad(gold_answers(examples), predictions)["f1"])
    assert predictions == final_model_answers(Path(result["final_model"]), examples)
    (test,) = [r for r in records if "test/f1" in r]
    assert result["test_metrics"] == {k: v for k, v in test.items() if k.startswith("test/")}
    assert set(json.loads((run_dir / "test_predictions.json").read_text())) == set(predictions)
    assert {"val/f1", "val/exact_match", "test/f1", "train/loss"} <= tensorboard_tags(run_dir)
    assert result["best_metric"] == "f1" and result["best_model"] and Path(result["best_model"]).is_dir()
    hf = transformers.LongformerForQuestionAnswering.from_pretrained(result["final_model"])  # transformers reads it
    assert hf.config.model_type == "longformer"


def test_squad_v2_roberta_baseline_answers_unanswerable_questions(tmp_path, models):
    data = squad_folder(tmp_path, SQUAD_V2, "v2.0")
    result, run_dir = run_qa(tmp_path, data, models.short, "--model", "Roberta", "--null_threshold=-1e9",
                             "--max_seq_len", "64")  # (a 37-token question)
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert predictions == {"56ddde6b9a695914005b9628": "", "5ad39d53604f3c001a3fe8d1": ""}  # threshold: always ""
    last = [r for r in metrics(run_dir) if "f1" in r][-1]
    assert last["NoAns_f1"] == 100.0 and last["HasAns_f1"] == 0.0 and last["f1"] == 50.0
    assert result["test_metrics"]["test/f1"] == 50.0


def test_triviaqa_layout_end_to_end(tmp_path, models):
    data = triviaqa_folder(tmp_path, test=True)
    # (the Webber question is 51 tokens of the tiny tokenizer: windows of 96 tokens)
    result, run_dir = run_qa(tmp_path, data, models.long, "--model", "Longformer", "--max_seq_len", "96")
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert set(predictions) == {"tc_33", "qb_101"}  # Wikipedia: one answer per question over all its documents
    examples = load_triviaqa(data / "qa" / "wikipedia-dev.json")
    assert len(examples) == 3
    assert all(any(text in ex.context for ex in examples if ex.question_id == qid) for qid, text in predictions.items())
    last = [r for r in metrics(run_dir) if "f1" in r][-1]
    assert last["f1"] == pytest.approx(evaluate_triviaqa(gold_answers(examples), predictions)["f1"])
    assert predictions == final_model_answers(Path(result["final_model"]), examples, max_seq_len=96)
    assert result["test_metrics"] == {} and not [r for r in metrics(run_dir) if "test/loss" in r]  # no answers
    test_answers = json.loads((run_dir / "test_predictions.json").read_text())
    assert test_answers == final_model_answers(Path(result["final_model"]), load_triviaqa(
        data / "qa" / "wikipedia-test-without-answers.json"), max_seq_len=96)


def test_squad_parquet_layout_end_to_end(tmp_path, models):
    data = tmp_path / "squad_parquet"
    for split in ("train", "validation"):
        write_squad_parquet(data, SQUAD_V1, split=split)
    result, run_dir = run_qa(tmp_path, data, models.long, "--model", "Longformer", "--dataset", "squad")
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert set(predictions) == {qa["id"] for article in SQUAD_V1["data"] for paragraph in article["paragraphs"]
                                for qa in paragraph["qas"]}
    assert result["test_metrics"] == {} and not (run_dir / "test_predictions.json").exists()


@pytest.mark.parametrize("names", [("train.json", "dev.json", "test.json"), ("train-v1.1.json", "validation.json")])
def test_squad_json_files_are_found_by_split_name(tmp_path, names):
    for name in names:
        write_squad_json(tmp_path, SQUAD_V1, name)
    splits = qa.load_splits("squad", tmp_path, "wikipedia")
    assert {split: source.name for split, (_, source) in splits.items()} == dict(zip(("train", "dev", "test"), names))
    write_squad_json(tmp_path, SQUAD_V1, "dev-v1.1.json")  # a second dev file
    with pytest.raises(qa.TaskError, match="several validation files"):
        qa.load_splits("squad", tmp_path, "wikipedia")


def test_triviaqa_web_domain_answers_per_document(tmp_path):
    for split in ("train", "dev"):
        write_triviaqa(tmp_path, domain="web", split=split)
    splits = qa.load_splits("triviaqa", tmp_path / "triviaqa-rc", "web")
    assert set(splits) == {"train", "dev"}
    examples, source = splits["dev"]
    assert source.name == "web-dev.json"
    assert {ex.question_id for ex in examples} >= {"tc_33--35/35_995.txt", "tc_33--Andrew_Lloyd_Webber.txt"}


def test_two_ranks_pick_the_best_span_over_both_ranks_windows(tmp_path, models):
    data = squad_folder(tmp_path, SQUAD_V1)
    run_two_ranks("ds_longformer.qa", [
        "--data_dir", data, "--model", "Longformer", "--model_path", models.long, "--max_steps", "2",
        "--batch_size", "2", "--val_check_interval", "2", "--default_root_dir", tmp_path, "--project_name", "two",
        "--cache_dir", tmp_path / "cache", *SHORT_WINDOWS])
    run_dir = tmp_path / "two"
    examples = load_squad(data / "dev-v1.1.json")
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert predictions == final_model_answers(run_dir / "final_model", examples)
    (validation,) = [r for r in metrics(run_dir) if "f1" in r]
    assert validation["f1"] == pytest.approx(evaluate_squad(gold_answers(examples), predictions)["f1"])


# ---- user errors: one message, exit 1 -------------------------------------------------------------
def user_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli(qa.main, argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err  # (the log lines go to stderr too)
    assert "Traceback" not in err and err.count("error: ") == 1
    return err[err.index("error: "):]


def test_an_answer_not_at_its_answer_start_names_file_and_question(tmp_path, models, capsys):
    document = json.loads(json.dumps(SQUAD_V1))
    document["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    data = squad_folder(tmp_path, SQUAD_V1)
    write_squad_json(data, document, "dev-v1.1.json")
    err = user_error(["--data_dir", str(data), "--model_path", str(models.short), "--cache_dir", str(tmp_path)], capsys)
    assert "dev-v1.1.json" in err and "zurich-1" in err and "answer_start" in err


def test_a_missing_triviaqa_evidence_file_is_named(tmp_path, models, capsys):
    data = triviaqa_folder(tmp_path)
    (data / "evidence" / "wikipedia" / "Nile.txt").unlink()
    err = user_error(["--data_dir", str(data), "--model_path", str(models.short), "--cache_dir", str(tmp_path)], capsys)
    assert "wikipedia/Nile.txt" in err and "qb_101" in err


def test_a_question_longer_than_max_seq_len_is_named(tmp_path, models, capsys):
    document = json.loads(json.dumps(SQUAD_V1))
    document["data"][0]["paragraphs"][0]["qas"][1]["question"] = "Where did she grow up? " * 8
    data = squad_folder(tmp_path, document)
    err = user_error(["--data_dir", str(data), "--model_path", str(models.short), "--cache_dir", str(tmp_path),
                      "--default_root_dir", str(tmp_path), *SHORT_WINDOWS], capsys)
    assert "train-v1.1.json" in err and "56be85543aeaaa14008c9065" in err and "--max_seq_len" in err


def test_sequence_parallelism_is_refused_clearly(tmp_path, models, capsys):
    data = squad_folder(tmp_path, SQUAD_V1)
    err = user_error(["--data_dir", str(data), "--model_path", str(models.short), "--cache_dir", str(tmp_path),
                      "--default_root_dir", str(tmp_path), "--sequence_parallel_size", "2"], capsys)
    assert "--sequence_parallel_size" in err


def test_help_lists_the_task_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        qa.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--data_dir", "--dataset", "--doc_stride", "--max_answer_len", "--model",
                                         "--max_seq_len", "--model_path", "--null_threshold", "--deepspeed_config"))
    assert "predictions.json" in text and "qa/<domain>-train.json" in text


