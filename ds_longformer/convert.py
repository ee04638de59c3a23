"""Turn a short pretrained encoder into a Longformer (the paper's section 5 recipe).

    python -m ds_longformer.convert --source DIR --output DIR --max_pos 4096 --attention_window 512

* The source is read through our classes' from_pretrained: a short encoder's weights renamed and
  its local query/key/value copied into query_global/key_global/value_global (short_encoders.py).
* Positions: the short table's rows are copied over and over until the new table holds `max_pos`
  positions. RoBERTa keeps its two reserved rows (0 = <s> slot unused, 1 = padding) and repeats
  rows 2..513; BERT-style models number positions from 0, so their rows 0..511 are repeated after
  the padding row(s).
* Tokenizer: copied with `model_max_length = max_pos`; a BERT source's [CLS]/[SEP] ids, which its
  config does not name, are taken from it into the long model's config.

Supported sources: RoBERTa / DistilRoBERTa / XLM-R / CamemBERT and BERT-style encoders (with or
without their MLM head), and Longformer folders (to lengthen them further). Not supported: models
with relative or rotary positions, DistilBERT/ALBERT/DeBERTa layouts (other parameter names).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .model import LongformerForMaskedLM, LongformerModel
from .weights import read_weight_names

log = logging.getLogger(__name__)


def extend_position_table(table: torch.Tensor, reserved: int, max_pos: int) -> torch.Tensor:
    """(P_short, C) -> (max_pos + reserved, C): keep the `reserved` leading rows, then repeat the
    short model's learned rows until max_pos positions are filled."""
    learned = table[reserved:]
    if max_pos < len(learned):
        raise ValueError(f"--max_pos {max_pos} is shorter than the source model's {len(learned)} positions")
    new = table.new_empty(max_pos + reserved, table.shape[1])
    new[:reserved] = table[:reserved]
    for start in range(0, max_pos, len(learned)):
        n = min(len(learned), max_pos - start)
        new[reserved + start: reserved + start + n] = learned[:n]
    return new


def has_mlm_head(folder: str | Path) -> bool:
    return any(k.startswith(("lm_head.", "cls.predictions.")) for k in read_weight_names(folder))


def convert_to_long(source: str | Path, max_pos: int = 4096, attention_window: int | list[int] | None = None):
    """Load a short encoder (or a Longformer) from `source` and return the long model
    (LongformerForMaskedLM when the source has an MLM head, else LongformerModel). attention_window
    None: 512 for a short encoder, the source's own windows for a Longformer."""
    cls = LongformerForMaskedLM if has_mlm_head(source) else LongformerModel
    model = cls.from_pretrained(source, **({} if attention_window is None else {"attention_window": attention_window}))
    config = model.config
    reserved = config.pad_token_id + 1
    emb = model.base_model.embeddings
    new_table = extend_position_table(emb.position_embeddings.weight.data, reserved, max_pos)
    emb.position_embeddings = torch.nn.Embedding.from_pretrained(
        new_table, freeze=False, padding_idx=config.pad_token_id)
    config.max_position_embeddings = new_table.shape[0]
    return model


def load_tokenizer(source: str | Path, max_pos: int):
    """The source's tokenizer with model_max_length raised, or None (with a warning) if it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), model_max_length=max_pos)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer saved: could not load one from %s (%s)", source, err)
        return None
    tokenizer.model_max_length = max_pos
    return tokenizer


def fill_special_ids(config, tokenizer) -> None:
    """[CLS]/[SEP] ids a BERT-style config does not name, from its tokenizer (never guessed)."""
    from .data.common import sequence_bounds

    if None not in (config.bos_token_id, config.eos_token_id, config.sep_token_id):
        return
    try:
        start, end = sequence_bounds(tokenizer)
    except ValueError:  # a tokenizer without such tokens: the ids stay unset (null in config.json)
        return
    for field, value in (("bos_token_id", start), ("eos_token_id", end), ("sep_token_id", end)):
        if getattr(config, field) is None:
            setattr(config, field, value)


def save_tokenizer(tokenizer, output: str | Path, max_pos: int) -> None:
    """Write the tokenizer with model_max_length = max_pos (also in tokenizer_config.json)."""
    tokenizer.save_pretrained(str(output))
    cfg_path = Path(output) / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["model_max_length"] = max_pos
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def long_model_and_tokenizer(source: str | Path, max_pos: int = 4096, attention_window: int | list[int] | None = None):
    """(the long model, the source's tokenizer or None): what `convert` writes; reads only."""
    model = convert_to_long(source, max_pos, attention_window)
    tokenizer = load_tokenizer(source, max_pos)
    if tokenizer is not None:
        fill_special_ids(model.config, tokenizer)
    return model, tokenizer


def save_long(model, tokenizer, output: str | Path, max_pos: int) -> None:
    model.save_pretrained(output)
    if tokenizer is not None:
        save_tokenizer(tokenizer, output, max_pos)
    log.info("wrote %s: %s, %d positions, windows %s", output, type(model).__name__, max_pos,
             model.config.attention_window)


def convert(source: str | Path, output: str | Path, max_pos: int = 4096,
            attention_window: int | list[int] | None = None):
    """Convert and write a Hugging Face folder (model + tokenizer) to `output`; returns the model."""
    model, tokenizer = long_model_and_tokenizer(source, max_pos, attention_window)
    save_long(model, tokenizer, output, max_pos)
    return model


def build_parser():
    from .engine.args import ranged
    from .tasks_common import ArgumentParser

    p = ArgumentParser(prog="python -m ds_longformer.convert", description=__doc__)
    p.add_argument("--source", required=True,
                   help="local Hugging Face folder of the model to lengthen (a short encoder or a Longformer)")
    p.add_argument("--output", required=True, help="folder to write the long model to (created; written whole or "
                                                   "not at all)")
    p.add_argument("--max_pos", type=ranged(int, "max_pos", minimum=1), default=4096,
                   help="positions of the long model")
    p.add_argument("--attention_window", type=ranged(int, "attention_window", minimum=2, even=True), nargs="+",
                   default=None, help="total window (even), one value for all layers or one per layer (default: 512 "
                                      "for a short encoder, the source's own windows for a Longformer)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it already holds files")
    return p


def run(argv=None) -> None:
    """The program; user errors are UserErrors (tasks_common.cli prints them)."""
    from .engine.files import replace_folder, staging_folder, writable_folder
    from .tasks_common import TaskError, check_model_folder, model_loader

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source, output = Path(args.source), Path(args.output)
    if not source.is_dir():
        raise TaskError(f"--source {source}: no such folder (a local Hugging Face folder: config.json + weights)")
    if output.resolve() == source.resolve():
        raise TaskError(f"--output {output} is the --source folder: write the long model to another folder")
    if output.exists() and not output.is_dir():
        raise TaskError(f"--output {output} is a file: name a folder")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise TaskError(f"--output {output} already exists and is not empty: pass --overwrite to replace it, or "
                        "name another folder")
    writable_folder(output.parent, "--output")
    check_model_folder(source)
    window = args.attention_window
    if window is not None and len(window) == 1:
        window = window[0]
    model, tokenizer = model_loader(long_model_and_tokenizer)(source, args.max_pos, window)
    # Written beside --output and renamed into place: a failed or killed run leaves no half model.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(output)
    try:
        save_long(model, tokenizer, staging, args.max_pos)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, output)


def main(argv=None):
    from .tasks_common import cli

    cli(run, argv)


if __name__ == "__main__":
    main()
