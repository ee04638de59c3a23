"""engine/distributed.py: ranks from the launcher's environment -- torchrun/deepspeed variables, SLURM
alone (`srun python -m ...`), mpirun -- or a clear stop; never N independent copies. A bare SLURM job
of two tasks trains exactly as torchrun's two processes (conftest's two_ranks)."""

import random
import socket

import pytest
import torch

from ds_longformer.engine.distributed import Launch, LaunchError, find_launch
from tests.conftest import TWO_RANK_FLAGS
from tests.trainer_helpers import finish, params, start


def no_scontrol(nodelist):
    return None


def test_torchrun_and_deepspeed_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29500",
           "SLURM_PROCID": "5", "SLURM_NTASKS": "2"}  # a torchrun inside a SLURM job: torchrun's ranks
    assert find_launch(env, no_scontrol) == Launch(3, 8, 1, "node-a", "29500", "RANK/WORLD_SIZE")
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT not"):
        find_launch({"RANK": "1", "WORLD_SIZE": "2"}, no_scontrol)


def test_slurm_alone_gives_the_ranks_and_the_first_host_as_master():
    """The issue's case: srun of 8 tasks, no RANK: this is rank 3 of 8, not one of 8 single-process runs."""
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    launch = find_launch(env, lambda nodelist: {"gpu[07-08]": ["gpu07", "gpu08"]}[nodelist])
    assert launch == Launch(3, 8, 3, "gpu07", str(20000 + 123456 % 20000), "SLURM_PROCID/SLURM_NTASKS")
    assert launch.environment() == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu07",
                                    "MASTER_PORT": "23456"}
    single_host = find_launch({**env, "SLURM_JOB_NODELIST": "gpu07"}, no_scontrol)  # needs no scontrol
    assert single_host.master_addr == "gpu07"
    given = find_launch({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}, no_scontrol)
    assert (given.master_addr, given.master_port) == ("10.0.0.1", "1234")


def test_slurm_alone_without_a_readable_master_stops():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    with pytest.raises(LaunchError, match="scontrol show hostnames.*Set MASTER_ADDR"):
        find_launch(env, no_scontrol)
    with pytest.raises(LaunchError, match="SLURM_LOCALID is not set"):
        find_launch({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}, no_scontrol)


def test_one_slurm_task_or_no_launcher_is_one_process():
    assert find_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, no_scontrol).world_size == 1
    assert find_launch({}, no_scontrol) == Launch(0, 1, 0, None, None, "a single process")


def test_mpirun_needs_a_master_address():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    with pytest.raises(LaunchError, match="mpirun started 4 processes but MASTER_ADDR is not set"):
        find_launch(env, no_scontrol)
    assert find_launch({**env, "MASTER_ADDR": "h"}, no_scontrol).rank == 1


def free_port_for_slurm_job() -> int:
    """A job id whose derived port (20000 + id % 20000) is free here."""
    for _ in range(100):
        job_id = random.randrange(1000, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port")


def test_a_bare_slurm_job_trains_as_torchrun_does(two_ranks, tmp_path):
    """Two tasks started as srun starts them (SLURM variables only, no launcher) train together:
    the same weights as torchrun's two processes, on both ranks."""
    reference, _ = two_ranks
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(free_port_for_slurm_job())}
    procs = [start(tmp_path, *TWO_RANK_FLAGS, env={**job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in (0, 1)]
    for proc in procs:
        finish(proc)
    expected = params(reference)
    for rank in (0, 1):
        got = params(tmp_path, rank)
        assert all(torch.equal(got[k], expected[k]) for k in expected), rank
