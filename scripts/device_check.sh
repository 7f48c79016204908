#!/usr/bin/env bash
# One GPU-host session: CUDA tests, kernel timings, then the prefill + decode benchmark.
# usage: KRASIS_COMMIT=<sha> bash scripts/device_check.sh [tests|kernels|bench ...]   (logs under $OUT)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/krasis-out}
mkdir -p "$OUT"
for step in "$@"; do
  case $step in
    tests)
      # the interpreter tests are CI's (Triton 3.9 on the CPU); here the kernels run compiled
      python3 -m pytest -q tests/test_hybrid_decode.py tests/test_gpu_prefill.py tests/test_decode_kernels.py \
        tests/test_prefill_kernels.py tests/test_family_engines.py -k "not interpreter" 2>&1 | tail -25 | tee "$OUT/tests.log" ;;
    family)
      python3 -m pytest -q tests/test_family_engines.py -k cuda 2>&1 | tail -25 | tee "$OUT/family.log"
      python3 scripts/bench_linear_attention.py 2>&1 | tee "$OUT/linear_attention.log" ;;
    cudatests)
      # what a q8-dense GPU placement touches: the GEMV, hybrid decode and the families' CUDA paths
      python3 -m pytest -q tests/test_decode_kernels.py tests/test_hybrid_decode.py tests/test_family_engines.py \
        tests/test_gpu_prefill.py -k "cuda and not interpreter" 2>&1 | tail -25 | tee "$OUT/cudatests.log" ;;
    groups)
      # q4 with a scale and zero per 64 columns: its CUDA tests, and the native kernels on this CPU's AVX-512 path
      python3 -m pytest -q tests/test_q4_groups.py tests/test_decode_kernels.py tests/test_gpu_prefill.py \
        tests/test_native_kernels.py -k "(cuda and not interpreter) or avx512" 2>&1 | tail -25 \
        | tee "$OUT/groups.log" ;;
    linear)
      python3 scripts/bench_decode_kernels.py --linear-only --iters 20 --json "$OUT/linear.json" 2>&1 | tee "$OUT/linear.log"
      grep -o 'best_linear_q8 [0-9,]*' "$OUT/linear.log" | cut -d' ' -f2 > "$OUT/linear_best.txt" ;;
    native_linear)
      python3 scripts/bench_native_linear.py --layers 48 --threads 16,8 --json "$OUT/native_linear.json" 2>&1 \
        | tee "$OUT/native_linear.log" ;;
    cpudecode)
      lscpu > "$OUT/lscpu.txt"; numactl -H >> "$OUT/lscpu.txt" 2>&1
      # issue 4's 16-core figure: the 48-layer 30B-A3B shape all on the CPU (one native call a decode step), the
      # model loop's glue and the one-call step against the loop; then the native tests on the AVX-512 path
      python3 scripts/bench_decode.py --synthetic --layers 48 --quant q4g64 --dense-quant q4 --kernels native \
        --tokens 32 --prompt 16 --glue --workdir /tmp/krasis-cpudecode --json "$OUT/cpudecode.json" 2>&1 \
        | tee "$OUT/cpudecode.log"
      python3 scripts/bench_native_attention.py --threads 16 --json "$OUT/attention16.json" 2>&1 | tee "$OUT/attention16.log"
      python3 -m pytest -q tests/test_native_kernels.py tests/test_native_glue.py -k avx512 2>&1 | tail -5 \
        | tee "$OUT/native_avx512.log" ;;
    kernels)
      [ -f scripts/bench_decode_kernels.py ] && python3 scripts/bench_decode_kernels.py --sweep 2>&1 | tee "$OUT/kernels.log" ;;
    bench)
      python3 scripts/bench.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/bench.log" ;;
  esac
done
