#!/usr/bin/env bash
# One device call on a lent GPU machine (see the device tool's METHOD.md), from the repository root:
#
#   bash bench/gpu_session.sh [STAGE ...]     stages: build tests sanitize bench ab
#                                             (default: the first four)
#
# build: fused_rnn against the torch there (pip install --no-build-isolation -e .); tests: the CUDA
# tests against cuDNN and the emulated ones; sanitize: bench/gpu_smoke.py under compute-sanitizer's
# memcheck and racecheck; bench: `python -m bench` (the GPU's quick grid; BENCH_ARGS adds arguments);
# ab: the training half of that grid in float32 with the fused backward step and again with
# FUSED_RNN_CUDA_UNFUSED_BACKWARD=1 (cell kernel + cuBLAS per step), tables only, to see where
# fusing pays.
# Logs and benchmark records go under $OUT (the device tool's output folder; /tmp/fused_rnn_gpu
# elsewhere): to commit a run, copy $OUT/results/<device>-<date>.json/.png to bench/results/<device>.json/.png
# (what `python -m bench --update-reference` writes). A summary is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/fused_rnn_gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
stages=${*:-build tests sanitize bench}
summary="$OUT/summary.txt"
: > "$summary"
note() { printf '%-10s %s\n' "$1" "$2" | tee -a "$summary"; }
last_line() { tail -n 1 "$1" | cut -c1-200; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
note device "$($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' 2>&1 | tail -n 1)"

for stage in $stages; do
  start=$SECONDS
  case $stage in
    build)
      if $PY -m pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
        note build "ok"
      else
        note build "FAILED (build.log)"; tail -n 40 "$OUT/build.log"; cat "$summary"; exit 1
      fi ;;
    tests)
      $PY -m pytest tests/test_cuda.py tests/test_cuda_emulated.py -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
      note tests "$(last_line "$OUT/tests.log")"
      grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20 ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 3 $PY bench/gpu_smoke.py > "$OUT/$tool.log" 2>&1
        note "$tool" "exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -n 1))"
      done ;;
    bench)
      # shellcheck disable=SC2086
      $PY -m bench --results-dir "$OUT/results" ${BENCH_ARGS:-} > "$OUT/bench.md" 2> "$OUT/bench.log"
      note bench "exit $? (bench.md)"
      tail -n 60 "$OUT/bench.md" ;;
    ab)
      for variant in fused unfused; do
        flag=0; [ "$variant" = unfused ] && flag=1
        # shellcheck disable=SC2086
        FUSED_RNN_CUDA_UNFUSED_BACKWARD=$flag $PY -m bench --modes training --dtypes float32 --no-save \
          ${BENCH_ARGS:-} > "$OUT/ab_$variant.md" 2> "$OUT/ab_$variant.log"
        note "ab" "$variant: $(grep -E '^geometric' "$OUT/ab_$variant.md")"
      done
      paste -d '\n' <(grep -E '^\| [A-Z]' "$OUT/ab_fused.md" | sed 's/^/fused   /') \
                     <(grep -E '^\| [A-Z]' "$OUT/ab_unfused.md" | sed 's/^/unfused /') ;;
    *) note "$stage" "unknown stage" ;;
  esac
  note "" "$stage took $((SECONDS - start)) s"
done
cat "$summary"
