#!/usr/bin/env bash
# The GPU check: one command that, on a machine with a CUDA GPU (no network needed), runs in at most 8 minutes
#   setup          use the python on PATH ($PYTHON); `pip install -e . --no-deps` only if saelab does not import
#   doctor         `saelab doctor --json` (skipped, and said so, where this saelab has no doctor command)
#   gpu_kernels    bench/gpu_kernels.py: every sparse op, Triton vs PyTorch vs float64, d 768/2304, n 24k/131k,
#                  k 32/64, fp32 and bf16
#   topk_stream    bench/gpu_topk_stream.py: the fused streaming encoder top-k, exact on integer inputs (ties to the
#                  lowest index, as the torch path), and against dense GEMM + topk and the blocked torch path at
#                  B 4096, k 32, d 2048/4096, n 65k/262k, bf16 and fp32 (TF32 off): agreement, ms, peak memory
#   train          a ~2-minute `saelab train --device cuda` on the reference model (with its core evaluation)
#   train_step     bench/train_step.py --device cuda, every architecture, shape b (d 768, n 24576)
#   kernels        bench/sparse_kernels.py --device cuda (sparse vs dense decoder, bf16, the full grid)
#   compile_check  python -m saelab.kernels.compile_check (cubins for sm_80 and sm_90; needs no GPU)
# and writes bench/results/gpu-<device>-<date>.json: one section per step (status, seconds, its JSON, the tail
# of its output). Every step runs under `timeout`, its own limit cut to what is left of the whole budget; a step
# that fails, times out or has no time left is recorded and the next one runs.
#
#   bash bench/gpu.sh               # the real check
#   bash bench/gpu.sh --dry-run     # the same steps at tiny sizes on the CPU (Triton under its interpreter), to
#                                   # check the plumbing; its JSON goes to a temporary folder, not bench/results
#   bash bench/gpu.sh --out PATH    # the JSON here (a file, or a folder)
# Environment: PYTHON (default: python, else python3, on PATH); SAELAB_GPU_BUDGET_S, the whole run's budget (470 s;
# a dry run 1500 s, and 3x each step's limit); SAELAB_GPU_TRAIN_TOKENS, the train step's tokens (40M).
# Exit status: 0 when every step passed (a doctor command that does not exist yet counts as passed), 1 otherwise.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a path}; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${SAELAB_GPU_BUDGET_S:-$([ $DRY = 1 ] && echo 1500 || echo 470)}
SCALE=$([ $DRY = 1 ] && echo 3 || echo 1)  # a dry run on a small shared CPU gets 3x each step's limit
TRAIN_TOKENS=${SAELAB_GPU_TRAIN_TOKENS:-40M}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/saelab-gpu-check.XXXXXX")
STEPS=$WORK/steps.tsv
: > "$STEPS"
if [ -z "$OUT" ]; then
    if [ $DRY = 1 ]; then OUT=$WORK; else OUT=$ROOT/bench/results; fi
fi
echo "gpu.sh: python $PY, budget ${BUDGET} s, work folder $WORK$([ $DRY = 1 ] && echo ', DRY RUN (CPU, tiny sizes)')"

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# record NAME STATUS RC SECONDS LIMIT LOG RESULT NOTE COMMAND  (one tab-separated line in steps.tsv)
record() {
    local IFS=$'\t'
    echo "$*" | tr -d '\n' >> "$STEPS"
    echo >> "$STEPS"
    printf '%-14s %-8s %6s s  %s\n' "$1" "$2" "$4" "$8"
}

