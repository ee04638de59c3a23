"""Measuring helpers shared by the benchmarks: isolated worker processes, peak memory, matmul rate.

Every measurement runs in a fresh worker process (`python -m <benchmark> --worker JSON`), so the
peak-memory reading of one configuration is not polluted by another's, and the timings of the
implementations being compared are taken by the same code on the same machine in one run.
CPU time (process_time) is the steadiest clock on a shared machine; on CUDA we use wall time
around synchronize() and torch.cuda.max_memory_allocated.

On CPU, memory and time are read from different calls under different glibc malloc settings
(`malloc_for`): for memory, blocks of 64 KiB and more come from mmap and go back at free, so peak
RSS tracks live tensors rather than what the heap keeps; for time, glibc's own steady state
(heap blocks up to 32 MiB), as users run: timed under the memory setting every allocation faults its
pages in again, which measured the allocator more than the models (a train step 1.7x slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from .. import flops

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _mallopt = _libc.mallopt
except (OSError, AttributeError):  # not glibc: measure with whatever the allocator does
    _mallopt = None


def malloc_for(purpose: str):
    """'memory': 64 KiB mmap threshold (RSS = live tensors); 'time': glibc's steady-state
    thresholds (32 MiB mmap, 64 MiB trim). Affects later allocations only."""
    if _mallopt is None:
        return
    mmap_threshold = {"memory": 64 * 2**10, "time": 32 * 2**20}[purpose]
    _mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    _mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_rss_bytes() -> int:
    """Peak RSS of this process since start or the last reset_peak_rss() (VmHWM).

    Unlike ru_maxrss it does not start at the parent's peak: subprocess forks with vfork, and the
    kernel carries the parent's high-water mark into the exec'd child's ru_maxrss.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss():
    """Restart hwm_rss_bytes() from the current RSS (Linux: clear_refs 5 resets the high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Memory of this process above a baseline taken at construction: RSS on CPU (measure it in a
    fresh worker, see run_worker), allocated tensor bytes on CUDA."""

    def __init__(self, device: str):
        self.device = device
        self.base = self.current()

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.device == "cuda" else rss_bytes()

    def reset_peak(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.device == "cuda" else hwm_rss_bytes()


def timed(fn, device: str):
    """(seconds, fn's result): CPU time of this process on CPU, synchronized wall time on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def measure(fn, device: str, repeats: int) -> dict:
    """Peak extra memory of the first call, then the median time of `repeats` more calls (after
    one untimed call under the timing malloc settings); repeats=0: memory only."""
    malloc_for("memory")
    memory = PeakMemory(device)
    memory.reset_peak()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = memory.peak() - memory.base
    result = {"peak_mib": max(peak, 0) / 2**20}
    if repeats:
        malloc_for("time")
        fn()
        times = [timed(fn, device)[0] for _ in range(repeats)]
        result.update(time_s=statistics.median(times), times_s=times)
    return result


def matmul_rate(device: str, dtype: torch.dtype, c: int = 768, repeats: int = 5) -> float:
    """Measured FLOP/s of a projection-shaped matmul (flops.matmul_rate) on the benchmarks' clock
    and malloc settings, for the floors the models are compared with."""
    malloc_for("time")
    return flops.matmul_rate(device, dtype, c=c, repeats=repeats, clock=lambda fn: timed(fn, device)[0])


def run_worker(module: str, spec: dict, threads: int, timeout: float = 900, nproc: int = 1) -> dict:
    """Run one measurement in a fresh process (nproc > 1: that many ranks under torch.distributed.run,
    `threads` each); returns its JSON result (or an 'error' entry)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}  # from the start: the baseline counts no heap slack
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "-m", module, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    results = _json_objects(done.stdout)
    if results and (done.returncode == 0 or "stopped" in results[-1]):  # (a rank over budget stops its peers)
        return results[-1]
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    stderr = done.stderr.lower()  # CUDA's "out of memory", CPU's "can't allocate memory", or killed by the OOM killer
    oom = ("out of memory" in stderr or "can't allocate memory" in stderr or done.returncode == -9
           or "exitcode  : -9" in stderr)
    return {**spec, "error": "out of memory" if oom else tail[0][:200]}


def _json_objects(stdout: str) -> list[dict]:
    """The JSON objects a worker printed, one a line -- or several on one line, where ranks printing
    at once ran their lines together."""
    decoder, objects = json.JSONDecoder(), []
    for line in stdout.splitlines():
        rest = line
        while rest.startswith("{"):
            try:
                value, end = decoder.raw_decode(rest)
            except json.JSONDecodeError:
                break
            objects.append(value)
            rest = rest[end:].lstrip()
    return objects


def summarize_rounds(runs: list[dict], group_by: tuple[str, ...], fields: tuple[str, ...], speed: str,
                     faster: str, memory: str, reference: str = "hf") -> list[dict]:
    """One row per configuration (the runs sharing `group_by`, one per round): the median over
    rounds of each of `fields` the runs have, and the median and range of the per-round ratios to
    the `reference` run (impl) of the same configuration and round, each ratio within one round:
      speed_vs_hf = how many times faster by `speed` ("higher" or "lower" is faster, `faster`),
      speed_range = "min-max" of those ratios,  mem_vs_hf = run[memory] / hf[memory]."""
    same_config = lambda r: tuple(r[k] for k in group_by if k != "impl")  # noqa: E731
    hf = {(same_config(r), r["round"]): r for r in runs if r["impl"] == reference}
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in group_by), []).append(run)
    rows = []
    for same in groups.values():
        row = {k: v for k, v in same[0].items() if k != "round"}
        row["rounds"] = len(same)
        for field in fields:
            values = [r[field] for r in same if field in r]
            if values:
                row[field] = statistics.median(values)
        pairs = [(r, hf.get((same_config(r), r["round"]))) for r in same]
        pairs = [(r, ref) for r, ref in pairs if ref and all(speed in x and memory in x for x in (r, ref))]
        if pairs:
            ratios = [(r[speed] / ref[speed]) if faster == "higher" else (ref[speed] / r[speed]) for r, ref in pairs]
            row["speed_vs_hf"] = statistics.median(ratios)
            row["speed_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
            row["mem_vs_hf"] = statistics.median(r[memory] / max(ref[memory], 1e-9) for r, ref in pairs)
        rows.append(row)
    return rows


def machine_description(device: str, threads: int) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {threads} thread(s), torch {torch.__version__}"


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]):
    """columns: (key, header, format). Missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
