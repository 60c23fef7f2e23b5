#!/usr/bin/env bash
# What heap.compile_then_release adds to each call of the step, beside jit's dispatch (benchmarks/step_overhead.py):
# stl10 state, batch 32, T = 2, a jitted function on the iteration's 542 arguments that returns at once.
# With OLD=<path of a checkout> the same benchmark also runs against that checkout's l2t_jax, taken in turn
# (2026-12-07: a worktree of db31d02, the signature with str(dtype)). Idle machine only. Resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
d=$PWD/results/benchmarks/step_overhead; mkdir -p "$d"
bench=$PWD/benchmarks/step_overhead.py
for rep in 1 2; do
  if [ -n "${OLD:-}" ]; then
    f=$d/stl10_b32_T2_$(git -C "$OLD" rev-parse --short HEAD)_r$rep.json
    if [ ! -s "$f" ]; then
      mkdir -p "$OLD/benchmarks" && cp "$bench" "$OLD/benchmarks/"  # the benchmark is newer than that checkout
      (cd "$OLD" && PYTHONPATH="$OLD" python -m benchmarks.step_overhead --out "$f.part" > /dev/null) && mv "$f.part" "$f"
    fi
  fi
  f=$d/stl10_b32_T2_new_r$rep.json
  [ -s "$f" ] || { PYTHONPATH=$PWD python -m benchmarks.step_overhead --out "$f.part" > /dev/null && mv "$f.part" "$f"; }
done
