"""Where transformers models work, ours work: transformers' Trainer trains our classifier, and our
DeepSpeed Trainer runs with DeepSpeed's wall-clock breakdown and FLOPs profiler (which walk the
model's outputs: a transformers ModelOutput, where a plain dataclass made them crash)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from ds_longformer import LongformerForSequenceClassification
from tests.model_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def separable_examples(n: int, seed: int) -> list[dict]:
    """Random tokens whose second one (10 or 11) is the label: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n, 24), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[:, 0], ids[:, 1] = 0, 10 + labels
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y} for x, y in zip(ids, labels)]


def mean_loss(model, examples) -> float:
    batch = torch.utils.data.default_collate(examples)
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_transformers_trainer_trains_our_classifier(tmp_path):
    torch.manual_seed(0)
    model = LongformerForSequenceClassification(tiny_config(num_labels=2, attention_window=8))
    train = separable_examples(64, seed=1)
    before = mean_loss(model, train)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40,
                                          learning_rate=1e-2, warmup_steps=0, logging_steps=8, save_strategy="no",
                                          report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = mean_loss(model, train)
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], losses
    assert after < 0.2 * before, (before, after)  # 0.69 -> 0.02 here


def test_our_trainer_runs_with_deepspeed_wall_clock_breakdown_and_flops_profiler(tmp_path):
    profiler = {"enabled": True, "profile_step": 2, "module_depth": -1, "top_modules": 1, "detailed": False}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "tests.trainer_helpers", "--default_root_dir", str(tmp_path), "--max_steps", "3",
           "--dump", str(tmp_path / "dump"),
           "--ds_override", json.dumps({"wall_clock_breakdown": True, "flops_profiler": profiler})]
    done = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "DeepSpeed Flops Profiler" in output and "fwd flops per GPU" in output
    assert output.count("time (ms) | fwd_microstep:") == 3  # one breakdown per step
    assert json.loads((tmp_path / "dump" / "summary.json").read_text())["global_step"] == 3


@pytest.mark.parametrize("global_first", [True, False], ids=["global_tokens", "no_global_tokens"])
def test_zero3_trains_with_and_without_global_tokens(tmp_path, global_first):
    """ZeRO-3 (every weight partitioned) with gradient checkpointing: the absorbed global rows (read
    the global weights, which ZeRO-3 gathers on access), and a batch without global tokens, whose
    global projections get their zero gradients (full-sized: through their module calls)."""
    from ds_longformer.engine import Trainer, TrainerArgs, load_ds_config

    config = load_ds_config("zero3", on_cpu=True)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny weights
    torch.manual_seed(0)
    model = LongformerForSequenceClassification(tiny_config(num_labels=2, attention_window=8))
    data = separable_examples(8, seed=2)
    for example in data:
        example["global_attention_mask"] = (torch.arange(24) == 0).long() * int(global_first)
    args = TrainerArgs(deepspeed_config=config, batch_size=2, max_steps=2, lr=1e-3, gradient_checkpointing=True,
                       default_root_dir=str(tmp_path), save_every_n_steps=0)
    summary = Trainer(model, args, data).fit()
    assert summary["global_step"] == 2 and math.isfinite(summary["train_loss"])
    exported = LongformerForSequenceClassification.from_pretrained(summary["final_model"])
    assert exported.classifier.out_proj.weight.shape == (2, 32)
