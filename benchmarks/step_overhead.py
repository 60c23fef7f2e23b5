"""What `heap.compile_then_release` adds to every call of the training step, beside jit's own dispatch.

    python -m benchmarks.step_overhead [--setting stl10] [--batch 32] [--T 2] [--calls 300] [--out FILE.json]

The runner's step is `heap.compile_then_release(jitted_step)`: before each call it
builds the arguments' signature (`heap.argument_signature`: pytree structure plus
each leaf's abstract value and sharding) and looks it up among the compiled ones.
That is Python work on every step, on top of jit's C++ dispatch. To see it without
the step's own seconds, both are timed on a jitted function that takes the real
iteration's arguments (the setting's train state, source variables, batch and
learning rate: `benchmarks.train_step.build`) and returns at once (`lr * 2`):

* jit_call_ms: the jitted function called directly (its dispatch and a trivial run);
* wrapped_call_ms: the same function through `compile_then_release`;
* signature_ms: `argument_signature(args) in compiled_signatures` alone;
* overhead_ms: wrapped minus direct; on a GPU step of 10 ms, 0.3 ms is 3 %.

Each figure is the best of --repeats rounds of --calls calls (wall clock). Prints
one JSON line; --out writes it too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import log, rounded


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if min(args.batch, args.T, args.calls, args.repeats) < 1:
        p.error("--batch, --T, --calls and --repeats must be >= 1")
    return args


def best_ms(fn, calls: int, repeats: int) -> float:
    """The fastest round's mean milliseconds per call."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks import train_step
    from l2t_jax import heap

    build_args = train_step.parse_args(["--setting", args.setting, "--batch", str(args.batch), "--T", str(args.T)])
    _, _, _, state, source_vars, x, y, _, _ = train_step.build(build_args)
    call_args = (state, source_vars, x, y, jnp.asarray(0.1, jnp.float32))
    leaves = len(jax.tree.leaves(call_args))
    log(f"setting {args.setting}, batch {args.batch}, T {args.T}: {leaves} argument leaves")

    @jax.jit
    def returns_at_once(state, source_vars, x, y, lr):
        return lr * 2

    wrapped = heap.compile_then_release(returns_at_once)
    jax.block_until_ready(wrapped(*call_args))  # compiles (and releases) once
    seen = wrapped.compiled_signatures

    direct_ms = best_ms(lambda: jax.block_until_ready(returns_at_once(*call_args)), args.calls, args.repeats)
    wrapped_ms = best_ms(lambda: jax.block_until_ready(wrapped(*call_args)), args.calls, args.repeats)
    signature_ms = best_ms(lambda: heap.argument_signature(call_args) in seen, args.calls, args.repeats)
    if len(seen) != 1:
        raise SystemExit(f"the wrapper compiled {len(seen)} signatures for one set of arguments")
    record = {
        "benchmark": "step_overhead", "setting": args.setting, "batch": args.batch, "T": args.T,
        "argument_leaves": leaves, "calls": args.calls, "repeats": args.repeats,
        "jit_call_ms": rounded(direct_ms, 4), "wrapped_call_ms": rounded(wrapped_ms, 4),
        "signature_ms": rounded(signature_ms, 4), "overhead_ms": rounded(wrapped_ms - direct_ms, 4),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}", "jax": jax.__version__,
    }
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return record


if __name__ == "__main__":
    main()
