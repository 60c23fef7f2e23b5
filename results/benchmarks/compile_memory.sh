#!/usr/bin/env bash
# What the compiler holds while it compiles the stl10 iteration (T = 2, mixed mode): XLA CPU
# flags, the convolution lowering, and a cached rerun; `benchmarks.train_step --memory_only`
# (compile only; max_rss_gb is the compiler's peak). Idle machine only (compile_s is wall
# time). Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
D=results/benchmarks/compile_memory
mkdir -p $D
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
. results/benchmarks/once.sh
run() {  # name, XLA_FLAGS, train_step arguments...
  local name=$1 flags=$2; shift 2
  once $D/$name.json env XLA_FLAGS="$flags" python -m benchmarks.train_step --setting stl10 --T 2 --hvp mixed --memory_only "$@"
}
run b32_default "" --batch 32
run b32_opt0 "--xla_backend_optimization_level=0" --batch 32
run b32_no_expensive_passes "--xla_llvm_disable_expensive_passes=true" --batch 32
run b32_codegen_split1 "--xla_cpu_parallel_codegen_split_count=1" --batch 32
run b32_conv_xla "" --batch 32 --conv_impl xla
run b128_conv_xla "" --batch 128 --conv_impl xla
[ -s $D/b32_cache_again.json ] || rm -f $D/b32_cache_first.json   # the pair shares one fresh cache
run b32_cache_first "" --batch 32 --compilation_cache "$CACHE"
run b32_cache_again "" --batch 32 --compilation_cache "$CACHE"
