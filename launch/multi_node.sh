#!/usr/bin/env bash
# Multi-node training without SLURM: the deepspeed launcher and a hostfile.
#
#   bash launch/multi_node.sh [--dry-run] HOSTFILE MODULE [ARGS...]
#   bash launch/multi_node.sh hostfile ds_longformer.pretrain --deepspeed_config zero3 --resume latest ...
#   NODE_RANK=1 bash launch/multi_node.sh hostfile ds_longformer.pretrain ...   # on each node, no ssh
#
# HOSTFILE: one line per node, "HOST slots=N" (N: GPUs, i.e. ranks, on that host), e.g.
#     node-a slots=8
#     node-b slots=8
# Default: run it on one host; the deepspeed launcher starts every node's ranks over ssh (pdsh), so
# each host needs passwordless ssh from it, this repository at the same path and the same Python
# environment. Remote ranks get PYTHONPATH, NCCL_* and the variables listed in ./.deepspeed_env (one
# NAME=VALUE per line: put OMP_NUM_THREADS and site settings there).
# NODE_RANK=k: no ssh; run the command on every host yourself (k = the host's line in HOSTFILE, from 0).
# MASTER_ADDR defaults to the first host of HOSTFILE, MASTER_PORT to 29500.
# --dry-run (or DRY_RUN=1) prints the command (stdout) instead of running it.
set -euo pipefail
DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
    echo "usage: [NODE_RANK=k] bash $0 [--dry-run] HOSTFILE MODULE [ARGS...]" >&2
    exit 2
fi
HOSTFILE=$1 MODULE=$2
shift 2
if [[ ! -f "$HOSTFILE" ]]; then
    echo "hostfile $HOSTFILE not found (one line per node: HOST slots=N)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
FIRST_HOST=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
PORT=${MASTER_PORT:-29500}

NO_SSH=()
if [[ -n "${NODE_RANK:-}" ]]; then NO_SSH=(--no_ssh --node_rank "$NODE_RANK"); fi
# --no_local_rank: the rank comes from the environment (LOCAL_RANK); the task CLIs accept the flag anyway.
cmd=(deepspeed --hostfile "$HOSTFILE" "${NO_SSH[@]}" --master_addr "$MASTER_ADDR" --master_port "$PORT"
     --no_local_rank --module "$MODULE" "$@")
line=$(printf '%q ' "${cmd[@]}")
if [[ "$DRY_RUN" == 1 ]]; then echo "$line"; exit 0; fi
echo "+ $line" >&2
exec "${cmd[@]}"
