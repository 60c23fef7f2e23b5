#!/usr/bin/env bash
# The runner's step as two programs (source + real step, then the meta step) against one: a whole
# experiments.run's lifetime peak, first run and cached rerun (benchmarks.runner_peak), in reverse mode
# (the default) and in mixed mode; the runner_peak.sh run, L2T-ww on limited CIFAR-10 (ResNet32 -> VGG9-bn,
# N = 25, batch 128, 4 epochs). OLD: a checkout of 429dcc2; NEW: the same with
# runner_peak_staged/two_programs.patch applied (bilevel.make_staged_train_step, used by loop.py; not
# adopted). Needs data/cifar10_pool500.npz in this checkout (see runner_peak.sh). Idle machine only.
# Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
: "${OLD:?set OLD to a checkout of 429dcc2}" "${NEW:?set NEW to a checkout of 429dcc2 with runner_peak_staged/two_programs.patch applied}"
run() {  # run OUT runner_peak ARGS...
  local out=$1; shift
  [ -s "$out" ] && { echo "kept $out" >&2; return 0; }
  python -m benchmarks.runner_peak --out "$out.part" "$@" > /dev/null && mv "$out.part" "$out"
}
D=results/benchmarks/runner_peak_staged
mkdir -p $D
ARGS=(--config=experiments/configs/cifar10_limited.py --config.dataset=npz:data/cifar10_pool500.npz --config.data_dir=.
      --config.method=l2t_ww --config.epochs=4 --config.progress_bar=False)
for hvp in reverse mixed; do
  run $D/${hvp}_two_programs.json --repo "$NEW" -- "${ARGS[@]}" --config.hvp=$hvp
  run $D/${hvp}_one_program.json --repo "$OLD" -- "${ARGS[@]}" --config.hvp=$hvp
done
