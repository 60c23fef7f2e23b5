"""Child process of tests/test_xla_flags.py: chooses XLA CPU's scheduler first, then compiles and runs.

    python tests/_scheduler_child.py memory|concurrency|late

Prints one JSON line: the XLA_FLAGS it ran under; the temporaries XLA's memory
analysis gives a program of eight independent branches (each a matmul whose
256 KB result feeds a second matmul and a sum: breadth-first order keeps the first
products of all branches alive together, depth-first order one or two at a time);
and a digest of the outputs of two mixed-mode training steps of the tiny benchmark
setting (float32, random data), which must not depend on the order. "late" starts
JAX first and then asks for the memory scheduler (refused: printed as "refused").
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from l2t_jax import xla_flags  # noqa: E402  (no JAX work yet)


def branchy_temp_bytes() -> int:
    import jax
    import jax.numpy as jnp

    def f(x, ws):
        total = jnp.zeros(())
        for i in range(ws.shape[0]):
            a = jnp.dot(x, ws[i])
            total = total + jnp.sum(jnp.dot(a, ws[i]))
        return total

    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    ws = jax.ShapeDtypeStruct((8, 256, 256), jnp.float32)
    return int(jax.jit(f).lower(x, ws).compile().memory_analysis().temp_size_in_bytes)


def step_digest() -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import train_step
    from l2t_jax import bilevel

    args = train_step.parse_args(["--setting", "tiny", "--batch", "4", "--T", "2", "--hvp", "mixed"])
    _, cfg, models, state, source_vars, x, y, _, _ = train_step.build(args)
    step = bilevel.make_train_step(models, cfg)
    for _ in range(2):
        state, metrics = step(state, source_vars, x, y, jnp.asarray(0.1, jnp.float32))
    h = hashlib.sha256()
    for leaf in jax.tree.leaves((state, metrics)):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def main(which: str) -> None:
    import os

    refused = None
    if which == "late":
        import jax

        jax.devices()
        try:
            xla_flags.use_cpu_scheduler("memory")
        except RuntimeError as e:
            refused = str(e)
    else:
        xla_flags.use_cpu_scheduler(which)
    out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "refused": refused}
    if which != "late":
        out.update(branchy_temp_bytes=branchy_temp_bytes(), digest=step_digest())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
