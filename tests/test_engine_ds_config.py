"""engine/ds_config.py: every "auto" filled with transformers' rules (checked against transformers'
own HfTrainerDeepSpeedConfig), a config's written values against the flags, configs written for the
Hugging Face Trainer (ZeRO-2, ZeRO-3, scheduler sections) training unchanged, DeepSpeed's own
monitors beside ours."""

import argparse
import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ds_longformer.engine import CONFIG_DIR, TrainerArgs, UserError, add_trainer_args
from ds_longformer.engine.ds_config import auto_values, build_ds_config, finalize, resolve
from tests.trainer_helpers import records, run_dir, scalars, train

SHIPPED = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fp16", "bf16", "cpu"]
HIDDEN = 32  # the tiny test model's

# As the Hugging Face DeepSpeed guide writes them (offload to "none": a CPU offload would JIT-build DeepSpeed's
# CPU Adam), every run-dependent value "auto".
HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}, "allgather_partitions": True,
                          "allgather_bucket_size": 2e8, "overlap_comm": True, "reduce_scatter": True,
                          "reduce_bucket_size": "auto", "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}
HF_ZERO3 = {
    **copy.deepcopy(HF_ZERO2),
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"},
                          "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}


def parsed(*argv: str, config=None) -> TrainerArgs:
    """TrainerArgs as a task gets them from `argv` (the flags typed are the `given` ones), with `config`."""
    args = TrainerArgs.from_namespace(add_trainer_args(argparse.ArgumentParser()).parse_args(list(argv)))
    return dataclasses.replace(args, deepspeed_config=config)


# ---- the rules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_get_every_auto_value(name):
    args = TrainerArgs(deepspeed_config=name, batch_size=3, gradient_accumulation_steps=4, lr=2e-4,
                       weight_decay=0.1, grad_clip=0.5)
    on_cpu = name == "cpu"
    cfg = build_ds_config(args, total_steps=100, on_cpu=on_cpu, hidden_size=HIDDEN)
    assert not auto_values(cfg)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (3, 4)
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["lr"] == 2e-4 and cfg["optimizer"]["params"]["weight_decay"] == 0.1
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.98]  # the file's: --adam_beta* not given
    assert cfg["optimizer"]["params"].get("torch_adam", False) == on_cpu
    assert cfg["optimizer"]["params"].get("fused", False) == on_cpu  # torch's fused CPU AdamW
    assert "train_batch_size" not in cfg  # DeepSpeed derives it from the world size


