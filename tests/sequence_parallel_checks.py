"""Sequence parallelism at P=2 against one device, as a program for 2 gloo ranks (tests/test_sequence_parallel.py
starts it once under torchrun and asserts on the JSON it writes: one launch for every case).

    torchrun --nproc_per_node 2 -m tests.sequence_parallel_checks OUT_DIR

Cases (tiny models: hidden 32, 4 heads, windows 32/16; a batch of 3 sequences of N=256 tokens, at P=2
shards [0, 128) and [128, 256): example 0 unpadded with global tokens 0, 130, 250 on both shards,
example 1 of 120 tokens (padding ends shard 0 and fills shard 1) with globals 3 and 110, example 2 of
200 tokens with its one global token 140 on the second shard):

* equivalence: the loss and every parameter's gradient at P=2 (summed over the group, as DeepSpeed
  does) against the unmodified model on one process, dropout off: MLM, classification and WikiHop
  heads, absorbed and projected global rows, gradient checkpointing, an N that P does not divide;
* engine: through deepspeed.initialize with the mpu, ZeRO-2 and ZeRO-3 (the config as the Trainer
  prepares it, every parameter partitioned): DeepSpeed's gradient after engine.backward against the
  one-process one; and ZeRO-3 with reduce_scatter true, the trap the engine refuses;
* eval: losses and logits in eval mode;
* dropout: masks of the two shards and of heads on the two ranks independent (and identical without
  a stream per rank: the trap); checkpointing redraws the same masks;
* resume: a Trainer at P=2 with dropout on resumed from its step-2 checkpoint equals the uninterrupted run.
* same_batch: the check that the ranks of a group hold the same batch.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ds_longformer import LongformerConfig
from ds_longformer.attention import AttentionLayout, blocked_band
from ds_longformer.engine import Trainer, TrainerArgs, init_distributed, seed_everything
from ds_longformer.engine import ds_config, parallel
from ds_longformer.model import LongformerForMaskedLM, LongformerForSequenceClassification
from ds_longformer.sequence_parallel import SequenceParallel
from ds_longformer.wikihop import WikiHopModel
from tests import trainer_helpers

N, B = 256, 3
HEADS = {"mlm": LongformerForMaskedLM, "cls": LongformerForSequenceClassification, "wikihop": WikiHopModel}


def tiny_model(head: str, global_path: str = "auto", dropout: float = 0.0, checkpointing: bool = False):
    torch.manual_seed(0)  # the same weights on every rank
    config = LongformerConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=300, attention_window=[32, 16],
                              hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2)
    model = HEADS[head](config).train()
    for layer in model.base_model.encoder.layer:
        layer.attention.self.global_path = global_path
    if checkpointing:
        model.activation_checkpointing_enable()
    return model


def make_batch(head: str, n: int = N) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (B, n), generator=g)
    am = torch.ones(B, n, dtype=torch.long)
    for b, length in enumerate((n, 120, 200)):
        am[b, length:] = 0
    ids[am == 0] = 1
    ids[:, 0] = 0  # <s>
    gm = torch.zeros(B, n, dtype=torch.long)
    for b, positions in enumerate(([0, 130, n - 6], [3, 110], [140])):
        gm[b, positions] = 1
    batch = {"input_ids": ids, "attention_mask": am, "global_attention_mask": gm}
    if head == "mlm":
        batch["labels"] = torch.where((torch.rand(B, n, generator=g) < 0.15) & am.bool(), ids, -100)
    elif head == "cls":
        batch["labels"] = torch.tensor([1, 0, 1])
    else:  # 3 chunks of 2 examples; candidates on both shards
        batch["candidate_positions"] = torch.tensor([[1, 100, 129, n - 5], [2, 50, 100, 119], [10, 127, 128, 199]])
        batch["chunk_to_example"] = torch.tensor([0, 0, 1])
        batch["candidate_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
        batch["labels"] = torch.tensor([2, 0])
    return batch


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def compare(reference: dict, got: dict) -> dict:
    """Worst max|got - ref| / the model's largest gradient; worst per-parameter relative error over the
    parameters whose gradient is not (near) zero (zero in exact arithmetic: key_global's bias, which
    softmax cancels, holds rounding noise only); parameters without a gradient."""
    scale = max(float(r.abs().max()) for r in reference.values() if r is not None)
    missing = sorted(n for n, g in got.items() if g is None)
    abs_err = rel_err = 0.0
    for name, ref in reference.items():
        ref = torch.zeros_like(got[name]) if ref is None else ref
        if got[name] is None:
            continue
        diff = float((got[name] - ref).abs().max())
        abs_err = max(abs_err, diff / scale)
        if float(ref.abs().max()) > 1e-3 * scale:
            rel_err = max(rel_err, diff / float(ref.abs().max()))
    return {"grad_abs_err": abs_err, "grad_rel_err": rel_err, "missing": missing}


def step(model, batch: dict, group=None, seed: int = 1):
    """Loss and gradients of one forward/backward; with a group the gradients are summed over it."""
    model.set_sequence_parallel(group)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = gradients(model)
    if group is not None:
        for g in grads.values():
            if g is not None:
                dist.all_reduce(g, group=group)
    return loss.item(), grads


def gather(value: float, group) -> list[float]:
    values = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(values, torch.tensor([value], dtype=torch.float64), group=group)
    return [v.item() for v in values]


# ---- cases ---------------------------------------------------------------------------------------
def equivalence(group) -> dict:
    cases = [(head, path, False, N) for head in HEADS for path in ("absorbed", "projected")]
    cases += [(head, "absorbed", True, N) for head in HEADS]  # gradient checkpointing
    cases += [(head, "auto", False, N - 3) for head in ("mlm", "wikihop")]  # N not divisible by P: padded
    results = {}
    for head, path, checkpointing, n in cases:
        model, batch = tiny_model(head, path, checkpointing=checkpointing), make_batch(head, n)
        loss1, grads1 = step(model, batch)
        loss2, grads2 = step(model, batch, group)
        results[f"{head} {path} checkpointing={checkpointing} N={n}"] = {
            "loss_p1": loss1, "loss_p2_ranks": gather(loss2, group), **compare(grads1, grads2)}
    return results


def engine_gradients(group, par: parallel.Parallelism) -> dict:
    """DeepSpeed's gradients (safe_get_full_grad after engine.backward) against one process."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    results = {}
    for head in ("mlm", "cls", "wikihop"):
        for stage, prepared in (("zero2", True), ("zero3", True), ("zero3", False)):
            if not prepared and head != "mlm":
                continue
            batch = make_batch(head)
            _, reference = step(tiny_model(head), batch)
            model = tiny_model(head)
            model.set_sequence_parallel(group)
            args = TrainerArgs(deepspeed_config=stage, batch_size=B, sequence_parallel_size=2, grad_clip=0.0)
            config, args = ds_config.resolve(args, dist.get_world_size(), on_cpu=True)
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
            if prepared:
                parallel.prepare_ds_config(config, model, 2)
            ds_config.finalize(config, 1, model.config.hidden_size)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                              mpu=par.mpu)
            loss = engine(**batch).loss
            engine.backward(loss)
            got = {}
            for name, p in model.named_parameters():
                g = safe_get_full_grad(p)
                got[name] = None if g is None else g.detach().float().clone().view(getattr(p, "ds_shape", p.shape))
            name = f"{head} {stage}" + ("" if prepared else " reduce_scatter=true")
            results[name] = {"loss": loss.item(), "config": config["zero_optimization"], **compare(reference, got)}
            ratio = [float(got[n].norm() / reference[n].norm()) for n in reference
                     if got[n] is not None and float(reference[n].norm()) > 0]
            results[name]["grad_norm_ratio"] = [min(ratio), max(ratio)]
            engine.destroy()
    return results


