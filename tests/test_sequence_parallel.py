"""Sequence parallelism (DeepSpeed Ulysses, --sequence_parallel_size): P=2 on 2 gloo ranks against one device.

Model and DeepSpeed cases run in one torchrun launch of tests/sequence_parallel_checks.py (its docstring
lists them and the batch: padding, global tokens on either shard, candidates on both); the Trainer in
one more launch of tests/trainer_helpers; the task programs in test_tasks.py; the rest in process.
"""

import json
import sys

import pytest
import torch

from ds_longformer import LongformerConfig, LongformerForMaskedLM, LongformerForQuestionAnswering
from ds_longformer.engine import TrainerArgs, UserError, ds_config, parallel
from ds_longformer.sequence_parallel import SequenceParallel
from tests.conftest import ZERO3_PARTITION_ALL
from tests.trainer_helpers import REPO, assert_params_close, child_env, params, reap, run_dir, scalars, spawn, train

LOSS_TOLERANCE, GRAD_ABS_TOLERANCE, GRAD_REL_TOLERANCE = 1e-6, 1e-5, 1e-4


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence_parallel")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.sequence_parallel_checks", str(out)]
    done = reap(spawn(cmd, cwd=REPO, env=child_env()), timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads((out / "results.json").read_text())


def assert_equals_one_device(name: str, case: dict, loss_p1: float):
    for loss in case.get("loss_p2_ranks", [case.get("loss")]):
        assert abs(loss - loss_p1) <= LOSS_TOLERANCE * max(1.0, abs(loss_p1)), (name, loss, loss_p1)
    assert not case["missing"], (name, "parameters without a gradient", case["missing"])
    assert case["grad_abs_err"] <= GRAD_ABS_TOLERANCE, (name, case)
    assert case["grad_rel_err"] <= GRAD_REL_TOLERANCE, (name, case)


@pytest.mark.parametrize("head", ["mlm", "cls", "wikihop"])
def test_loss_and_every_gradient_equal_one_device(checks, head):
    """Padding and global tokens on both shards, absorbed and projected global rows, gradient
    checkpointing, N not divisible by P; gradients summed over the group as DeepSpeed does."""
    cases = {name: case for name, case in checks["equivalence"].items() if name.startswith(f"{head} ")}
    assert any("absorbed" in n for n in cases) and any("projected" in n for n in cases)
    assert any("checkpointing=True" in n for n in cases)
    for name, case in cases.items():
        assert_equals_one_device(name, case, case["loss_p1"])
        assert case["loss_p2_ranks"][0] == case["loss_p2_ranks"][1]  # every rank reports the batch's loss


@pytest.mark.parametrize("head", ["mlm", "cls", "wikihop"])
def test_deepspeed_zero2_and_zero3_gradients_equal_one_device(checks, head):
    """DeepSpeed's own gradients after engine.backward (safe_get_full_grad), not weights after a step:
    Adam and clipping hide a gradient scaled by 1/P."""
    loss_p1 = checks["equivalence"][f"{head} absorbed checkpointing=False N=256"]["loss_p1"]
    for stage in ("zero2", "zero3"):
        case = checks["engine"][f"{head} {stage}"]
        assert_equals_one_device(f"{head} {stage}", case, loss_p1)
    zero3 = checks["engine"][f"{head} zero3"]["config"]
    assert zero3["stage"] == 3 and zero3["reduce_scatter"] is False


def test_zero3_reduce_scatter_is_the_trap_the_engine_refuses(checks):
    """ZeRO-3's reduce-scatter (its default) averages over all ranks: every gradient 1/P of the right
    one. The comparison above sees it; the engine sets reduce_scatter false (or refuses, below)."""
    case = checks["engine"]["mlm zero3 reduce_scatter=true"]
    assert case["grad_rel_err"] == pytest.approx(0.5, abs=1e-3)
    assert case["config"].get("reduce_scatter", True) is True


def test_eval_losses_and_logits_equal_one_device(checks):
    results = checks["eval"]
    for head in ("mlm", "cls", "wikihop"):
        for loss in results[head]["loss_p2_ranks"]:
            assert loss == pytest.approx(results[head]["loss_p1"], rel=LOSS_TOLERANCE)
    assert results["mlm"]["logits_p2"] is None  # the loss without the (B, N, V) logits
    assert results["cls"]["logits_max_diff"] < 1e-6 and results["wikihop"]["logits_max_diff"] < 1e-6
    assert "output_attentions is not available under sequence parallelism" in results["output_attentions"]


def test_dropout_masks_are_independent_across_shards_and_heads(checks):
    """Each rank draws its tokens' and heads' dropout from a stream of its own; the shared stream
    (the trap) would give both shards the same hidden-dropout masks and heads on both ranks the
    same attention masks."""
    dropout = checks["dropout"]
    assert 0.09 < dropout["hidden"]["dropped"] < 0.11
    assert 0.79 < dropout["hidden"]["equal_decisions"] < 0.85  # independent: 0.9^2 + 0.1^2 = 0.82
    assert dropout["hidden_shared_stream"]["equal_decisions"] == 1.0
    assert not dropout["band"]["heads_0_2_equal"] and not dropout["band"]["heads_0_1_equal"]
    assert dropout["band_shared_stream"]["heads_0_2_equal"]


def test_checkpointing_redraws_the_same_dropout_masks(checks):
    case = checks["dropout"]["checkpointing"]
    assert case["loss"] == case["loss_checkpointing"]
    assert case["grad_abs_err"] == 0.0 and not case["missing"]
    assert case["dropout_acts"] > 0.1  # dropout on changes the gradients: the comparison means something


def test_resumed_run_equals_the_uninterrupted_one_with_dropout(checks):
    resume = checks["resume"]
    assert resume["bit_exact"] and resume["max_weight_diff"] == 0.0
    assert resume["steps"] == [4, 4] and resume["train_loss"][0] == resume["train_loss"][1]
    assert resume["state_sequence_parallel_size"] == 2  # the checkpoint records P


def test_a_group_whose_ranks_hold_different_batches_is_stopped(checks):
    """(It would otherwise train on the halves of two different sequences without a word.)"""
    for message in checks["same_batch"]:  # every rank of the group stops
        assert message is not None and "got different batches" in message


# ---- the Trainer at P=2 against one process -------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """conftest's parallel_runs flags at P=2 on 2 ranks (one replica), ZeRO-3 with every parameter
    partitioned and gradient checkpointing: the one-process run's steps."""
    out = tmp_path_factory.mktemp("sp_trainer")
    train(out, "--max_steps", "4", "--val_check_interval", "2", "--n_val", "7", "--batch_size", "2",
          "--sequence_parallel_size", "2", "--deepspeed_config", "zero3", "--gradient_checkpointing",
          "--ds_override", ZERO3_PARTITION_ALL, nproc=2)
    return out


def test_trainer_at_p2_equals_one_process(trainer_run, parallel_runs):
    single = parallel_runs / "single"
    rank0, rank1 = params(trainer_run, 0), params(trainer_run, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks disagree"
    assert_params_close(rank0, params(single))
    for tag in ("train/loss", "train/grad_norm"):  # the gradient norm: the gradients, not only the weights
        assert scalars(run_dir(trainer_run), tag) == pytest.approx(scalars(run_dir(single), tag), rel=1e-5), tag
    ours = [json.loads(line) for line in (run_dir(trainer_run) / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (run_dir(single) / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-6)
    state = json.loads((run_dir(trainer_run) / "checkpoints" / "global_step4" / "trainer_state.json").read_text())
    assert state["sequence_parallel_size"] == 2 and state["world_size"] == 2


def test_trainer_counts_a_groups_batch_once(trainer_run):
    """Both ranks run the same batch of 2 samples x 16 tokens: the step counts it once."""
    samples, tokens, seconds = (scalars(run_dir(trainer_run), f"train/{tag}")
                                for tag in ("samples_per_s", "tokens_per_s", "step_time"))
    for step in seconds:
        assert samples[step] * seconds[step] == pytest.approx(2, rel=1e-4)
        assert tokens[step] * seconds[step] == pytest.approx(32, rel=1e-4)


# ---- checks before training, in process -----------------------------------------------------------
def tiny_config(**kw) -> LongformerConfig:
    return LongformerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=100, attention_window=8, **kw)


def test_heads_not_divisible_by_p_are_refused():
    model = LongformerForMaskedLM(tiny_config())
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by sequence_parallel_size=3"):
        model.set_sequence_parallel(SequenceParallel(None, 0, 3))
    with pytest.raises(UserError, match="--sequence_parallel_size 3: num_attention_heads=4 is not divisible"):
        parallel.attach(model, parallel.Parallelism(0, 3, 3, group=SequenceParallel(None, 0, 3)))
    assert model.sequence_parallel is None  # refused: unchanged
    model.set_sequence_parallel(SequenceParallel(None, 1, 2))
    assert model.sequence_parallel.size == 2 and model.longformer.sequence_parallel is model.sequence_parallel
    model.set_sequence_parallel(None)
    assert model.sequence_parallel is None


def test_heads_without_sequence_parallel_support_are_refused():
    model = LongformerForQuestionAnswering(tiny_config(num_labels=2))
    with pytest.raises(ValueError, match="LongformerForQuestionAnswering has no sequence-parallel support"):
        model.set_sequence_parallel(SequenceParallel(None, 0, 2))


def test_world_size_not_divisible_by_p_is_refused():
    with pytest.raises(UserError, match="--sequence_parallel_size 2 does not divide the 3 ranks"):
        parallel.setup(0, 3, 2)
    with pytest.raises(UserError, match="does not divide the 3 ranks"):
        ds_config.resolve(TrainerArgs(sequence_parallel_size=2), world_size=3, on_cpu=True)


def test_a_rank_holds_n_over_p_tokens_of_the_padded_sequence():
    sp = SequenceParallel(None, 1, 2)
    x = torch.arange(2 * 5).view(2, 5)
    assert sp.padded(5) == 6 and sp.span(5) == (3, 6)
    assert sp.pad(x, -1).tolist() == [[0, 1, 2, 3, 4, -1], [5, 6, 7, 8, 9, -1]]
    assert sp.local(x, fill=-1).tolist() == [[3, 4, -1], [8, 9, -1]]
    assert SequenceParallel(None, 0, 2).local(x).tolist() == [[0, 1, 2], [5, 6, 7]]


def test_ds_config_key_and_batch_arithmetic():
    """The flag and DeepSpeed's key agree; a global batch is micro x accumulation x replicas (W / P)."""
    config, args = ds_config.resolve(TrainerArgs(sequence_parallel_size=2, batch_size=3,
                                                 deepspeed_config={"train_batch_size": "auto"}), 4, on_cpu=True)
    assert config["sequence_parallel_size"] == 2 and config["train_batch_size"] == 3 * 2
    config, args = ds_config.resolve(TrainerArgs(deepspeed_config={"sequence_parallel_size": 4}), 8, on_cpu=True)
    assert args.sequence_parallel_size == 4  # the file's value where the flag is not given
    config, args = ds_config.resolve(TrainerArgs(), 2, on_cpu=True)
    assert "sequence_parallel_size" not in config and args.sequence_parallel_size == 1


def test_zero3_config_is_fixed_or_refused_for_sequence_parallelism():
    model = LongformerForMaskedLM(tiny_config())
    largest = max(p.numel() for p in model.parameters())
    zero3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    fixed = parallel.prepare_ds_config(json.loads(json.dumps(zero3)), model, 2)["zero_optimization"]
    assert fixed["reduce_scatter"] is False and fixed["reduce_bucket_size"] == max(32 * 32, largest)
    assert parallel.prepare_ds_config(json.loads(json.dumps(zero3)), model, 1) == zero3  # P=1: untouched
    with pytest.raises(UserError, match="reduce_scatter=true with sequence parallelism"):
        parallel.prepare_ds_config({"zero_optimization": {"stage": 3, "reduce_scatter": True}}, model, 2)
    with pytest.raises(UserError, match=f"reduce_bucket_size=1000 is smaller than the largest parameter "
                                        f"\\({largest} elements\\)"):
        parallel.prepare_ds_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}, model, 2)
    with pytest.raises(UserError, match="data_parallel_size=1 with sequence parallelism: remove it"):
        parallel.prepare_ds_config({"data_parallel_size": 1, "zero_optimization": {"stage": 2}}, model, 2)
    zero2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 10}}
    assert parallel.prepare_ds_config(json.loads(json.dumps(zero2)), model, 2) == zero2


def test_data_and_counts_follow_the_data_parallel_rank():
    ranks = [parallel.Parallelism(r, 8, 4) for r in range(8)]
    assert [p.data_rank for p in ranks] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {p.data_world_size for p in ranks} == {2}
    assert [p.counts_data for p in ranks] == [True, False, False, False, True, False, False, False]
    one = parallel.Parallelism(3, 4)
    assert (one.data_rank, one.data_world_size, one.counts_data, one.mpu) == (3, 4, True, None)
