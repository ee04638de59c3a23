"""Train-step benchmark: our LongformerForMaskedLM against transformers' under the same DeepSpeed engine.

    python -m ds_longformer.benchmarks.train_step                           # CPU defaults (below)
    python -m ds_longformer.benchmarks.train_step --precisions fp32 bf16 --checkpointing on
    python -m ds_longformer.benchmarks.train_step --device cuda --precisions fp16 bf16

One train step = forward with the MLM loss, backward, optimizer step (clipping, AdamW, lr schedule),
driven exactly as the Trainer drives it (engine(**batch), engine.backward, engine.step), with the
DeepSpeed config the Trainer builds (engine.ds_config.build_ds_config from --ds_config: ds_configs/cpu.json
on CPU, zero2.json on CUDA) for both models. The optimizer is torch's AdamW (torch_adam) for both,
so no DeepSpeed op is JIT-compiled.

Both models have the same weights (ours is built from --seed, saved with save_pretrained and
loaded by transformers.LongformerForMaskedLM.from_pretrained) and see the same batch: random
tokens, <s> first with global attention (1 global token), 15% of the tokens masked as MLM labels.
Attention dropout (--attention_dropout) is 0.1 for both, 0 when our backend is flex (it has none).

Our MLM head scores only the masked positions in training, in chunks that never hold all their
logits (losses.LinearCrossEntropy; the same loss); transformers' scores all N over the whole
vocabulary, a large share of its step and of its memory (the N x vocab logits and their
gradients). `--impls ... hf_masked` adds transformers' model with our head's shortcuts (its
encoder, then its lm_head on the masked positions only, the loss chunked as ours): against it the
table's "vs hf_masked" column isolates the encoder and attention.

Each (model, precision, checkpointing) runs in a fresh worker process: --warmup untimed steps
(on CPU of --warmup_len tokens: they only have to allocate the optimizer state), one full-length
step for memory, then --steps timed steps (the first also regrows the heap under the timing
malloc settings; the median leaves it out); the median step time gives tokens/s. On CPU the clock
is the worker's CPU time (steady on a shared machine; with --threads 1 it equals wall time on an
idle core), on CUDA synchronized wall time. Memory: peak of the memory step above the worker's
memory before the model was built (peak RSS on CPU, under the malloc settings of
common.malloc_for; torch.cuda.max_memory_allocated on CUDA), so it counts weights, gradients,
optimizer state and activations; "act" is the part above the state kept between steps (weights and
optimizer state): the activations and the step's gradients; "activations" (act_only_mib) the peak
above weights, gradients and optimizer state (the memory held right after the backward).

--sequence_parallel_size P (ours only) runs the worker as P ranks under torch.distributed.run, one
sequence-parallel group (ds_longformer/sequence_parallel.py): every rank gets the same batch and
holds N / P of its tokens. Memory is per rank (the largest rank's); "comm MiB/layer" the bytes one
rank sends on its group per layer in the memory step (forward, backward and checkpointing's
recompute: the all-to-alls of q, k, v and the output, (P - 1) / P of each tensor, and the global
rows' all-reduces, 2 (P - 1) / P of each, as ring collectives send).
TFLOP/s and MFU: the model FLOPs of the step (flops.py: the MLM loss's math, the head on the
masked positions, counted alike for every model, so their ratios are the speed ratios) per second,
and that as a share of the device's peak (flops.peak_flops: a known GPU's datasheet figure; on CPU
a matmul rate measured in the worker, so there "MFU" is against what a projection-shaped matmul
reaches, not a datasheet peak).
--rounds repeats every worker, interleaved ours/hf, and the table gives medians over rounds.

Defaults (CPU / CUDA): --layers 2 / 12, --precisions fp32 / fp16 bf16, --steps 3 / 5, --warmup 1 / 2,
--warmup_len 512 / full length, --backend blocked / flex, --threads 1, --rounds 2. The CPU defaults
take about 13 minutes of CPU time (the LM head over 50265 words is more than half of each step).
On every CPU the default is fp32 alone, so what runs does not depend on the CPU model: add bf16
with --precisions fp32 bf16 (without avx512_bf16 or AMX, bf16 matmuls run several times slower than
fp32; the header line says whether this CPU has them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from types import SimpleNamespace

import torch

from .common import (PeakMemory, machine_description, malloc_for, print_table, rss_bytes, run_worker,
                     summarize_rounds, timed)

MODULE = "ds_longformer.benchmarks.train_step"
BOS, EOS = 0, 2  # RoBERTa's <s> and </s>; <mask> is the last id of the vocabulary
MASK_PROB = 0.15


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---- worker -------------------------------------------------------------------------------------
def build_model(spec: dict) -> torch.nn.Module:
    """Our model from spec['seed'], or transformers' model with the very same weights."""
    from ds_longformer import LongformerConfig, LongformerForMaskedLM

    torch.manual_seed(spec["seed"])
    config = LongformerConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], intermediate_size=spec["intermediate"],
        max_position_embeddings=spec["seq_len"] + 2, attention_window=spec["window"],
        attention_backend=spec["backend"], attention_probs_dropout_prob=spec["attention_dropout"])
    model = LongformerForMaskedLM(config)
    if spec["impl"] in ("hf", "hf_masked"):
        import transformers

        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = transformers.LongformerForMaskedLM.from_pretrained(folder)
        if spec["checkpointing"]:  # recompute in backward, non-reentrant as ours
            model.activation_checkpointing_enable({"use_reentrant": False})
        return MaskedPositionsHead(model) if spec["impl"] == "hf_masked" else model
    if spec["checkpointing"]:
        model.activation_checkpointing_enable()
    return model


