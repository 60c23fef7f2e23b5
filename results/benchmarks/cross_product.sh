#!/usr/bin/env bash
# Mixed mode's first look-ahead step without the θ product (bilevel.inner_value_and_grad's theta_differentiated):
# benchmarks.train_step --hvp mixed on this checkout against OLD=<checkout of the commit before>, taken in turn:
# stl10 T = 2 at batch 32 and 128, two rounds each, then cub200 at batch 64 once each. Files are named by each
# side's commit (results/benchmarks/cross_product/). Idle machine only. Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
: "${OLD:?set OLD to a checkout of the commit to compare against}"
d=$PWD/results/benchmarks/cross_product; mkdir -p "$d"
run() {  # run CHECKOUT NAME ARGS...: benchmarks.train_step from CHECKOUT, its JSON to $d/NAME_<commit>.json
  local src=$1 name=$2; shift 2
  local f=$d/${name}_$(git -C "$src" rev-parse --short HEAD).json
  [ -s "$f" ] && return 0
  (cd "$src" && PYTHONPATH="$src" python -m benchmarks.train_step "$@" > "$f.part") && mv "$f.part" "$f"
}
for rep in 1 2; do
  for b in 32 128; do
    for src in "$OLD" "$PWD"; do
      run "$src" stl10_b${b}_T2_mixed_r$rep --setting stl10 --batch $b --T 2 --iters 3 --hvp mixed
    done
  done
done
for src in "$OLD" "$PWD"; do
  run "$src" cub200_b64_T2_mixed --setting cub200 --batch 64 --T 2 --iters 2 --hvp mixed
done
