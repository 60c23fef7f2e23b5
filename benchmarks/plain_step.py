"""The target's plain SGD step under XLA CPU lowering choices, beside PyTorch's.

    python -m benchmarks.plain_step [--setting stl10] [--batch 128] [--iters 5]
        [--variants default,xla_conv,im2col_single,xnnpack,onednn,...] [--compare_torch]
        [--allocators default,thp,arena] [--torch_threads N] [--timeout S] [--out FILE.json]

Our meta-iteration costs 6-9 plain steps where the authors' costs 24-26, yet on the
2-core CPU our plain step is 1.5-1.8x slower than PyTorch's (README, "Speed and
memory"): the plain step's lowering is the lever for every figure. This script times
one jitted SGD step of the setting's target (cross-entropy, PyTorch SGD, state donated;
`benchmarks.train_step.make_plain_step`) for each variant, a pair (conv_impl, XLA_FLAGS):

* default: conv_impl "auto" (im2col in groups of taps on CPU), no flags;
* xla_conv: XLA's convolution; im2col_single: one matmul per conv;
* xnnpack / onednn (+ _xla_conv): XLA CPU's XNNPACK or oneDNN paths, with either lowering;
* fast_math: `--xla_cpu_enable_fast_math=true`.

Every variant (PyTorch's too) runs once per allocator setting, glibc's malloc tunables
set in the child's environment (`GLIBC_TUNABLES`, read when a process starts):

* default: glibc's defaults. XLA's CPU runtime allocates each execution's buffers
  anew; blocks above glibc's mmap threshold, or too large for a worker thread's arena,
  are fresh mmaps, so every step pays the kernel to fault in and zero its buffers
  (`sys_s_per_call`, `minor_faults_per_call`). PyTorch's CPU tensors go the same way.
* thp: `glibc.malloc.hugetlb=1` (glibc >= 2.35): malloc asks for transparent huge
  pages, so a fresh block faults in 2 MB at a time (where the kernel's THP mode is
  "madvise" or "always").
* arena: one arena, no mmap, no trimming: freed blocks are reused, never faulted in
  again (the process keeps its peak heap).

Each variant runs in its own child process (XLA reads XLA_FLAGS once, when its backend
starts); a variant whose flags this jaxlib does not know fails alone, as a row with
"error". Every child starts from the same random weights and batch, so `first_loss`
(the loss of the first step) shows whether a variant computes the same thing:
`loss_rel_diff` is its relative difference from "default" (float32 rounding is
~1e-7; a lowering that changes the math shows far more). With --compare_torch the
PyTorch twin's plain step (`benchmarks/torch_reference.py`) is timed too, and every
row gets `speedup_vs_torch` (PyTorch's time over the row's).

stdout: one JSON line per row as it finishes, then a Markdown table; `--out` also
writes one JSON document.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.common import gb, log, rounded

REPO = Path(__file__).resolve().parents[1]

#: variant -> (conv_impl, XLA_FLAGS added for the child)
VARIANTS: dict[str, tuple[str, str]] = {
    "default": ("auto", ""),
    "xla_conv": ("xla", ""),
    "im2col_single": ("im2col_single", ""),
    "xnnpack": ("auto", "--xla_cpu_use_xnnpack=true"),
    "xnnpack_xla_conv": ("xla", "--xla_cpu_use_xnnpack=true"),
    "onednn": ("auto", "--xla_cpu_use_onednn=true"),
    "onednn_xla_conv": ("xla", "--xla_cpu_use_onednn=true"),
    "fast_math": ("auto", "--xla_cpu_enable_fast_math=true"),
}
TORCH = "torch"

#: allocator setting -> GLIBC_TUNABLES for the child (see the module docstring)
ALLOCATORS: dict[str, str] = {
    "default": "",
    "thp": "glibc.malloc.hugetlb=1",
    "arena": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=None, help="default: the setting's")
    p.add_argument("--iters", type=int, default=5, help="timed steps per variant (after a warm-up step)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--compare_torch", action="store_true", help="also time the PyTorch twin's plain step")
    p.add_argument("--allocators", default="default",
                   help=f"comma-separated subset of {','.join(ALLOCATORS)}: every variant runs under each")
    p.add_argument("--torch_threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child before it is killed")
    p.add_argument("--compilation_cache", default=None, help="persistent XLA cache for the children (tests only)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = common.setting(args.setting).batch
    if args.batch < 1 or args.iters < 1:
        p.error("--batch and --iters must be >= 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    args.allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    bad = [a for a in args.allocators if a not in ALLOCATORS]
    if bad or not args.allocators:
        p.error(f"unknown allocator(s) {bad}; choose from {','.join(ALLOCATORS)}")
    return args


def child_jax(args) -> dict:
    """Times the plain step of variant `args.child` in this process (XLA_FLAGS already set)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.train_step import compiled_plain_step, random_target_and_batch
    from l2t_jax import heap
    from l2t_jax.models import get_model

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.compilation_cache).resolve()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    conv_impl, flags = VARIANTS[args.child]
    s = common.setting(args.setting)
    model = get_model(s.target, s.target_classes, conv_impl=conv_impl)
    variables, x, y = random_target_and_batch(model, s, args.batch, args.seed)
    one, compile_s = compiled_plain_step(model, jnp.float32, variables, x, y)
    first_loss = float(one())
    heap.release_free_memory()
    with common.RssSampler() as sampler, common.CpuUsage() as cpu:
        times = common.time_calls(one, args.iters, jax.block_until_ready)
    return {"variant": args.child, "conv_impl": conv_impl, "xla_flags": flags, "step_s_median": rounded(common.median(times)),
            "step_s_all": [rounded(t) for t in times], **cpu.per_call(args.iters), "compile_s": rounded(compile_s, 2),
            "first_loss": first_loss, "peak_mem_gb": gb(sampler.peak), "jax": jax.__version__,
            "child_glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def child_torch(args) -> dict:
    """The PyTorch twin's plain step (torch_reference's target, same SGD), in this process."""
    import torch

    from benchmarks import torch_reference
    from l2t_jax import heap, transfer

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    s = common.setting(args.setting)
    pairs = transfer.resolve_pairs(s.pairs, s.source, s.target, s.image_size)
    bench = torch_reference.TorchL2T(s, pairs, args.batch, 1, torch.device("cpu"), "adjoint", args.seed)
    step = bench.plain_step_fn()
    step()
    heap.release_free_memory()
    with common.RssSampler() as sampler, common.CpuUsage() as cpu:
        times = common.time_calls(step, args.iters)
    return {"variant": TORCH, "step_s_median": rounded(common.median(times)), "step_s_all": [rounded(t) for t in times],
            **cpu.per_call(args.iters), "child_glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "peak_mem_gb": gb(sampler.peak), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def run_variant(args, variant: str, allocator: str = "default") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.plain_step", "--child", variant, "--setting", args.setting,
           "--batch", str(args.batch), "--iters", str(args.iters), "--seed", str(args.seed)]
    if args.compilation_cache:
        cmd += ["--compilation_cache", args.compilation_cache]
    if args.torch_threads:
        cmd += ["--torch_threads", str(args.torch_threads)]
    env = dict(os.environ)
    if variant != TORCH and VARIANTS[variant][1]:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + VARIANTS[variant][1]).strip()
    tunables = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), ALLOCATORS[allocator]) if t)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    row = {"benchmark": "plain_step", "setting": args.setting, "batch": args.batch, "variant": variant,
           "allocator": allocator, "glibc_tunables": tunables}
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {args.timeout:.0f} s"
        return row
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        row["error"] = f"exit code {proc.returncode}: {last[:300]}"
        log(f"{variant}: failed: {row['error']}")
        return row
    row.update(common.parse_last_json(proc.stdout))
    return row


