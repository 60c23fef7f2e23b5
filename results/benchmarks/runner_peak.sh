#!/usr/bin/env bash
# The whole runner's lifetime peak (experiments.run as a child process, first run and cached rerun):
# this checkout against a worktree of 4ad2822 (before l2t_jax.heap), then mixed mode and its CPU schedulers; L2T-ww on limited CIFAR-10
# (ResNet32 -> VGG9-bn, N = 25, batch 128, 4 epochs: training, a validation pass and the test set).
# Needs data/cifar10_pool500.npz (python -m experiments.pack_cifar10 --tar ../shared/data/cifar10-jpeg.tar
# --out data/cifar10_pool500.npz). Idle machine only. Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
OLD=${OLD:-/tmp/l2t_old}
ARGS=(--config=experiments/configs/cifar10_limited.py --config.dataset=npz:data/cifar10_pool500.npz --config.data_dir=.
      --config.method=l2t_ww --config.epochs=4 --config.progress_bar=False)
for side in new old; do
  f=results/benchmarks/runner_peak_c10_l2tww_${side}.json
  [ -s "$f" ] && continue
  repo=.
  if [ $side = old ]; then repo=$OLD; [ -d "$OLD" ] || git worktree add -f "$OLD" 4ad2822; fi
  python -m benchmarks.runner_peak --repo "$repo" --out $f.part -- "${ARGS[@]}"
  mv $f.part $f
done
# the same runner in mixed mode (hvp="mixed": the look-ahead's memory bounded), this checkout only
f=results/benchmarks/runner_peak_c10_l2tww_mixed.json
if [ ! -s "$f" ]; then
  python -m benchmarks.runner_peak --out $f.part -- "${ARGS[@]}" --config.hvp=mixed
  mv $f.part $f
fi
# mixed mode under each XLA CPU scheduler (l2t_jax.xla_flags; the default, "auto", is "memory" in mixed mode)
for sched in memory concurrency; do
  f=results/benchmarks/runner_peak_c10_l2tww_mixed_${sched}.json
  [ -s "$f" ] && continue
  python -m benchmarks.runner_peak --out $f.part -- "${ARGS[@]}" --config.hvp=mixed --config.cpu_scheduler=$sched
  mv $f.part $f
done
