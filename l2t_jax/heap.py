"""Returning the memory a compilation freed to the operating system, before the program runs.

    step = compile_then_release(jax.jit(f))  # same calls, same results
    release_free_memory()                    # glibc's malloc_trim(0); False where there is none

Why: XLA's compiler allocates 1-2 GB of small blocks on the C heap (for the stl10
iteration; more at 224 px) and frees them when it is done. glibc keeps freed blocks
in the arena of the thread that freed them and returns a heap's pages to the kernel
only from its top. The compiled program then runs on XLA's worker threads, whose
arenas do not reuse those blocks, so the process keeps the compiler's peak as
resident memory for the whole run, and the program's own buffers come on top of it.
`malloc_trim(0)` gives every whole free page of every arena back (`madvise`), which
is what glibc never does by itself. Measured in results/benchmarks/README.md
("The heap after compiling").

`compile_then_release` wraps a jitted function: at the first call with a new
argument signature (the pytree structure and each leaf's shape, dtype, weak type and
sharding; any other leaf, such as a static module, by value) it releases the free
memory (what earlier programs' executions freed: a second batch shape, or the
evaluation after training steps, would otherwise compile on top of it), compiles
ahead of time (`lower(...).compile()`, which fills the jitted function's own cache,
so the call that follows neither traces nor compiles again), releases again, and
then calls. Every call goes through the jitted function itself, so results,
donation and shardings are exactly the unwrapped function's; a signature the key
misses only means a compile without the release.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None (macOS, musl, Windows: nothing to call)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Gives the C heap's free pages back to the kernel (glibc `malloc_trim(0)`).

    Returns whether the C library has the call; it takes milliseconds and changes no
    value anywhere, only the process's resident memory.
    """
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def _leaf_key(leaf: Any) -> Hashable:
    """What decides which compiled program a leaf of the arguments calls.

    Called for every leaf on every step, so a jax array is keyed by its abstract value
    (shape, dtype, weak type), which it already holds, and its sharding: building
    `(shape, str(dtype), ...)` instead cost 4 us a leaf, 2 ms a step for the stl10
    state's 542 leaves (`str(dtype)` alone 2.6 us).
    """
    if isinstance(leaf, jax.Array):
        return (leaf.aval, leaf.sharding)
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:  # numpy arrays and scalars
        return (tuple(shape), dtype, bool(getattr(leaf, "weak_type", False)), None)
    try:
        hash(leaf)
    except TypeError:
        return (type(leaf), id(leaf))
    return (type(leaf), leaf)


def argument_signature(args: tuple) -> Hashable:
    """The pytree structure of `args` and the key of every leaf (`_leaf_key`)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple([_leaf_key(leaf) for leaf in leaves])


class CompileThenRelease:
    """A jitted function that releases the compiler's freed memory before each new program first runs.

    Attributes:
      fn: the jitted function (anything with `lower(*args).compile()` and `__call__`).
      compiled_signatures: the argument signatures compiled so far (one per program).
    """

    def __init__(self, fn: Callable):
        if not hasattr(fn, "lower"):
            raise TypeError(f"compile_then_release needs a jitted function (with .lower), got {fn!r}")
        self.fn = fn
        self.compiled_signatures: set = set()
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args):
        key = argument_signature(args)
        if key not in self.compiled_signatures:
            release_free_memory()  # what earlier executions freed: the compiler then starts from live memory
            self.fn.lower(*args).compile()
            release_free_memory()  # what the compiler freed
            self.compiled_signatures.add(key)
        return self.fn(*args)

    def __getattr__(self, name: str):
        """Everything else is the wrapped function's (`lower`; `parallel`'s `mesh`, `num_devices`, `jitted`)."""
        if name == "fn":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.fn, name)


def compile_then_release(fn: Callable) -> CompileThenRelease:
    """`fn` (jitted), compiling each new argument signature ahead of its call and then releasing free memory."""
    return CompileThenRelease(fn)