class MaskedPositionsHead(torch.nn.Module):
    """transformers' LongformerForMaskedLM with our head's shortcuts: its encoder, then its lm_head
    on the labelled positions only, its decoder through our chunked LinearCrossEntropy; the same
    loss as scoring every position, so against it only the encoders differ."""

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, attention_mask, global_attention_mask, labels):
        from ds_longformer.losses import linear_cross_entropy

        hidden = self.mlm.longformer(input_ids=input_ids, attention_mask=attention_mask,
                                     global_attention_mask=global_attention_mask)[0]
        scored = labels != -100
        head = self.mlm.lm_head  # its forward: dense -> gelu -> layer_norm -> decoder
        features = head.layer_norm(torch.nn.functional.gelu(head.dense(hidden[scored])))
        loss = linear_cross_entropy(features, head.decoder.weight, head.decoder.bias, labels[scored])
        return SimpleNamespace(loss=loss)


def step_flops(spec: dict, batch: dict) -> float:
    """Model FLOPs of one train step (flops.py): the MLM loss's math with the head on the masked
    positions, counted alike for every impl, so MFU ratios are speed ratios."""
    with torch.device("meta"):  # the count reads the config only: no weights
        model = build_model(dict(spec, impl="ours", checkpointing=False))
    return model.train_flops(**batch)


def make_batch(spec: dict, seq_len: int, device) -> dict:
    g = torch.Generator().manual_seed(spec["seed"])
    B, V = spec["batch"], spec["vocab"]
    ids = torch.randint(3, V - 1, (B, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = BOS, EOS
    masked = torch.rand(B, seq_len, generator=g) < MASK_PROB
    masked[:, [0, -1]] = False
    labels = torch.where(masked, ids, -100)
    global_mask = torch.zeros_like(ids)
    global_mask[:, 0] = 1  # <s>
    batch = {"input_ids": ids.masked_fill(masked, V - 1), "attention_mask": torch.ones_like(ids),
             "global_attention_mask": global_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def build_engine(model: torch.nn.Module, spec: dict, on_cpu: bool, parallelism=None):
    """deepspeed.initialize as the Trainer calls it: its config, parameter groups and schedule (and,
    with sequence parallelism, its group, config rules and mpu)."""
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    from ds_longformer.engine import TrainerArgs, ds_config, parallel
    from ds_longformer.engine.trainer import parameter_groups

    sp_size = spec.get("sequence_parallel_size", 1)
    args = TrainerArgs(deepspeed_config=spec["ds_config"], batch_size=spec["batch"], precision=spec["precision"],
                       gradient_checkpointing=spec["checkpointing"], sequence_parallel_size=sp_size)
    total_steps = spec["warmup"] + spec["steps"]
    config, _ = ds_config.resolve(args, parallelism.world_size if parallelism else 1, on_cpu)
    if parallelism is not None:
        parallel.attach(model, parallelism)
        parallel.prepare_ds_config(config, model, sp_size)
    ds_config.finalize(config, total_steps, spec["hidden"])
    config["optimizer"]["params"]["torch_adam"] = True  # same optimizer everywhere, no JIT build
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, args.weight_decay), config=config,
        lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, 0, total_steps),
        mpu=parallelism.mpu if parallelism else None)
    engine.train()  # from_pretrained leaves the model in eval mode (no dropout, no checkpointing)
    return engine


