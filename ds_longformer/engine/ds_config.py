"""The DeepSpeed config: a file (a path, a name in ds_configs/, or a dict) with every "auto" filled in.

Built in two steps, as transformers' DeepSpeed integration does (``HfTrainerDeepSpeedConfig``:
``trainer_config_process`` then ``trainer_config_finalize``), with the same rules, so a config
written for the Hugging Face Trainer runs unchanged:

``resolve(args, world_size, on_cpu, run_dir) -> (config, args)``, before the data loader exists:

==========================================  ====================================================
key                                          "auto" becomes
==========================================  ====================================================
sequence_parallel_size                      --sequence_parallel_size P (written only when P > 1)
train_micro_batch_size_per_gpu              --batch_size
gradient_accumulation_steps                 --gradient_accumulation_steps
train_batch_size                            micro batch x accumulation x ranks / P
gradient_clipping                           --grad_clip
optimizer.params.lr, weight_decay           --lr, --weight_decay
optimizer.params.betas, eps                 [--adam_beta1, --adam_beta2], --adam_epsilon
scheduler.params.warmup_min_lr              0
scheduler.params.warmup_max_lr              --lr
scheduler.params.warmup_num_steps           max(1, --warmup_steps) (DeepSpeed refuses 0)
fp16.enabled, bf16.enabled                  --precision; bf16 "auto": bf16 on a bf16-capable GPU
==========================================  ====================================================

``finalize(config, total_steps, hidden_size)``, once the model and the run's length are known:

==========================================  ====================================================
scheduler.params.total_num_steps            the run's optimizer steps
zero_optimization.reduce_bucket_size        hidden_size^2
zero_optimization.stage3_prefetch_bucket_size      int(0.9 x hidden_size^2)
zero_optimization.stage3_param_persistence_threshold  10 x hidden_size
==========================================  ====================================================

One difference: a bf16 section's ``"enabled": "auto"`` means bf16 on a bf16-capable GPU (the shipped
configs rely on it), where transformers reads its --bf16 flag (off by default).

A value written in the file (not "auto") is used as written -- and the returned args say so, e.g.
the data loader's batch is the file's micro batch -- unless the user typed the flag that sets it:
then the flag wins, with a warning. (transformers stops at any difference instead, also against a
flag's default; here a DeepSpeed user's own config keeps its values.) Keys the file leaves out:
the micro batch, accumulation, clipping (DeepSpeed would silently clip at 1.0), lr and weight decay
come from the flags; betas and eps only when their flags are typed (else DeepSpeed's defaults, which
are the flags' defaults). An explicit ``train_batch_size`` fixes the accumulation (or the micro
batch) that neither the file nor a flag fixed, as DeepSpeed derives it; one that cannot hold stops
the run. An "auto" without a rule stops the run naming it, instead of reaching DeepSpeed.

Also: on CPU the optimizer is torch's fused AdamW (no JIT-compiled DeepSpeed kernel); DeepSpeed's
own ``tensorboard``/``csv_monitor`` sections write under the run folder unless they name an
``output_path``; DeepSpeed's step prints stay off (``steps_per_print``) unless the file sets them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch

from . import parallel
from .args import TrainerArgs
from .errors import UserError

logger = logging.getLogger(__name__)



def find_config_dir() -> Path:
    """ds_configs/: packaged inside ds_longformer/ by `pip install .`, beside it in a checkout (and an
    editable install)."""
    package = Path(__file__).resolve().parents[1]
    return package / "ds_configs" if (package / "ds_configs").is_dir() else package.parent / "ds_configs"


CONFIG_DIR = find_config_dir()


def load_ds_config(config: str | dict | None, on_cpu: bool) -> dict:
    """The config as a dict: a copy of a dict, a JSON path, or a name in ds_configs/ (None: cpu on CPU,
    zero2 on GPU)."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if config is None:
        config = "cpu" if on_cpu else "zero2"
    path = Path(config)
    if not path.is_file():
        path = CONFIG_DIR / f"{config}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise UserError(f"--deepspeed_config {config}: no such file, and not a name in ds_configs/ ({names})")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed_config {path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--deepspeed_config {path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


