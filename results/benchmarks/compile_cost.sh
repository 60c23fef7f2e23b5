#!/usr/bin/env bash
# Lifetime peak memory of a first run (the compile) against a cached rerun and the PyTorch twin, stl10, T = 2,
# batch 32 and 128 (benchmarks/compile_cost.py). Idle machine only. Resumable: finished files are kept.
#
#   bash results/benchmarks/compile_cost.sh                  # modes mixed,off: compile_cost_stl10_b{32,128}_T2.json
#   HEAPS=release,keep bash results/benchmarks/compile_cost.sh heap_release          # heap_release_stl10_b{32,128}_T2.json
#   MODES=mixed SCHEDULERS=memory,concurrency bash results/benchmarks/compile_cost.sh cpu_scheduler
#   MODES=mixed CONV_IMPLS=auto,im2col bash results/benchmarks/compile_cost.sh tap_loop
#
# HEAPS (--heaps): the compiler's freed memory released before the first execution (l2t_jax.heap, what
# experiments.run does) or kept (plain jax.jit). SCHEDULERS (--cpu_schedulers): XLA CPU's instruction order
# (l2t_jax.xla_flags). CONV_IMPLS (--conv_impls): the convolution lowering. The compile_cost_* files of 2026-12-02 predate both options (train_step then trimmed the
# heap after its warm-up; the scheduler was XLA's default).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
name=${1:-compile_cost}
opts=(--modes "${MODES:-mixed,off}")
[ -n "${HEAPS:-}" ] && opts+=(--heaps "$HEAPS")
[ -n "${SCHEDULERS:-}" ] && opts+=(--cpu_schedulers "$SCHEDULERS")
[ -n "${CONV_IMPLS:-}" ] && opts+=(--conv_impls "$CONV_IMPLS")
for b in 32 128; do
  f=results/benchmarks/${name}_stl10_b${b}_T2.json
  [ -s "$f" ] && continue
  python -m benchmarks.compile_cost --setting stl10 --batch $b --T 2 "${opts[@]}" --iters 2 --out $f.part
  mv $f.part $f
done
