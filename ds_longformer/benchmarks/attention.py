"""Attention benchmark: our backends against transformers' LongformerSelfAttention.

    python -m ds_longformer.benchmarks.attention                       # N = 1024..8192, window 512
    python -m ds_longformer.benchmarks.attention --seq_lens 4096 --windows 256 512 1024
    python -m ds_longformer.benchmarks.attention --device cuda --impls hf blocked flex --seq_lens 4096 32768

Implementations (same weights and inputs):
  hf       transformers' LongformerSelfAttention (projections + attention)
  blocked  our module, backend "blocked" (projections + attention)
  dense    our module, backend "dense" (O(N^2) reference; only up to --dense_max_len)
  flex     our module, backend "flex" (CUDA; on CPU forward only and unfused, so off by default)
  core     our blocked band attention alone, given q/k/v: shows the linear cost in N and window

For each: forward time, forward+backward time, peak extra memory of forward+backward, and the
time as a multiple of the floor = (model FLOPs of the same work, flops.py) / (measured matmul rate).
Forward time and memory are measured in a fresh process per configuration (on CPU also the
forward+backward memory: RSS cannot be told apart within one process). forward+backward times come
from one process per sequence length that runs every (implementation, window, globals) in turns,
--repeats turns, each turn also timing a projection-shaped matmul for the floor: on a shared
machine whose speed drifts by tens of percent over minutes, the speed and window ratios then
compare calls seconds apart.
Ratios against hf are taken within each round (--rounds repeats every measurement, interleaving the
implementations); the table gives medians over rounds and the range of the per-round speed ratios.
Prints a table and writes JSON (--json): the summary rows and every round's runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from .. import flops
from .common import (machine_description, malloc_for, matmul_rate, measure, print_table, run_worker,
                     summarize_rounds, timed)

MODULE = "ds_longformer.benchmarks.attention"


def floor_flops(impl: str, n: int, window: int, n_global: int, hidden: int, heads: int, backward: bool) -> float:
    """FLOPs the work needs at least (flops.self_attention_flops): the band and the global rows and
    columns, plus the projections except for 'core'; backward ~ twice the forward."""
    forward = flops.self_attention_flops(n, window, n_global, hidden, heads, projections=impl != "core")
    return forward * (3 if backward else 1)


def build(spec: dict):
    """Returns (forward, forward_backward) closures for one configuration."""
    from ds_longformer.attention import AttentionLayout, LongformerSelfAttention, blocked_band

    torch.manual_seed(0)
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    B, N, C, H, W, G = spec["batch"], spec["seq_len"], spec["hidden"], spec["heads"], spec["window"], spec["globals"]
    attention_mask = torch.ones(B, N, dtype=torch.long, device=device)
    global_mask = torch.zeros_like(attention_mask)
    global_mask[:, torch.linspace(0, N - 1, G).long()] = 1 if G else 0
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    impl = spec["impl"]

    if impl == "hf":
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFAttention

        cfg = LongformerConfig(hidden_size=C, num_attention_heads=H, attention_window=[W], num_hidden_layers=1,
                               attention_probs_dropout_prob=0.0)
        module = HFAttention(cfg, 0).to(device, dtype)
        n_pad = math.ceil(N / W) * W  # HF needs a multiple of the window (its model pads; do it here)
        x = torch.nn.functional.pad(x, (0, 0, 0, n_pad - N))
        mask = torch.full((B, n_pad), -10000.0, device=device, dtype=dtype)
        mask[:, :N] = torch.where(global_mask.bool(), 10000.0, 0.0)

        def call(inp):
            return module(inp, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                          is_global_attn=G > 0)[0]
    elif impl == "core":
        D = C // H
        q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype) for _ in range(3))

        def call(inp):
            layout = AttentionLayout.build(attention_mask, global_mask)
            return blocked_band(inp, k, v, layout, W, 0.0, spec.get("block"))

        x = q
    else:
        module = LongformerSelfAttention(C, H, W, backend=impl, block_size=spec.get("block")).to(device, dtype)

        def call(inp):
            return module(inp, AttentionLayout.build(attention_mask, global_mask))  # layout built per batch

    def forward():
        with torch.no_grad():
            call(x)

    def forward_backward():
        inp = x.detach().requires_grad_(True)
        call(inp).float().sum().backward()

    return forward, forward_backward


def worker(spec: dict):
    torch.set_num_threads(spec["threads"])
    result = dict(spec)
    if spec["mode"] == "paired":
        result.update(paired_timings(spec))
    else:  # "forward": memory and time; "memory": forward+backward memory only (CPU; timed in pairs)
        forward, forward_backward = build(spec)
        fn, repeats = (forward, spec["repeats"]) if spec["mode"] == "forward" else (forward_backward, 0)
        result[spec["mode"]] = measure(fn, spec["device"], repeats)
    print(json.dumps(result))


def paired_timings(spec: dict) -> dict:
    """forward+backward of every (impl, window, globals) of spec["items"] at one length in one
    process, timed in turns, each turn also timing a projection-shaped matmul: speed ratios, window
    ratios and floors then compare calls seconds apart (a shared machine drifts by tens of percent
    between workers minutes apart). On CUDA also each item's peak extra memory (allocated bytes;
    on CPU RSS needs a process of its own)."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    calls = [build(dict(spec, impl=impl, window=window, globals=n_global))[1] for impl, window, n_global in spec["items"]]
    out = {"times_s": [[] for _ in calls], "matmul_flops": []}
    if device == "cuda":
        out["peak_mib"] = []
        for fn in calls:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            out["peak_mib"].append((torch.cuda.max_memory_allocated() - base) / 2**20)
    malloc_for("time")
    for fn in calls:  # warm-up (and flex's compilation) untimed
        fn()
    for turn in range(spec["repeats"]):
        first = turn % len(calls)  # rotate who goes first
        for i in list(range(first, len(calls))) + list(range(first)):
            out["times_s"][i].append(timed(calls[i], device)[0])
        out["matmul_flops"].append(matmul_rate(device, dtype, c=spec["hidden"], repeats=1))
    return out


