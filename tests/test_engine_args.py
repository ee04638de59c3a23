"""engine/args.py: one definition per trainer flag, the parser made from it, Hugging Face's names as
aliases, which flags the user typed, ranges."""

import argparse
import dataclasses

import pytest

from ds_longformer.engine import TrainerArgs, add_trainer_args
from ds_longformer.engine.args import flag_fields

# Hugging Face TrainingArguments name -> ours
HF_ALIASES = {
    "--learning_rate": "lr", "--per_device_train_batch_size": "batch_size", "--output_dir": "default_root_dir",
    "--eval_steps": "val_check_interval", "--save_steps": "save_every_n_steps", "--logging_steps": "log_every_n_steps",
    "--save_total_limit": "keep_last_k", "--max_grad_norm": "grad_clip", "--resume_from_checkpoint": "resume",
    "--deepspeed": "deepspeed_config", "--num_train_epochs": "epochs", "--dataloader_num_workers": "num_workers",
    "--metric_for_best_model": "best_metric",
}


def parser() -> argparse.ArgumentParser:
    return add_trainer_args(argparse.ArgumentParser())


def test_cli_flags_fill_trainer_args():
    p = parser()
    p.set_defaults(lr=3e-5, project_name="classify")  # how a task sets its defaults
    ns = p.parse_args("--deepspeed_config zero3 --batch_size 4 --gradient_accumulation_steps 2 --epochs 3 "
                      "--max_steps 7 --val_check_interval 5 --default_root_dir r --seed 1 "
                      "--gradient_checkpointing --resume latest --weight_decay 0 --warmup_steps 9".split())
    args = TrainerArgs.from_namespace(ns)
    assert args == TrainerArgs(deepspeed_config="zero3", batch_size=4, gradient_accumulation_steps=2, lr=3e-5,
                               weight_decay=0.0, warmup_steps=9, epochs=3, max_steps=7, val_check_interval=5,
                               default_root_dir="r", project_name="classify", seed=1, gradient_checkpointing=True,
                               resume="latest")


def test_every_field_is_a_flag_with_its_default_and_help():
    defaults = vars(parser().parse_args([]))
    for f in flag_fields():
        assert defaults[f.name] == f.default and f.metadata["help"], f.name
    assert {f.name for f in dataclasses.fields(TrainerArgs)} - {f.name for f in flag_fields()} == {"given"}


@pytest.mark.parametrize("alias, field", sorted(HF_ALIASES.items()))
def test_hugging_face_names_are_aliases(alias, field):
    value = {"resume": "latest", "deepspeed_config": "zero2", "default_root_dir": "out",
             "best_metric": "accuracy"}.get(field, "3")
    ns = parser().parse_args([alias, value])
    args = TrainerArgs.from_namespace(ns)
    default = getattr(TrainerArgs(), field)
    expected = value if default is None else type(default)(value)
    assert getattr(args, field) == expected and args.given == {field}


def test_precision_shortcuts_and_adam_flags():
    args = TrainerArgs.from_namespace(parser().parse_args(["--bf16", "--adam_beta2", "0.98", "--adam_epsilon", "1e-6"]))
    assert (args.precision, args.adam_beta2, args.adam_epsilon) == ("bf16", 0.98, 1e-6)
    assert TrainerArgs.from_namespace(parser().parse_args(["--fp16"])).precision == "fp16"


def test_help_has_one_entry_per_flag_naming_its_alias(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--lr LR, --learning_rate LR" in help_text
    assert "--default_root_dir DEFAULT_ROOT_DIR, --output_dir DEFAULT_ROOT_DIR" in help_text
    for f in flag_fields():
        assert help_text.count(f"--{f.name} ") + help_text.count(f"--{f.name}\n") >= 1, f.name


def test_given_flags_are_those_typed():
    p = parser()
    p.set_defaults(lr=1e-3)
    args = TrainerArgs.from_namespace(p.parse_args(["--learning_rate", "1e-3", "--seed", "3"]))
    assert args.given == {"lr", "seed"}  # typed, although equal to the (task's) default
    assert args.is_given("lr") and not args.is_given("batch_size")
    built = TrainerArgs(lr=1e-3)  # in code: the fields set to something else than their default
    assert built.is_given("lr") and not built.is_given("batch_size")


def test_ranges_are_checked_by_the_parser_and_in_code(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--logging_steps", "0"])
    assert "--log_every_n_steps must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--gradient_accumulation_steps must be at least 1"):
        TrainerArgs(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="--best_mode must be one of min, max"):
        TrainerArgs(best_mode="best")


def test_a_subset_of_flags_with_other_defaults():
    """As the quickstart uses them: its --output_dir is the trainer's --default_root_dir."""
    p = add_trainer_args(argparse.ArgumentParser(), only=("lr", "default_root_dir"))
    p.set_defaults(default_root_dir="quickstart_out")
    assert vars(p.parse_args([])) == {"lr": 5e-5, "default_root_dir": "quickstart_out"}
    assert p.parse_args(["--output_dir", "x"]).default_root_dir == "x"
