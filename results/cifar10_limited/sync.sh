#!/usr/bin/env bash
# Copies every finished cell of the study (a summary.json under runs/c10 or runs/c10_calib)
# into results/cifar10_limited/runs/..., with its metrics.jsonl and config.json; prints
# the cells still running or not started (from each sweep.json). Commit the result.
set -euo pipefail
cd "$(dirname "$0")/../.."
copy_cells() {  # copy_cells ROOT MARKER: every cell of ROOT holding MARKER, with its outputs, and the sweep record
  local root=$1 marker=$2 dest
  [ -d "$root" ] || return 0
  dest="results/cifar10_limited/runs/$(basename "$root")"
  find "$root" -name "$marker" | while read -r s; do
    cell=$(dirname "${s#$root/}")
    mkdir -p "$dest/$cell"
    for f in summary.json metrics.jsonl config.json; do
      if [ -f "$root/$cell/$f" ]; then cp "$root/$cell/$f" "$dest/$cell/$f"; fi
    done
  done
  if [ -f "$root/sweep.json" ]; then mkdir -p "$dest" && cp "$root/sweep.json" "$dest/sweep.json"; fi
}
for root in runs/c10 runs/c10_b runs/c10_l2tww runs/c10_l2tww_b runs/c10_calib runs/c10_calib_b runs/c10_torch; do
  copy_cells "$root" summary.json  # finished cells
done
# The meta_lr investigation: also an unfinished cell's metrics.jsonl (λ, meta-gradient norms per epoch).
copy_cells runs/c10_metalr metrics.jsonl
# STATUS.md: every cell of the study, finished or not, from the work directories.
python - <<'PY'
import glob, json, os
rows = []
grid = [(m, s) for m in ("scratch", "fm_one_to_one", "lwf_at", "lwf", "at", "l2t_ww") for s in (0, 1, 2)]
ROOTS = ("runs/c10", "runs/c10_b", "runs/c10_l2tww", "runs/c10_l2tww_b")  # a cell may have run in any of the sweep roots
def last_epoch(d):
    p = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(p):
        return None
    eps = [json.loads(l) for l in open(p) if '"kind": "epoch"' in l]
    return eps[-1]["epoch"] if eps else 0
def finished_columns(d):
    """best val (epoch) | test at best val | last test | wall time, from a finished cell's summary.json."""
    j = json.load(open(f"{d}/summary.json"))
    return (f"{j['best_val_acc']:.1f} ({j['best_epoch']}) | {j['test_acc_at_best_val']:.2f} | {j['last_test_acc']:.2f} "
            f"| {j['wall_time_s'] / 60:.0f} min")
out = ["# Study status (written by sync.sh)", "",
       "N = 25, test accuracy (%) at the best validation epoch; wall time with other jobs on the 2 cores.", "",
       "| method | seed | status | best val (epoch) | test at best val | last test | wall time |", "|---|---|---|---|---|---|---|"]
for m, s in grid:
    cands = [f"{r}/method={m}/n_per_class=25/seed={s}" for r in ROOTS]
    d = next((c for c in cands if os.path.exists(f"{c}/summary.json")), None) or \
        next((c for c in cands if os.path.exists(c)), cands[0])
    if os.path.exists(f"{d}/summary.json"):
        out.append(f"| {m} | {s} | finished | {finished_columns(d)} |")
    else:
        e = last_epoch(d)
        out.append(f"| {m} | {s} | {'not started' if e is None else f'running or interrupted: epoch {e}/200'} | | | | |")
out += ["", "## Scratch: this library vs the authors' VGG9-bn in PyTorch (same splits and batches)", "",
        "| seed | JAX test at best val (best val) | PyTorch test at best val (best val) | JAX last test | PyTorch last test |",
        "|---|---|---|---|---|"]
for s in (0, 1, 2):
    a, b = f"runs/c10/method=scratch/n_per_class=25/seed={s}/summary.json", f"runs/c10_torch/seed={s}/summary.json"  # scratch: root runs/c10
    if os.path.exists(a) and os.path.exists(b):
        ja, jb = json.load(open(a)), json.load(open(b))
        out.append(f"| {s} | {ja['test_acc_at_best_val']:.2f} ({ja['best_val_acc']:.1f}) | {jb['test_acc_at_best_val']:.2f} "
                   f"({jb['best_val_acc']:.1f}) | {ja['last_test_acc']:.2f} | {jb['last_test_acc']:.2f} |")
    else:
        out.append(f"| {s} | {'finished' if os.path.exists(a) else 'pending'} | {'finished' if os.path.exists(b) else 'pending'} | | |")
out += ["", "## Investigation: L2T-ww with meta_lr 1e-3 (`study.sh n25_metalr`)", "",
        "| seed | status | best val (epoch) | test at best val | last test | wall time |", "|---|---|---|---|---|---|"]
for d in sorted(glob.glob("runs/c10_metalr/**/seed=*", recursive=True)):
    s = d.rsplit("=", 1)[1]
    if os.path.exists(f"{d}/summary.json"):
        out.append(f"| {s} | finished | {finished_columns(d)} |")
    else:
        out.append(f"| {s} | running or interrupted: epoch {last_epoch(d)}/200 | | | |")
open("results/cifar10_limited/STATUS.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
