"""Which process is which: ranks from the launcher's environment, the process group, small collectives.

``find_launch(env)`` reads the ranks, in this order:

1. ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, the deepspeed launcher, the ``launch/`` scripts), with
   their ``MASTER_ADDR``/``MASTER_PORT``;
2. SLURM alone (``srun python -m ...``: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, with
   ``SLURM_NTASKS`` > 1): the master is the allocation's first host (``scontrol show hostnames
   $SLURM_JOB_NODELIST``), the port 20000 + job id % 20000 (as launch/slurm.sh), unless
   ``MASTER_ADDR``/``MASTER_PORT`` say otherwise;
3. Open MPI alone (``mpirun``: ``OMPI_COMM_WORLD_*``), when ``MASTER_ADDR`` names the master;
4. none of them: one process on its own.

A launcher that starts several processes but whose ranks cannot be read stops with a message
(``LaunchError``): N processes never train as N independent copies writing the same run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import socket
import subprocess
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from .errors import UserError

logger = logging.getLogger(__name__)


class LaunchError(UserError):
    """The environment says several processes were started, but not which one this is."""


@dataclasses.dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None  # None: one process, any free local port
    master_port: str | None
    source: str  # where the ranks came from, for the log

    def environment(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous reads."""
        env = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        env["MASTER_ADDR"] = self.master_addr or "127.0.0.1"
        env["MASTER_PORT"] = self.master_port or str(_free_port())
        return env


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """The hosts of a SLURM node list (``node[01-04]``), or None where ``scontrol`` is missing."""
    if shutil.which("scontrol") is None:
        return None
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _first_host(nodelist: str, hostnames: Callable[[str], list[str] | None]) -> str:
    hosts = hostnames(nodelist)
    if hosts:
        return hosts[0]
    if re.fullmatch(r"[\w.-]+", nodelist):  # a single plain host name needs no scontrol
        return nodelist
    raise LaunchError(f"SLURM started this process as one of several tasks, but the master host cannot be read: "
                      f"SLURM_JOB_NODELIST={nodelist!r} needs `scontrol show hostnames`, which is not on PATH. "
                      "Set MASTER_ADDR to the first host of the allocation (and MASTER_PORT), or launch with "
                      "launch/slurm.sh, which starts torchrun on each node")


def find_launch(env: Mapping[str, str] | None = None,
                hostnames: Callable[[str], list[str] | None] = scontrol_hostnames) -> Launch:
    """This process's place in the job, from its environment (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing and int(env.get("WORLD_SIZE", "1")) > 1:
            raise LaunchError(f"RANK={env['RANK']} is set but {', '.join(missing)} not: set them all (torchrun and "
                              "the deepspeed launcher do)")
        return Launch(int(env["RANK"]), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")),
                      env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "RANK/WORLD_SIZE")
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
        if missing:
            raise LaunchError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but {', '.join(missing)} is not set: start the "
                              "tasks with srun, or use launch/slurm.sh")
        addr = env.get("MASTER_ADDR")
        if addr is None:
            if "SLURM_JOB_NODELIST" not in env:
                raise LaunchError("SLURM started several tasks but SLURM_JOB_NODELIST is not set: set MASTER_ADDR")
            addr = _first_host(env["SLURM_JOB_NODELIST"], hostnames)
        port = env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]), addr, port,
                      "SLURM_PROCID/SLURM_NTASKS")
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        if "MASTER_ADDR" not in env:
            raise LaunchError(f"mpirun started {env['OMPI_COMM_WORLD_SIZE']} processes but MASTER_ADDR is not set: "
                              "pass -x MASTER_ADDR=<first host> -x MASTER_PORT=<port>, or launch with torchrun or "
                              "deepspeed")
        return Launch(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                      int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")), env["MASTER_ADDR"],
                      env.get("MASTER_PORT", "29500"), "OMPI_COMM_WORLD_RANK/SIZE")
    return Launch(0, 1, 0, None, None, "a single process")


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU); returns (rank, world_size).

    The ranks come from find_launch, written to the environment first: DeepSpeed would otherwise
    try MPI discovery in a plain ``python -m ...`` run, and treat SLURM tasks as separate jobs.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launch = find_launch()
    for name, value in launch.environment().items():  # (DeepSpeed's engine reads LOCAL_RANK, even once initialized)
        os.environ.setdefault(name, value)
    if not dist.is_initialized():
        if launch.world_size > 1:
            logger.debug("rank %d of %d (from %s), master %s:%s", launch.rank, launch.world_size, launch.source,
                         os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        if get_accelerator().device_name() == "cpu":
            # DeepSpeed JIT-compiles a shared-memory all-reduce (~1 min) at init on CPU; training
            # never uses it (only inference_all_reduce does), so gloo does all the communication.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


def reduce_across_ranks(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """all_reduce of a small CPU tensor (counts, sums), returned on CPU. It travels on the
    accelerator: NCCL reduces CUDA tensors only (gloo, on CPU, reduces them in place)."""
    from deepspeed.accelerator import get_accelerator

    on_device = values.to(get_accelerator().current_device_name())
    dist.all_reduce(on_device, op=op)
    return on_device.cpu()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (e.g. tokenizes and writes a cache), then the other ranks do
    (reading the cache). If rank 0 fails, the others still run it and fail the same way."""
    rank, _ = init_distributed()
    if rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if rank == 0:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