class _Filler:
    """Fills one config from one TrainerArgs; ``args`` becomes the values the run uses."""

    def __init__(self, config: dict, args: TrainerArgs):
        self.config, self.args = config, args

    def section(self, path: str, create: bool) -> tuple[dict | None, str]:
        *parents, key = path.split(".")
        node = self.config
        for name in parents:
            if not isinstance(node.get(name), dict):
                if not create:
                    return None, key
                node[name] = {}
            node = node[name]
        return node, key

    def sync(self, path: str, fields: str | tuple[str, ...], value=None, create: bool = True) -> bool:
        """Make the config's ``path`` and the args' ``fields`` agree (see the module docstring);
        ``value``: what the fields give the config (default: their values). Returns whether the value
        was chosen, by the file or by a typed flag (False: "auto", missing, or a flag's default)."""
        fields = (fields,) if isinstance(fields, str) else fields
        wanted = value if value is not None else (
            getattr(self.args, fields[0]) if len(fields) == 1 else [getattr(self.args, f) for f in fields])
        typed = any(self.args.is_given(f) for f in fields)
        node, key = self.section(path, create)
        if node is None or (key not in node and not create):
            return False
        written = node.get(key, "auto")
        if written == "auto":
            node[key] = wanted
            return typed
        if written == wanted:
            return True
        flags = "/".join(f"--{f}" for f in fields)
        if typed:
            logger.warning("DeepSpeed config %s=%r replaced by %s %r", path, written, flags, wanted)
            node[key] = wanted
        else:
            logger.debug("DeepSpeed config %s=%r used (%s not given)", path, written, flags)
            values = written if len(fields) > 1 else [written]
            if len(values) != len(fields):
                raise UserError(f"DeepSpeed config {path}={written!r}: expected {len(fields)} values")
            self.args = dataclasses.replace(self.args, **dict(zip(fields, values)))
        return True

    def fill(self, path: str, value) -> None:
        """Fill ``path`` when it says "auto" (transformers' fill_only)."""
        node, key = self.section(path, create=False)
        if node is not None and node.get(key) == "auto":
            node[key] = value


def resolve(args: TrainerArgs, world_size: int, on_cpu: bool, run_dir: Path | None = None
            ) -> tuple[dict, TrainerArgs]:
    """Step one (see the module docstring): the config with the run's values, and the args it implies."""
    filler = _Filler(load_ds_config(args.deepspeed_config, on_cpu), args)
    config = filler.config
    filler.sync("sequence_parallel_size", "sequence_parallel_size", create=args.sequence_parallel_size > 1)
    replicas = parallel.data_parallel_size(world_size, filler.args.sequence_parallel_size)
    fixed_micro = filler.sync("train_micro_batch_size_per_gpu", "batch_size")
    fixed_accumulation = filler.sync("gradient_accumulation_steps", "gradient_accumulation_steps")
    _global_batch(filler, replicas, fixed_micro, fixed_accumulation)
    filler.sync("gradient_clipping", "grad_clip")

    optimizer = config.setdefault("optimizer", {"type": "AdamW"})
    params = optimizer.setdefault("params", {})
    filler.sync("optimizer.params.lr", "lr")
    filler.sync("optimizer.params.weight_decay", "weight_decay")
    betas = ("adam_beta1", "adam_beta2")
    filler.sync("optimizer.params.betas", betas, create=any(filler.args.is_given(f) for f in betas))
    filler.sync("optimizer.params.eps", "adam_epsilon", create=filler.args.is_given("adam_epsilon"))
    if on_cpu:  # DeepSpeed's CPU FusedAdam is a ~2 min JIT compile; torch's AdamW is as good here
        params.setdefault("torch_adam", True)
        if params["torch_adam"] and "foreach" not in params:  # (torch refuses fused with foreach)
            # torch's fused CPU AdamW: one pass over each tensor, 5x faster than its default per-tensor
            # loop (82 vs 422 ms a step for 53M parameters, one thread); the same update up to rounding
            params.setdefault("fused", True)

    if "scheduler" in config:
        filler.fill("scheduler.params.warmup_min_lr", 0)
        filler.fill("scheduler.params.warmup_max_lr", filler.args.lr)
        filler.sync("scheduler.params.warmup_num_steps", "warmup_steps", value=max(1, filler.args.warmup_steps),
                    create=False)
    _set_precision(config, filler.args.precision, on_cpu)
    for monitor in ("tensorboard", "csv_monitor"):  # DeepSpeed's own, beside ours: into the run folder
        section = config.get(monitor)
        enabled = isinstance(section, dict) and section.get("enabled")
        if run_dir is not None and enabled and not section.get("output_path"):
            section["output_path"] = str(Path(run_dir) / "deepspeed_monitor")
    config.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed's step prints off
    return config, filler.args


