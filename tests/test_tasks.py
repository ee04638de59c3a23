"""The task programs end to end: pretrain, classify, wikihop (qa: test_task_qa.py).

Tiny random RoBERTa models (saved with transformers) and tiny dataset files in their published
formats; each task runs a few steps in this process and at 2 CPU ranks under torchrun, and its
run folder (TensorBoard events, metrics.jsonl) and saved Hugging Face folders are checked, the
latter by loading them in transformers and comparing outputs with ours.
"""

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from data_fixtures import (
    make_tiny_roberta_tokenizer,
    make_wikihop_records,
    write_hyperpartisan_xml,
    write_imdb_folders,
    write_imdb_parquet,
    write_wikihop_json,
    write_wikitext_raw,
)
from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

from ds_longformer import LongformerForCandidateScoring, LongformerForMaskedLM, LongformerForSequenceClassification
from ds_longformer import classify, pretrain, qa, quickstart, wikihop
from ds_longformer import convert as convert_program
from ds_longformer.convert import convert
from ds_longformer.engine import TrainerArgs
from ds_longformer.data.wikihop import WIKIHOP_TOKENS, WikiHopFeatures, collate_wikihop
from ds_longformer.tasks_common import TaskError, cli, load_baseline

REPO = Path(__file__).resolve().parents[1]
SHORT_LEN = 64  # tokens the tiny "RoBERTa" reads
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def save_tiny_roberta(folder, tokenizer_dir, max_tokens=SHORT_LEN, layers=2, seed=0, **config) -> Path:
    """A random RobertaForMaskedLM saved by transformers, with the tokenizer: the short model
    (``config``: other RobertaConfig fields, e.g. initializer_range)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    roberta = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=max_tokens + 2, type_vocab_size=1,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2, **config)
    RobertaForMaskedLM(roberta).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def tiny_models(root: Path) -> SimpleNamespace:
    """short: a tiny random RoBERTa (SHORT_LEN positions); long: its Longformer conversion (256, window 32)."""
    short = save_tiny_roberta(root / "short", make_tiny_roberta_tokenizer(root))
    long = root / "long"
    convert(short, long, max_pos=256, attention_window=32)
    return SimpleNamespace(short=short, long=long)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded


# ---- helpers ------------------------------------------------------------------------------------
def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # in-process runs set them
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def run_two_ranks(module: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", module, *map(str, args)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@contextlib.contextmanager
def launch_env_restored():
    """For a module fixture's in-process run: the launch variables it sets are undone afterwards
    (conftest's restore_distributed_env does that for each test)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in LAUNCH_ENV:
            patch.setenv(name, os.environ[name]) if name in os.environ else patch.delenv(name, raising=False)
        yield


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in run_dir.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    return tags


def printed_records(stdout: str) -> list[dict]:
    """The JSON lines a task printed (DeepSpeed prints its warnings to stdout too)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def trained_by_two_ranks(run_dir: Path) -> bool:
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    return (run_dir / "checkpoints" / step / "rng_state_rank1.pt").is_file()


def token_batch(tokenizer_dir, texts, **kw):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer(texts, padding=True, return_tensors="pt", **kw)


def assert_same_outputs(ours, theirs, atol=1e-4):
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-4)


def check_masked_lm_folder(folder: Path):
    """Loads in transformers without missing weights and computes what our model computes."""
    hf, info = transformers.LongformerForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"]
    batch = token_batch(folder, ["The game began development in 2010 .", "It met with positive sales ."])
    with torch.no_grad():
        theirs = hf.eval()(**batch).logits
        ours = LongformerForMaskedLM.from_pretrained(folder).eval()(batch["input_ids"], batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert_same_outputs(ours[real], theirs[real])
    return hf


def check_classifier_folder(folder: Path):
    hf, info = transformers.LongformerForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"]
    batch = token_batch(folder, ["A wonderful film, superb acting.", "Dull and far too long."])
    with torch.no_grad():
        theirs = hf.eval()(**batch).logits  # transformers also puts global attention on <s>
        ours = LongformerForSequenceClassification.from_pretrained(folder).eval()(
            batch["input_ids"], batch["attention_mask"]).logits
    assert_same_outputs(ours, theirs)


# ---- the command lines --------------------------------------------------------------------------
ISSUE_DEFAULTS = {
    pretrain: dict(model_path="distilbert/distilroberta-base", max_seq_len=2048, attention_window=512, max_pos=2048,
                   batch_size=1, gradient_accumulation_steps=8, lr=5e-5, warmup_steps=500, epochs=10,
                   val_check_interval=500, save_model_to="./data/long_model", cache_dir="./data",
                   state_dict_path=None, copy_global_projections=False, num_workers=0, max_steps=-1),
    classify: dict(dataset="Hyperpartisan", model="Roberta", model_path=None, batch_size=8, lr=5e-5, epochs=3,
                   gradient_accumulation_steps=1, val_check_interval=200, default_root_dir="./logs",
                   project_name="Classification", max_seq_len=None),
    wikihop: dict(train_data="data/wikihop/train.json", val_data="data/wikihop/dev.json", longformer=False,
                  model_path=None, lr=3e-5, weight_decay=0.01, epochs=5, default_root_dir="./model/",
                  val_check_interval=10, project_name="WikihopQA"),
}
COMMON_FLAGS = ("--model_path", "--tokenizer_name", "--deepspeed_config", "--batch_size",
                "--gradient_accumulation_steps", "--lr", "--warmup_steps", "--epochs", "--max_steps",
                "--val_check_interval", "--default_root_dir", "--project_name", "--seed", "--max_seq_len",
                "--gradient_checkpointing", "--resume")


@pytest.mark.parametrize("task", [pretrain, classify, wikihop], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_flags_and_defaults_are_the_issues(task, capsys):
    args = vars(task.build_parser().parse_args([]))
    assert {k: args[k] for k in ISSUE_DEFAULTS[task]} == ISSUE_DEFAULTS[task]
    with pytest.raises(SystemExit) as exit_:
        task.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in COMMON_FLAGS)


HF_NAMES = ["--learning_rate", "1e-3", "--per_device_train_batch_size", "2", "--output_dir", "out", "--eval_steps", "5",
            "--save_steps", "10", "--logging_steps", "2", "--save_total_limit", "3", "--max_grad_norm", "0.5",
            "--resume_from_checkpoint", "latest", "--deepspeed", "zero2", "--num_train_epochs", "2"]
OUR_NAMES = ["--lr", "1e-3", "--batch_size", "2", "--default_root_dir", "out", "--val_check_interval", "5",
             "--save_every_n_steps", "10", "--log_every_n_steps", "2", "--keep_last_k", "3", "--grad_clip", "0.5",
             "--resume", "latest", "--deepspeed_config", "zero2", "--epochs", "2"]


@pytest.mark.parametrize("task", [pretrain, classify, wikihop, qa], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_hugging_face_flag_names_are_accepted(task):
    parser = task.build_parser()
    theirs, ours = (TrainerArgs.from_namespace(parser.parse_args(argv)) for argv in (HF_NAMES, OUR_NAMES))
    assert theirs == ours and theirs.given == ours.given


def test_missing_dataset_is_a_message_not_a_traceback(tmp_path, models, capsys):
    proc = subprocess.run([sys.executable, "-m", "ds_longformer.classify", "--dataset", "IMDB", "--data_dir", tmp_path],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "aclImdb" in proc.stderr and "Download" in proc.stderr

    cases = [(pretrain.main, ["--model_path", models.short, "--data_dir", tmp_path, "--cache_dir", tmp_path / "c"],
              "wiki.train.raw"),
             (wikihop.main, ["--model_path", models.short, "--train_data", tmp_path / "train.json"], "train.json")]
    for main, argv, expected in cases:
        with pytest.raises(SystemExit) as exit_:
            cli(main, list(map(str, argv)))
        assert exit_.value.code == 1
        assert expected in capsys.readouterr().err


def test_data_with_nothing_to_learn_is_a_message_before_training(tmp_path, models, capsys):
    """An IMDB class folder without reviews used to train a one-class classifier (exit 0); an empty
    wiki.valid.raw and an empty WikiHop list ended in tracebacks."""
    imdb = write_imdb_folders(tmp_path / "imdb")
    for review in (imdb / "aclImdb" / "train" / "pos").glob("*.txt"):
        review.unlink()
    wiki = write_wikitext_raw(tmp_path / "wiki")
    (wiki / "wikitext-103-raw" / "wiki.valid.raw").write_text(" \n\n")
    no_records = write_wikihop_json(tmp_path / "wikihop", [], name="train.json")
    cases = [(classify.main, ["--dataset", "IMDB", "--data_dir", imdb, "--model_path", models.short],
              "train/pos: no reviews (*.txt) of class 'pos'"),
             (pretrain.main, ["--model_path", models.short, "--data_dir", wiki, "--cache_dir", tmp_path / "cache"],
              "wiki.valid.raw: no text"),
             (wikihop.main, ["--model_path", models.short, "--train_data", no_records, "--val_data", no_records],
              "train.json: no records")]
    for main, argv, expected in cases:
        with pytest.raises(SystemExit) as exit_:
            cli(main, list(map(str, argv)))
        assert exit_.value.code == 1 and expected in capsys.readouterr().err


def damaged_model(tmp_path, source, name, file, keep=0.5) -> Path:
    folder = tmp_path / name
    shutil.copytree(source, folder)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[:int(len(data) * keep)])
    return folder


def bad_input(case: str, tmp_path, models) -> tuple[list, str]:
    """(flags added to a good classify command, what the one message must say) for the issue's cases."""
    if case == "invalid ds_config JSON":
        bad_json = tmp_path / "bad_config.json"
        bad_json.write_text('{"zero_optimization": {"stage": 2,}')
        return ["--deepspeed_config", bad_json], f"{bad_json}: not valid JSON"
    if case == "output folder under a file":
        (tmp_path / "a_file").write_text("")
        return ["--default_root_dir", tmp_path / "a_file" / "runs"], "cannot write there"
    if case == "damaged --resume folder":
        damaged = tmp_path / "ckpts" / "global_step2"
        damaged.mkdir(parents=True)
        (damaged / "trainer_state.json").write_text('{"global_st')
        return ["--resume", damaged], "global_step2/trainer_state.json is not readable JSON"
    if case == "truncated model.safetensors":
        return (["--model_path", damaged_model(tmp_path, models.short, "cut_weights", "model.safetensors")],
                "cut_weights/model.safetensors is truncated")
    if case == "truncated config.json":
        return (["--model_path", damaged_model(tmp_path, models.short, "cut_config", "config.json")],
                "cut_config/config.json is not valid JSON")
    return {
        "--deepspeed_config zero5": (["--deepspeed_config", "zero5"], "--deepspeed_config zero5: no such file"),
        "--batch_size 0": (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        "fp16 on CPU": (["--precision", "fp16"], "fp16 needs a GPU"),
        "missing --resume folder": (["--resume", tmp_path / "nowhere"], "nowhere does not exist"),
        "unknown --best_metric": (["--best_metric", "bleu"], "--best_metric 'bleu' is not a validation metric"),
        "batch larger than the data": (["--batch_size", "64"], "smaller than one optimizer step"),
        "--gradient_accumulation_steps 0": (["--gradient_accumulation_steps", "0"],
                                            "--gradient_accumulation_steps must be at least 1"),
        "--lr -1": (["--lr", "-1"], "--lr must be at least 0"),
        "--lr nan": (["--lr", "nan"], "--lr must be a finite number"),
        "--adam_beta2 1": (["--adam_beta2", "1"], "--adam_beta2 must be less than 1"),
        "--max_seq_len 2": (["--max_seq_len", "2"], "--max_seq_len must be at least 3"),
        "unknown flag": (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        "unknown dataset": (["--dataset", "Reuters"], "invalid choice: 'Reuters'"),
    }[case]


BAD_INPUTS = ["--deepspeed_config zero5", "--batch_size 0", "fp16 on CPU", "missing --resume folder",
              "unknown --best_metric", "batch larger than the data", "--gradient_accumulation_steps 0", "--lr -1",
              "--lr nan", "--adam_beta2 1", "--max_seq_len 2", "invalid ds_config JSON", "output folder under a file",
              "truncated model.safetensors", "truncated config.json", "damaged --resume folder", "unknown flag",
              "unknown dataset"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_message_exit_1_before_tokenising(models, tmp_path, capsys, monkeypatch, case):
    """Each used to end in a traceback (JSONDecodeError, ZeroDivisionError, safetensors' errors...), in a
    good message inside a traceback after tokenising, or in argparse's exit status 2."""
    data = write_hyperpartisan_xml(tmp_path / "hp")
    good = ["--dataset", "Hyperpartisan", "--data_dir", data, "--model_path", models.short, "--default_root_dir",
            tmp_path / "runs", "--cache_dir", tmp_path / "cache", "--batch_size", 1]
    monkeypatch.setattr(classify, "tokenized_once", lambda *a, **k: pytest.fail("tokenised before the check"))
    flags, expected = bad_input(case, tmp_path, models)
    with pytest.raises(SystemExit) as exit_:
        cli(classify.main, list(map(str, good + flags)))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and expected in err, err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    assert not (tmp_path / "runs").exists()  # no run folder left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_folder_is_one_message(models, tmp_path, capsys):
    data = write_hyperpartisan_xml(tmp_path / "hp")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)
    with pytest.raises(SystemExit) as exit_:
        cli(classify.main, list(map(str, ["--data_dir", data, "--model_path", models.short, "--default_root_dir",
                                          tmp_path / "locked", "--cache_dir", tmp_path / "cache"])))
    assert exit_.value.code == 1 and "--default_root_dir" in capsys.readouterr().err


@pytest.mark.parametrize("task, flags, expected", [
    (pretrain, ["--attention_window", "7"], "--attention_window must be even, got 7"),
    (pretrain, ["--max_pos", "0"], "--max_pos must be at least 3"),
    (wikihop, ["--max_chunks", "0"], "--max_chunks must be at least 1"),
    (wikihop, ["--seed", "-1"], "--seed must be at least 0"),
], ids=["pretrain-window", "pretrain-max_pos", "wikihop-max_chunks", "wikihop-seed"])
def test_task_flags_are_checked_by_the_parser(task, flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(task.main, flags)
    assert exit_.value.code == 1 and expected in capsys.readouterr().err


@pytest.mark.parametrize("program", [pretrain, classify, wikihop, qa, quickstart, convert_program],
                         ids=lambda m: m.__name__)
def test_every_numeric_flag_has_a_checked_range(program):
    """A bare int/float flag accepts 0, -1 or nan: each numeric flag reads through engine.args.ranged."""
    bare = [a.dest for a in program.build_parser()._actions if a.type in (int, float) and a.dest != "local_rank"]
    assert not bare


def test_user_errors_are_printed_once_by_rank_0(models, tmp_path):
    data = write_hyperpartisan_xml(tmp_path / "hp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ds_longformer.classify", "--data_dir", str(data), "--model_path", str(models.short),
                           "--deepspeed_config", "zero5"], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --deepspeed_config zero5") == 1, proc.stderr[-3000:]


def test_an_internal_error_keeps_its_traceback():
    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli(main, [])


def test_longformer_tasks_refuse_a_short_model(models, tmp_path, capsys):
    data = write_hyperpartisan_xml(tmp_path / "hp")
    with pytest.raises(SystemExit):
        cli(classify.main, ["--model", "Longformer", "--model_path", str(models.short), "--data_dir", str(data),
                            "--batch_size", "1"])
    assert "not a Longformer: convert it first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(classify.main, ["--model", "Longformer", "--data_dir", str(data)])
    assert "needs --model_path" in capsys.readouterr().err


def test_wrong_model_folders_are_a_message_not_a_traceback(models, tmp_path, capsys):
    data = write_hyperpartisan_xml(tmp_path / "hp")
    (tmp_path / "empty").mkdir()
    fewer_layers = tmp_path / "fewer_layers"  # config.json says 1 layer, the weights hold 2
    LongformerForMaskedLM.from_pretrained(models.long).save_pretrained(fewer_layers)
    config = json.loads((fewer_layers / "config.json").read_text())
    config.update(num_hidden_layers=1, attention_window=[32])
    (fewer_layers / "config.json").write_text(json.dumps(config))
    for folder, expected in ((tmp_path / "empty", "config.json"), (fewer_layers, "the config has no place for")):
        with pytest.raises(SystemExit) as exit_:
            cli(classify.main, ["--model", "Longformer", "--model_path", str(folder), "--data_dir", str(data),
                                "--batch_size", "1"])
        assert exit_.value.code == 1 and expected in capsys.readouterr().err


# ---- building blocks ----------------------------------------------------------------------------
def test_roberta_baseline_is_exactly_roberta(models):
    model, max_len = load_baseline(LongformerForMaskedLM, models.short)
    assert max_len == SHORT_LEN
    batch = token_batch(models.short, ["Robert Boulter is an English film actor . " * 9, "Homarus gammarus ."],
                        truncation=True, max_length=SHORT_LEN)
    assert batch["input_ids"].shape[1] == SHORT_LEN  # the whole position table
    with torch.no_grad():
        theirs = RobertaForMaskedLM.from_pretrained(models.short).eval()(**batch).logits
        ours = model.eval()(batch["input_ids"], batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    assert_same_outputs(ours[mask], theirs[mask])


def test_state_dict_path_loads_a_folder_or_a_file(models, tmp_path):
    earlier = LongformerForMaskedLM.from_pretrained(models.long)
    with torch.no_grad():
        for p in earlier.parameters():
            p.add_(0.01)
    earlier.save_pretrained(tmp_path / "folder")
    torch.save(earlier.state_dict(), tmp_path / "weights.pt")
    for source in (tmp_path / "folder", tmp_path / "weights.pt"):
        model = LongformerForMaskedLM.from_pretrained(models.long)
        pretrain.load_weights(model, source)
        for (name, a), b in zip(model.state_dict().items(), earlier.state_dict().values()):
            assert torch.equal(a, b), name
        assert model.lm_head.decoder.weight is model.longformer.embeddings.word_embeddings.weight

    torch.save({k: v for k, v in earlier.state_dict().items() if "lm_head" not in k}, tmp_path / "encoder.pt")
    with pytest.raises(TaskError, match="does not fit the model: missing"):
        pretrain.load_weights(model, tmp_path / "encoder.pt")
    with pytest.raises(TaskError, match="does not exist"):
        pretrain.load_weights(model, tmp_path / "nothing.pt")
    wider = {k: torch.cat([v, v]) if k.endswith("word_embeddings.weight") else v for k, v in earlier.state_dict().items()}
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(TaskError, match="does not fit the model's shapes: .*word_embeddings"):
        pretrain.load_weights(model, tmp_path / "wider.pt")


def test_validation_masks_are_fixed_per_block(models):
    tokenizer = AutoTokenizer.from_pretrained(models.short)
    blocks = [{"input_ids": [0] + list(range(5, 300)) + [2]} for _ in range(3)]
    a, b = pretrain.FixedMaskBlocks(blocks, tokenizer, seed=1), pretrain.FixedMaskBlocks(blocks, tokenizer, seed=1)
    assert torch.equal(a[2]["labels"], b[2]["labels"]) and not torch.equal(a[1]["labels"], a[2]["labels"])
    assert (a[0]["labels"] != -100).float().mean().item() == pytest.approx(0.15, abs=0.06)
    assert a[0]["labels"][0] == a[0]["labels"][-1] == -100  # <s>, </s> never masked


def test_classification_metrics():
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    stats = classify.classification_stats(SimpleNamespace(logits=logits), {"labels": torch.tensor([1, 0, 1, 0, 1])})
    assert stats == {"correct": 3, "examples": 5, "tp": 2, "fp": 1, "fn": 1, "tn": 1}
    # class 1: F1 = 4 / 6; class 0: F1 = 2 / 4 (1 hit, 1 false positive, 1 false negative)
    assert classify.reduce_classification({**stats, "samples": 5}) == {
        "accuracy": 0.6, "f1": pytest.approx(2 / 3), "f1_macro": pytest.approx((2 / 3 + 1 / 2) / 2)}


def test_wikihop_scores_are_averaged_over_each_examples_chunks(models):
    model = wikihop.WikiHopModel.from_pretrained(models.long).eval()
    g = torch.Generator().manual_seed(0)

    def example(n_chunks, length, positions, label):
        chunks = [{"input_ids": [0, *torch.randint(5, 300, (length - 2,), generator=g).tolist(), 2],
                   "global_attention_mask": [1] * 8 + [0] * (length - 8)} for _ in range(n_chunks)]
        return WikiHopFeatures("x", chunks, [positions] * n_chunks, label)

    features = [example(3, 22, [1, 4, 6], 2), example(1, 15, [2, 5], 0)]  # the second one is padded
    batch = collate_wikihop(features, pad_token_id=1)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if torch.is_tensor(v)})
        # Each chunk alone through the plain (one row = one example) candidate scorer.
        per_chunk = [LongformerForCandidateScoring.forward(
            model, **{k: torch.tensor([v]) for k, v in chunk.items()}, candidate_positions=torch.tensor([positions])
        ).logits[0] for f in features for chunk, positions in zip(f.chunks, f.candidate_positions)]
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits[0], torch.stack(per_chunk[:3]).mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1, :2], per_chunk[3], atol=1e-5, rtol=1e-5)
    assert out.logits[1, 2] == torch.finfo(out.logits.dtype).min  # a padded candidate never wins
    assert out.loss == torch.nn.functional.cross_entropy(out.logits, batch["labels"])


# ---- pretraining --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wikitext_dir(tmp_path_factory):
    from data_fixtures import WIKITEXT_SPLITS

    # Enough text for a few 128-token blocks per rank.
    splits = {name: lines * (8 if name == "train" else 3) for name, lines in WIKITEXT_SPLITS.items()}
    return write_wikitext_raw(tmp_path_factory.mktemp("wikitext"), splits)


def pretrain_args(models, wikitext_dir, tmp_path, *extra):
    return ["--model_path", models.short, "--data_dir", wikitext_dir, "--cache_dir", tmp_path / "cache",
            "--default_root_dir", tmp_path, "--save_model_to", tmp_path / "long_model", "--max_pos", 256,
            "--gradient_accumulation_steps", 1, "--batch_size", 2, "--lr", 1e-3, "--warmup_steps", 0,
            "--max_steps", 4, "--val_check_interval", 2, *extra]


# Blocks as long as the short model's, and a window spanning them: the converted model is the short
# model, so their step-0 BPCs agree exactly.
PRETRAIN_CONVERTED = ["--max_seq_len", SHORT_LEN, "--attention_window", 2 * SHORT_LEN, "--copy_global_projections"]


@pytest.fixture(scope="module")
def pretrain_one_process(models, wikitext_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pretrain_one_process")
    with launch_env_restored():
        return tmp_path, pretrain.main(list(map(str, pretrain_args(models, wikitext_dir, tmp_path,
                                                                   *PRETRAIN_CONVERTED))))


def test_pretrain_one_process(pretrain_one_process):
    tmp_path, result = pretrain_one_process

    step0 = result["step0"]
    assert step0["bpc"] == pytest.approx(step0["short_model/bpc"], rel=1e-5)
    assert step0["loss"] == pytest.approx(step0["short_model/loss"], rel=1e-5)
    assert 0 < step0["bpc"] < 10 and math.isfinite(step0["loss"])
    run_dir = tmp_path / "Pretraining"
    records = metrics(run_dir)
    assert records[0]["step"] == 0 and {"loss", "bpc", "short_model/loss", "short_model/bpc"} <= records[0].keys()
    assert [r["step"] for r in records[1:]] == [2, 4] and all("bpc" in r for r in records[1:])
    assert records[-1]["loss"] < records[0]["loss"]  # lr 1e-3 on the training text lowers the loss
    assert {"train/loss", "val/loss", "val/bpc", "short_model/bpc"} <= tensorboard_tags(run_dir)

    hf = check_masked_lm_folder(tmp_path / "long_model")
    for layer in hf.longformer.encoder.layer:  # --copy_global_projections
        attention = layer.attention.self
        assert torch.equal(attention.query.weight, attention.query_global.weight)
        assert torch.equal(attention.value.bias, attention.value_global.bias)
    assert hf.config.max_position_embeddings == 258 and hf.config.attention_window == [128, 128]
    check_masked_lm_folder(run_dir / "final_model")
    assert AutoTokenizer.from_pretrained(tmp_path / "long_model").model_max_length == 256


def test_pretrain_validation_loss_is_finite_when_a_block_has_no_masked_token(models):
    """The loss over the masked tokens of all blocks, not the mean of per-block means: with batch
    size 1 a block without a masked token (a short last block) made val/loss NaN at every validation."""
    from ds_longformer.data.wikitext import WikiTextSplit
    from ds_longformer.engine import evaluate, init_distributed

    init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(models.short)
    blocks = [{"input_ids": [0] + list(range(5, 60)) + [2]}, {"input_ids": [0, 7, 2]}]
    val = pretrain.FixedMaskBlocks(blocks, tokenizer, seed=1)
    assert (val[1]["labels"] == -100).all() and (val[0]["labels"] != -100).any()
    model = LongformerForMaskedLM.from_pretrained(models.long).eval()
    collate = pretrain.PretrainCollator(tokenizer)
    split = WikiTextSplit(blocks, n_chars=200, n_tokens=56)
    metrics = evaluate(lambda batch: model(**batch), val, 1, collate, compute_metrics=pretrain.masked_nll,
                       reduce_metrics=pretrain.bpc_metrics(split))
    with torch.no_grad():
        together = model(**collate([val[0], val[1]])).loss.item()  # the mean over every masked token
    assert metrics["loss"] == pytest.approx(together, rel=1e-5) and math.isfinite(metrics["bpc"])


def test_pretrain_reads_its_data_before_loading_the_model(models, tmp_path, capsys, monkeypatch):
    wiki = write_wikitext_raw(tmp_path / "wiki")
    (wiki / "wikitext-103-raw" / "wiki.train.raw").write_text("")
    monkeypatch.setattr(pretrain, "load_long_model", lambda *a: pytest.fail("model loaded before the data"))
    with pytest.raises(SystemExit) as exit_:
        cli(pretrain.main, list(map(str, ["--model_path", models.short, "--data_dir", wiki, "--cache_dir",
                                          tmp_path / "cache", "--default_root_dir", tmp_path / "runs"])))
    assert exit_.value.code == 1 and "wiki.train.raw" in capsys.readouterr().err


def test_pretrain_killed_before_its_first_checkpoint_records_step_0_once(models, wikitext_dir, tmp_path,
                                                                         monkeypatch):
    from ds_longformer.engine.checkpointing import Checkpointer

    class Killed(Exception):
        pass

    argv = list(map(str, pretrain_args(models, wikitext_dir, tmp_path, "--max_seq_len", 64, "--attention_window", 32,
                                       "--save_every_n_steps", 2, "--resume", "latest")))
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", lambda *a: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            pretrain.main(argv)
    assert [r["step"] for r in metrics(tmp_path / "Pretraining")] == [0, 2]
    pretrain.main(argv)  # --resume latest finds no checkpoint: from scratch
    assert [r["step"] for r in metrics(tmp_path / "Pretraining")] == [0, 2, 4]


@pytest.fixture(scope="module")
def dropout_models(models, tmp_path_factory):
    """The tiny short and long models with dropout 0.1 (hidden and attention), as real ones have."""
    root = tmp_path_factory.mktemp("dropout_models")
    out = {}
    for name in ("short", "long"):
        shutil.copytree(getattr(models, name), root / name)
        config = json.loads((root / name / "config.json").read_text())
        config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = root / name
    return SimpleNamespace(**out)


def killed_and_resumed(main, argv, tmp_path, crash_after: int) -> tuple[Path, Path]:
    """`main` run straight in tmp_path/straight, and in tmp_path/resumed stopped right after its
    checkpoint of step `crash_after` (an exception: the process state is not reused), then resumed
    with --resume latest. Returns both run folders' parents."""
    from ds_longformer.engine.checkpointing import Checkpointer

    class Killed(Exception):
        pass

    save = Checkpointer.save

    def save_then_die(self, engine, state):
        out = save(self, engine, state)
        if state["global_step"] == crash_after:
            raise Killed()
        return out

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(list(map(str, argv(straight))))
    Checkpointer.save = save_then_die
    try:
        with pytest.raises(Killed):
            main(list(map(str, argv(resumed))))
    finally:
        Checkpointer.save = save
    main(list(map(str, argv(resumed) + ["--resume", "latest"])))
    return straight, resumed


def assert_same_training(straight: Path, resumed: Path):
    """Every step's loss and the final weights, bit for bit."""
    from safetensors.torch import load_file

    from tests.trainer_helpers import assert_params_equal, scalars

    losses = [scalars(run, "train/loss") for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) >= 6
    assert_params_equal(*(load_file(run / "final_model" / "model.safetensors") for run in (resumed, straight)))


def test_pretrain_as_a_user_runs_it_resumes_exactly(dropout_models, wikitext_dir, tmp_path):
    """Dropout on, MLM masks made by 2 DataLoader workers, accumulation, no --peak_tflops: resumed
    mid-run, pretrain used to drift by up to 0.059 in loss (the MFU probe, the workers' mask streams)."""
    def argv(out):
        return pretrain_args(dropout_models, wikitext_dir, out, "--max_seq_len", 64, "--attention_window", 32,
                             "--batch_size", 1, "--gradient_accumulation_steps", 2, "--max_steps", 8,
                             "--save_every_n_steps", 3, "--num_workers", 2)

    straight, resumed = killed_and_resumed(pretrain.main, argv, tmp_path, crash_after=3)
    assert_same_training(straight / "Pretraining", resumed / "Pretraining")


def test_classify_as_a_user_runs_it_resumes_exactly(dropout_models, tmp_path):
    """Dropout on, no --peak_tflops: resumed mid-run, classify used to drift by 0.013 in loss."""
    data = write_hyperpartisan_xml(tmp_path / "hp")

    def argv(out):
        return classify_args(out, "--data_dir", data, "--model", "Longformer", "--model_path", dropout_models.long,
                             "--batch_size", 1, "--max_steps", 8, "--save_every_n_steps", 3)

    straight, resumed = killed_and_resumed(classify.main, argv, tmp_path, crash_after=3)
    assert_same_training(straight / "Classification", resumed / "Classification")


def test_pretrain_two_ranks(models, wikitext_dir, tmp_path):
    argv = pretrain_args(models, wikitext_dir, tmp_path, "--max_seq_len", 128, "--attention_window", 32,
                         "--state_dict_path", models.long, "--deepspeed_config", "zero2")
    proc = run_two_ranks("ds_longformer.pretrain", argv)

    run_dir = tmp_path / "Pretraining"
    assert trained_by_two_ranks(run_dir)
    step0 = metrics(run_dir)[0]
    # 128-token blocks with copied positions start near the short model on its 64-token blocks.
    assert step0["step"] == 0 and step0["bpc"] == pytest.approx(step0["short_model/bpc"], rel=0.05)
    [printed] = printed_records(proc.stdout)  # by rank 0 only
    assert printed["short_model/bpc"] == step0["short_model/bpc"]
    assert {"val/bpc", "short_model/bpc", "train/loss"} <= tensorboard_tags(run_dir)
    check_masked_lm_folder(tmp_path / "long_model")


# ---- classification -----------------------------------------------------------------------------
def classify_args(tmp_path, *extra):
    return ["--default_root_dir", tmp_path, "--cache_dir", tmp_path / "cache", "--batch_size", 2, "--lr", 1e-3,
            "--max_steps", 4, "--val_check_interval", 2, *extra]


# Hugging Face's names for the same flags: a run typed as a transformers user would
HF_CLASSIFY_ARGS = ["--output_dir", "{tmp}", "--cache_dir", "{tmp}/cache", "--per_device_train_batch_size", "2",
                    "--learning_rate", "1e-3", "--max_steps", "4", "--eval_steps", "2"]


def check_classification_run(run_dir: Path, stdout: str):
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4, 4]
    assert all({"loss", "accuracy", "f1", "f1_macro"} <= r.keys() for r in records[:2])
    test = records[-1]
    assert {"test/loss", "test/accuracy", "test/f1"} <= test.keys() and 0 <= test["test/accuracy"] <= 1
    [printed] = printed_records(stdout)  # by rank 0 only
    assert printed["test/accuracy"] == test["test/accuracy"]
    assert {"train/loss", "val/accuracy", "val/f1", "test/accuracy", "test/f1"} <= tensorboard_tags(run_dir)
    for folder in ("final_model", "best_model"):
        check_classifier_folder(run_dir / folder)


def test_classify_roberta_baseline_one_process(models, tmp_path, capsys):
    data = write_imdb_parquet(tmp_path / "imdb")
    argv = [a.format(tmp=tmp_path) for a in HF_CLASSIFY_ARGS]
    result = classify.main(argv + list(map(str, ["--dataset", "IMDB", "--data_dir", data, "--model", "Roberta",
                                                 "--model_path", models.short])))
    check_classification_run(tmp_path / "Classification", capsys.readouterr().out)
    assert result["test_metrics"]["test/accuracy"] == metrics(tmp_path / "Classification")[-1]["test/accuracy"]
    config = json.loads((tmp_path / "Classification" / "final_model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_classify_longformer_two_ranks(models, tmp_path):
    data = write_hyperpartisan_xml(tmp_path / "hp")
    argv = classify_args(tmp_path, "--dataset", "Hyperpartisan", "--data_dir", data, "--model", "Longformer",
                         "--model_path", models.long, "--batch_size", 1)
    proc = run_two_ranks("ds_longformer.classify", argv)
    run_dir = tmp_path / "Classification"
    assert trained_by_two_ranks(run_dir)
    check_classification_run(run_dir, proc.stdout)
    assert printed_records(proc.stdout)[0]["max_seq_len"] == 256  # the long model's length
    # tokenized once, by rank 0: one cache folder per split, nothing half-written
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir()) == [
        "classify-hyperpartisan-dev", "classify-hyperpartisan-test", "classify-hyperpartisan-train"]


def test_classify_resumed_after_its_test_record_keeps_one(models, tmp_path):
    """A run killed after it wrote its test metrics (here: finished) and resumed from its last
    checkpoint used to append a second test record."""
    argv = list(map(str, classify_args(tmp_path, "--dataset", "Hyperpartisan", "--data_dir",
                                       write_hyperpartisan_xml(tmp_path / "hp"), "--model_path", models.short,
                                       "--max_steps", 2, "--resume", "latest")))
    classify.main(argv)
    first = metrics(tmp_path / "Classification")
    classify.main(argv)
    again = metrics(tmp_path / "Classification")
    assert [r["step"] for r in again] == [2, 2] and again[0] == first[0] and "test/accuracy" in again[1]


def test_classify_refuses_a_tokenizer_that_yields_no_tokens(models, tmp_path, capsys):
    from data_fixtures import make_tokenizer_without_vocabulary

    data = write_hyperpartisan_xml(tmp_path / "hp")
    no_vocabulary = make_tokenizer_without_vocabulary(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli(classify.main, list(map(str, classify_args(tmp_path, "--data_dir", data, "--model_path", models.short,
                                                       "--tokenizer_name", no_vocabulary))))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and str(data) in err and "yields no tokens" in err and "tokenizer_without" in err


def test_classify_tokenizes_once_and_later_runs_reuse_it(models, tmp_path, monkeypatch):
    from ds_longformer.data.hyperpartisan import load_hyperpartisan

    examples = load_hyperpartisan(write_hyperpartisan_xml(tmp_path / "hp"))["train"]
    tokenizer = AutoTokenizer.from_pretrained(models.short)
    args = classify.build_parser().parse_args(["--dataset", "Hyperpartisan", "--cache_dir", str(tmp_path / "cache")])
    first = classify.encode_split(args, "train", examples, tokenizer, 64)
    with monkeypatch.context() as m:
        m.setattr(classify, "encode_classification", lambda *a, **k: pytest.fail("tokenized again"))
        again = classify.encode_split(args, "train", examples, tokenizer, 64)
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
    classify.encode_split(args, "train", examples, tokenizer, 32)  # the length is part of the key
    classify.encode_split(args, "train", examples[:-1], tokenizer, 64)  # so is the data
    args.model = "Longformer"  # and the global attention on <s>
    assert classify.encode_split(args, "train", examples, tokenizer, 64)["global_attention_mask"][0][0] == 1
    assert len(list((tmp_path / "cache").iterdir())) == 4


# ---- WikiHop ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wikihop_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wikihop")
    # 5 supports of 60 words: several chunks per example at the tiny models' lengths.
    return (write_wikihop_json(root, make_wikihop_records(8, seed=1), name="train.json"),
            write_wikihop_json(root, make_wikihop_records(4, seed=2), name="dev.json"))


def wikihop_args(wikihop_files, tmp_path, *extra):
    train, dev = wikihop_files
    return ["--train_data", train, "--val_data", dev, "--cache_dir", tmp_path / "cache", "--default_root_dir", tmp_path,
            "--batch_size", 2, "--lr", 1e-3, "--max_steps", 4, "--val_check_interval", 2, *extra]


def check_wikihop_run(run_dir: Path, max_len: int):
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4] and all({"loss", "accuracy"} <= r.keys() for r in records)
    assert {"train/loss", "val/loss", "val/accuracy"} <= tensorboard_tags(run_dir)
    folder = run_dir / "final_model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in WIKIHOP_TOKENS)
    hf = transformers.LongformerModel.from_pretrained(folder).eval()
    assert hf.config.vocab_size == len(tokenizer)
    text = "[q] place of birth [/q] [ent] north king [/ent] [ent] old river [/ent]</s> the river city ."
    batch = tokenizer([text], return_tensors="pt")
    assert batch["input_ids"].shape[1] <= max_len
    global_mask = torch.zeros_like(batch["input_ids"])
    global_mask[:, :12] = 1
    with torch.no_grad():
        theirs = hf(**batch, global_attention_mask=global_mask).last_hidden_state
        ours = wikihop.WikiHopModel.from_pretrained(folder).eval().longformer(
            batch["input_ids"], batch["attention_mask"], global_mask).last_hidden_state
    assert_same_outputs(ours, theirs)


@pytest.fixture(scope="module")
def wikihop_longformer_one_process(models, wikihop_files, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("wikihop_one_process")
    with launch_env_restored():
        wikihop.main(list(map(str, wikihop_args(wikihop_files, tmp_path, "--longformer", "--model_path", models.long,
                                                "--max_seq_len", 96))))
    return tmp_path / "WikihopQA"


def test_wikihop_longformer_one_process(wikihop_longformer_one_process):
    check_wikihop_run(wikihop_longformer_one_process, 96)


def test_wikihop_refuses_questions_that_fill_the_input_before_training(models, wikihop_files, tmp_path, capsys):
    argv = wikihop_args(wikihop_files, tmp_path, "--longformer", "--model_path", models.long, "--max_seq_len", 16)
    with pytest.raises(SystemExit) as exit_:
        cli(wikihop.main, list(map(str, argv)))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "--train_data" in err and "max_len=16" in err and "no room for supports" in err and "--max_seq_len" in err
    assert not (tmp_path / "WikihopQA").exists()  # refused before the trainer was built


def test_wikihop_roberta_baseline_two_ranks(models, wikihop_files, tmp_path):
    run_two_ranks("ds_longformer.wikihop", wikihop_args(wikihop_files, tmp_path, "--model_path", models.short))
    run_dir = tmp_path / "WikihopQA"
    assert trained_by_two_ranks(run_dir)
    check_wikihop_run(run_dir, SHORT_LEN)


@pytest.mark.parametrize("task", [pretrain, classify, wikihop, qa])
def test_deepspeed_launchers_local_rank_flag_is_accepted(task):
    """`deepspeed` (without --no_local_rank) appends --local_rank=N; the rank comes from LOCAL_RANK."""
    assert task.build_parser().parse_args(["--local_rank=3"]).local_rank == 3


# ---- sequence parallelism: P=2 on 2 ranks (one replica) trains as one process -----------------------
def same_records(ours: Path, theirs: Path, keys: tuple[str, ...]):
    mine, reference = metrics(ours), metrics(theirs)
    assert [r["step"] for r in mine] == [r["step"] for r in reference]
    for a, b in zip(mine, reference):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def sequence_parallel_state(run_dir: Path) -> int:
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    return json.loads((run_dir / "checkpoints" / step / "trainer_state.json").read_text())["sequence_parallel_size"]


def test_pretrain_sequence_parallel(models, wikitext_dir, tmp_path, pretrain_one_process):
    """The MLM loss and BPC of every validation (step 0 included: the long model under sequence
    parallelism equals the short model without) as one process's; an ordinary folder at the end."""
    run_two_ranks("ds_longformer.pretrain", pretrain_args(models, wikitext_dir, tmp_path, *PRETRAIN_CONVERTED,
                                                          "--sequence_parallel_size", 2))
    run_dir = tmp_path / "Pretraining"
    step0 = metrics(run_dir)[0]
    assert step0["bpc"] == pytest.approx(step0["short_model/bpc"], rel=1e-5)
    same_records(run_dir, pretrain_one_process[0] / "Pretraining", ("loss", "bpc", "short_model/bpc"))
    assert sequence_parallel_state(run_dir) == 2
    check_masked_lm_folder(tmp_path / "long_model")


def test_wikihop_longformer_sequence_parallel(models, wikihop_files, tmp_path, wikihop_longformer_one_process):
    """Global attention on the question, [ent] tokens on either shard, scores averaged over chunks."""
    run_two_ranks("ds_longformer.wikihop", wikihop_args(wikihop_files, tmp_path, "--longformer", "--model_path",
                                                        models.long, "--max_seq_len", 96, "--sequence_parallel_size", 2))
    run_dir = tmp_path / "WikihopQA"
    check_wikihop_run(run_dir, 96)
    same_records(run_dir, wikihop_longformer_one_process, ("loss", "accuracy"))
    assert sequence_parallel_state(run_dir) == 2


def test_classify_longformer_sequence_parallel(models, tmp_path):
    """<s> read from the rank holding it; the same checks as the data-parallel run."""
    data = write_hyperpartisan_xml(tmp_path / "hp")
    argv = classify_args(tmp_path, "--dataset", "Hyperpartisan", "--data_dir", data, "--model", "Longformer",
                         "--model_path", models.long, "--batch_size", 1, "--sequence_parallel_size", 2)
    proc = run_two_ranks("ds_longformer.classify", argv)
    run_dir = tmp_path / "Classification"
    check_classification_run(run_dir, proc.stdout)
    assert sequence_parallel_state(run_dir) == 2


def test_sequence_parallel_size_that_does_not_divide_the_ranks_is_a_message(models, wikihop_files, tmp_path, capsys):
    argv = wikihop_args(wikihop_files, tmp_path, "--longformer", "--model_path", models.long, "--max_seq_len", 96,
                        "--sequence_parallel_size", 2)
    with pytest.raises(SystemExit) as exit_:
        cli(wikihop.main, list(map(str, argv)))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "--sequence_parallel_size 2 does not divide the 1 ranks" in err
