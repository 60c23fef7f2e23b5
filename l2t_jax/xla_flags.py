"""The XLA CPU scheduler, chosen for the whole process before JAX starts.

    xla_flags.choose_cpu_scheduler("mixed")  # before any JAX work
    import jax  # (importing is fine; running anything starts the backend)

XLA's CPU compiler orders a program's instructions either breadth-first (its
default, "concurrency": more independent work in flight for its worker threads,
and more buffers alive at once) or depth-first ("memory": each buffer freed as
early as the order allows; `--xla_cpu_enable_concurrency_optimized_scheduler=false`).
The order decides which buffers share memory, never a value. In mixed mode, whose
Hessian-vector products leave many independent branches, depth-first order cuts
the iteration's temporaries (stl10, T = 2: 2.07 to 1.64 GB at batch 128) at the
same speed; in reverse mode it does not (3.01 to 3.09 GB). Measured in
results/benchmarks/README.md ("The CPU scheduler").

XLA reads XLA_FLAGS once, when JAX's first backend starts, and a per-compile option
(`jax.jit(compiler_options=...)`) does not reach this choice (its temporaries stay
those of the default order; checked both ways). So the choice belongs to the process:
`experiments.run` and `benchmarks.train_step` make it first thing, and
`use_cpu_scheduler` refuses once a backend is running, rather than do nothing.
`choose_cpu_scheduler` does both steps: resolve a choice for a mode, then set it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: XLA CPU's instruction orders (breadth-first, XLA's default; depth-first), and
#: "auto": depth-first in mixed mode, XLA's default otherwise (`cpu_scheduler_for`).
CPU_SCHEDULERS = ("auto", "concurrency", "memory")
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def cpu_scheduler_for(hvp: str, choice: str = "auto") -> str:
    """The scheduler to run: `choice`, or for "auto" the one that measured smaller for `hvp`."""
    if choice not in CPU_SCHEDULERS:
        raise ValueError(f"unknown CPU scheduler {choice!r}; expected one of {CPU_SCHEDULERS}")
    if choice != "auto":
        return choice
    return "memory" if hvp == "mixed" else "concurrency"


def with_cpu_scheduler(flags: str, scheduler: str) -> str:
    """`flags` (an XLA_FLAGS value) with the scheduler flag set for `scheduler` (any earlier setting replaced)."""
    if scheduler not in ("concurrency", "memory"):
        raise ValueError(f"CPU scheduler must be 'concurrency' or 'memory', got {scheduler!r}")
    kept = [f for f in flags.split() if f.split("=", 1)[0] != FLAG]
    return " ".join(kept + ([f"{FLAG}=false"] if scheduler == "memory" else []))  # concurrency: XLA's default


def backends_started() -> bool:
    """Whether JAX has started a backend (after which XLA_FLAGS are no longer read)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module: assume started, to refuse safely
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def use_cpu_scheduler(scheduler: str, environ: MutableMapping[str, str] | None = None) -> str:
    """Sets XLA_FLAGS for `scheduler` ("concurrency" or "memory") and returns the new value.

    Raises:
      RuntimeError: a JAX backend is already running (the flag would be ignored).
    """
    env = os.environ if environ is None else environ
    flags = with_cpu_scheduler(env.get("XLA_FLAGS", ""), scheduler)
    if flags == env.get("XLA_FLAGS", ""):
        return flags
    if backends_started():
        raise RuntimeError(f"the CPU scheduler {scheduler!r} must be chosen before JAX starts a backend "
                           "(XLA reads XLA_FLAGS once); choose it first thing in the process")
    env["XLA_FLAGS"] = flags
    return flags


def choose_cpu_scheduler(hvp: str, choice: str = "auto", environ: MutableMapping[str, str] | None = None) -> str:
    """Resolves `choice` for the meta-gradient mode `hvp` (`cpu_scheduler_for`), sets it, and returns it.

    Raises:
      ValueError: `choice` is not one of CPU_SCHEDULERS.
      RuntimeError: a JAX backend is already running and the setting would change.
    """
    scheduler = cpu_scheduler_for(hvp, choice)
    use_cpu_scheduler(scheduler, environ)
    return scheduler
