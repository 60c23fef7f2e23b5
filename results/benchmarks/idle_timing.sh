#!/usr/bin/env bash
# Timed benchmarks for issue 14, side by side with the PyTorch twin of the authors' iteration,
# run on an otherwise idle machine (nothing else may compute while this runs). Resumable:
# finished files are skipped, and unroll_memory keeps the rows its --out already holds.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv ] && . .venv/bin/activate
D=results/benchmarks
. results/benchmarks/once.sh
# stl10 (ResNet32 -> VGG9-bn, 15 pairs): every T and mode, JAX and PyTorch in one table per batch
python -m benchmarks.unroll_memory --batch 128 --Ts 2 --remat_modes off,on,mixed,torch --iters 2 --out $D/unroll_stl10_b128.json
once $D/train_step_stl10_b32_T2_torch.json python -m benchmarks.train_step --setting stl10 --batch 32 --T 2 --iters 3 --compare_torch
python -m benchmarks.unroll_memory --batch 32 --Ts 1,2,4,8 --remat_modes off,on,mixed,torch --iters 2 --out $D/unroll_stl10_b32.json
once $D/train_step_stl10_b128_T2_torch.json python -m benchmarks.train_step --setting stl10 --batch 128 --T 2 --iters 2 --compare_torch
once $D/train_step_cub200_b64_T2_mixed.json python -m benchmarks.train_step --setting cub200 --batch 64 --T 2 --iters 2 --hvp mixed
python -m benchmarks.unroll_memory --batch 128 --Ts 1,2,4,8 --remat_modes off,on,mixed,torch --iters 2 --out $D/unroll_stl10_b128.json
# the plain step per lowering variant (conv_impl x XLA CPU flags), beside PyTorch's
[ -s $D/plain_step_stl10_b128.json ] || python -m benchmarks.plain_step --setting stl10 --batch 128 --iters 5 --compare_torch --out $D/plain_step_stl10_b128.json
[ -s $D/plain_step_stl10_b32.json ] || python -m benchmarks.plain_step --setting stl10 --batch 32 --iters 10 --compare_torch --out $D/plain_step_stl10_b32.json
[ -s $D/plain_step_cub200_b64.json ] || python -m benchmarks.plain_step --setting cub200 --batch 64 --iters 3 --variants default,xla_conv,xnnpack,onednn,fast_math --compare_torch --out $D/plain_step_cub200_b64.json
