"""Longest trainable sequence: the longest N whose train step fits a memory budget, ours vs transformers'.

    python -m ds_longformer.benchmarks.longest_sequence                       # CPU defaults (below)
    python -m ds_longformer.benchmarks.longest_sequence --budget_gib 8 --max_len 65536
    python -m ds_longformer.benchmarks.longest_sequence --device cuda --budget_gib 16

For each model, with gradient checkpointing: a train step (the train_step benchmark's worker: same
weights, data and DeepSpeed engine for both models) at N = --start, then at 2N, 4N, ... while it
fits, up to --max_len (when --start itself does not fit: N/2, N/4, ... until one does). Each try
runs in a fresh worker: one warm-up step of --warmup_len tokens allocates the optimizer state, then
one step of N tokens is measured, so the peak is that of a steady-state step.

A step fits when its peak memory stays within --budget_gib, counted from the worker's memory
before the model is built (weights, gradients, optimizer state, activations). On CPU that is peak
RSS (VmHWM); the worker stops as soon as its RSS passes the budget, so a try that does not fit
costs little. On CUDA it is torch.cuda.max_memory_allocated, with the allocator capped at the
budget (set_per_process_memory_fraction) so a step that needs more fails as on a smaller GPU.

Prints every try, each model's longest N and the ratio ours/hf; writes JSON (--json).
Defaults (CPU / CUDA): --layers 2 / 12, --precision fp32 / bf16, --budget_gib 4 / 16,
--max_len 32768 / 131072, --backend blocked / flex, --threads 1. The CPU defaults take about
5 minutes on an idle core.
"""

from __future__ import annotations

import argparse
import json
import time

from .common import machine_description, print_table, run_worker
from .train_step import MODULE as WORKER_MODULE
from .train_step import add_model_args, base_spec, describe

MODULE = "ds_longformer.benchmarks.longest_sequence"


def search(spec: dict, start: int, max_len: int, min_len: int, timeout: float, report) -> tuple[int | None, list]:
    """Longest fitting N among start * 2**k (k >= 0 while it fits, k < 0 while it does not)."""
    tries = []

    def fits(n: int) -> bool:
        res = run_worker(WORKER_MODULE, dict(spec, seq_len=n), spec["threads"], timeout=timeout)
        # Out of memory (or killed for it) means "does not fit"; any other failure is no answer.
        failed = "fits" not in res and res.get("error") != "out of memory"
        res.setdefault("fits", False)
        tries.append(res)
        report(res)
        if failed:
            raise RuntimeError(f"{spec['impl']} at N={n} failed ({res.get('error')}), not for memory: no longest N")
        return res["fits"]

    n = start
    if fits(n):
        while n * 2 <= max_len and fits(n * 2):
            n *= 2
        return n, tries
    while n // 2 >= min_len:
        n //= 2
        if fits(n):
            return n, tries
    return None, tries


def main(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget_gib", type=float, default=None, help="memory budget (default 4 on CPU, 16 on CUDA)")
    p.add_argument("--start", type=int, default=4096, help="first length tried")
    p.add_argument("--max_len", type=int, default=None, help="stop doubling here (default 32768 CPU, 131072 CUDA)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--impls", nargs="+", choices=["ours", "hf", "hf_masked"], default=["ours", "hf"],
                   help="hf_masked: transformers' model scoring only the masked positions, as ours does")
    p.add_argument("--warmup_len", type=int, default=512, help="tokens of the warm-up step")
    p.add_argument("--json", default="longest_sequence_benchmark.json", help="where to write all results")
    add_model_args(p)
    args = p.parse_args(argv)

    on_cpu = args.device == "cpu"
    precision = args.precision or ("fp32" if on_cpu else "bf16")
    if on_cpu and precision == "fp16":
        p.error("fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use fp32 or bf16")
    budget = args.budget_gib or (4.0 if on_cpu else 16.0)
    max_len = args.max_len or (32768 if on_cpu else 131072)
    spec0 = dict(base_spec(args), precision=precision, checkpointing=True, steps=0, warmup=1,
                 warmup_len=args.warmup_len, budget_gib=budget)
    machine = machine_description(args.device, args.threads)
    print(f"# {machine}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# {describe(spec0)}; {precision}, gradient checkpointing; budget {budget:g} GiB; "
          f"N from {args.start}, doubling up to {max_len}")

    result = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M"), "config": describe(spec0),
              "budget_gib": budget, "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "tries": [], "longest": {}}

    def save():
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

    def report(res: dict):
        state = "fits" if res["fits"] else res.get("error") or res.get("stopped") or "over budget"
        peak = f", peak {res['peak_mib']:.0f} MiB" if "peak_mib" in res else ""
        print(f"  tried {res['impl']:4s} N={res['seq_len']:6d}: {state}{peak}", flush=True)
        result["tries"].append(res)
        save()  # a run stopped midway keeps what it measured

    for impl in args.impls:
        try:
            longest, _ = search(dict(spec0, impl=impl), args.start, max_len, args.window, args.worker_timeout,
                                report)
        except RuntimeError as err:
            print(f"  {err}", flush=True)
            longest = None
        result["longest"][impl] = longest

    rows = [dict(r, fit="yes" if r["fits"] else "no", note=r.get("error") or r.get("stopped"))
            for r in result["tries"]]
    print_table(rows, [("impl", "model", "s"), ("seq_len", "N", "d"), ("fit", "fits", "s"),
                       ("peak_mib", "peak MiB", ".0f"), ("act_mib", "act MiB", ".0f"), ("note", "note", "s")])
    longest = result["longest"]
    capped = {impl for impl, n in longest.items() if n is not None and n * 2 > max_len}
    for impl, n in longest.items():
        print(f"longest {impl}: {n if n is not None else 'none'}{' (--max_len reached)' if impl in capped else ''}")
    for other in ("hf", "hf_masked"):
        if longest.get("ours") and longest.get(other):
            result["ratio" if other == "hf" else f"ratio_{other}"] = ratio = longest["ours"] / longest[other]
            bound = ">= " if "ours" in capped else ""  # ours might fit longer still
            print(f"ratio ours/{other}: {bound}{ratio:.2f}")
    save()
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