def _global_batch(filler: _Filler, world_size: int, fixed_micro: bool, fixed_accumulation: bool) -> None:
    """train_batch_size: "auto" -> micro x accumulation x ranks; a written one must hold, fixing the
    accumulation or the micro batch that nobody fixed (as DeepSpeed derives the third of the three)."""
    config, args = filler.config, filler.args
    micro, accumulation = args.batch_size, args.gradient_accumulation_steps
    written = config.get("train_batch_size")
    if written is None or written == "auto":
        if written == "auto":
            config["train_batch_size"] = micro * accumulation * world_size
        return
    if written == micro * accumulation * world_size:
        return
    if not fixed_accumulation and written % (micro * world_size) == 0:
        accumulation = written // (micro * world_size)
    elif not fixed_micro and written % (accumulation * world_size) == 0:
        micro = written // (accumulation * world_size)
    else:
        raise UserError(f"DeepSpeed config train_batch_size={written} is not micro batch {micro} x accumulation "
                        f"{accumulation} x {world_size} ranks = {micro * accumulation * world_size}: change it (or "
                        "--batch_size / --gradient_accumulation_steps), or set it to \"auto\"")
    logger.info("DeepSpeed config train_batch_size=%d: micro batch %d x accumulation %d x %d ranks", written, micro,
                accumulation, world_size)
    config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = micro, accumulation
    filler.args = dataclasses.replace(args, batch_size=micro, gradient_accumulation_steps=accumulation)


def finalize(config: dict, total_steps: int, hidden_size: int | None) -> dict:
    """Step two (see the module docstring): the values that need the model and the run's length; then
    no "auto" may be left."""
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        from_hidden = {"reduce_bucket_size": lambda h: h * h,
                       "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                       "stage3_param_persistence_threshold": lambda h: 10 * h}
        wanted = [key for key in from_hidden if zero.get(key) == "auto"]
        if wanted and hidden_size is None:
            raise UserError(f"DeepSpeed config zero_optimization: {', '.join(wanted)} are \"auto\", filled from the "
                            "model's config.hidden_size, which this model lacks: write numbers there")
        for key in wanted:
            zero[key] = from_hidden[key](hidden_size)
    schedule = config.get("scheduler", {}).get("params", {})
    if schedule.get("total_num_steps") == "auto":
        schedule["total_num_steps"] = total_steps
    elif "total_num_steps" in schedule and schedule["total_num_steps"] != total_steps:
        logger.warning("DeepSpeed config scheduler.params.total_num_steps=%s, but this run trains %d steps",
                       schedule["total_num_steps"], total_steps)
    left = auto_values(config)
    if left:
        raise UserError(f"DeepSpeed config: no rule fills \"auto\" at {', '.join(left)}; write values there")
    return config


def build_ds_config(args: TrainerArgs, total_steps: int, on_cpu: bool, world_size: int = 1,
                    hidden_size: int | None = None) -> dict:
    """Both steps at once, where no data loader depends on the result (the train-step benchmark)."""
    config, _ = resolve(args, world_size, on_cpu)
    return finalize(config, total_steps, hidden_size)


def auto_values(node, path: str = "") -> list[str]:
    """Dotted paths of the "auto" values left in a config."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in auto_values(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def _set_precision(config: dict, precision: str, on_cpu: bool) -> None:
    if precision != "auto":
        config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
        config["fp16"] = {**config.get("fp16", {}), "enabled": precision == "fp16"}
    for name in ("bf16", "fp16"):
        if config.get(name, {}).get("enabled") == "auto":
            config[name]["enabled"] = name == "bf16" and not on_cpu and torch.cuda.is_bf16_supported()
    fp16, bf16 = config.get("fp16", {}).get("enabled", False), config.get("bf16", {}).get("enabled", False)
    if fp16 and bf16:
        raise UserError("the DeepSpeed config enables both fp16 and bf16: choose one (--precision)")
    if fp16 and on_cpu:
        raise UserError("fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use --precision bf16 or fp32")
