#!/usr/bin/env bash
# One prepared run on a GPU machine: build against the torch found there, run the CUDA
# tests, compute-sanitizer memcheck, then the benchmarks. Full logs and JSON under $OUT
# (bench/out without it); a short table last.
#   bench/gpu_check.sh sampling     the sampling family (each section under 5 minutes)
#   bench/gpu_check.sh decode       KV-cache append and compaction, paged attention (tree mask),
#                                   the layers (linear, rms_norm, silu_and_mul, RoPE), chain and
#                                   tree verification, and the model's decode step (CUDA graph)
#                                   against the CPU and HF transformers on SmolLM2's shape
set -uo pipefail
cd "$(dirname "$0")/.."
SECTION=${1:-sampling}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} CMAKE_BUILD_PARALLEL_LEVEL=16 PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
t0=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
$PY -c "import decodekit, torch; print('decodekit', decodekit.__version__, 'cuda ops', decodekit.HAS_CUDA_OPS)"
case "$SECTION" in
  sampling)
    timeout 240 $PY -m pytest -q -ra -p no:cacheprovider tests/ops/test_sampling_cuda.py "tests/ops/test_contracts.py::test_cpu_equals_cuda" 2>&1 | tee "$OUT/tests.log" | tail -25
    echo "tests exit: ${PIPESTATUS[0]}"
    if command -v compute-sanitizer >/dev/null; then
      timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 $PY bench/gpu_memcheck_sampling.py \
        >"$OUT/memcheck.log" 2>&1
      echo "memcheck exit: $? ($(grep -c 'Invalid\|ERROR SUMMARY' "$OUT/memcheck.log") lines of note)"
      grep "ERROR SUMMARY" "$OUT/memcheck.log"
    fi
    timeout 300 $PY bench/gpu_sampling.py ${BENCH_ARGS:-} --json "$OUT/sampling.json" 2>&1 | tee "$OUT/bench.log"
    ;;
  decode)
    DECODE_OPS="tests/ops/test_kv_cache_cuda.py tests/ops/test_layers_cuda.py tests/ops/test_attention_cuda.py tests/ops/test_speculative_cuda.py tests/ops/test_tree_cuda.py"
    DECODE_TESTS="$DECODE_OPS tests/models/test_device_path.py"
    timeout 100 $PY -m pytest -q -ra -p no:cacheprovider $DECODE_TESTS "tests/ops/test_contracts.py::test_cpu_equals_cuda" \
      2>&1 | tee "$OUT/tests.log" | tail -30
    echo "tests exit: ${PIPESTATUS[0]}"
    if command -v compute-sanitizer >/dev/null; then
      timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -x -p no:cacheprovider \
        $DECODE_OPS -k "not 128256 and not graph and not bad_arguments" >"$OUT/memcheck.log" 2>&1
      echo "memcheck exit: $? ($(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses)"
      grep "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1
    fi
    timeout 180 $PY bench/gpu_decode.py ${BENCH_ARGS:-} --json "$OUT/decode.json" 2>&1 | tee "$OUT/bench.log"
    ;;
  *) echo "unknown section $SECTION (sampling, decode)"; exit 2 ;;
esac
