#!/usr/bin/env bash
# XLA's temporaries for reverse mode (the default hvp) under each XLA CPU scheduler (l2t_jax.xla_flags):
# stl10, batch 128, T = 2, compiled only (train_step --memory_only: no execution, no timing).
# Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
d=results/benchmarks/cpu_scheduler_reverse; mkdir -p $d
for sched in memory concurrency; do
  f=$d/stl10_b128_T2_reverse_${sched}.json
  [ -s "$f" ] && continue
  python -m benchmarks.train_step --setting stl10 --batch 128 --T 2 --hvp reverse --memory_only --cpu_scheduler $sched > $f.part
  mv $f.part $f
done
