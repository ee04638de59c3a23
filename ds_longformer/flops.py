"""FLOP counts and peak rates: the trainer's model FLOPs utilisation (MFU) and the benchmarks' floors.

Model FLOPs, as in the PaLM paper's MFU: the multiply-adds the model's math needs (2 FLOPs each),
whatever the kernels spend on top (the blocked backend's padded tiles, recomputation under
gradient checkpointing). A training step costs 3 x its forward: the backward computes two
products (input and weight gradients) per forward one. Counts are per sequence of the length the
batch has (padding included: the kernels do that work). Shapes: n tokens, C hidden, g global tokens.
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) peak TFLOP/s of known GPUs by the precision matmuls run in; the first name
# found in torch.cuda.get_device_name() wins, so the PCIe and NVL H100s come before the SXM one.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def band_pairs(n: int, window: int) -> int:
    """(query, key) pairs of the sliding window: 2w + 1 per query (w = window / 2), fewer within
    w of either end; n^2 when the window covers the sequence."""
    w = window // 2
    return n * (2 * w + 1) - w * (w + 1) if w < n else n * n


def self_attention_flops(n: int, window: int, n_global: int, hidden: int, heads: int,
                         projections: bool = True) -> float:
    """Forward FLOPs of one LongformerSelfAttention on one sequence: the band, the local queries
    against the global keys and the global rows; with `projections`, also query/key/value and the
    global projections (not the output dense, which belongs to the layer)."""
    g, c = n_global, hidden
    flops = 4 * band_pairs(n, window) * c  # q.k and p.v over the band, all heads
    flops += 4 * g * max(0, n - (window + 1)) * c  # local queries against the global keys outside their band
    if projections:
        flops += 3 * 2 * n * c * c  # query, key, value
        if g:
            flops += 2 * g * c * c + 4 * g * n * c  # query_global on the g rows; their q.k and p.v over n keys
            # key_global/value_global: projected for every token, or folded into the g queries per
            # head (see attention.AbsorbedGlobalRows), whichever is cheaper, as the model picks.
            flops += min(2 * 2 * n * c * c, 2 * 2 * heads * g * n * c + 2 * 2 * g * c * c)
    return float(flops)


def encoder_layer_flops(n: int, window: int, n_global: int, hidden: int, heads: int, intermediate: int) -> float:
    """Forward FLOPs of one encoder layer on one sequence: self-attention, its output dense, the MLP."""
    return self_attention_flops(n, window, n_global, hidden, heads) + 2 * n * hidden * hidden \
        + 2 * 2 * n * hidden * intermediate


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for `precision` (fp32, bf16, fp16) on `device`: the
    table above for a known GPU, else a measured dense matmul rate (a CPU has no datasheet figure
    we could know; pass the trainer's --peak_tflops for a true peak)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.get_float32_matmul_precision() != "highest"  # torch.set_float32_matmul_precision("high")
        key = "tf32" if precision == "fp32" and tf32 else precision
        for gpu, peaks in PEAK_TFLOPS.items():
            if gpu in name:
                return peaks[key] * 1e12, f"{name} {key} dense peak"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    rate = matmul_rate(device, dtype)
    return rate, f"measured {str(dtype).removeprefix('torch.')} matmul rate on {device.type}"


def _wall_clock(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def matmul_rate(device: torch.device | str, dtype: torch.dtype, n: int = 4096, c: int = 768, repeats: int = 5,
                clock=None) -> float:
    """Measured FLOP/s of an (n x c) @ (c x c) matmul, the shape of a projection: the median of
    `repeats` timings by `clock(fn) -> seconds` (default: wall time, synchronized on CUDA)."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(0)  # its own: measuring never moves the training's streams
    a = torch.randn(n, c, device=device, dtype=dtype, generator=generator)
    w = torch.randn(c, c, device=device, dtype=dtype, generator=generator)
    calls = 50 if device.type == "cuda" else 1  # one GPU matmul (~10 us) would mostly time the launch and sync

    def matmuls():
        for _ in range(calls):
            a @ w

    clock = clock or (lambda fn: _wall_clock(fn, device))
    matmuls()  # warm-up
    times = sorted(clock(matmuls) for _ in range(repeats))
    return calls * 2 * n * c * c / times[len(times) // 2]
