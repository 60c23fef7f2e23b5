#!/usr/bin/env bash
# Every accelerator check in one call: exactness, speed against the PyTorch twin, one short
# real training run. Meant for a GPU machine with no internet and its own preinstalled
# jax / flax / optax / orbax / torch; runs on a CPU too (QUICK=1: small settings, for testing).
#
#   OUT=/path/to/out [L2T_SHARED=/path/to/shared] [QUICK=1] bash benchmarks/device_check.sh
#
# Writes under $OUT (default ./device_out): env.json; one JSON line per check in
# checks.jsonl ({"check", "exit", "seconds", ...figures}); each check's full output in
# <check>.log; the benchmarks' own JSON lines in <check>.json. A check that fails or times
# out is recorded and the script goes on. Missing Python packages that the runner needs
# (ml-collections; scikit-learn for the digits run) are installed from ./.whl if wheels
# were carried there (pip download ml-collections scikit-learn -d .whl), else those checks
# are skipped with the reason. Budget on a GPU: under 8 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
QUICK=${QUICK:-0}
SHARED=${L2T_SHARED:-$( [ -d shared/reference ] && echo shared || echo ../shared )}
export L2T_SHARED=$SHARED
mkdir -p "$OUT"
: > "$OUT/checks.jsonl"
PY=${PYTHON:-python}

record() {  # record NAME EXIT SECONDS [EXTRA_JSON]
  local extra=${4:-}
  echo "{\"check\": \"$1\", \"exit\": $2, \"seconds\": $3${extra:+, $extra}}" >> "$OUT/checks.jsonl"
}

check() {  # check NAME TIMEOUT_S CMD...: runs CMD, keeps its output, records exit and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$OUT/$name.log" > "$OUT/$name.json" 2>/dev/null || true
  local figure
  figure=$(grep -Eo '(PASS|FAIL): .*' "$OUT/$name.log" | tail -1 | sed 's/"/\\"/g')
  record "$name" "$rc" "$((SECONDS - t0))" "${figure:+\"result\": \"$figure\"}"
  echo "[$name] exit $rc in $((SECONDS - t0)) s ${figure}" >&2
}

$PY - > "$OUT/env.json" <<'EOF'
import json, platform
import jax
out = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
       "devices": [str(d) for d in jax.devices()]}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
               torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
except ImportError:
    out["torch"] = None
print(json.dumps(out))
EOF
cat "$OUT/env.json" >&2

# ---- 1. exactness: every case and trajectory folder that was carried, float64 and float32
for dir in "$SHARED"/reference/cases/* "$SHARED"/reference/trajectories/*; do
  [ -d "$dir" ] || continue
  for dt in float64 float32; do
    [ "$QUICK" = 1 ] && [ "$dt" = float32 ] && continue
    check "compare_$(basename "$dir")_$dt" 300 $PY -m l2t_jax.reference compare "$dir" --dtype "$dt"
  done
done

# ---- 2. speed and memory against the PyTorch twin (same iteration, side by side)
if [ "$QUICK" = 1 ]; then
  check bench_tiny 300 $PY -m benchmarks.train_step --setting tiny --batch 4 --T 2 --iters 1 --compare_torch
  check bench_tiny_mixed 300 $PY -m benchmarks.train_step --setting tiny --batch 4 --T 2 --iters 1 --hvp mixed --no_plain
else
  check bench_stl10_b128 240 $PY -m benchmarks.train_step --setting stl10 --batch 128 --T 2 --iters 5 --compare_torch
  check bench_stl10_b128_mixed 150 $PY -m benchmarks.train_step --setting stl10 --batch 128 --T 2 --iters 5 --hvp mixed --no_plain
  check bench_cub200_b64 300 $PY -m benchmarks.train_step --setting cub200 --batch 64 --T 2 --iters 3 --compare_torch
fi

# ---- 3. one short real training run (the runner end to end)
need=$($PY -c "
import importlib.util as u
print(' '.join(p for m, p in (('ml_collections', 'ml-collections'), ('sklearn', 'scikit-learn')) if u.find_spec(m) is None))")
if [ -n "$need" ] && [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links .whl $need > "$OUT/pip.log" 2>&1 || true
  need=$($PY -c "
import importlib.util as u
print(' '.join(p for m, p in (('ml_collections', 'ml-collections'), ('sklearn', 'scikit-learn')) if u.find_spec(m) is None))")
fi
if [ -n "$need" ]; then
  record train_quickstart 0 0 "\"skipped\": \"missing packages: $need (carry their wheels in .whl/)\""
else
  check train_quickstart 300 $PY -m experiments.run --config=experiments/configs/quickstart.py \
    --workdir="$OUT/quickstart" --config.methods=scratch,l2t_ww
fi
echo "done: $OUT/checks.jsonl" >&2