@pytest.mark.parametrize("config", [HF_ZERO2, HF_ZERO3], ids=["zero2", "zero3"])
def test_auto_values_are_filled_as_transformers_fills_them(config):
    """transformers' own HfTrainerDeepSpeedConfig, given the same settings, fills every key the same."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = parsed("--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5",
                  "--learning_rate", "2e-4", "--adam_beta1", "0.8", "--adam_beta2", "0.95", "--adam_epsilon", "1e-7",
                  "--weight_decay", "0.1", "--warmup_steps", "0")
    ours, _ = resolve(dataclasses.replace(args, deepspeed_config=config), world_size=2, on_cpu=True)
    finalize(ours, total_steps=50, hidden_size=HIDDEN)

    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    hf_args = SimpleNamespace(world_size=2, per_device_train_batch_size=3, gradient_accumulation_steps=4,
                              max_grad_norm=0.5, learning_rate=2e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                              weight_decay=0.1, save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=False,
                              bf16_full_eval=False, get_warmup_steps=lambda total: 0)
    hf.trainer_config_process(hf_args)
    hf.trainer_config_finalize(hf_args, SimpleNamespace(config=SimpleNamespace(hidden_size=HIDDEN)), 50)

    def leaves(node, path=""):
        if isinstance(node, dict):
            return {p: v for k, child in node.items() for p, v in leaves(child, f"{path}.{k}" if path else k).items()}
        return {path: node}

    theirs = leaves(hf.config)
    assert {p: leaves(ours).get(p) for p in theirs} == theirs
    assert theirs["scheduler.params.warmup_num_steps"] == 1  # DeepSpeed refuses 0: both give 1
    if config is HF_ZERO3:
        assert ours["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN ** 2)


def test_a_typed_flag_wins_over_the_file_with_a_warning(caplog):
    config = {"gradient_clipping": 2.0, "optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}}
    cfg, args = resolve(parsed("--grad_clip", "0", "--lr", "1e-3", config=config), world_size=1, on_cpu=True)
    assert cfg["gradient_clipping"] == 0.0  # not DeepSpeed's silent default of 1.0
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and args.lr == 1e-3
    assert "gradient_clipping=2.0 replaced by --grad_clip 0.0" in caplog.text


def test_the_files_values_win_over_flag_defaults():
    """A DeepSpeed user's own config keeps its values; the run uses them (the data loader's batch too)."""
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 2.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "betas": [0.8, 0.9]}}}
    cfg, args = resolve(parsed(config=config), world_size=1, on_cpu=True)
    assert (args.batch_size, args.grad_clip, args.lr, args.adam_beta1, args.adam_beta2) == (4, 2.0, 5e-4, 0.8, 0.9)
    assert cfg["optimizer"]["params"] == {"lr": 5e-4, "betas": [0.8, 0.9], "weight_decay": 0.01, "torch_adam": True,
                                          "fused": True}


def test_an_explicit_train_batch_size_fixes_the_accumulation_or_stops():
    cfg, args = resolve(parsed("--batch_size", "2", config={"train_batch_size": 16}), world_size=2, on_cpu=True)
    assert (args.batch_size, args.gradient_accumulation_steps, cfg["gradient_accumulation_steps"]) == (2, 4, 4)
    with pytest.raises(UserError, match="train_batch_size=15 is not micro batch 2 x accumulation 1 x 2 ranks"):
        resolve(parsed("--batch_size", "2", "--gradient_accumulation_steps", "1", config={"train_batch_size": 15}),
                world_size=2, on_cpu=True)


def test_scheduler_sections_are_filled():
    sched = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                 "total_num_steps": "auto", "warmup_type": "linear"}}
    cfg = build_ds_config(TrainerArgs(deepspeed_config={"scheduler": sched}, lr=1e-3, warmup_steps=5), 50, True)
    assert cfg["scheduler"]["params"] == {"warmup_max_lr": 1e-3, "warmup_num_steps": 5, "total_num_steps": 50,
                                          "warmup_type": "linear"}
    cfg = build_ds_config(TrainerArgs(deepspeed_config={"scheduler": sched}), 50, True)  # --warmup_steps 0
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 1


def test_an_auto_without_a_rule_and_a_model_without_hidden_size_stop_with_the_key():
    with pytest.raises(UserError, match="no rule fills \"auto\" at zero_optimization.sub_group_size"):
        build_ds_config(TrainerArgs(deepspeed_config={"zero_optimization": {"sub_group_size": "auto"}}), 10, True)
    with pytest.raises(UserError, match="reduce_bucket_size are \"auto\".*hidden_size"):
        build_ds_config(TrainerArgs(deepspeed_config={"zero_optimization": {"reduce_bucket_size": "auto"}}), 10, True)


def test_precision_flags():
    assert build_ds_config(TrainerArgs(deepspeed_config="cpu", precision="bf16"), 10, True)["bf16"]["enabled"]
    cfg = build_ds_config(TrainerArgs(deepspeed_config="bf16", precision="fp32"), 10, False)
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        build_ds_config(TrainerArgs(deepspeed_config="fp16"), 10, on_cpu=True)


def test_unknown_or_broken_config_files_are_named(tmp_path):
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.json")) == sorted(SHIPPED)
    with pytest.raises(UserError, match="zero3_offload"):
        build_ds_config(TrainerArgs(deepspeed_config="zero9"), 10, True)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(UserError, match=f"{broken}: not valid JSON \\(line 1"):
        build_ds_config(TrainerArgs(deepspeed_config=str(broken)), 10, True)


def test_a_config_asking_for_foreach_gets_no_fused_flag():
    """torch refuses fused together with foreach: a config that asks for foreach keeps it alone."""
    cfg = build_ds_config(TrainerArgs(deepspeed_config={"optimizer": {"type": "AdamW", "params": {"foreach": True}}}),
                          10, on_cpu=True)
    assert cfg["optimizer"]["params"]["foreach"] is True and "fused" not in cfg["optimizer"]["params"]


# ---- configs written for the Hugging Face Trainer, training -----------------------------------------
def write(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_hf_zero2_config_trains_with_deepspeeds_monitors_beside_ours(tmp_path):
    """WarmupLR with the default --warmup_steps 0 (DeepSpeed refuses 0 warmup steps); DeepSpeed's own
    TensorBoard and CSV monitors switched on, writing into the run folder beside ours."""
    config = {**HF_ZERO2, "tensorboard": {"enabled": True, "job_name": "ds"},
              "csv_monitor": {"enabled": True, "job_name": "ds"}}
    train(tmp_path, "--deepspeed_config", write(tmp_path, config), "--max_steps", "3", "--lr", "1e-3",
          "--val_check_interval", "3")
    # warmup_min_lr 0, then warmup_max_lr = --lr (DeepSpeed's WarmupLR warms up over at least 2 steps, its
    # first at iteration 0; the lr logged at a step is the one it trains with)
    assert scalars(run_dir(tmp_path), "train/lr") == {1: 0, 2: 0, 3: pytest.approx(1e-3)}
    assert [r["step"] for r in records(tmp_path)] == [3]
    monitors = run_dir(tmp_path) / "deepspeed_monitor" / "ds"
    assert sorted(scalars(monitors, "Train/Samples/lr")) == [2, 4, 6]  # DeepSpeed counts samples (batch 2)
    assert (monitors / "Train_Samples_lr.csv").is_file()


def test_wall_clock_breakdown_prints_deepspeeds_timings(tmp_path):
    done = train(tmp_path, "--max_steps", "2", "--ds_override", '{"wall_clock_breakdown": true}')
    assert "time (ms)" in done.stdout


def test_hf_zero3_config_with_a_decaying_schedule_trains_on_two_ranks(tmp_path):
    train(tmp_path, "--deepspeed_config", write(tmp_path, HF_ZERO3), "--max_steps", "5", "--lr", "1e-3",
          "--batch_size", "1", "--val_check_interval", "5", nproc=2)
    lr = scalars(run_dir(tmp_path), "train/lr")  # WarmupDecayLR: to 0 at total_num_steps = 5
    assert lr[1] == lr[2] == 0 and lr[3] == lr[4] == pytest.approx(1e-3) and lr[5] == pytest.approx(2 / 3 * 1e-3)
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert summary["global_step"] == 5 and summary["world_size"] == 2
