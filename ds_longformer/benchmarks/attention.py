"""Attention benchmark: our backends against transformers' LongformerSelfAttention.

    python -m ds_longformer.benchmarks.attention                       # N = 1024..8192, window 512
    python -m ds_longformer.benchmarks.attention --seq_lens 4096 --windows 256 512 1024
    python -m ds_longformer.benchmarks.attention --device cuda --impls hf blocked flex --seq_lens 4096 32768

Implementations (each measured in its own process, same weights and inputs):
  hf       transformers' LongformerSelfAttention (projections + attention)
  blocked  our module, backend "blocked" (projections + attention)
  dense    our module, backend "dense" (O(N^2) reference; only up to --dense_max_len)
  flex     our module, backend "flex" (CUDA; on CPU forward only and unfused, so off by default)
  core     our blocked band attention alone, given q/k/v: shows the linear cost in N and window

For each: forward time, forward+backward time, peak extra memory of forward+backward, and the
time as a multiple of the floor = (model FLOPs of the same work, flops.py) / (matmul rate measured
in the same worker right after its timings).
Ratios against hf are taken within each round (--rounds repeats every measurement, interleaving the
implementations); the table gives medians over rounds and the range of the per-round speed ratios.
Prints a table and writes JSON (--json): the summary rows and every round's runs.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from .. import flops
from .common import machine_description, matmul_rate, measure, print_table, run_worker, summarize_rounds

MODULE = "ds_longformer.benchmarks.attention"


def floor_flops(impl: str, n: int, window: int, n_global: int, hidden: int, heads: int, backward: bool) -> float:
    """FLOPs the work needs at least (flops.self_attention_flops): the band and the global rows and
    columns, plus the projections except for 'core'; backward ~ twice the forward."""
    forward = flops.self_attention_flops(n, window, n_global, hidden, heads, projections=impl != "core")
    return forward * (3 if backward else 1)


def build(spec: dict):
    """Returns (forward, forward_backward) closures for one configuration."""
    from ds_longformer.attention import AttentionLayout, LongformerSelfAttention, blocked_local_attention

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
            return blocked_local_attention(inp, k, v, layout, W, spec.get("block"), 0.0)

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
    forward, forward_backward = build(spec)
    result = dict(spec)
    if spec["mode"] == "forward":
        result["forward"] = measure(forward, spec["device"], spec["repeats"])
    else:
        result["forward_backward"] = measure(forward_backward, spec["device"], spec["repeats"])
        # The floor's rate from the same process, right after: a shared machine drifts by tens of
        # percent over a run, so a rate measured once at the start would skew later workers' floors.
        result["matmul_flops"] = matmul_rate(spec["device"], getattr(torch, spec["dtype"]), c=spec["hidden"])
    print(json.dumps(result))


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

    torch.set_num_threads(args.threads)  # the floor's matmul rate with the workers' thread count
    rate = matmul_rate(args.device, getattr(torch, args.dtype), c=args.hidden)
    print(f"# {machine_description(args.device, args.threads)}; {args.dtype}; batch {args.batch}, "
          f"{args.heads} heads of {args.hidden // args.heads}; matmul {rate / 1e9:.1f} GFLOP/s at start (each "
          "forward+backward worker measures it again for its floor)")
    # Rounds repeat every measurement, interleaving the implementations, so that each ratio
    # compares workers that ran seconds apart; the table gives medians over rounds.
    runs = []

    def save(**summary):  # after every worker too: a run stopped by a time limit keeps what it measured
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(args.device, args.threads), "matmul_flops": rate,
                       "args": {k: v for k, v in vars(args).items() if k != "worker"}, **summary, "runs": runs},
                      f, indent=2)

    for round_ in range(args.rounds):
        for window in args.windows:
            for n_global in args.globals:
                for n in args.seq_lens:
                    for impl in args.impls:
                        if impl == "dense" and n > args.dense_max_len:
                            continue
                        row = dict(impl=impl, seq_len=n, window=window, globals=n_global, round=round_)
                        for mode in ("forward", "forward_backward"):
                            if impl == "flex" and args.device == "cpu" and mode == "forward_backward":
                                continue
                            spec = dict(row, mode=mode, device=args.device, dtype=args.dtype, batch=args.batch,
                                        hidden=args.hidden, heads=args.heads, block=args.block,
                                        threads=args.threads, repeats=args.repeats)
                            res = run_worker(MODULE, spec, args.threads)
                            if "error" in res:
                                row[f"{mode}_error"] = res["error"]
                                continue
                            row[f"{mode}_ms"] = res[mode]["time_s"] * 1e3
                            row[f"{mode}_mib"] = res[mode]["peak_mib"]
                            if "matmul_flops" in res:  # the forward+backward worker's
                                row["matmul_gflops"] = res["matmul_flops"] / 1e9
                        if "forward_backward_ms" in row:
                            work = floor_flops(impl, n, window, n_global, args.hidden, args.heads, True) * args.batch
                            row["x_floor"] = row["forward_backward_ms"] / 1e3 / (work / (row["matmul_gflops"] * 1e9))
                            row["us_per_token"] = row["forward_backward_ms"] * 1e3 / (n * args.batch)
                        runs.append(row)
                        save(partial=True)
                        times = ", ".join(f"{mode.replace('_', '+')} {row[f'{mode}_ms']:.1f} ms "
                                          f"{row[f'{mode}_mib']:.0f} MiB"
                                          for mode in ("forward", "forward_backward") if f"{mode}_ms" in row)
                        print(f"  round {round_ + 1}/{args.rounds}: {impl:8s} N={n:6d} window={window} "
                              f"globals={n_global}: {times or 'failed'}", flush=True)
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
