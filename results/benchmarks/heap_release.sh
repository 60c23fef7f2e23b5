#!/usr/bin/env bash
# The heap after compiling: our lifetime and training peaks with the compiler's freed memory released
# before the first execution (l2t_jax.heap, what experiments.run does) against kept (plain jax.jit),
# first run and cached rerun, beside the PyTorch twin; stl10, T = 2, batch 32 and 128, modes mixed and
# off (benchmarks/compile_cost.py --heaps release,keep). Idle machine only. Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
for b in 32 128; do
  f=results/benchmarks/heap_release_stl10_b${b}_T2.json
  [ -s "$f" ] && continue
  python -m benchmarks.compile_cost --setting stl10 --batch $b --T 2 --modes mixed,off --heaps release,keep --iters 2 --out $f.part
  mv $f.part $f
done
