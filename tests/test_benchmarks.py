"""Benchmark CLIs at tiny sizes on CPU: each runs, prints its table and writes JSON of the expected
shape (no timing assertions). Also the longest-sequence search and launch/gpu_check.sh.
Every run names its precision and sizes: what a test measures must not depend on the CPU model
(a default may; test_train_step_default_precisions_do_not_depend_on_the_cpu checks the one that did).
The CLI runs are independent and start together (fixture `cli`), so the file takes about as long
as the slowest of them."""

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_longformer.benchmarks import longest_sequence

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--hidden", "32", "--heads", "2"]
TINY_MODEL = [*TINY, "--layers", "1", "--intermediate", "64", "--vocab", "100", "--window", "16"]


# Independent CLI runs, all started at once by the `cli` fixture: name -> (benchmark, flags).
RUNS = {
    "attention": ("attention", [*TINY, "--dtype", "float32", "--seq_lens", "64", "--windows", "16", "32",
                                "--impls", "hf", "blocked", "--repeats", "3", "--rounds", "2"]),
    "train_step": ("train_step", [*TINY_MODEL, "--precisions", "fp32", "--seq_len", "64", "--checkpointing", "on",
                                  "--steps", "1", "--warmup", "1", "--warmup_len", "32", "--rounds", "2"]),
    "longest": ("longest_sequence", [*TINY_MODEL, "--precision", "fp32", "--start", "64", "--max_len", "64",
                                     "--budget_gib", "2", "--warmup_len", "32", "--sequence_parallel_size", "1", "2"]),
    "over_budget": ("longest_sequence", [*TINY_MODEL, "--precision", "fp32", "--impls", "ours", "--start", "16",
                                         "--budget_gib", "0.001", "--sequence_parallel_size", "1", "2"]),
    "fp16_on_cpu": ("train_step", ["--device", "cpu", "--precisions", "fp16"]),
    "masked_head": ("train_step", [*TINY_MODEL, "--precisions", "fp32", "--seq_len", "64", "--checkpointing", "off",
                                   "--steps", "1", "--warmup", "1", "--warmup_len", "32", "--rounds", "1",
                                   "--impls", "ours", "hf", "hf_masked"]),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Start every run of RUNS at once; cli(name) waits for one and returns (returncode, stdout,
    stderr, its JSON or None)."""
    folder = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {}
    for name, (module, flags) in RUNS.items():
        cmd = [sys.executable, "-m", f"ds_longformer.benchmarks.{module}", *flags,
               "--json", str(folder / f"{name}.json")]
        with open(folder / f"{name}.out", "w") as out, open(folder / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)

    def result(name: str):
        returncode = procs[name].wait(timeout=600)
        json_path = folder / f"{name}.json"
        data = json.loads(json_path.read_text()) if json_path.is_file() else None
        return returncode, (folder / f"{name}.out").read_text(), (folder / f"{name}.err").read_text(), data

    yield result
    for proc in procs.values():  # a failed test may leave runs (and their workers) behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_attention_cli(cli):
    from ds_longformer.benchmarks.attention import floor_flops

    returncode, stdout, stderr, result = cli("attention")
    assert returncode == 0, stderr[-3000:]
    assert "fwd+bwd ms" in stdout
    runs = result["runs"]
    assert [(r["impl"], r["window"], r["round"]) for r in runs] == [
        (impl, window, round_) for round_ in (0, 1) for window in (16, 32) for impl in ("hf", "blocked")]
    rows = result["rows"]
    assert [(r["impl"], r["window"], r["rounds"]) for r in rows] == [("hf", 16, 2), ("blocked", 16, 2),
                                                                     ("hf", 32, 2), ("blocked", 32, 2)]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in rows)
    blocked = rows[1]
    blocked_runs = [r for r in runs if r["impl"] == "blocked" and r["window"] == 16]
    assert blocked["forward_backward_ms"] == pytest.approx(sum(r["forward_backward_ms"] for r in blocked_runs) / 2)
    ratios = [hf["forward_backward_ms"] / ours["forward_backward_ms"]
              for hf, ours in zip(runs[0::4], runs[1::4])]  # window 16, rounds 0 and 1
    assert blocked["speed_vs_hf"] == pytest.approx(sum(ratios) / 2)  # the median of two per-round ratios
    assert blocked["speed_range"] == f"{min(ratios):.2f}-{max(ratios):.2f}" and "mem_vs_hf" in blocked

    for run in runs:  # forward+backward timed in turns, each turn's floor from its own matmul
        work = floor_flops(run["impl"], run["seq_len"], run["window"], run["globals"], 32, 2, True)
        turns = list(zip(run["turn_ms"], run["turn_matmul_gflops"]))
        assert len(turns) == 3 and all(rate > 0.1 for _, rate in turns)
        assert run["forward_backward_ms"] == pytest.approx(statistics.median(run["turn_ms"]))
        assert run["x_floor"] == pytest.approx(statistics.median(ms / 1e3 / (work / (rate * 1e9)) for ms, rate in turns))
        assert run["forward_backward_mib"] > 0 and run["forward_ms"] > 0
    for round_ in (0, 1):  # both windows and both impls of a round were timed in one process, in turns
        turns = [r["turn_matmul_gflops"] for r in runs if r["round"] == round_]
        assert all(t == turns[0] for t in turns)
    assert runs[0]["turn_matmul_gflops"] != runs[4]["turn_matmul_gflops"]  # another round, another process


def test_train_step_cli(cli):
    returncode, stdout, stderr, result = cli("train_step")
    assert returncode == 0, stderr[-3000:]
    assert "tokens/s" in stdout and "speed vs hf" in stdout
    assert {"machine", "date", "config", "args", "rows", "runs"} <= set(result)
    assert [(r["impl"], r["round"]) for r in result["runs"]] == [("ours", 0), ("hf", 0), ("ours", 1), ("hf", 1)]
    ours, hf = result["rows"]
    assert ours["rounds"] == hf["rounds"] == 2
    assert (ours["impl"], hf["impl"]) == ("ours", "hf")
    for row in (ours, hf):
        assert "error" not in row, row.get("error")
        assert row["precision"] == "fp32" and row["ckpt"] == "on" and row["seq_len"] == 64
        assert row["tokens_per_s"] > 0 and row["peak_mib"] > 0 and len(row["times_s"]) == 1
        assert torch.isfinite(torch.tensor(row["loss"]))
    assert ours["speed_vs_hf"] > 0 and ours["mem_vs_hf"] > 0
    assert hf["speed_vs_hf"] == pytest.approx(1.0)
    assert "MFU %" in stdout
    for run in result["runs"]:  # the same model FLOPs for both: their MFU ratio is their speed ratio
        assert run["tflops"] * 1e12 * run["step_s"] == pytest.approx(result["runs"][0]["tflops"] * 1e12
                                                                     * result["runs"][0]["step_s"], rel=1e-6)
        assert 0 < run["mfu_percent"] < 100 and run["peak_source"].startswith("measured float32 matmul")


def test_train_step_against_transformers_with_the_masked_only_head(cli):
    """hf_masked: transformers' encoder and lm_head, scoring only the masked positions as ours does:
    the same loss as transformers' full head, and its own ratio columns."""
    returncode, stdout, stderr, result = cli("masked_head")
    assert returncode == 0, stderr[-3000:]
    assert "vs hf_masked" in stdout
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["hf_masked"]["loss"] == pytest.approx(rows["hf"]["loss"], rel=1e-5)
    assert rows["hf_masked"]["vs_masked"] == pytest.approx(1.0) and rows["ours"]["vs_masked"] > 0


def test_search_stops_on_a_worker_failure_that_is_not_memory(monkeypatch):
    boom = lambda module, spec, threads, timeout, nproc: {**spec, "error": "boom"}  # noqa: E731
    monkeypatch.setattr(longest_sequence, "run_worker", boom)
    with pytest.raises(RuntimeError, match="failed \\(boom\\), not for memory"):
        longest_sequence.search({"threads": 1, "impl": "hf"}, 4096, 65536, 512, 60, report=lambda r: None)
    oom = lambda module, spec, threads, timeout, nproc: {**spec, "error": "out of memory"}  # noqa: E731
    monkeypatch.setattr(longest_sequence, "run_worker", oom)
    assert longest_sequence.search({"threads": 1, "impl": "hf"}, 4096, 65536, 4096, 60, report=lambda r: None)[0] is None


@pytest.mark.parametrize("native_bf16", [True, False])
def test_train_step_default_precisions_do_not_depend_on_the_cpu(monkeypatch, tmp_path, capsys, native_bf16):
    """On a CPU with avx512_bf16/AMX the default used to add bf16 runs (and the CLI tests failed there)."""
    from ds_longformer.benchmarks import train_step

    measured = []

    def fake_worker(module, spec, threads, timeout):
        measured.append(spec["precision"])
        return {**spec, "error": "not run"}

    monkeypatch.setattr(train_step, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(train_step, "run_worker", fake_worker)
    train_step.main([*TINY_MODEL, "--checkpointing", "off", "--rounds", "1", "--json", str(tmp_path / "out.json")])
    assert measured == ["fp32", "fp32"]  # ours and hf
    assert f"this CPU has {'' if native_bf16 else 'no '}native bf16" in capsys.readouterr().out


def test_train_step_refuses_fp16_on_cpu(cli):
    returncode, _, stderr, _ = cli("fp16_on_cpu")
    assert returncode == 2 and "fp16 needs a GPU" in stderr


def test_longest_sequence_cli(cli):
    """ours and hf, and ours at P=2 (--sequence_parallel_size 1 2: 2 CPU ranks): the largest rank's peak
    and activations, the bytes a rank sends per layer (all-to-alls of q, k, v and the output forward,
    backward and in checkpointing's recompute: 12 tensors of (N/2 x hidden) fp32, half of each sent;
    plus the global rows' all-reduces)."""
    returncode, stdout, stderr, result = cli("longest")
    assert returncode == 0, stderr[-3000:]
    assert "longest ours: 64" in stdout and "ratio ours/hf: >= 1.00" in stdout
    assert result["longest"] == {"ours": 64, "hf": 64, "ours P=2": 64} and result["ratio"] == 1.0
    assert [(t["impl"], t["sequence_parallel_size"], t["seq_len"], t["fits"]) for t in result["tries"]] == [
        ("ours", 1, 64, True), ("hf", 1, 64, True), ("ours", 2, 64, True)]  # (transformers' model: P=1 only)
    assert all(0 < t["peak_mib"] <= 2 * 1024 for t in result["tries"])
    one, _, two = result["tries"]
    assert len(two["peak_mib_ranks"]) == 2 and two["peak_mib"] == max(two["peak_mib_ranks"]) > 0
    assert all(run["act_only_mib"] >= 0 and run["memory_step_s"] > 0 for run in (one, two))
    all_to_alls = 12 * 0.5 * 32 * 32 * 4 / 2**20
    assert all_to_alls < two["comm_mib_per_layer"] < 1.2 * all_to_alls and "comm_mib_per_layer" not in one
    assert "activation_ratio_p2" in result  # (at N=64 the activations are below what RSS resolves: no ratio)
    assert "ratio ours P=2/P=1 (longest N per rank budget): not measured, both reach --max_len" in stdout


def test_longest_sequence_stops_a_worker_over_budget(cli):
    """At P=2 too: the rank over budget stops its launcher, so its peer does not wait for it."""
    returncode, stdout, stderr, result = cli("over_budget")
    assert returncode == 0, stderr[-3000:]
    assert "longest ours: none" in stdout and "longest ours P=2: none" in stdout
    assert [t["sequence_parallel_size"] for t in result["tries"]] == [1, 2]
    assert all(t["fits"] is False and t["stopped"] == "over budget" for t in result["tries"])


def test_search_doubles_while_it_fits_and_halves_while_it_does_not(monkeypatch):
    def fake_worker(module, spec, threads, timeout, nproc):
        return {**spec, "fits": spec["seq_len"] <= limit}

    monkeypatch.setattr(longest_sequence, "run_worker", fake_worker)
    for limit, expected, lengths in [(20000, 16384, [4096, 8192, 16384, 32768]),
                                     (70000, 65536, [4096, 8192, 16384, 32768, 65536]),  # stops at max_len
                                     (3000, 2048, [4096, 2048]),
                                     (100, None, [4096, 2048, 1024, 512])]:  # not below min_len
        longest, tries = longest_sequence.search({"threads": 1}, 4096, 65536, 512, 60, report=lambda r: None)
        assert longest == expected and [t["seq_len"] for t in tries] == lengths


def test_gpu_check_script(tmp_path):
    script = REPO / "launch" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("runs the whole GPU check on a GPU machine")
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path / "out")})
    assert done.returncode == 0 and "no CUDA GPU" in done.stdout