def evaluation(group) -> dict:
    results = {}
    for head in HEADS:
        model, batch = tiny_model(head).eval(), make_batch(head)
        with torch.no_grad():
            model.set_sequence_parallel(None)
            one = model(**batch)
            model.set_sequence_parallel(group)
            two = model(**batch)
        results[head] = {"loss_p1": one.loss.item(), "loss_p2_ranks": gather(two.loss.item(), group),
                         "logits_p2": None if two.logits is None else two.logits.shape[1]}
        if head != "mlm":
            results[head]["logits_max_diff"] = float((one.logits - two.logits).abs().max())
    model = tiny_model("mlm")
    model.set_sequence_parallel(group)
    try:
        model(**make_batch("mlm"), output_attentions=True)
        results["output_attentions"] = "accepted"
    except ValueError as err:
        results["output_attentions"] = str(err)
    return results


def dropout_masks(group, sp: SequenceParallel, own_stream: bool) -> dict:
    """Each hidden-dropout site's mask on this rank's tokens (forward hooks), compared across the
    ranks: the fraction of equal keep/drop decisions (independent masks: 0.9^2 + 0.1^2 = 0.82), over
    the elements whose input is not zero on either rank (a zero stays zero, dropped or not)."""
    model = tiny_model("mlm", dropout=0.1)
    model.set_sequence_parallel(group)
    masks = []  # (2, ...): dropped, and whether the input is not zero

    def record(module, inputs, out):
        masks.append(torch.stack([out == 0, inputs[0] != 0]))

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(record)
    torch.manual_seed(5)  # the same generator state on both ranks, as the trainer's seed + data-parallel rank
    with contextlib.ExitStack() as stack:
        if not own_stream:  # the trap: dropout from the shared stream
            stack.enter_context(_patched(SequenceParallel, "own_rng", lambda self, device: contextlib.nullcontext()))
        model(**make_batch("mlm")).loss.backward()
    dropped, counted = torch.cat([m.flatten(1) for m in masks], dim=1)
    both = [torch.zeros_like(dropped) for _ in range(2)], [torch.zeros_like(counted) for _ in range(2)]
    dist.all_gather(both[0], dropped, group=group)
    dist.all_gather(both[1], counted, group=group)
    counted = both[1][0] & both[1][1]
    return {"equal_decisions": float((both[0][0] == both[0][1])[counted].float().mean()),
            "dropped": float(dropped[counted].float().mean())}


