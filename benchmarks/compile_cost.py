"""What compiling costs a process: lifetime peak memory and start-up time, first run against a cached rerun.

    python -m benchmarks.compile_cost [--setting stl10] [--batch 32] [--T 2] [--modes mixed,off]
        [--heaps release,keep] [--cpu_schedulers auto,concurrency] [--conv_impls auto,im2col] [--iters 2]
        [--timeout 3600] [--out FILE.json]

A user's process holds its peak memory at its peak, whenever that is. For our
iteration on XLA's CPU backend that is while the compiler runs, not while training
(`benchmarks.unroll_memory`'s child_max_rss_gb against its peak_mem_gb). This
benchmark measures, each in a fresh child process and in one run:

* "first": `benchmarks.train_step ... --no_plain --compilation_cache DIR` with DIR a new,
  empty folder: the compile of a first run (and what `experiments.run` does on a
  machine that never compiled this program);
* "cached": the same command again, DIR now holding the programs: a rerun, a resumed
  run, the next seed of a sweep (the runner's default cache, `l2t_jax.compile_cache`);
* "torch": the PyTorch twin (`benchmarks.torch_reference ... --no_plain`).

Each of our rows is taken for every --heaps setting (`benchmarks.train_step --heap`):
"release" returns the heap's free memory to the OS after building and after
compiling, as `experiments.run` does (`l2t_jax.heap`); "keep" never does (plain
`jax.jit`). And for every --cpu_schedulers setting (`train_step --cpu_scheduler`: XLA
CPU's instruction order, `l2t_jax.xla_flags`; "auto" resolves per mode), and every
--conv_impls lowering (`train_step --conv_impl`; "auto" resolves per mode,
`layers.conv_impl_for`). Each combination has its own cache, filled by its "first" row.

Per row: max_rss_gb (the child's lifetime peak RSS from the kernel, `wait4`),
peak_mem_gb (RSS sampled during the timed iterations), first_call_s (compile and
first iteration; PyTorch: its first iteration), compile_s, iter_s_median,
child_wall_s (the whole child: imports, building, compile, all iterations) and
max_rss_vs_torch = max_rss_gb / the "torch" row's.

stdout: one JSON line per row as it finishes, then a Markdown table; `--out` also
writes one JSON document {"rows": [...], ...}. On a 2-core CPU a batch-32 run takes
about 5 minutes, batch 128 about 10. Idle machine only (times are wall clock).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from benchmarks import common
from benchmarks.common import log, rounded
from benchmarks.unroll_memory import MODES, run_child
from l2t_jax import xla_flags
from l2t_jax.models.layers import CONV_IMPLS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--modes", default="mixed,off", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--heaps", default="release", help="comma-separated subset of release,keep (train_step --heap)")
    p.add_argument("--cpu_schedulers", default="auto",
                   help="comma-separated subset of auto,concurrency,memory (train_step --cpu_scheduler)")
    p.add_argument("--conv_impls", default="auto",
                   help="comma-separated convolution lowerings (train_step --conv_impl; auto: im2col_loop in mixed mode on CPU)")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch twin")
    p.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads in the PyTorch child")
    p.add_argument("--timeout", type=float, default=None, help="seconds per child before it is killed")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.modes = _subset(p, "--modes", args.modes, tuple(MODES))
    args.heaps = _subset(p, "--heaps", args.heaps, ("release", "keep"))
    args.cpu_schedulers = _subset(p, "--cpu_schedulers", args.cpu_schedulers, xla_flags.CPU_SCHEDULERS)
    args.conv_impls = _subset(p, "--conv_impls", args.conv_impls, CONV_IMPLS)
    return args


def _subset(p: argparse.ArgumentParser, flag: str, value: str, choices: tuple[str, ...]) -> list[str]:
    """The comma-separated `value` of `flag` as a list, or an argparse error (exit 2) naming the choices."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items or any(v not in choices for v in items):
        p.error(f"{flag} must be a comma-separated subset of {','.join(choices)}")
    return items


