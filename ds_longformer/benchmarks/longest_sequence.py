"""Longest trainable sequence: the longest N whose train step fits a memory budget, ours vs transformers'.

    python -m ds_longformer.benchmarks.longest_sequence                       # CPU defaults (below)
    python -m ds_longformer.benchmarks.longest_sequence --budget_gib 8 --max_len 65536
    python -m ds_longformer.benchmarks.longest_sequence --device cuda --budget_gib 16
    python -m ds_longformer.benchmarks.longest_sequence --impls ours --sequence_parallel_size 1 2   # 2 CPU ranks

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

--sequence_parallel_size P [P ...]: ours also at P > 1, as P ranks under torch.distributed.run (one
sequence-parallel group: each rank holds N / P tokens of the same batch; the budget is per rank,
and what is reported is the largest rank's: peak, "act" (above weights and optimizer state),
"activations" (above weights, gradients and optimizer state), the memory step's wall time, and the
bytes a rank sends on its group per layer). transformers' model runs at P = 1 only.

Prints every try, each model's longest N and the ratio ours/hf (and ours at P against P = 1, with
the activations' ratio at each N both measured); writes JSON (--json).
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
        res = run_worker(WORKER_MODULE, dict(spec, seq_len=n), spec["threads"], timeout=timeout,
                         nproc=spec.get("sequence_parallel_size", 1))
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
    p.add_argument("--sequence_parallel_size", type=int, nargs="+", default=[1],
                   help="ranks that hold each sequence (ours; P > 1 runs P processes, the budget per rank)")
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
        print(f"  tried {name(res)} N={res['seq_len']:6d}: {state}{peak}", flush=True)
        result["tries"].append(res)
        save()  # a run stopped midway keeps what it measured

    for sp_size in args.sequence_parallel_size:
        for impl in args.impls:
            if sp_size > 1 and impl != "ours":
                continue  # (transformers' model has no sequence parallelism)
            spec = dict(spec0, impl=impl, sequence_parallel_size=sp_size)
            try:
                longest, _ = search(spec, args.start, max_len, args.window, args.worker_timeout, report)
            except RuntimeError as err:
                print(f"  {err}", flush=True)
                longest = None
            result["longest"][name(spec)] = longest

    rows = [dict(r, model=name(r), fit="yes" if r["fits"] else "no", note=r.get("error") or r.get("stopped"))
            for r in result["tries"]]
    print_table(rows, [("model", "model", "s"), ("seq_len", "N", "d"), ("fit", "fits", "s"),
                       ("peak_mib", "peak MiB", ".0f"), ("act_mib", "act MiB", ".0f"),
                       ("act_only_mib", "activations MiB", ".0f"), ("memory_step_s", "step s", ".2f"),
                       ("comm_mib_per_layer", "comm MiB/layer", ".1f"), ("note", "note", "s")])
    longest = result["longest"]
    capped = {impl for impl, n in longest.items() if n is not None and n * 2 > max_len}
    for impl, n in longest.items():
        print(f"longest {impl}: {n if n is not None else 'none'}{' (--max_len reached)' if impl in capped else ''}")
    for other in ("hf", "hf_masked"):
        if longest.get("ours") and longest.get(other):
            result["ratio" if other == "hf" else f"ratio_{other}"] = ratio = longest["ours"] / longest[other]
            bound = ">= " if "ours" in capped else ""  # ours might fit longer still
            print(f"ratio ours/{other}: {bound}{ratio:.2f}")
    for sp_size in args.sequence_parallel_size:
        if sp_size > 1:
            sequence_parallel_ratios(result, sp_size, capped)
    save()
    print(f"# wrote {args.json}")


def name(spec: dict) -> str:
    """ours, hf, hf_masked; ours at P > 1: "ours P=2"."""
    sp_size = spec.get("sequence_parallel_size", 1)
    return spec["impl"] if sp_size == 1 else f"{spec['impl']} P={sp_size}"


def sequence_parallel_ratios(result: dict, sp_size: int, capped: set) -> None:
    """Ours at P against P = 1: the longest N, and the activations per rank at each N both fit."""
    longest, key = result["longest"], f"ours P={sp_size}"
    if longest.get("ours") and longest.get(key):
        if key in capped and "ours" in capped:
            print(f"ratio ours P={sp_size}/P=1 (longest N per rank budget): not measured, both reach --max_len")
        else:
            result[f"ratio_p{sp_size}"] = ratio = longest[key] / longest["ours"]
            bound = ">= " if key in capped else "<= " if "ours" in capped else ""
            print(f"ratio ours P={sp_size}/P=1 (longest N per rank budget): {bound}{ratio:.2f}")
    fitting = {(name(r), r["seq_len"]): r for r in result["tries"] if r["fits"] and "act_only_mib" in r}
    ratios = {}
    for (model, n), run in fitting.items():
        one = fitting.get(("ours", n))
        if model == key and one and one["act_only_mib"] > 0:
            ratios[n] = run["act_only_mib"] / one["act_only_mib"]
            print(f"activations per rank at N={n}: P={sp_size} {run['act_only_mib']:.0f} MiB / P=1 "
                  f"{one['act_only_mib']:.0f} MiB = {ratios[n]:.3f}")
    result[f"activation_ratio_p{sp_size}"] = ratios


if __name__ == "__main__":
    main()