def train_step(engine, batch: dict) -> float:
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def watch_budget(memory: PeakMemory, budget: int, result: dict):
    """CPU: end the worker as soon as its RSS passes the budget (the step does not fit; finishing
    it would only cost time and memory on a shared machine). The final VmHWM check catches what
    the 10 ms polling misses. A rank of several exits with an error, so that the launcher stops
    the others (which would wait for it)."""
    exit_code = 0 if result.get("sequence_parallel_size", 1) == 1 else 3

    def poll():
        while True:
            used = rss_bytes() - memory.base
            if used > budget:
                print(json.dumps({**result, "fits": False, "peak_mib": used / 2**20, "stopped": "over budget"}),
                      flush=True)
                os._exit(exit_code)
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()


class GroupTraffic:
    """Bytes this rank sends on `group` while counting (torch.distributed's all_to_all_single and
    all_reduce, wrapped): an all-to-all sends (P - 1) / P of its input, a ring all-reduce 2 (P - 1) / P."""

    def __init__(self, group, size: int):
        self.group, self.bytes, self.counting = group, 0, False
        # (collective, share of the tensor a rank sends, the tensor's position and keyword)
        for name, share, position, keyword in (("all_to_all_single", (size - 1) / size, 1, "input"),
                                               ("all_reduce", 2 * (size - 1) / size, 0, "tensor")):
            setattr(torch.distributed, name, self._counted(getattr(torch.distributed, name), share, position, keyword))

    def _counted(self, collective, share: float, position: int, keyword: str):
        def run(*args, **kwargs):
            if self.counting and kwargs.get("group") is self.group:
                tensor = kwargs[keyword] if keyword in kwargs else args[position]
                self.bytes += share * tensor.numel() * tensor.element_size()
            return collective(*args, **kwargs)
        return run


def worker(spec: dict):
    import transformers

    from ds_longformer.engine import init_distributed, parallel

    transformers.LongformerForMaskedLM  # import the lazy module now, outside the measured memory
    device = spec["device"]
    torch.set_num_threads(spec["threads"])
    rank, world = init_distributed()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    sp_size = spec.get("sequence_parallel_size", 1)
    parallelism = parallel.setup(rank, world, sp_size) if sp_size > 1 else None
    traffic = GroupTraffic(parallelism.group, sp_size) if parallelism else None
    budget = spec.get("budget_gib") and int(spec["budget_gib"] * 2**30)
    if budget and device == "cuda":  # the allocator refuses past the budget, as a smaller GPU would
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(0).total_memory))
    memory = PeakMemory(device)
    result = dict(spec)
    try:
        engine = build_engine(build_model(spec), spec, on_cpu=device == "cpu", parallelism=parallelism)
        n = spec["seq_len"]
        warm = make_batch(spec, min(spec["warmup_len"] or n, n), engine.device)
        batch = make_batch(spec, n, engine.device)
        if budget and device == "cpu":
            watch_budget(memory, budget, result)
        for _ in range(spec["warmup"]):
            train_step(engine, warm)
        memory.reset_peak()
        steady = memory.current() - memory.base
        started = time.perf_counter()
        if traffic:
            traffic.counting = True
        loss = engine(**batch).loss  # the memory step (see common.malloc_for)
        engine.backward(loss)
        if traffic:
            traffic.counting = False
        held = memory.current() - memory.base  # weights, gradients, optimizer state
        engine.step()
        losses = [loss.item()]
        if device == "cuda":
            torch.cuda.synchronize()
        memory_step_s = time.perf_counter() - started
        peak = memory.peak() - memory.base
        malloc_for("time")
        times = []
        for _ in range(spec["steps"]):
            seconds, loss = timed(lambda: train_step(engine, batch), device)
            times.append(seconds)
            losses.append(loss)
    except torch.cuda.OutOfMemoryError:
        result.update(error="out of memory", fits=False)
        print(json.dumps(result))
        return
    result.update(loss=statistics.median(losses), peak_mib=peak / 2**20, steady_mib=steady / 2**20,
                  act_mib=(peak - steady) / 2**20, act_only_mib=max(peak - held, 0) / 2**20,
                  memory_step_s=memory_step_s)
    if traffic:
        result["comm_mib_per_layer"] = traffic.bytes / spec["layers"] / 2**20
    if times:
        from ds_longformer import flops

        step_s = statistics.median(times)
        achieved = step_flops(spec, batch) / step_s
        device_peak, peak_source = flops.peak_flops(device, spec["precision"])  # `peak` is the memory's
        result.update(step_s=step_s, times_s=times, tokens_per_s=spec["batch"] * n / step_s,
                      tflops=achieved / 1e12, mfu_percent=100 * achieved / device_peak, peak_source=peak_source)
    if budget:
        result["fits"] = peak <= budget
    if parallelism:  # one result: the largest rank's memory and time
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, result)
        result = dict(ranks[0], peak_mib_ranks=[r["peak_mib"] for r in ranks])
        for key in ("peak_mib", "act_mib", "act_only_mib", "memory_step_s", "step_s"):
            if key in result:
                result[key] = max(r[key] for r in ranks)
        if budget:
            result["fits"] = all(r["fits"] for r in ranks)
        if rank:
            return
    print(json.dumps(result))


