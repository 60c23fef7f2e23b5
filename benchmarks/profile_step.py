"""Where our plain step's time goes, by kind of XLA operation (jax.profiler trace).

    python -m benchmarks.profile_step [--setting stl10] [--batch 128] [--iters 5] [--conv_impl auto]
        [--top 15] [--out FILE.json]

Traces `iters` plain SGD steps of the setting's target (`benchmarks.train_step.
compiled_plain_step`, after two warm-up steps) with XLA's per-operation trace events on
(`--xla_cpu_enable_xprof_traceme=true`, set here before JAX starts), then sums each
operation's duration per step and groups the operations by kind:

* matmul: dots (XLA CPU runs them through its YNNPACK / XNNPACK / Eigen kernels);
* patches: fusions of pads, slices and concatenations: im2col's patch building and its
  transpose, also slice-based fusions such as the 2x2 max-pool's selects;
* other: everything else (batch norm, ReLU, max-pool, losses, the SGD update, copies).

Durations are summed over operations that can run at once on the 2 cores, so the total
can exceed the wall time (`step_s_median`, also reported). Minor page faults and CPU
time per step (getrusage) say what the kernel spent on fresh buffers. Prints one JSON
line; --out writes it too.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks.common import log, rounded


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=None, help="default: the setting's")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--conv_impl", default="auto", choices=("auto", "xla", "im2col", "im2col_single"))
    p.add_argument("--top", type=int, default=15, help="the slowest operations to list")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = common.setting(args.setting).batch
    if args.batch < 1 or args.iters < 1:
        p.error("--batch and --iters must be >= 1")
    return args


def kind(op_name: str) -> str:
    """matmul / patches / other for an XLA operation's trace-event name."""
    n = op_name.lower()
    if "ynn" in n or "xnn" in n or n.startswith("dot") or "_dot" in n or "onednn" in n:
        return "matmul"
    if "concatenate" in n or "slice" in n or n.startswith("pad") or "_pad" in n:
        return "patches"
    return "other"


def op_durations(trace_dir: str, steps: int) -> dict[str, float]:
    """Milliseconds per step of each XLA operation in the Perfetto trace under `trace_dir`."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"no trace written under {trace_dir}: is the JAX profiler available?")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    skip = ("$", "ThunkExecutor", "PjitFunction", "PjRt", "Execute", "Await", "Thread")
    ms: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or any(name.startswith(s) or s in name for s in skip):
            continue
        ms[name] += e.get("dur", 0) / 1e3 / steps
    return ms


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    import jax
    import jax.numpy as jnp

    from benchmarks.train_step import compiled_plain_step, random_target_and_batch
    from l2t_jax.models import get_model

    s = common.setting(args.setting)
    model = get_model(s.target, s.target_classes, conv_impl=args.conv_impl)
    variables, x, y = random_target_and_batch(model, s, args.batch, seed=0)
    one, _ = compiled_plain_step(model, jnp.float32, variables, x, y)
    for _ in range(2):
        jax.block_until_ready(one())
    with common.CpuUsage() as cpu:
        times = common.time_calls(one, args.iters, jax.block_until_ready)
    log(f"tracing {args.iters} steps")
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.iters):
                jax.block_until_ready(one())
        ms = op_durations(d, args.iters)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, t in ms.items():
        by_kind[kind(name)] += t
    top = sorted(ms.items(), key=lambda kv: -kv[1])[: args.top]
    out = {"benchmark": "profile_step", "setting": args.setting, "model": s.target, "batch": args.batch,
           "conv_impl": args.conv_impl, "iters": args.iters, "step_s_median": rounded(common.median(times)),
           **cpu.per_call(args.iters), "op_ms_total": rounded(sum(ms.values()), 1),
           "op_ms_by_kind": {k: rounded(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
           "top_ops_ms": [[n, rounded(t, 2), kind(n)] for n, t in top], "jax": jax.__version__, **common.host_info()}
    common.emit(out)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