def measure_length(args, n: int, round_: int) -> list[dict]:
    """One row per (window, globals, impl) at length n in one round: forward time and memory,
    forward+backward memory (a fresh worker each), forward+backward time and floor (one paired
    worker for them all)."""
    impls = [i for i in args.impls if not (i == "dense" and n > args.dense_max_len)]
    keys = [(impl, window, g) for window in args.windows for g in args.globals for impl in impls]
    rows = {key: dict(impl=key[0], seq_len=n, window=key[1], globals=key[2], round=round_) for key in keys}
    common = dict(seq_len=n, device=args.device, dtype=args.dtype, batch=args.batch, hidden=args.hidden,
                  heads=args.heads, block=args.block, threads=args.threads, repeats=args.repeats)
    on_cpu = args.device == "cpu"
    for (impl, window, g), row in rows.items():
        for mode in ("forward", "memory") if on_cpu else ("forward",):
            res = run_worker(MODULE, dict(common, impl=impl, window=window, globals=g, mode=mode), args.threads)
            if "error" in res:
                row[f"{mode}_error"] = res["error"]
            elif mode == "forward":
                row["forward_ms"], row["forward_mib"] = res["forward"]["time_s"] * 1e3, res["forward"]["peak_mib"]
            else:
                row["forward_backward_mib"] = res["memory"]["peak_mib"]
    # flex on CPU is forward only; what did not fit forward+backward is left out of the pairs
    paired = [key for key in keys if not (key[0] == "flex" and on_cpu) and "memory_error" not in rows[key]]
    res = run_worker(MODULE, dict(common, items=paired, mode="paired"), args.threads) if paired else {}
    for i, (impl, window, g) in enumerate(paired):
        row = rows[impl, window, g]
        if "error" in res:
            row["forward_backward_error"] = res["error"]
            continue
        times, rates = res["times_s"][i], res["matmul_flops"]
        work = floor_flops(impl, n, window, g, args.hidden, args.heads, True) * args.batch
        row.update(forward_backward_ms=statistics.median(times) * 1e3, turn_ms=[t * 1e3 for t in times],
                   matmul_gflops=statistics.median(rates) / 1e9, turn_matmul_gflops=[r / 1e9 for r in rates],
                   x_floor=statistics.median(t / (work / r) for t, r in zip(times, rates)),
                   us_per_token=statistics.median(times) * 1e6 / (n * args.batch))
        if "peak_mib" in res:
            row["forward_backward_mib"] = res["peak_mib"][i]
    for row in rows.values():
        times = ", ".join(f"{label} {row[f'{mode}_ms']:.1f} ms" for mode, label in
                          (("forward", "forward"), ("forward_backward", "forward+backward")) if f"{mode}_ms" in row)
        memory = f", peak {row['forward_backward_mib']:.0f} MiB" if "forward_backward_mib" in row else ""
        errors = "; ".join(row[k] for k in ("forward_error", "memory_error", "forward_backward_error") if k in row)
        print(f"  round {round_ + 1}/{args.rounds}: {row['impl']:8s} N={n:6d} window={row['window']} "
              f"globals={row['globals']}: {times}{memory}{'; ' + errors if errors else ''}", flush=True)
    return list(rows.values())


