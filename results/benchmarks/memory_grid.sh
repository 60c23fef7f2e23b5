#!/usr/bin/env bash
# XLA's memory analysis of the compiled L2T-ww iteration (temporaries, arguments, outputs) over
# batch, T, meta-gradient mode and conv lowering: `benchmarks.train_step --memory_only` compiles
# and does not execute, so the figures do not depend on what else runs on the machine.
# Resumable: rows already in the output are skipped. Output: one JSON line per row.
# "mixed" rows: hvp="mixed", whose look-ahead is a loop (BilevelConfig.unrolled); rows named
# "mixed-unrolled" were taken before that rule, with the steps unrolled.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
OUT=results/benchmarks/memory_grid.jsonl
touch "$OUT"
row() {  # row KEY ARGS...
  local key=$1; shift
  grep -q "\"row\": \"$key\"" "$OUT" && return 0
  local line
  line=$(nice -n 5 python -m benchmarks.train_step --memory_only "$@" 2>/dev/null | tail -n 1)
  python -c "import json,sys; r=json.loads(sys.argv[1]); r['row']=sys.argv[2]; print(json.dumps(r, sort_keys=True))" "$line" "$key" >> "$OUT"
}
for mode in mixed reverse remat; do
  extra=(--hvp reverse); [ $mode = mixed ] && extra=(--hvp mixed); [ $mode = remat ] && extra=(--remat)
  row "cub200 b64 T2 $mode auto" --setting cub200 --batch 64 --T 2 "${extra[@]}"
done
for T in 1 2 4 8; do
  for mode in mixed reverse remat; do
    extra=(--hvp reverse); [ $mode = mixed ] && extra=(--hvp mixed); [ $mode = remat ] && extra=(--remat)
    row "stl10 b128 T$T $mode auto" --setting stl10 --batch 128 --T $T "${extra[@]}"
  done
done
for T in 2 8; do
  row "stl10 b128 T$T reverse xla" --setting stl10 --batch 128 --T $T --conv_impl xla
  row "stl10 b128 T$T mixed xla" --setting stl10 --batch 128 --T $T --hvp mixed --conv_impl xla
done