def add_ratios(rows: list[dict]) -> None:
    """Per row, against rows of the same allocator setting: loss_rel_diff and time_vs_default
    against the "default" variant, speedup_vs_torch against PyTorch's; and, for allocator
    settings other than "default", time_vs_default_allocator against the same variant
    under glibc's defaults."""
    ok = {(r["variant"], r.get("allocator", "default")): r for r in rows if "error" not in r}
    for (variant, alloc), r in ok.items():
        base, ref = ok.get(("default", alloc)), ok.get((TORCH, alloc))
        if base is not None and "first_loss" in r:
            r["loss_rel_diff"] = abs(r["first_loss"] - base["first_loss"]) / abs(base["first_loss"])
        if base is not None and variant != TORCH:
            r["time_vs_default"] = rounded(r["step_s_median"] / base["step_s_median"], 3)
        if ref is not None:
            r["speedup_vs_torch"] = rounded(ref["step_s_median"] / r["step_s_median"], 3)
        same = ok.get((variant, "default"))
        if alloc != "default" and same is not None:
            r["time_vs_default_allocator"] = rounded(r["step_s_median"] / same["step_s_median"], 3)


def table(rows: list[dict]) -> str:
    lines = ["| variant | allocator | conv_impl | XLA_FLAGS | step s (median) | vs default | speed-up vs PyTorch "
             "| CPU user / sys s | minor faults | peak GB | first-loss rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r.get('allocator', 'default')} | | | {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r.get('allocator', 'default')} | {r.get('conv_impl', '—')} | "
                     f"{r.get('xla_flags') or '—'} | {f(r['step_s_median'], '.4f')} | {f(r.get('time_vs_default'), '.2f')} | "
                     f"{f(r.get('speedup_vs_torch'), '.2f')} | {f(r.get('user_s_per_call'), '.3f')} / "
                     f"{f(r.get('sys_s_per_call'), '.3f')} | {r.get('minor_faults_per_call', '—')} | "
                     f"{f(r.get('peak_mem_gb'), '.2f')} | {f(r.get('loss_rel_diff'), '.1e')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        common.emit(child_torch(args) if args.child == TORCH else child_jax(args))
        return []
    variants = args.variants + ([TORCH] if args.compare_torch else [])
    runs = [(v, a) for a in args.allocators for v in variants]
    log(f"{len(variants)} variants x {len(args.allocators)} allocator settings ({args.setting}, batch {args.batch}), "
        "one child process each")
    rows = []
    for i, (v, a) in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {v} ({a} allocator)")
        rows.append(run_variant(args, v, a))
    add_ratios(rows)
    for r in rows:
        common.emit(r)
    print(table(rows), flush=True)
    if args.out:
        common.write_rows(args.out, "plain_step", rows, setting=args.setting, batch=args.batch)
    return rows


if __name__ == "__main__":
    main()