def _child(cmd: list[str], timeout: float | None, row: dict) -> dict | None:
    """Runs one child; fills `row` with its lifetime peak and wall time; its JSON record, or None on failure."""
    rc, text, maxrss, wall = run_child(cmd, timeout)
    row.update(max_rss_gb=common.gb(maxrss), child_wall_s=rounded(wall, 1))
    if rc != 0:
        row.update(error="killed (timeout or out of memory?)" if rc < 0 else f"exit code {rc}")
        log(f"{row['mode']}/{row['run']}: child failed: {row['error']}")
        return None
    return common.parse_last_json(text)


def measure_ours(args, mode: str, heap: str, run: str, cache: str, scheduler: str = "auto", conv_impl: str = "auto") -> dict:
    remat, unroll, hvp = MODES[mode]
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--setting", args.setting, "--batch", str(args.batch),
           "--T", str(args.T), "--iters", str(args.iters), "--hvp", hvp, "--no_plain", "--compilation_cache", cache,
           "--heap", heap, "--cpu_scheduler", scheduler, "--conv_impl", conv_impl]
    cmd += ["--remat"] if remat else []
    cmd += [] if unroll else ["--no_unroll"]
    row = {"mode": mode, "heap": heap, "scheduler": scheduler, "conv_impl": conv_impl, "run": run}
    r = _child(cmd, args.timeout, row)
    if r is not None:
        row.update(heap=r["heap"], scheduler=r["cpu_scheduler"], conv_impl=r["conv_impl_used"], first_call_s=r["first_call_s"], compile_s=r["compile_s"], iter_s_median=r["iter_s_median"],
                   peak_mem_gb=r["peak_mem_gb"], rss_before_iters_gb=r.get("rss_before_iters_gb"),
                   xla_temp_gb=r.get("xla_temp_gb"), loadavg_1m=r.get("loadavg_1m"))
    return row


def measure_torch(args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--setting", args.setting, "--batch", str(args.batch),
           "--T", str(args.T), "--iters", str(args.iters), "--no_plain"]
    cmd += ["--threads", str(args.torch_threads)] if args.torch_threads else []
    row = {"mode": "torch", "heap": "-", "scheduler": "-", "conv_impl": "-", "run": "-"}
    r = _child(cmd, args.timeout, row)
    if r is not None:
        row.update(first_call_s=r.get("torch_first_iter_s"), compile_s=None, iter_s_median=r["torch_iter_s_median"],
                   peak_mem_gb=r["torch_peak_mem_gb"], rss_before_iters_gb=None, xla_temp_gb=None,
                   loadavg_1m=r.get("loadavg_1m"))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| mode | heap | CPU scheduler | convolution | run | lifetime peak GB | ÷ PyTorch's | peak while training GB | compile + first iteration s | compile s | s/iter | child wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["mode"], r["heap"], r.get("scheduler"), r.get("conv_impl"), r["run"], r.get("max_rss_gb"), r.get("max_rss_vs_torch"), r.get("peak_mem_gb"),
                 r.get("first_call_s"), r.get("compile_s"), r.get("iter_s_median"), r.get("child_wall_s")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for mode in args.modes:
        for heap in args.heaps:
            for scheduler in args.cpu_schedulers:
                for conv_impl in args.conv_impls:
                    with tempfile.TemporaryDirectory(prefix="l2t_compile_cost_") as cache:
                        for run in ("first", "cached"):
                            log(f"{mode}, heap {heap}, CPU scheduler {scheduler}, conv {conv_impl}, {run} run")
                            rows.append(measure_ours(args, mode, heap, run, cache, scheduler, conv_impl))
                            common.emit(rows[-1])
    if not args.no_torch:
        log("the PyTorch twin")
        rows.append(measure_torch(args))
        common.emit(rows[-1])
    torch_rss = next((r.get("max_rss_gb") for r in rows if r["mode"] == "torch"), None)
    for r in rows:
        if torch_rss and r.get("max_rss_gb"):
            r["max_rss_vs_torch"] = rounded(r["max_rss_gb"] / torch_rss, 2)
    print(table(rows))
    if args.out:
        common.write_rows(args.out, "compile_cost", rows, setting=args.setting, batch=args.batch, T=args.T,
                          iters=args.iters)
    return rows


if __name__ == "__main__":
    main()
