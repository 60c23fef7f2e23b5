#!/usr/bin/env bash
# Where a meta-iteration's time goes, phase by phase (benchmarks.meta_phases), for the
# settings the issue's targets name. Idle machine only. Resumable: finished files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
D=results/benchmarks/meta_phases
mkdir -p $D
. results/benchmarks/once.sh
run() {  # name, meta_phases arguments...
  local name=$1; shift
  once $D/$name.json python -m benchmarks.meta_phases "$@"
}
run cub200_b64_T2_mixed --setting cub200 --batch 64 --hvp mixed
run stl10_b128_T2_mixed --setting stl10 --batch 128 --hvp mixed
