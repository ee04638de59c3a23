#!/usr/bin/env bash
# GPU check: the CUDA tests and the three benchmarks at GPU sizes, in under 8 minutes on an H100 (12
# with the sequence-parallel step, on a machine of several GPUs).
#
#   bash launch/gpu_check.sh          # outputs in $OUT if set, else ./gpu_check_out
#
# Steps, in order of importance (each under `timeout`; one that fails or times out does not stop
# the others, and no step may run past the total deadline of $TOTAL_S seconds, default 460; 700 on
# a machine of several GPUs):
#   tests         pytest -m cuda tests/test_cuda.py: flex/blocked vs dense forward and backward,
#                 fp16/bf16 training steps finite, ZeRO-2 Trainer on one GPU, fp16's loss scaler
#                 (a skipped step goes on; the scaler giving up stops the run)
#   attention     our blocked and flex vs transformers' attention, fp16, window 512, N=4096
#   train_step    12 layers, N=4096, fp16 and bf16, ours (backend blocked) vs hf; flex's speed is
#                 the attention step's (each flex train worker would spend ~1 min compiling)
#   attention_long  the same attention at N=32768 (memory at length)
#   longest       longest trainable N within 16 GiB, bf16, gradient checkpointing, ours vs hf
#                 (backend blocked: flex would compile anew for every length tried)
#   longest_sp    the same for ours with sequence parallelism over all the machine's GPUs (P = their
#                 number, one group; 16 GiB per GPU; a large model's width, 16 heads, so that P divides
#                 them) against P = 1: per-rank peak and activations, bytes per layer; skipped on one GPU
# Each step writes <out>/<step>.log and the benchmarks <out>/<step>.json; the run ends with a
# summary (status and seconds per step, then each benchmark's table), also in <out>/summary.txt.
# Exit status: 0 when every step passed, 1 otherwise; without a CUDA GPU it says so and exits 0.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Every GPU (or those CUDA_VISIBLE_DEVICES names) for the sequence-parallel step; one for the others.
ALL_GPUS=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, -)}
NGPUS=$(awk -F, '{print NF}' <<< "$ALL_GPUS")
TOTAL_S=${TOTAL_S:-$((NGPUS >= 2 ? 700 : 460))}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1
  python -c "import torch; from importlib.metadata import version as v; print('torch', torch.__version__, \
'cuda', torch.version.cuda, '| deepspeed', v('deepspeed'), '| transformers', v('transformers'))" 2>/dev/null
  date -u; } | tee "$OUT_DIR/machine.txt"

START=$SECONDS
SUMMARY=()

# run_step NAME LIMIT_S COMMAND...: run under the smaller of LIMIT_S and the time left.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((left < 20)); then
        SUMMARY+=("$(printf '%-15s %-22s %5s s' "$name" "skipped (no time left)" 0)")
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS rc status
    # timeout signals the whole process group, so benchmark workers stop with their driver.
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    SUMMARY+=("$(printf '%-15s %-22s %5d s' "$name" "$status" $((SECONDS - t0)))")
}

# Limits per step add up to more than TOTAL_S on purpose: time a step does not use goes to the next.
BENCH="python -m ds_longformer.benchmarks"
run_step tests 150 python -m pytest -q -m cuda tests/test_cuda.py
run_step attention 100 $BENCH.attention --device cuda --dtype float16 --impls hf blocked flex \
    --seq_lens 4096 --windows 512 --globals 1 --repeats 5 --rounds 1 --threads 4 --json "$OUT_DIR/attention.json"
run_step train_step 120 $BENCH.train_step --device cuda --layers 12 --seq_len 4096 --precisions fp16 bf16 \
    --checkpointing off --backend blocked --steps 5 --warmup 2 --rounds 1 --threads 4 \
    --json "$OUT_DIR/train_step.json"
run_step attention_long 100 $BENCH.attention --device cuda --dtype float16 --impls hf blocked flex \
    --seq_lens 32768 --windows 512 --globals 1 --repeats 3 --rounds 1 --threads 4 --json "$OUT_DIR/attention_long.json"
run_step longest 150 $BENCH.longest_sequence --device cuda --layers 12 --precision bf16 --budget_gib 16 \
    --backend blocked --start 4096 --max_len 131072 --threads 4 --json "$OUT_DIR/longest.json"
if ((NGPUS >= 2)); then
    run_step longest_sp 240 env CUDA_VISIBLE_DEVICES="$ALL_GPUS" $BENCH.longest_sequence --device cuda --layers 12 \
        --hidden 1024 --heads 16 --intermediate 4096 --precision bf16 --budget_gib 16 --backend blocked \
        --impls ours --sequence_parallel_size 1 "$NGPUS" --start 16384 --max_len 1048576 --threads 4 \
        --json "$OUT_DIR/longest_sp.json"
else
    echo "=== longest_sp: skipped (one GPU: sequence parallelism needs two or more)"
fi

{
    echo "=== gpu_check summary ($(head -n 1 "$OUT_DIR/machine.txt"); total $((SECONDS - START)) s)"
    printf '%s\n' "${SUMMARY[@]}"
    grep -E 'passed|failed|error|skipped|no tests ran' "$OUT_DIR/tests.log" 2>/dev/null | tail -n 1
    for name in attention train_step attention_long longest longest_sp; do
        [[ -f "$OUT_DIR/$name.log" ]] || continue
        echo "--- $name"
        # Header comments, progress lines (all a stopped run has) and the table with what follows it.
        awk '/^ *(impl|model) /{table=1} table || /^(# |  round |  tried )/' "$OUT_DIR/$name.log"
    done
} | tee "$OUT_DIR/summary.txt"
for line in "${SUMMARY[@]}"; do
    [[ $line == *" ok "* ]] || exit 1
done
exit 0