# ---- driver -------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser):
    """Model, data and engine flags shared with longest_sequence (None: per-device default)."""
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default 2 on CPU, 12 on CUDA)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=50265)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backend", choices=["blocked", "flex", "dense"], default=None,
                   help="our attention backend (default blocked on CPU, flex on CUDA)")
    p.add_argument("--attention_dropout", type=float, default=None,
                   help="attention dropout of both models (default 0.1, 0 with the flex backend)")
    p.add_argument("--ds_config", default=None, help="ds_configs name or path (default: the Trainer's, "
                                                     "cpu on CPU, zero2 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (1 is the steadiest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker_timeout", type=float, default=3600, help="seconds before a worker is stopped")


def base_spec(args) -> dict:
    on_cpu = args.device == "cpu"
    backend = args.backend or ("blocked" if on_cpu else "flex")
    dropout = args.attention_dropout if args.attention_dropout is not None else 0.0 if backend == "flex" else 0.1
    return dict(device=args.device, layers=args.layers or (2 if on_cpu else 12), hidden=args.hidden,
                heads=args.heads, intermediate=args.intermediate, vocab=args.vocab, window=args.window,
                batch=args.batch, backend=backend, attention_dropout=dropout, ds_config=args.ds_config,
                threads=args.threads, seed=args.seed)


def describe(spec: dict) -> str:
    from ds_longformer.engine import TrainerArgs
    from ds_longformer.engine.ds_config import build_ds_config

    cfg = build_ds_config(TrainerArgs(deepspeed_config=spec["ds_config"]), 1, spec["device"] == "cpu")
    return (f"{spec['layers']} layers, hidden {spec['hidden']}, {spec['heads']} heads, intermediate "
            f"{spec['intermediate']}, vocab {spec['vocab']}, window {spec['window']}, batch {spec['batch']}, "
            f"1 global token; our backend {spec['backend']}, attention dropout {spec['attention_dropout']}; "
            f"DeepSpeed ZeRO-{cfg['zero_optimization']['stage']}, torch AdamW"
            f"{' (fused)' if cfg['optimizer']['params'].get('fused') else ''}")


