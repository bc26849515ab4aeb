#!/usr/bin/env bash
# The GPU check, in two device calls that fit a lent machine's 15 minutes (machine start included):
#
#   bash bench/gpu_check.sh 1    # <= 8 min: build for the visible GPU only, the CUDA tests against
#                                #   cuDNN, the timing probe (bench/gpu_probe.py), memcheck on our kernels
#   bash bench/gpu_check.sh 2    # <= 5 min: racecheck on the reduced smoke, fused vs unfused
#                                #   backward, the quick GPU grid (python -m bench)
#
# Run from the repository root; call 2 needs call 1's build on the same (still warm) machine, else
# it builds first. Every stage runs under `timeout` drawn from one deadline (CALL_SECONDS, default
# 470 s and 290 s: the device tool's per-call limit less a margin), so a slow stage costs itself,
# not the call; a stage that would start with under 20 s left is skipped and says so. Files under
# $OUT (the device tool's output folder; /tmp/fused_rnn_gpu elsewhere): call 1 writes 6, call 2
# writes 7 (summary.txt each time), within what comes back. No emulated tests here: CI runs them.
#
# DRY_RUN=1: the same stages on a machine without a GPU, to check the script itself (the build is
# the installed one, the tests and sanitizers are skipped with a note, the probe and the benchmark
# run on the CPU on tiny shapes). tests/test_bench.py runs both calls that way.
set -uo pipefail
call=${1:-}
case $call in
  1) budget=${CALL_SECONDS:-470} ;;
  2) budget=${CALL_SECONDS:-290} ;;
  *) echo "usage: bash bench/gpu_check.sh 1|2" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/fused_rnn_gpu}
PY=${PYTHON:-python3}
DRY=${DRY_RUN:-0}
mkdir -p "$OUT"
deadline=$((SECONDS + budget))
summary="$OUT/summary.txt"
: > "$summary"
note() { printf '%-12s %s\n' "$1" "$2" | tee -a "$summary"; }
last_line() { tail -n 1 "$1" 2>/dev/null | cut -c1-200; }

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND under the smaller of MAX_SECONDS and what is left.
stage() {
  local name=$1 max=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then note "$name" "skipped: ${left} s left of the call"; return 99; fi
  local limit=$((max < left ? max : left)) began=$SECONDS
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && note "$name" "TIMED OUT after ${limit} s"
  note "" "$name: exit $rc in $((SECONDS - began)) s (limit ${limit} s)"
  return $rc
}

have_gpu() { [ "$DRY" != 1 ] && $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
device=cuda; have_gpu || device=cpu
note device "$($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1 | tail -n 1)$( [ "$DRY" = 1 ] && echo ' (dry run)')"

build() {
  if [ "$DRY" = 1 ]; then note build "dry run: the installed build"; return 0; fi
  # setup.py builds for the visible GPU's architecture only when one is visible.
  if $PY -c 'import fused_rnn, sys; sys.exit(0 if fused_rnn.built_with_cuda else 1)' 2>/dev/null \
      && [ "$call" = 2 ]; then note build "call 1's build"; return 0; fi
  FUSED_RNN_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} stage build 300 \
    $PY -m pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] && note build "ok" || { note build "FAILED: tail of build.log"; tail -n 30 "$OUT/build.log"; }
  return $rc
}

sanitize() {  # sanitize TOOL [SMOKE ARGS]
  local tool=$1; shift
  if [ "$device" != cuda ] || ! command -v compute-sanitizer > /dev/null; then
    note "$tool" "skipped: no GPU or no compute-sanitizer"; return 0
  fi
  # Our kernels only: torch's and cuBLAS's are not ours to check and would triple the time.
  stage "$tool" "$SANITIZE_SECONDS" compute-sanitizer --tool "$tool" --error-exitcode 3 \
    --kernel-name regex:'step_kernel|step_tensor_core|persistent' $PY bench/gpu_smoke.py --device cuda "$@" \
    > "$OUT/$tool.log" 2>&1
  note "$tool" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -n 1)"
}

if [ "$call" = 1 ]; then
  build || { cat "$summary"; exit 1; }
  if [ "$device" = cuda ]; then
    stage tests 150 $PY -m pytest tests/test_cuda.py tests/test_ecosystem.py tests/test_bad_input.py \
      -q -p no:cacheprovider -k "cuda and not emulated" > "$OUT/tests.log" 2>&1
    note tests "$(last_line "$OUT/tests.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20
  else
    note tests "skipped: no GPU (CI runs the CPU and emulated tests)"
  fi
  stage probe 90 $PY bench/gpu_probe.py --device "$device" --out "$OUT/probe.json" > "$OUT/probe.md" 2>&1
  note probe "$(grep -c '^| [A-Z]' "$OUT/probe.md") rows (probe.md, probe.json)"
  SANITIZE_SECONDS=120 sanitize memcheck
else
  build || { cat "$summary"; exit 1; }
  SANITIZE_SECONDS=120 sanitize racecheck --reduced
  small=""; [ "$device" = cpu ] && small="--shapes 3x2x4 --repeats 1"
  for variant in fused unfused; do
    flag=0; [ "$variant" = unfused ] && flag=1
    # shellcheck disable=SC2086
    FUSED_RNN_CUDA_UNFUSED_BACKWARD=$flag stage "ab_$variant" 50 $PY -m bench --device "$device" \
      --modes training --dtypes float32 --no-save $small ${BENCH_ARGS:-} > "$OUT/ab_$variant.md" 2> /dev/null
  done
  # shellcheck disable=SC2086
  stage bench 150 $PY -m bench --device "$device" --results-dir "$OUT/results" $small ${BENCH_ARGS:-} \
    > "$OUT/bench.md" 2> "$OUT/bench.log"
  note bench "$(ls "$OUT/results" 2>/dev/null | tr '\n' ' ')(bench.md)"
fi
note total "call $call took ${SECONDS} s of its ${budget} s"
cat "$summary"
