#!/usr/bin/env bash
# Lifetime peak memory of a first run (the compile) against a cached rerun and the PyTorch twin,
# stl10, T = 2, batch 32 and 128 (benchmarks/compile_cost.py). Idle machine only. Resumable:
# finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
for b in 32 128; do
  f=results/benchmarks/compile_cost_stl10_b${b}_T2.json
  [ -s "$f" ] && continue
  python -m benchmarks.compile_cost --setting stl10 --batch $b --T 2 --modes mixed,off --iters 2 --out $f.part
  mv $f.part $f
done
