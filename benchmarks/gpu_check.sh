#!/usr/bin/env bash
# GPU check: build, GPU tests and quick benchmarks on a GPU machine, everything logged to OUTDIR.
#   benchmarks/gpu_check.sh OUTDIR        (run from anywhere; it works in the repository root)
# Steps (each with a time limit; a failing step does not stop the next ones; the exit status is
# non-zero when any step failed):
#   1 nvidia-smi                                   -> OUTDIR/nvidia-smi.txt
#   2 pip install --no-deps --no-build-isolation -e .  (builds libfastlayers_cuda.so) -> OUTDIR/build.log
#   3 gpu_smoke (one case per op x backend x dtype), then pytest -m gpu -q (xdist)                          -> OUTDIR/pytest-gpu.log, OUTDIR/pytest-gpu.xml
#   4 fastlayers info + fastlayers bench --quick   -> OUTDIR/bench.log, OUTDIR/bench-results.tar.gz
#                                                     (JSON + PNG; tarred: the machine returns <= 8 files)
#   5 fastlayers bench --quick --models gpt2, then --models bart (generate: decode ms/token, tokens/s,
#     prefill, beam search, against transformers generate and its compiled static cache), each its
#     own step with its own --max-seconds      -> appended to OUTDIR/bench.log, JSON in the same tarball
#   OUTDIR/summary.txt: one line per step with its status and seconds.
# Budget: the device tool allows 600 s per command and 15 min per session, so the default run is the
# proof of what landed (steps 1-4: limits add up to ~570 s) and the generation groups are OFF by
# default; a second call on the still-warm machine (the build is kept) runs them:
#   GPU_CHECK_BUILD_S=60 GPU_CHECK_TEST_S=0 GPU_CHECK_BENCH_S=0 GPU_CHECK_GPT2_S=240 GPU_CHECK_BART_S=180 \
#     benchmarks/gpu_check.sh OUTDIR
# (a step limit of 0 skips that step).
# The generation groups are the slow ones: transformers generate runs ~2 s a call at batch 1 (eager
# Python per token), each row is called ~8 times, and its torch.compile row compiles for ~1 min per
# batch shape; --max-seconds stops starting rows GEN_MARGIN_S (90 s: one compile row) before the hard
# limit, and the rows run in the order: every case's transformers and fastlayers rows (batch 1 first),
# then the compile rows, so a short budget keeps the fastlayers figures and drops compile rows first.
# Limits are overridable: GPU_CHECK_BUILD_S, GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S, GPU_CHECK_GPT2_S,
# GPU_CHECK_BART_S (0 skips that step); extra pytest
# arguments (e.g. a file or -k expression, to spend a short lease on one kernel) in GPU_CHECK_PYTEST_ARGS.
set -u
if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
BUILD_S=${GPU_CHECK_BUILD_S:-150}
TEST_S=${GPU_CHECK_TEST_S:-180}
BENCH_S=${GPU_CHECK_BENCH_S:-180}
GPT2_S=${GPU_CHECK_GPT2_S:-0}
BART_S=${GPU_CHECK_BART_S:-0}
GEN_MARGIN_S=90
FAILED=0
: > "$OUT/summary.txt"

step() {  # step NAME LOGFILE TIMEOUT_S CMD...: runs CMD under a time limit, appends to LOGFILE
    local name=$1 log=$2 limit=$3
    shift 3
    if [ "$limit" -le 0 ]; then  # a limit of 0 skips the step (timeout 0 would mean no limit at all)
        echo "skipped $name (limit 0)" >> "$OUT/summary.txt"
        return 0
    fi
    local t0=$SECONDS rc
    echo "== $name: $*" >> "$log"
    timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local dt=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        echo "ok      $name (${dt}s)" >> "$OUT/summary.txt"
    else
        [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" timed out after ${limit}s" || note=""
        echo "FAILED  $name (exit $rc${note}, ${dt}s; see $(basename "$log"))" >> "$OUT/summary.txt"
        FAILED=1
    fi
    echo "== $name: exit $rc after ${dt}s" >> "$log"
    return 0
}

step nvidia-smi "$OUT/nvidia-smi.txt" 30 nvidia-smi
step build "$OUT/build.log" "$BUILD_S" env FASTLAYERS_BUILD_CUDA=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
# One small case per op x backend x dtype first: a whole-library verdict in under a minute.
step gpu-smoke "$OUT/pytest-gpu.log" 120 "$PY" -m fastlayers.bench.gpu_smoke
# Triton compiles one kernel per specialisation (CPU-bound): spread the tests over 8 workers when
# pytest-xdist is there; collect up to 25 failures rather than stopping at the first.
XDIST=$("$PY" -c "import xdist" > /dev/null 2>&1 && echo "-n 8")
# shellcheck disable=SC2086
step pytest-gpu "$OUT/pytest-gpu.log" "$TEST_S" \
    "$PY" -m pytest -m gpu $XDIST --maxfail=25 -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
    ${GPU_CHECK_PYTEST_ARGS:-}

BENCH_DIR=$(mktemp -d)
step info "$OUT/bench.log" 30 "$PY" -m fastlayers.cli info
# the harness's own budget stops starting rows 30 s before the hard limit, so its JSON is written
step bench "$OUT/bench.log" "$BENCH_S" "$PY" -m fastlayers.cli bench --quick --out "$BENCH_DIR" \
    --max-seconds $((BENCH_S - 30))
# the generation groups, one bounded step each (--models alone: no op group runs again)
for group in gpt2 bart; do
    [ "$group" = gpt2 ] && limit=$GPT2_S || limit=$BART_S
    if [ "$limit" -gt 0 ]; then
        budget=$((limit - GEN_MARGIN_S))
        [ "$budget" -lt 30 ] && budget=30
        step "bench-$group" "$OUT/bench.log" "$limit" "$PY" -m fastlayers.cli bench --quick --models "$group" \
            --out "$BENCH_DIR" --max-seconds "$budget"
    else
        echo "skipped bench-$group (GPU_CHECK_${group^^}_S=0)" >> "$OUT/summary.txt"
    fi
done
if ls "$BENCH_DIR"/* > /dev/null 2>&1; then
    tar -czf "$OUT/bench-results.tar.gz" -C "$BENCH_DIR" .
    echo "bench results: bench-results.tar.gz ($(cd "$BENCH_DIR" && ls | tr '\n' ' '))" >> "$OUT/summary.txt"
else
    echo "bench results: none written" >> "$OUT/summary.txt"
fi
rm -rf "$BENCH_DIR"

cat "$OUT/summary.txt"
exit $FAILED
