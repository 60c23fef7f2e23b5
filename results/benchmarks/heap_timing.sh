#!/usr/bin/env bash
# Does releasing the heap after compiling cost iteration time? stl10, batch 32, T = 2, default mode, from a warm
# compilation cache, --heap release and --heap keep taken in turn, 3 rounds of 5 timed iterations
# (benchmarks/train_step.py --heap). Idle machine only. Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
d=results/benchmarks/heap_timing; mkdir -p $d
cache=$(mktemp -d); trap 'rm -rf "$cache"' EXIT
python -m benchmarks.train_step --setting stl10 --batch 32 --T 2 --iters 1 --no_plain --compilation_cache "$cache" > /dev/null
for rep in 1 2 3; do
  for h in release keep; do
    f=$d/stl10_b32_T2_${h}_rep${rep}.json
    [ -s "$f" ] && continue
    python -m benchmarks.train_step --setting stl10 --batch 32 --T 2 --iters 5 --no_plain --heap $h --compilation_cache "$cache" > $f.part
    mv $f.part $f
  done
done
