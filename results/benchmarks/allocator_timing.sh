#!/usr/bin/env bash
# The paper's setting (stl10, T = 2) against the PyTorch twin under three glibc malloc settings
# (benchmarks/plain_step.py, ALLOCATORS), both sides in the same setting: GLIBC_TUNABLES is set
# for the whole `train_step --compare_torch` run, so the PyTorch child inherits it. The settings
# take turns within each repeat, so that drift on this shared VM falls on all of them alike.
# Idle machine only. Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
D=results/benchmarks/allocators
mkdir -p $D
for b in 32 128; do
  iters=5; [ $b = 128 ] && iters=3
  for rep in 1 2; do
    for a in default thp arena; do
      f=$D/stl10_b${b}_T2_${a}_rep$rep.json
      [ -s "$f" ] && continue
      tun=$(python -c "import sys; from benchmarks.plain_step import ALLOCATORS; print(ALLOCATORS[sys.argv[1]])" $a)
      GLIBC_TUNABLES="$tun" python -m benchmarks.train_step --setting stl10 --batch $b --T 2 --iters $iters \
        --compare_torch > $f.part
      mv $f.part $f
    done
  done
done
