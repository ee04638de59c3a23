"""engine/evaluation.py: the evaluation loop (sample-weighted loss, additive task statistics, every
sample once over any number of ranks, ZeRO-3 included) and best-model tracking."""

import json
from types import SimpleNamespace

import pytest
import torch

from ds_longformer.engine import UserError, evaluate, init_distributed
from ds_longformer.engine.evaluation import BestTracker


def test_loss_is_sample_weighted_and_statistics_add_up():
    init_distributed()  # one process
    data = [{"x": torch.tensor(float(i)), "labels": torch.tensor(i % 2)} for i in range(5)]

    def forward(batch):  # loss: the batch's mean x; logits: x
        return SimpleNamespace(loss=batch["x"].mean(), logits=batch["x"])

    def odd(outputs, batch):
        return {"odd": int(batch["labels"].sum())}

    metrics = evaluate(forward, data, batch_size=2, compute_metrics=odd)
    assert metrics == {"loss": pytest.approx(2.0), "odd": pytest.approx(2 / 5)}  # batches (0,1) (2,3) (4)
    reduced = evaluate(forward, data, batch_size=2, compute_metrics=odd,
                       reduce_metrics=lambda totals: {"odd_count": totals["odd"], "n": totals["samples"]})
    assert reduced == {"loss": pytest.approx(2.0), "odd_count": 2, "n": 5}


def test_validation_over_two_ranks_equals_one_process(parallel_runs):
    """7 validation samples: uneven shards (4 and 3), the shorter rank repeating a batch it does not
    count, ZeRO-3 gathering weights in each forward."""
    def val(run):
        return [json.loads(line) for line in (parallel_runs / run / "ds-longformer" / "metrics.jsonl").open()]

    single = val("single")
    assert [r["step"] for r in single] == [2, 4]
    for stage in (0, 2, 3):
        for ours, theirs in zip(val(f"zero{stage}"), single):
            assert ours == pytest.approx(theirs, rel=1e-6), stage


def test_best_tracker():
    best = BestTracker("val/loss", "min")
    assert best.metric == "loss"
    assert best.update({"loss": 2.0}, 1) and not best.update({"loss": 3.0}, 2) and best.update({"loss": 1.0}, 3)
    assert not best.update({"loss": float("nan")}, 4)
    assert (best.value, best.step) == (1.0, 3)
    highest = BestTracker("eval_accuracy", "max")  # transformers' name for it
    assert highest.update({"accuracy": 0.5}, 1) and highest.update({"accuracy": 0.7}, 2)
    with pytest.raises(UserError, match="--best_metric 'bleu' is not a validation metric"):
        BestTracker("bleu", "max").update({"loss": 1.0}, 1)
