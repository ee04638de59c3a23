#!/usr/bin/env bash
#SBATCH --job-name=ds-longformer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# Multi-node training under SLURM: one torchrun per node (srun, one task per node) starting
# one rank per GPU; the first host of the allocation is the master, each node's rank is
# SLURM_NODEID. Submit from the repository root (sbatch runs a copy of this file):
#
#   sbatch [--nodes 4 --gpus-per-node 8] launch/slurm.sh MODULE [ARGS...]
#   sbatch launch/slurm.sh ds_longformer.pretrain --deepspeed_config zero3 --resume latest ...
#   sbatch --nodes 4 launch/slurm.sh ds_longformer.pretrain --sequence_parallel_size 8 --max_seq_len 65536 ...
#       (sequence parallelism: each node's 8 GPUs hold a document between them -- a group is 8
#       consecutive ranks, one node -- and the 4 nodes are data-parallel replicas)
#
# GPUS_PER_NODE defaults to SLURM_GPUS_ON_NODE (else 8); MASTER_PORT to 20000 + job id % 20000.
# --dry-run (or DRY_RUN=1) prints the srun command; it also works outside an allocation.
# (A bare `srun --ntasks-per-node=8 python -m MODULE ...`, one task per GPU, also works: the trainer
# reads its ranks from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the master from the node list.)
set -euo pipefail
DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 MODULE [ARGS...]   (or: bash $0 --dry-run MODULE [ARGS...])" >&2
    exit 2
fi
MODULE=$1
shift
REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # (| head would SIGPIPE under pipefail)
    MASTER_ADDR=${HOSTS[0]}
else
    MASTER_ADDR=$(hostname)
fi
MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}

# ---- NCCL across nodes: the usual settings; the commented ones depend on the site's network ----
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed rank stops the job, no hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}              # INFO prints the rings/transports chosen (debug slow links)
# export NCCL_SOCKET_IFNAME=ib0                    # interface for NCCL's bootstrap and sockets (see `ip addr`)
# export NCCL_IB_HCA=mlx5                          # InfiniBand adapters to use (see `ibv_devices`)
# export NCCL_IB_DISABLE=1                         # no InfiniBand: plain TCP
# export NCCL_NET_GDR_LEVEL=PHB                    # GPUDirect RDMA up to this PCIe distance
# export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1  # AWS EFA (with the aws-ofi-nccl plugin)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / GPUS_PER_NODE > 0 ? CPUS / GPUS_PER_NODE : 1 ))}

# SLURM_NODEID is expanded by each node's shell, so it is quoted here; the module and its
# arguments are passed as positional parameters and keep their quoting.
node_cmd='exec torchrun --nnodes "$0" --node_rank "$SLURM_NODEID" --nproc_per_node "$1" --master_addr "$2" --master_port "$3" -m "${@:4}"'
# --cpus-per-task again: since Slurm 22.05 srun does not inherit it from sbatch (1 CPU otherwise).
cmd=(srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" --kill-on-bad-exit=1
     bash -c "$node_cmd" "$NNODES" "$GPUS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" "$MODULE" "$@")
line="OMP_NUM_THREADS=$OMP_NUM_THREADS $(printf '%q ' "${cmd[@]}")"
if [[ "$DRY_RUN" == 1 ]]; then echo "$line"; exit 0; fi
echo "+ $line" >&2
exec "${cmd[@]}"