def main(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default fp32 on CPU (whatever the CPU; add bf16 to measure it), fp16 bf16 on CUDA")
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="gradient checkpointing settings to measure")
    p.add_argument("--impls", nargs="+", choices=["ours", "hf", "hf_masked"], default=["ours", "hf"],
                   help="hf_masked: transformers' model scoring only the masked positions, as ours does")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median reported; default 3 CPU, 5 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 2 CUDA)")
    p.add_argument("--rounds", type=int, default=2,
                   help="times each worker runs, interleaved ours/hf; medians reported (default 2)")
    p.add_argument("--warmup_len", type=int, default=None,
                   help="tokens of the warm-up steps (default 512 on CPU, the full length on CUDA)")
    p.add_argument("--json", default="train_step_benchmark.json", help="where to write all results")
    add_model_args(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    on_cpu = args.device == "cpu"
    precisions = args.precisions or (["fp32"] if on_cpu else ["fp16", "bf16"])  # the same on every CPU
    if on_cpu and "fp16" in precisions:
        p.error("fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use fp32 or bf16")
    spec0 = dict(base_spec(args), seq_len=args.seq_len, steps=args.steps or (3 if on_cpu else 5),
                 warmup=args.warmup if args.warmup is not None else (1 if on_cpu else 2),
                 warmup_len=args.warmup_len if args.warmup_len is not None else (512 if on_cpu else 0))
    machine = machine_description(args.device, args.threads)
    print(f"# {machine}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# {describe(spec0)}; N={args.seq_len}; median of {spec0['steps']} steps after {spec0['warmup']} "
          f"warm-up; time = {'CPU' if on_cpu else 'wall'} seconds")
    if on_cpu and args.precisions is None:
        print(f"# bf16 not measured by default: this CPU has {'' if cpu_has_native_bf16() else 'no '}native bf16 "
              "(avx512_bf16 or AMX); add --precisions fp32 bf16 to measure it")

    rows, runs = [], []

    def save():
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M"), "config": describe(spec0),
                       "args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows,
                       "runs": runs}, f, indent=2)

    # Rounds interleave the implementations (ours, hf, ours, hf, ...) so that each ratio compares
    # workers that ran minutes apart, not a whole benchmark apart; the table gives medians.
    for round_ in range(args.rounds):
        for precision in precisions:
            for ckpt in args.checkpointing:
                for impl in args.impls:
                    spec = dict(spec0, impl=impl, precision=precision, checkpointing=ckpt == "on")
                    res = run_worker(MODULE, spec, args.threads, timeout=args.worker_timeout)
                    runs.append(dict(res, ckpt=ckpt, round=round_))
                    status = res.get("error") or f"{res['tokens_per_s']:.0f} tokens/s, peak {res['peak_mib']:.0f} MiB"
                    print(f"  round {round_ + 1}/{args.rounds}: {impl:4s} {precision} checkpointing {ckpt}: {status}",
                          flush=True)
                    save()  # a run stopped midway keeps what it measured
    ok = [r for r in runs if "error" not in r]
    rows[:] = summarize_rounds(ok, group_by=("impl", "precision", "ckpt"),
                               fields=("step_s", "tokens_per_s", "tflops", "mfu_percent", "peak_mib", "act_mib", "loss"),
                               speed="tokens_per_s", faster="higher", memory="peak_mib")
    if "hf_masked" in args.impls:  # the same ratios against transformers' model with the masked-only head
        masked = summarize_rounds(ok, group_by=("impl", "precision", "ckpt"), fields=(), speed="tokens_per_s",
                                  faster="higher", memory="peak_mib", reference="hf_masked")
        for row, other in zip(rows, masked):
            row.update(vs_masked=other.get("speed_vs_hf"), vs_masked_range=other.get("speed_range"),
                       mem_vs_masked=other.get("mem_vs_hf"))
    rows += [r for r in runs if "error" in r]
    print_table(rows, [("impl", "model", "s"), ("precision", "precision", "s"), ("ckpt", "ckpt", "s"),
                       ("seq_len", "N", "d"), ("step_s", "step s", ".2f"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("tflops", "TFLOP/s", ".3g"), ("mfu_percent", "MFU %", ".1f"),
                       ("peak_mib", "peak MiB", ".0f"), ("act_mib", "act MiB", ".0f"), ("loss", "loss", ".3f"),
                       ("speed_vs_hf", "speed vs hf", ".2f"), ("speed_range", "per round", "s"),
                       ("mem_vs_hf", "mem vs hf", ".2f")]
                + ([("vs_masked", "vs hf_masked", ".2f"), ("vs_masked_range", "per round", "s"),
                    ("mem_vs_masked", "mem vs hf_masked", ".2f")] if "hf_masked" in args.impls else []))
    for row in rows:
        if "error" in row:
            print(f"  {row['impl']} {row['precision']} checkpointing {row['ckpt']}: {row['error']}")
    save()
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
