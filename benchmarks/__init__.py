"""Benchmarks of l2t_jax: time and memory of one training iteration, and a PyTorch twin.

    python -m benchmarks.train_step --setting stl10 --batch 128 --T 2 --iters 5 [--compare_torch]
    python -m benchmarks.torch_reference --setting stl10 --batch 128 --T 2 --iters 5
    python -m benchmarks.unroll_memory --batch 128 --Ts 1,2,4,8 --iters 2

Each prints JSON on stdout (one object per line) and progress on stderr. Random
data and random initialisation at the real model sizes: no weights or data needed.
"""