# step NAME LIMIT RESULT COMMAND...: run COMMAND under timeout (LIMIT, cut to the budget left), log its output
step() {
    local name=$1 limit=$2 result=$3
    shift 3
    local left=$((START + BUDGET - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        record "$name" skipped "" 0 0 "" "" "no time left in the ${BUDGET} s budget" "$*"
        return
    fi
    limit=$((limit * SCALE))
    [ "$limit" -gt "$left" ] && limit=$left
    local log=$WORK/$name.log t0 rc status note=""
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="stopped after its ${limit} s limit" ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" "$(since "$t0")" "$limit" "$log" "$result" "$note" "$*"
}

# ---------------------------------------------------------------------------------------------------- setup
t0=$(date +%s.%N)
SETUP_LOG=$WORK/setup.log
if (cd / && "$PY" -c "import saelab" >> "$SETUP_LOG" 2>&1); then
    how="saelab already importable: $(cd / && "$PY" -c 'import saelab, os; print(os.path.dirname(saelab.__file__))')"
    setup_status=ok
elif timeout 120 "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT" >> "$SETUP_LOG" 2>&1 \
        && (cd / && "$PY" -c "import saelab" >> "$SETUP_LOG" 2>&1); then
    how="saelab did not import; installed with pip install -e . --no-deps --no-build-isolation"
    setup_status=ok
else
    how="saelab did not import and pip install -e . --no-deps failed (see the log); running from the source tree"
    setup_status=failed
fi
# this checkout's code, whatever is installed (bench scripts run with bench/ as their first path entry)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
"$PY" bench/gpu_report.py env > "$WORK/env.json" 2>> "$SETUP_LOG" || echo '{}' > "$WORK/env.json"
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>> "$SETUP_LOG"; then
    setup_status=failed
    how="$how; torch sees no CUDA device (the CUDA steps will fail; --dry-run checks the plumbing on a CPU)"
fi
record setup "$setup_status" "" "$(since "$t0")" 120 "$SETUP_LOG" "" "$how" \
    "import saelab || pip install -e . --no-deps"

# ---------------------------------------------------------------------------------------------------- steps
if [ $DRY = 1 ]; then
    DEV=cpu
    KERNELS_ARGS=(--device cpu --tiny --repeats 1)
    TRAIN_ARGS=(--device cpu --tokens 16k --cache-tokens 16k --eval-tokens 2048 --n-latents 512 --batch-size 512
                --context-size 64)
    STEP_ARGS=(--device cpu --shapes 32x128 --batch 64 --steps 1 --repeats 1 --archs all)
    BENCH_ARGS=(--device cpu --dtype float32 --cases 64x512x8 --repeats 1 --warmup 1)
    TOPK_ARGS=(--device cpu --tiny --repeats 1)
else
    DEV=cuda
    KERNELS_ARGS=(--device cuda)
    TRAIN_ARGS=(--device cuda --tokens "$TRAIN_TOKENS" --checkpoint-every 2000)
    STEP_ARGS=(--device cuda --shapes b --archs all)
    BENCH_ARGS=(--device cuda)
    TOPK_ARGS=(--device cuda)
fi

if "$PY" -m saelab.cli doctor --help > /dev/null 2>&1; then
    step doctor 45 "$WORK/doctor.json" "$PY" -m saelab.cli doctor --json "$WORK/doctor.json"
else
    record doctor absent "" 0 0 "" "" "this saelab has no doctor command yet" "saelab doctor --json FILE"
fi
step gpu_kernels 120 "$WORK/gpu_kernels.json" \
    "$PY" bench/gpu_kernels.py "${KERNELS_ARGS[@]}" --out "$WORK/gpu_kernels.json"
step topk_stream 90 "$WORK/topk_stream.json" \
    "$PY" bench/gpu_topk_stream.py "${TOPK_ARGS[@]}" --out "$WORK/topk_stream.json"
step train 180 "$WORK/train-run" "$PY" -m saelab.cli train "${TRAIN_ARGS[@]}" --out "$WORK/train-run" --no-progress
step train_step 110 "$WORK/train_step/train_step-$DEV.json" \
    "$PY" bench/train_step.py "${STEP_ARGS[@]}" --out "$WORK/train_step"
step kernels 70 "$WORK/kernels.json" "$PY" bench/sparse_kernels.py "${BENCH_ARGS[@]}" --out "$WORK/kernels.json"
step compile_check 90 "$WORK/compile_check.log" env -u TRITON_INTERPRET "$PY" -m saelab.kernels.compile_check

# ---------------------------------------------------------------------------------------------------- report
"$PY" bench/gpu_report.py assemble "$STEPS" "$WORK/env.json" "$OUT" --started "$START" $([ $DRY = 1 ] && echo --dry-run)
