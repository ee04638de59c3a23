"""MLM pretraining of a Longformer converted from a short model (the paper's section 5), on WikiText-103.

    python -m ds_longformer.pretrain --model_path distilbert/distilroberta-base \\
        --data_dir data/wikitext-103-raw --max_pos 4096 --max_seq_len 4096 --attention_window 512 \\
        --copy_global_projections --save_model_to data/long_model
    bash launch/multi_gpu.sh 8 ds_longformer.pretrain ... --deepspeed_config zero2

1. --model_path is a short model (RoBERTa/BERT folder with an MLM head): it is converted
   (positions copied up to --max_pos, global projections copied, window --attention_window). A
   Longformer folder is used as it is (its own length and windows). --state_dict_path then loads
   the weights of an earlier long model (a save_pretrained folder or a state-dict file).
2. WikiText-103 (--data_dir, default --cache_dir; the raw/tokens files, the Hugging Face parquet
   files or .txt files: see ds_longformer.data.wikitext) is tokenized once, cached under
   --cache_dir and cut into --max_seq_len blocks; MLM masks 15% of the tokens (80/10/10).
3. Validation reports the loss and bits per character (BPC). At step 0 (before training), when
   --model_path is a short model, it also evaluates that model on 512-token blocks -- the paper's
   comparison: copied positions start near the short model's BPC and training brings the long
   model below it. The step-0 record in metrics.jsonl holds loss and bpc, plus short_model/loss and
   short_model/bpc after a conversion. Validation masks
   are fixed per block, so every evaluation scores the same masked tokens.
4. After training the long model is saved to --save_model_to (Hugging Face folder + tokenizer);
   --copy_global_projections first copies the trained local q/k/v into the global projections,
   which MLM (local attention only) leaves untrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import LongformerConfig, LongformerForMaskedLM
from .convert import convert_to_long, has_mlm_head
from .data.collate import pad_batch
from .data.mlm import MLMCollator, mask_tokens
from .data.wikitext import WikiTextSplit, bits_per_character, load_wikitext
from .engine import Trainer, evaluate, rank_zero_first, seed_everything, setup_logging
from .engine.args import ranged
from .engine.rng import untouched
from .engine.batches import ModelInputs
from .tasks_common import (
    SHORT_MODEL,
    TaskError,
    check_model_folder,
    cli,
    load_baseline,
    load_tokenizer,
    model_loader,
    resolve_model_path,
    task_parser,
    task_preflight,
)
from .short_encoders import copy_local_to_global
from .weights import load_state_dict_into, read_config_json, read_state_dict


def build_parser():
    parser = task_parser("pretrain", __doc__, model_path=SHORT_MODEL, max_seq_len=2048,
                         batch_size=1, gradient_accumulation_steps=8, lr=5e-5, warmup_steps=500, epochs=10,
                         val_check_interval=500, default_root_dir="./logs", project_name="Pretraining",
                         best_metric="bpc", best_mode="min")
    g = parser.add_argument_group("pretraining")
    g.add_argument("--attention_window", type=ranged(int, "attention_window", minimum=2, even=True), default=512,
                   help="window of a converted short model (even: window/2 tokens on each side)")
    g.add_argument("--max_pos", type=ranged(int, "max_pos", minimum=3), default=2048,
                   help="positions of a converted short model")
    g.add_argument("--data_dir", default=None, help="WikiText-103 folder; None: --cache_dir")
    g.add_argument("--state_dict_path", default=None,
                   help="weights of an earlier long model to start from (folder or .safetensors/.bin/.pt)")
    g.add_argument("--copy_global_projections", action="store_true",
                   help="copy the trained local q/k/v into the global projections before saving")
    g.add_argument("--save_model_to", default="./data/long_model")
    return parser


# ---- model --------------------------------------------------------------------------------------
@model_loader
def load_long_model(model_path: Path, max_pos: int, attention_window: int) -> tuple[LongformerForMaskedLM, bool]:
    """(long MLM model in training mode, whether it was converted from a short one)."""
    if read_config_json(model_path).get("model_type") == "longformer":
        return LongformerForMaskedLM.from_pretrained(model_path).train(), False
    if not has_mlm_head(model_path):
        raise TaskError(f"{model_path} has no MLM head (lm_head.* / cls.predictions.*): MLM pretraining "
                        "needs the short model's ...ForMaskedLM weights")
    return convert_to_long(model_path, max_pos, attention_window).train(), True


@model_loader
def planned_max_tokens(model_path: Path, max_pos: int) -> int:
    """Positions of the long model: a Longformer folder's own, else --max_pos (the conversion's)."""
    config = read_config_json(model_path)
    if config.get("model_type") != "longformer":
        return max_pos
    return LongformerConfig.from_dict(config).max_tokens


@model_loader
def load_weights(model: LongformerForMaskedLM, path: str | Path) -> None:
    """Load --state_dict_path: a save_pretrained folder, or a file holding model.state_dict()
    (weights.read_state_dict); every weight must fit (weights.load_state_dict_into, strict)."""
    load_state_dict_into(model, read_state_dict(path), f"--state_dict_path {path}", strict=True)


def copy_global_projections(folder: Path) -> None:
    model = LongformerForMaskedLM.from_pretrained(folder)
    state = model.state_dict()
    copy_local_to_global(state)
    model.load_state_dict(state)
    model.save_pretrained(folder)


# ---- data and metrics ---------------------------------------------------------------------------
class FixedMaskBlocks(Dataset):
    """Validation blocks, each masked with a generator seeded by its index: every evaluation (and
    any number of ranks or batch size) scores the same masked tokens."""

    def __init__(self, blocks, tokenizer, seed: int):
        self.blocks, self.seed = blocks, seed
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.mask_token_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        ids = torch.as_tensor(self.blocks[index]["input_ids"], dtype=torch.long)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        masked, labels = mask_tokens(ids, torch.isin(ids, self.special_ids), self.mask_token_id,
                                     self.vocab_size, generator=generator, special_ids=self.special_ids)
        return {"input_ids": masked, "labels": labels}


class PretrainCollator:
    """Training blocks get fresh masks (MLMCollator); validation items come masked and are padded."""

    def __init__(self, tokenizer):
        self.mlm, self.pad_token_id = MLMCollator(tokenizer), tokenizer.pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        return pad_batch(features, self.pad_token_id) if "labels" in features[0] else self.mlm(features)


METRICS = ("loss", "bpc")  # what a validation reports (bpc_metrics)


def masked_nll(outputs, batch) -> dict:
    """Sum of the masked tokens' negative log-likelihoods (nats) and their number. Under sequence
    parallelism the model gives no logits, and the batch's mean loss (over its masked tokens) instead."""
    if outputs.logits is None:
        masked = (batch["labels"] != -100).sum().item()
        return {"nll": outputs.loss.item() * masked if masked else 0.0, "masked": masked}
    labels = batch["labels"].to(outputs.logits.device)
    nll = F.cross_entropy(outputs.logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
    return {"nll": nll.item(), "masked": (labels != -100).sum().item()}


def bpc_metrics(split: WikiTextSplit):
    """reduce_metrics for a split: the loss as the mean NLL over the masked tokens of all blocks (not
    the mean of per-block means: a block with no masked token has none), and BPC from it (see
    data.wikitext)."""
    def reduce(totals: dict) -> dict:
        loss = totals["nll"] / totals["masked"] if totals["masked"] else float("nan")
        return {"loss": loss, "bpc": bits_per_character(loss, split.n_tokens, split.n_chars)}

    return reduce


def short_model_report(args, model_path: Path, tokenizer, collate) -> dict:
    """The paper's reference point: the short model itself (full attention) on its own 512-token
    blocks of the validation text -- loss and BPC, each rank scoring its share of the blocks (no
    DeepSpeed: the short model is only evaluated), as the trainer evaluates the long one."""
    from deepspeed.accelerator import get_accelerator

    model, max_len = load_baseline(LongformerForMaskedLM, model_path)
    with rank_zero_first():
        split = load_wikitext(args.data_dir or args.cache_dir, tokenizer, max_len, args.cache_dir, ("validation",),
                              args.num_workers or None)["validation"]
    device = get_accelerator().current_device_name()
    model.to(device).eval()
    forward = ModelInputs(model, device)
    metrics = evaluate(lambda batch: model(**forward(batch)), FixedMaskBlocks(split.blocks, tokenizer, args.seed),
                       args.batch_size, collate, compute_metrics=masked_nll, reduce_metrics=bpc_metrics(split))
    return {f"short_model/{k}": v for k, v in metrics.items()}


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    """Pretrain; returns the trainer's summary plus the step-0 report (``step0``, empty on resume)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    trainer_args = task_preflight(args, METRICS, save_model_to=args.save_model_to)
    if args.state_dict_path and not Path(args.state_dict_path).exists():
        raise TaskError(f"--state_dict_path {args.state_dict_path} does not exist")
    model_path = resolve_model_path(args.model_path)
    check_model_folder(model_path)
    max_tokens = planned_max_tokens(model_path, args.max_pos)
    if args.max_seq_len > max_tokens:
        raise TaskError(f"--max_seq_len {args.max_seq_len} exceeds the long model's {max_tokens} positions (raise "
                        "--max_pos when converting)")
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_path)
    tokenizer.model_max_length = max_tokens  # saved with the long model

    with rank_zero_first():  # the data before the model: a data error comes before any conversion
        data = load_wikitext(args.data_dir or args.cache_dir, tokenizer, args.max_seq_len, args.cache_dir,
                             ("train", "validation"), args.num_workers or None)
    seed_everything(args.seed)
    model, converted = load_long_model(model_path, args.max_pos, args.attention_window)
    if args.state_dict_path:
        load_weights(model, args.state_dict_path)
    collate = PretrainCollator(tokenizer)
    val = FixedMaskBlocks(data["validation"].blocks, tokenizer, args.seed)
    trainer = Trainer(model, trainer_args, data["train"].blocks, val, collate_fn=collate,
                      compute_metrics=masked_nll, reduce_metrics=bpc_metrics(data["validation"]), tokenizer=tokenizer)
    step0 = {}
    if trainer.global_step == 0:  # not when resuming
        with untouched():  # a measurement: loading the short model draws its initial weights
            step0 = trainer.evaluate(val)
            if converted:
                step0.update(short_model_report(args, model_path, tokenizer, collate))
        trainer.log_record(step0)
        if trainer.rank == 0:
            print(json.dumps({"step": 0, "max_seq_len": args.max_seq_len, **step0}))

    summary = trainer.fit()
    save_to = Path(args.save_model_to)
    trainer.export(save_to)
    if trainer.rank == 0 and args.copy_global_projections:
        copy_global_projections(save_to)
    dist.barrier()  # the folder is complete on every rank's return
    return {**summary, "step0": step0, "saved_model": str(save_to)}


if __name__ == "__main__":
    cli(main)
