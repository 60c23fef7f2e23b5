#!/usr/bin/env bash
# The arithmetic of one iteration against a plain step's, ours (XLA's cost analysis, loop-free
# programs) and the PyTorch twin's (torch.utils.flop_counter): benchmarks.meta_phases --phases flops
# --compare_torch. Compiles and runs one torch iteration; valid on a busy machine (no timing).
# Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
D=results/benchmarks/meta_phases
mkdir -p $D
. results/benchmarks/once.sh
run() {  # name, meta_phases arguments...
  local name=$1; shift
  once $D/$name.json python -m benchmarks.meta_phases --phases flops --compare_torch "$@"
}
for hvp in mixed reverse; do
  run flops_stl10_b32_T2_$hvp --setting stl10 --batch 32 --hvp $hvp
  run flops_stl10_b128_T2_$hvp --setting stl10 --batch 128 --hvp $hvp
  run flops_cub200_b64_T2_$hvp --setting cub200 --batch 64 --hvp $hvp
done
