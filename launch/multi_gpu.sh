#!/usr/bin/env bash
# Train on N GPUs of one node.
#
#   bash launch/multi_gpu.sh [--dry-run] NGPUS MODULE [ARGS...]
#   bash launch/multi_gpu.sh 8 ds_longformer.pretrain --deepspeed_config zero3 ...
#   bash launch/multi_gpu.sh 8 ds_longformer.pretrain --sequence_parallel_size 8 --max_seq_len 65536 ...
#       (sequence parallelism: the 8 GPUs hold each document between them, 8192 tokens each)
#
# LAUNCHER=deepspeed (default; the first N of CUDA_VISIBLE_DEVICES when set) or LAUNCHER=torchrun.
# OMP_NUM_THREADS defaults to cores / N (the deepspeed launcher leaves it unset). MASTER_PORT defaults to 29500.
# --dry-run (or DRY_RUN=1) prints the command (stdout) instead of running it.
set -euo pipefail
DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
    echo "usage: [LAUNCHER=deepspeed|torchrun] bash $0 [--dry-run] NGPUS MODULE [ARGS...]" >&2
    exit 2
fi
NGPUS=$1 MODULE=$2
shift 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPUS > 0 ? $(nproc) / NGPUS : 1 ))}
PORT=${MASTER_PORT:-29500}

# `deepspeed --num_gpus N` drops CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1: name the first N
# visible GPUs with --include instead, so CUDA_VISIBLE_DEVICES=4,5 picks GPUs 4 and 5.
DEVICES=(--num_gpus "$NGPUS")
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -ra VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
    if (( NGPUS > ${#VISIBLE[@]} )); then
        echo "asked for $NGPUS GPUs but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#VISIBLE[@]}" >&2
        exit 2
    fi
    DEVICES=(--include "localhost:$(IFS=,; echo "${VISIBLE[*]:0:NGPUS}")")
fi

case "${LAUNCHER:-deepspeed}" in
    # --no_local_rank: the task CLIs take no --local_rank (LOCAL_RANK is in the environment).
    deepspeed) cmd=(deepspeed "${DEVICES[@]}" --master_port "$PORT" --no_local_rank --module "$MODULE" "$@") ;;
    torchrun) cmd=(torchrun --nproc_per_node "$NGPUS" --master_port "$PORT" -m "$MODULE" "$@") ;;
    *) echo "LAUNCHER must be deepspeed or torchrun, got ${LAUNCHER}" >&2; exit 2 ;;
esac
line="OMP_NUM_THREADS=$OMP_NUM_THREADS $(printf '%q ' "${cmd[@]}")"
if [[ "$DRY_RUN" == 1 ]]; then echo "$line"; exit 0; fi
echo "+ $line" >&2
exec "${cmd[@]}"
