"""Launch scripts: they parse, --dry-run prints the command, the SLURM script starts one torchrun
per node with the right ranks and NCCL settings (fake srun/scontrol/torchrun), launch/cpu.sh really
trains with two processes, and both multi-node recipes (deepspeed --hostfile, SLURM) run a 2-node job
on this machine -- two launchers, node ranks 0 and 1, one process each -- that equals the 1-node run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TWO_RANK_FLAGS
from tests.trainer_helpers import child_env, params, reap, spawn

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))


def bash(*args: str, env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return reap(spawn(["bash", *args], cwd=REPO, env={**os.environ, **(env or {})}), timeout)


def test_every_script_parses():
    assert {"cpu.sh", "gpu.sh", "multi_gpu.sh", "multi_node.sh", "slurm.sh"} <= {p.name for p in SCRIPTS}
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


def fake_commands(folder: Path, **bodies: str) -> dict:
    """Executables named after the keys (bash bodies) in `folder`, first on PATH."""
    for name, body in bodies.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (folder / name).chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_slurm_script_starts_one_torchrun_per_node(tmp_path):
    """Fake srun (runs its command as node 1), scontrol (two hosts) and torchrun (prints argv and the
    NCCL settings it got)."""
    path = fake_commands(
        tmp_path,
        srun='while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"',
        scontrol='printf "node-a\\nnode-b\\n"',
        torchrun='python -c "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ[\'NCCL_DEBUG\'], '
                 'os.environ[\'TORCH_NCCL_ASYNC_ERROR_HANDLING\']]))" "$@"')
    env = {**path, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "123", "SLURM_CPUS_PER_TASK": "32",
           "OMP_NUM_THREADS": "", "NCCL_DEBUG": ""}  # empty = unset: the script derives or sets them
    proc = bash("launch/slurm.sh", *TASK, env=env)
    assert proc.returncode == 0, proc.stderr
    argv, nccl_debug, async_errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert argv == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4", "--master_addr", "node-a",
                    "--master_port", "20123", "-m", *TASK]
    assert (nccl_debug, async_errors) == ("WARN", "1")
    assert "OMP_NUM_THREADS=8 " in proc.stderr


def test_multi_node_dry_run_names_the_hostfile_and_its_first_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    proc = bash("launch/multi_node.sh", "--dry-run", str(hostfile), *TASK, env={"MASTER_ADDR": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 "
                                   "--no_local_rank --module ds_longformer.pretrain --max_steps 3 --project_name a\\ b")
    proc = bash("launch/multi_node.sh", "--dry-run", str(hostfile), *TASK, env={"MASTER_ADDR": "", "NODE_RANK": "1"})
    assert "--no_ssh --node_rank 1 --master_addr node-a" in proc.stdout
    assert bash("launch/multi_node.sh", str(tmp_path / "none"), *TASK).returncode == 2


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_two_nodes(node_command: list[str], env: dict, out: Path) -> None:
    """`node_command` twice at once, as nodes 0 and 1 (NODE_RANK / SLURM_NODEID in `env` per node)."""
    procs = [spawn([*node_command, "tests.trainer_helpers", *TWO_RANK_FLAGS, "--default_root_dir", str(out),
                    "--dump", str(out / "dump")], cwd=REPO, env=child_env(**env, NODE_RANK=str(node)))
             for node in (0, 1)]
    for proc in procs:
        done = reap(proc, timeout=400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def assert_same_training(out: Path, reference: Path):
    summary = json.loads((out / "dump" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    expected = params(reference)
    for rank in (0, 1):
        got = params(out, rank)
        assert all(torch.equal(got[k], expected[k]) for k in expected), rank


def test_two_nodes_through_the_deepspeed_hostfile_recipe(two_ranks, tmp_path):
    """launch/multi_node.sh with NODE_RANK (deepspeed --hostfile --no_ssh) on two "hosts" of this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    path = fake_commands(tmp_path, deepspeed=f'exec "{sys.executable}" -m deepspeed.launcher.runner "$@"')
    env = {**path, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "DS_ACCELERATOR": "cpu"}
    run_two_nodes(["bash", "launch/multi_node.sh", str(hostfile)], env, tmp_path / "out")
    assert_same_training(tmp_path / "out", two_ranks[0])


def test_two_nodes_through_the_slurm_script(two_ranks, tmp_path):
    """launch/slurm.sh with a fake srun that starts its command for nodes 0 and 1 here (real torchrun)."""
    path = fake_commands(
        tmp_path,
        srun='while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=$NODE_RANK exec "$@"',
        scontrol='printf "127.0.0.1\\n127.0.0.1\\n"',
        torchrun=f'exec "{sys.executable}" -m torch.distributed.run "$@"')
    env = {**path, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[0-1]", "GPUS_PER_NODE": "1",
           "SLURM_CPUS_PER_TASK": "1", "MASTER_PORT": free_port()}
    run_two_nodes(["bash", "launch/slurm.sh"], env, tmp_path / "out")
    assert_same_training(tmp_path / "out", two_ranks[0])


def test_cpu_launcher_trains_with_two_processes(tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = bash("launch/cpu.sh", "2", "tests.trainer_helpers", "--max_steps", "2", "--default_root_dir",
                str(tmp_path), "--dump", str(tmp_path / "dump"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"params_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert summary["global_step"] == 2 and Path(summary["final_model"], "model.safetensors").is_file()
