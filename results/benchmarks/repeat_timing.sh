#!/usr/bin/env bash
# The JAX-vs-PyTorch ratio at stl10, batch 32, T = 2, measured again in three separate runs
# (each: our default iteration, then the PyTorch twin, 5 timed iterations each), because one
# run's ratio moved by up to 40 % between runs minutes apart on this shared VM (steal time).
# Idle machine only. Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
D=results/benchmarks/repeats
mkdir -p $D
for rep in 1 2 3; do
  for b in 32; do
    f=$D/stl10_b${b}_T2_rep$rep.json
    [ -s "$f" ] && continue
    python -m benchmarks.unroll_memory --batch $b --Ts 2 --remat_modes off,torch --iters 5 --out $f.part && mv $f.part $f
  done
done