def main(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--windows", type=int, nargs="+", default=[512])
    p.add_argument("--globals", type=int, nargs="+", default=[1], help="global tokens per sequence (0 = none)")
    p.add_argument("--impls", nargs="+", default=["hf", "blocked", "dense", "core"],
                   choices=["hf", "blocked", "dense", "flex", "core"])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=None, help="query block of the blocked backend (default window/2)")
    p.add_argument("--dense_max_len", type=int, default=4096, help="skip 'dense' above this length (O(N^2))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (1 is the steadiest)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--rounds", type=int, default=2,
                   help="times every measurement runs, interleaving the implementations; medians reported")
    p.add_argument("--json", default="attention_benchmark.json", help="where to write all results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    print(f"# {machine_description(args.device, args.threads)}; {args.dtype}; batch {args.batch}, "
          f"{args.heads} heads of {args.hidden // args.heads}; forward+backward: median of {args.repeats} turns")
    # Rounds repeat every measurement; the table gives medians over rounds.
    runs = []

    def save(**summary):  # after every length too: a run stopped by a time limit keeps what it measured
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(args.device, args.threads),
                       "args": {k: v for k, v in vars(args).items() if k != "worker"}, **summary, "runs": runs},
                      f, indent=2)

    for round_ in range(args.rounds):
        for n in args.seq_lens:
            runs += measure_length(args, n, round_)
            save(partial=True)
    rows = summarize_rounds(runs, group_by=("impl", "seq_len", "window", "globals"),
                            fields=("forward_ms", "forward_backward_ms", "forward_mib", "forward_backward_mib",
                                    "x_floor", "us_per_token"),
                            speed="forward_backward_ms", faster="lower", memory="forward_backward_mib")
    for row in rows:  # core is band attention alone: no like-for-like ratio to a whole attention layer
        if row["impl"] == "core":
            for key in ("speed_vs_hf", "speed_range", "mem_vs_hf"):
                row.pop(key, None)
    print_table(rows, [("impl", "impl", "s"), ("seq_len", "N", "d"), ("window", "window", "d"),
                       ("globals", "global", "d"), ("forward_ms", "fwd ms", ".1f"),
                       ("forward_backward_ms", "fwd+bwd ms", ".1f"), ("forward_backward_mib", "peak MiB", ".0f"),
                       ("us_per_token", "us/token", ".1f"), ("x_floor", "x floor", ".2f"),
                       ("speed_vs_hf", "speed vs hf", ".2f"), ("speed_range", "per round", "s"),
                       ("mem_vs_hf", "mem vs hf", ".2f")])
    errors = [(r["impl"], r["seq_len"], r.get("forward_backward_error") or r.get("forward_error"))
              for r in runs if "forward_backward_error" in r or "forward_error" in r]
    for impl, n, err in errors:
        print(f"  {impl} N={n}: {err}")
    save(rows=rows)
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