@contextlib.contextmanager
def _patched(owner, name, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def band_heads(sp: SequenceParallel, own_stream: bool) -> dict:
    """Attention dropout 0.5 in the band over the group's heads, every head fed the same values: heads 0
    and 2 (held by ranks 0 and 1 during the band) must drop different entries."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 512, 1, 8, generator=g).expand(1, 512, 4, 8).contiguous() for _ in range(3))
    layout = AttentionLayout.build(torch.ones(1, 512, dtype=torch.long), None, sp)
    q, k, v = (layout.local(x) for x in (q, k, v))
    torch.manual_seed(9)
    with sp.own_rng(q.device) if own_stream else contextlib.nullcontext():
        out = sp.band_over_heads(blocked_band)(q, k, v, layout, 64, 0.5, None)  # (1, 256, 4, 8)
    return {"heads_0_1_equal": bool(torch.equal(out[:, :, 0], out[:, :, 1])),
            "heads_0_2_equal": bool(torch.equal(out[:, :, 0], out[:, :, 2]))}


def dropout_cases(group, sp: SequenceParallel) -> dict:
    results = {"hidden": dropout_masks(group, sp, True), "hidden_shared_stream": dropout_masks(group, sp, False),
               "band": band_heads(sp, True), "band_shared_stream": band_heads(sp, False)}
    batch = make_batch("mlm")
    loss, grads = step(tiny_model("mlm", dropout=0.1), batch, group, seed=3)
    loss_ckpt, grads_ckpt = step(tiny_model("mlm", dropout=0.1, checkpointing=True), batch, group, seed=3)
    _, grads_off = step(tiny_model("mlm"), batch, group, seed=3)
    results["checkpointing"] = {"loss": loss, "loss_checkpointing": loss_ckpt, **compare(grads, grads_ckpt),
                                "dropout_acts": compare(grads_off, grads)["grad_rel_err"]}
    return results


def resume(out: Path) -> dict:
    """The tiny MLM trainer run of trainer_helpers at P=2, dropout 0.1, ZeRO-2: 4 steps straight
    (a checkpoint every 2), and a run resumed from that run's step-2 checkpoint."""
    flags = dict(max_steps=4, save_every_n_steps=2, batch_size=1, gradient_accumulation_steps=2, lr=1e-3,
                 weight_decay=0.0, sequence_parallel_size=2, deepspeed_config="zero2", project_name="sp",
                 val_check_interval=0, peak_tflops=1.0)

    def run(root: Path, **extra) -> tuple[dict, dict]:
        seed_everything(42)
        trainer = Trainer(trainer_helpers.tiny_model(0.1), TrainerArgs(default_root_dir=str(root), **flags, **extra),
                          trainer_helpers.random_mlm_data(10, 1))
        summary = trainer.fit()
        return trainer_helpers.full_params(trainer), summary

    straight, summary = run(out / "straight")
    checkpoint = out / "straight" / "sp" / "checkpoints" / "global_step2"
    resumed, summary_resumed = run(out / "resumed", resume=str(checkpoint))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {"max_weight_diff": max(float((straight[k] - resumed[k]).abs().max()) for k in straight),
            "bit_exact": all(torch.equal(straight[k], resumed[k]) for k in straight),
            "train_loss": [summary["train_loss"], summary_resumed["train_loss"]],
            "steps": [summary["global_step"], summary_resumed["global_step"]],
            "state_sequence_parallel_size": state.get("sequence_parallel_size")}


def same_batch(par) -> dict:
    """parallel.check_same_batch: the same batch on both ranks passes; a batch that differs on one rank
    (one token) stops with the message, on every rank of the group."""
    batch = make_batch("mlm")
    parallel.check_same_batch(batch, par)
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][1, 7] += dist.get_rank()
    try:
        parallel.check_same_batch(changed, par)
        message = None
    except RuntimeError as err:
        message = str(err)
    messages = [None] * dist.get_world_size(par.group)
    dist.all_gather_object(messages, message, group=par.group)
    return messages


def main(out: Path) -> None:
    rank, world = init_distributed()
    par = parallel.setup(rank, world, 2)
    sp = SequenceParallel.of(par.group)
    results = {"equivalence": equivalence(par.group), "engine": engine_gradients(par.group, par),
               "eval": evaluation(par.group), "dropout": dropout_cases(par.group, sp), "resume": resume(out),
               "same_batch": same_batch(par)}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
