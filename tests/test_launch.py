"""Launch scripts: they parse, --dry-run prints the command, the SLURM script starts one torchrun
per node with the right ranks (fake srun/scontrol/torchrun), and launch/cpu.sh really trains
with two processes."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.trainer_helpers import reap, spawn

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))


def bash(*args: str, env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return reap(spawn(["bash", *args], cwd=REPO, env={**os.environ, **(env or {})}), timeout)


def test_every_script_parses():
    assert {"cpu.sh", "gpu.sh", "multi_gpu.sh", "slurm.sh"} <= {p.name for p in SCRIPTS}
    for script in SCRIPTS:
        assert bash("-n", str(script)).returncode == 0, script


TASK = ["ds_longformer.pretrain", "--max_steps", "3", "--project_name", "a b"]


@pytest.mark.parametrize("script, head, expected", [
    ("cpu.sh", ["2"], "torchrun --standalone --nproc_per_node 2 -m ds_longformer.pretrain"),
    ("gpu.sh", [], "python -m ds_longformer.pretrain"),
    ("multi_gpu.sh", ["4"], "deepspeed --num_gpus 4 --master_port 29500 --no_local_rank --module ds_longformer.pretrain"),
    ("slurm.sh", [], "--ntasks-per-node=1 --cpus-per-task="),
])
def test_dry_run_prints_the_command(script, head, expected):
    for how in (["--dry-run"], []):
        env = {"CUDA_VISIBLE_DEVICES": "", **({"DRY_RUN": "1"} if not how else {})}  # "" = unset
        proc = bash(f"launch/{script}", *how, *head, *TASK, env=env)
        assert proc.returncode == 0, proc.stderr
        line = proc.stdout.strip()
        assert expected in line and line.endswith("--max_steps 3 --project_name a\\ b"), line


def test_multi_gpu_keeps_cuda_visible_devices():
    """deepspeed --num_gpus would drop CUDA_VISIBLE_DEVICES and use GPUs 0..N-1."""
    proc = bash("launch/multi_gpu.sh", "--dry-run", "2", *TASK, env={"CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert "deepspeed --include localhost:4\\,5 --master_port" in proc.stdout, proc.stdout
    proc = bash("launch/multi_gpu.sh", "--dry-run", "2", *TASK, env={"CUDA_VISIBLE_DEVICES": "4"})
    assert proc.returncode == 2 and "CUDA_VISIBLE_DEVICES=4 names 1" in proc.stderr


def test_multi_gpu_can_use_torchrun():
    proc = bash("launch/multi_gpu.sh", "--dry-run", "8", *TASK, env={"LAUNCHER": "torchrun"})
    assert "torchrun --nproc_per_node 8 --master_port 29500 -m ds_longformer.pretrain" in proc.stdout


def test_cpu_launcher_sets_threads_per_rank():
    proc = bash("launch/cpu.sh", "--dry-run", "2", *TASK, env={"OMP_NUM_THREADS": ""})  # empty = unset
    assert proc.stdout.startswith(f"OMP_NUM_THREADS={max(1, os.cpu_count() // 2)} "), proc.stdout


def test_slurm_script_starts_one_torchrun_per_node(tmp_path):
    """Fake srun (runs its command as node 1), scontrol (two hosts) and torchrun (prints argv)."""
    fakes = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"',
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        "torchrun": 'python -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"',
    }
    for name, body in fakes.items():
        (tmp_path / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "123", "SLURM_CPUS_PER_TASK": "32",
           "OMP_NUM_THREADS": ""}  # empty = unset: the script derives it from the CPUs per task
    proc = bash("launch/slurm.sh", *TASK, env=env)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout.strip().splitlines()[-1])
    assert argv == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4", "--master_addr", "node-a",
                    "--master_port", "20123", "-m", *TASK]
    assert "OMP_NUM_THREADS=8 " in proc.stderr


def test_cpu_launcher_trains_with_two_processes(tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = bash("launch/cpu.sh", "2", "tests.trainer_helpers", "--max_steps", "2", "--default_root_dir",
                str(tmp_path), "--dump", str(tmp_path / "dump"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"params_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert summary["global_step"] == 2 and Path(summary["final_model"], "model.safetensors").is_file()
