#!/usr/bin/env bash
# Lifetime peak memory of a first run (the compile) against a cached rerun and the PyTorch twin, stl10, T = 2,
# batch 32 and 128, modes mixed and off (benchmarks/compile_cost.py). Idle machine only. Resumable: finished
# files are kept.
#
#   bash results/benchmarks/compile_cost.sh                             # compile_cost_stl10_b{32,128}_T2.json
#   bash results/benchmarks/compile_cost.sh heap_release release,keep   # heap_release_stl10_b{32,128}_T2.json
#
# The second form is "the heap after compiling": the compiler's freed memory released before the first
# execution (l2t_jax.heap, what experiments.run does) against kept (plain jax.jit), --heaps release,keep.
# The compile_cost_* files of 2026-12-02 predate --heaps (train_step then trimmed the heap after its warm-up).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
name=${1:-compile_cost}
heaps=()
[ -n "${2:-}" ] && heaps=(--heaps "$2")
for b in 32 128; do
  f=results/benchmarks/${name}_stl10_b${b}_T2.json
  [ -s "$f" ] && continue
  python -m benchmarks.compile_cost --setting stl10 --batch $b --T 2 --modes mixed,off "${heaps[@]}" --iters 2 --out $f.part
  mv $f.part $f
done
