#!/usr/bin/env bash
# The limited-data CIFAR-10 study (issue 16), resumable: rerun this script after any
# interruption; finished cells (summary.json) are skipped and interrupted ones resume
# from their newest checkpoint. Work directories live under runs/ (not committed);
# `sync.sh` copies each finished cell's summary.json and metrics.jsonl here.
#
#   bash results/cifar10_limited/study.sh calib          # step 0: scratch's learning rate at N = 25
#   bash results/cifar10_limited/study.sh n25            # scratch, FM 1-1, LwF+AT, LwF at N = 25 (12 runs)
#   bash results/cifar10_limited/study.sh n25_at         # AT at N = 25 (3 runs; may run beside n25)
#   bash results/cifar10_limited/study.sh n25_l2tww      # L2T-ww at N = 25 (3 runs; may run beside n25)
#   SEEDS=1 bash results/cifar10_limited/study.sh n25_l2tww   # ... only seed 1, while
#   bash results/cifar10_limited/study.sh n25_l2tww_b    # L2T-ww seed 2 runs in a second root beside it
#   bash results/cifar10_limited/study.sh torch_scratch  # scratch in PyTorch (the protocol check)
#   bash results/cifar10_limited/study.sh n25_metalr     # L2T-ww at meta_lr 1e-3 (the investigation), seed 0
#   bash results/cifar10_limited/study.sh n50            # N = 50: scratch, FM 1-1, LwF+AT, L2T-ww first
#
# Each command is one sweep under `nice`, one run at a time; on the 2-core CPU at most two
# sweeps should run side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
POOL=data/cifar10_pool500.npz
[ -f "$POOL" ] || python -m experiments.pack_cifar10 --tar "${L2T_SHARED:-../shared}/data/cifar10-jpeg.tar" --out "$POOL"
COMMON=(--config=experiments/configs/cifar10_limited.py --config.dataset="npz:$POOL" --config.data_dir=.
        --config.progress_bar=False --compilation_cache=.jax_cache)
case "${1:-n25}" in
  calib)
    exec nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10_calib \
      --grid lr=0.1,0.03,0.01,0.003 --config.n_per_class=25 --config.method=scratch --config.seed=0 ;;
  n25)  # the baselines but AT (about 15-30 min a run on the 2-core CPU)
    exec nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10 --grid n_per_class=25 \
      --grid "method=scratch,fm_one_to_one,lwf_at,lwf" --grid seed=0,1,2 ;;
  n25_at)  # AT at N = 25 in its own root, to use a free core beside `n25` (which skips finished cells)
    exec nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10_b --grid n_per_class=25 \
      --grid "method=at" --grid seed=0,1,2 ;;
  n25_l2tww)  # L2T-ww (about 2 h a run): its own root, so it can run beside `n25`
    exec nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10_l2tww --grid n_per_class=25 \
      --grid "method=l2t_ww" --grid "seed=${SEEDS:-0,1,2}" ;;
  n25_l2tww_b)  # L2T-ww seed 2 in a second root, so that two L2T-ww seeds share the 2 cores
    exec nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10_l2tww_b --grid n_per_class=25 \
      --grid "method=l2t_ww" --grid seed=2 ;;
  n25_metalr)  # L2T-ww with Adam 1e-3 on φ (the authors' Stanford40 setting, their issue #4): does φ move, does it help?
    exec nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10_metalr --grid n_per_class=25 \
      --grid "method=l2t_ww" --grid meta_lr=1e-3 --grid "seed=${SEEDS:-0}" ;;
  torch_scratch)  # the authors' VGG9-bn in PyTorch, scratch, the same splits and batches: seeds 0, 1, 2
    for s in 0 1 2; do
      nice -n 5 python -m experiments.torch_scratch "${COMMON[@]::4}" --config.n_per_class=25 \
        --config.method=scratch --config.seed=$s --workdir=runs/c10_torch/seed=$s --threads=1
    done ;;
  n50)
    nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10 --grid n_per_class=50 \
      --grid "method=scratch,fm_one_to_one,lwf_at,l2t_ww" --grid seed=0,1,2
    exec nice -n 5 python -m experiments.sweep "${COMMON[@]}" --workdir=runs/c10 --grid n_per_class=50 \
      --grid "method=lwf,at" --grid seed=0,1,2 ;;
  *) echo "usage: $0 calib|n25|n25_at|n25_l2tww|n25_l2tww_b|n25_metalr|torch_scratch|n50" >&2; exit 2 ;;
esac
