"""Tests of l2t_jax.heap: the compiler's freed memory goes back to the OS before a program runs.

The memory figures themselves are measured by `benchmarks.compile_cost --heaps
release,keep` (results/benchmarks/README.md); here: that the release really returns
free heap pages (read back from /proc), that each new argument signature is compiled
exactly once and before the release, that the call is the jitted function's own
(values, donation, no second trace), and that the training loop uses it.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, write_digits_npz
from l2t_jax import heap, loop

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None,
                    reason="malloc_trim is glibc's (Linux); elsewhere release_free_memory is a no-op")
def test_release_free_memory_returns_free_heap_pages_to_the_kernel():
    """256 MB of 64 KB heap blocks freed under a live block stay resident until the release."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 64 * 1024, 4096  # below glibc's mmap threshold (128 KB): the main arena's heap
    blocks = [libc.malloc(size) for _ in range(n)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, size)  # touched: resident
    pin = libc.malloc(size)  # a live block above them: glibc's own trimming (top of the heap only) cannot reach them
    for b in blocks:
        libc.free(b)
    try:
        before = _rss_bytes()
        assert heap.release_free_memory() is True
        after = _rss_bytes()
    finally:
        libc.free(pin)
    assert before - after > 0.75 * size * n, (before, after)


@pytest.fixture
def compiles():
    """The XLA compilations that finish while the test runs (one entry each)."""
    events: list[str] = []

    def listener(name, duration, **kw):
        if name == COMPILE_EVENT:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def test_compile_then_release_compiles_each_signature_once_before_releasing(compiles, monkeypatch):
    releases: list[int] = []  # the number of compilations seen at each release
    monkeypatch.setattr(heap, "release_free_memory", lambda: releases.append(len(compiles)) or True)
    traces = {"n": 0}

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1,))
    def f(k, x, y):
        traces["n"] += 1
        return x * k + y, jnp.sum(y)

    step = heap.compile_then_release(f)
    y = jnp.arange(5.0)
    x = jnp.ones(5)
    c0 = len(compiles)
    out, s = step(2.0, x, y)
    np.testing.assert_array_equal(out, 2.0 + np.arange(5.0))
    assert float(s) == 10.0
    assert x.is_deleted()  # the jitted function's donation is kept
    assert (len(compiles) - c0, traces["n"], len(releases)) == (1, 1, 2)  # one trace, one compile, two releases
    assert releases == [c0, c0 + 1]  # released before the compile and after it, before the call ran

    out, _ = step(2.0, out, y)  # the same signature: no compile, no release
    assert (len(compiles) - c0, traces["n"], len(releases)) == (1, 1, 2)
    np.testing.assert_array_equal(out, 4.0 + 3 * np.arange(5.0))  # 2 (2 + y) + y

    y6 = jnp.ones(6)  # (created before counting: jnp.ones compiles its own small program)
    x6 = jnp.ones(6)
    c1 = len(compiles)
    step(2.0, x6, y6)  # a new shape: a new program
    step(3.0, jnp.ones(6) + 0, y6)  # a new static value: a new program
    assert len(compiles) - c1 >= 2 and traces["n"] == 3 and len(releases) == 6
    assert len(step.compiled_signatures) == 3


def test_argument_signature_tells_programs_apart():
    a = jnp.ones((2, 3))
    sig = heap.argument_signature
    assert sig((a, 1)) == sig((jnp.zeros((2, 3)), 1))
    assert sig((a, 1)) != sig((jnp.ones((3, 2)), 1))  # shape
    assert sig((a, 1)) != sig((a.astype(jnp.int32), 1))  # dtype
    assert sig((a, 1)) != sig((a.astype(jnp.bfloat16), 1))  # dtype of the same width and kind
    weak = jnp.asarray(0.1)  # a Python float's: weakly typed
    strong = jnp.asarray(0.1, weak.dtype)
    assert (weak.weak_type, strong.weak_type, weak.dtype) == (True, False, strong.dtype)
    assert sig((weak,)) != sig((strong,)) and sig((weak,)) == sig((jnp.asarray(0.2),))
    assert sig((a, 1)) != sig((a, 2))  # a static value
    assert sig(({"w": a},)) != sig(({"v": a},))  # structure
    assert sig((np.ones((2, 3), np.float32),)) == sig((np.zeros((2, 3), np.float32),))
    unhashable = {1}  # a set is a leaf that cannot be hashed: keyed by identity
    assert sig((unhashable,)) == sig((unhashable,)) != sig(({1},))


def test_compile_then_release_passes_other_attributes_through():
    @jax.jit
    def f(x):
        return x + 1

    f.num_devices = 4  # as parallel.make_parallel_train_step's function carries its mesh size
    step = heap.compile_then_release(f)
    assert step.num_devices == 4 and step.__name__ == "f"
    with pytest.raises(AttributeError):
        step.no_such_attribute


def test_compile_then_release_refuses_a_plain_function():
    with pytest.raises(TypeError, match="jitted function"):
        heap.compile_then_release(lambda x: x)


def test_training_loop_releases_after_setup_and_each_compile(tmp_path, monkeypatch):
    """`loop.train`: the step is a CompileThenRelease with one program; memory released after setup and compiles."""
    real = heap.release_free_memory
    calls = {"n": 0}

    def counted():
        calls["n"] += 1
        return real()

    monkeypatch.setattr(heap, "release_free_memory", counted)
    seen = []
    npz = write_digits_npz(tmp_path / "digits4.npz", 4)
    summary = loop.train(tiny_config(f"npz:{npz}"), tmp_path / "run", step_fn_wrapper=lambda f: seen.append(f) or f)
    assert isinstance(seen[0], heap.CompileThenRelease)
    assert len(seen[0].compiled_signatures) == 1  # 48 images, batch 16: one batch shape
    assert calls["n"] >= 2  # after building, after the step's compile (and the evaluation's, if not compiled yet)
    assert summary["steps"] > 0
