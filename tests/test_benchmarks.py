"""Smoke tests of the benchmark scripts: each runs on a tiny setting and prints valid JSON.

The scripts run as users run them (`python -m benchmarks.<name>` in a child process),
on the "tiny" setting (ResNet8 -> tiny VGG, 32 px, batch 2, T = 1, one timed
iteration) with the repository's persistent compilation cache, so reruns are quick.
Only the shape of the output and the sanity of the numbers are checked here; the
real figures come from full runs on a quiet machine.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` from the checkout, however pytest was started
    sys.path.insert(0, str(REPO))
CACHE = str(REPO / ".jax_cache")
TINY = ["--setting", "tiny", "--batch", "2", "--T", "1", "--iters", "1"]


def _run(module: str, *args: str, timeout: float = 600) -> tuple[list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=str(REPO), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return records, proc.stdout


def _positive(record: dict, *keys: str) -> None:
    for k in keys:
        v = record[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{k} = {v!r}"


def test_settings_match_the_paper():
    from benchmarks.common import SETTINGS
    from l2t_jax.transfer import resolve_pairs

    stl, cub = SETTINGS["stl10"], SETTINGS["cub200"]
    assert (stl.source, stl.source_classes, stl.target, stl.target_classes, stl.image_size, stl.batch) == (
        "resnet32", 200, "vgg9_bn", 10, 32, 128)
    assert (cub.source, cub.source_classes, cub.target, cub.target_classes, cub.image_size, cub.batch) == (
        "resnet34", 1000, "resnet18", 200, 224, 64)
    stl_pairs = resolve_pairs(stl.pairs, stl.source, stl.target, stl.image_size)
    assert set(stl_pairs) == {(m, n) for m in (4, 9, 14) for n in range(5)}
    cub_pairs = resolve_pairs(cub.pairs, cub.source, cub.target, cub.image_size)
    assert set(cub_pairs) == {(m, n) for m in range(1, 5) for n in range(1, 5)}


def test_train_step_with_torch_comparison():
    pytest.importorskip("torch", reason="--compare_torch needs PyTorch (pip install -e .[torch])")
    records, _ = _run("benchmarks.train_step", *TINY, "--compare_torch", "--torch_threads", "1",
                      "--compilation_cache", CACHE)
    assert len(records) == 1, "train_step must print exactly one JSON line"
    r = records[0]
    for k in ("setting", "batch", "T", "remat", "iters", "device", "jax", "compile_s", "first_call_s",
              "max_rss_gb", "xla_temp_gb", "torch_device", "torch_mode"):
        assert k in r, k
    assert (r["setting"], r["batch"], r["T"], r["remat"], r["iters"]) == ("tiny", 2, 1, False, 1)
    _positive(r, "iter_s_median", "plain_step_s_median", "ratio_iter_to_plain", "peak_mem_gb",
              "torch_iter_s_median", "torch_plain_step_s_median", "speedup_vs_torch",
              "iter_user_s_per_call", "torch_iter_user_s_per_call")
    assert r["iter_minor_faults_per_call"] >= 0 and r["torch_iter_sys_s_per_call"] >= 0
    assert r["compile_s"] >= 0 and r["first_call_s"] >= r["compile_s"]
    assert len(r["iter_s_all"]) == 1
    assert math.isfinite(r["last_outer_loss"]) and math.isfinite(r["last_loss"])
    assert r["speedup_vs_torch"] == pytest.approx(r["torch_iter_s_median"] / r["iter_s_median"], rel=1e-2)


def test_train_step_memory_only_compiles_without_running():
    """--memory_only: XLA's memory analysis of the compiled iteration, no timing fields; remat needs fewer temporaries."""
    base = ["--setting", "tiny", "--batch", "4", "--T", "2", "--memory_only", "--compilation_cache", CACHE]
    (plain,), _ = _run("benchmarks.train_step", *base)
    (remat,), _ = _run("benchmarks.train_step", *base, "--remat")
    assert plain["memory_only"] and "iter_s_median" not in plain and "peak_mem_gb" not in plain
    _positive(plain, "xla_temp_gb", "xla_argument_gb", "xla_output_gb")
    assert (plain["remat"], remat["remat"], plain["T"]) == (False, True, 2)
    assert remat["xla_temp_gb"] < plain["xla_temp_gb"]


def test_unroll_memory_table():
    records, stdout = _run("benchmarks.unroll_memory", "--setting", "tiny", "--batch", "2", "--Ts", "1",
                           "--remat_modes", "off,on,loop,mixed", "--iters", "1", "--compilation_cache", CACHE)
    assert [(r["T"], r["mode"], r["remat"], r["unroll"]) for r in records] == [
        (1, "off", False, True), (1, "on", True, False), (1, "loop", False, False), (1, "mixed", False, False)]
    for r in records:
        assert "error" not in r, r
        _positive(r, "iter_s_median", "peak_mem_gb", "child_max_rss_gb")
        assert r["xla_temp_gb"] is not None and r["xla_temp_gb"] >= 0
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(records)


def test_unroll_memory_times_the_torch_twin_beside_jax_and_resumes(tmp_path):
    """Mode "torch" puts the PyTorch twin in the same table; --out keeps finished rows for a rerun."""
    pytest.importorskip("torch", reason="mode torch needs PyTorch (pip install -e .[torch])")
    out = tmp_path / "table.json"
    args = ("--setting", "tiny", "--batch", "2", "--Ts", "1", "--remat_modes", "off,torch", "--iters", "1",
            "--torch_threads", "1", "--compilation_cache", CACHE, "--out", str(out))
    records, stdout = _run("benchmarks.unroll_memory", *args)
    assert [(r["T"], r["mode"]) for r in records] == [(1, "off"), (1, "torch")]
    jax_row, torch_row = json.loads(out.read_text())["rows"]
    _positive(torch_row, "iter_s_median", "peak_mem_gb", "child_max_rss_gb")
    assert torch_row["torch_mode"] == "adjoint" and torch_row["xla_temp_gb"] is None
    assert jax_row["speedup_vs_torch"] == pytest.approx(torch_row["iter_s_median"] / jax_row["iter_s_median"], rel=1e-2)
    assert jax_row["peak_vs_torch"] == pytest.approx(jax_row["peak_mem_gb"] / torch_row["peak_mem_gb"], rel=1e-2)
    assert "PyTorch" in stdout
    # the rerun measures nothing again: same rows, same times
    proc = subprocess.run([sys.executable, "-m", "benchmarks.unroll_memory", *args],
                          cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("kept from") == 2
    again = json.loads(out.read_text())["rows"]
    assert [r["iter_s_all"] for r in again] == [jax_row["iter_s_all"], torch_row["iter_s_all"]]


def test_plain_step_variants_beside_torch(tmp_path):
    """Each lowering variant in its own child; the same weights and batch, so the same first loss."""
    pytest.importorskip("torch", reason="--compare_torch needs PyTorch (pip install -e .[torch])")
    out = tmp_path / "plain.json"
    records, stdout = _run("benchmarks.plain_step", "--setting", "tiny", "--batch", "4", "--iters", "2",
                           "--variants", "default,xla_conv", "--compare_torch", "--torch_threads", "1",
                           "--allocators", "default,arena", "--compilation_cache", CACHE, "--out", str(out))
    assert [(r["variant"], r["allocator"]) for r in records] == [
        (v, a) for a in ("default", "arena") for v in ("default", "xla_conv", "torch")]
    default, xla, torch_row, arena_default, _, arena_torch = records
    for r in records:
        assert "error" not in r, r
        _positive(r, "step_s_median", "peak_mem_gb")
        # a tiny step can take less CPU than the kernel's accounting resolves: >= 0 only here
        assert r["user_s_per_call"] >= 0 and r["sys_s_per_call"] >= 0 and r["minor_faults_per_call"] >= 0
        # the allocator setting reached the child (JAX's and PyTorch's alike)
        assert r["child_glibc_tunables"] == r["glibc_tunables"]
        assert (r["glibc_tunables"] != "") == (r["allocator"] == "arena")
    assert (default["conv_impl"], xla["conv_impl"]) == ("auto", "xla")
    # two lowerings of the same convolutions: the same loss up to float32 rounding
    assert xla["loss_rel_diff"] < 1e-5 and default["loss_rel_diff"] == 0.0
    assert xla["speedup_vs_torch"] == pytest.approx(torch_row["step_s_median"] / xla["step_s_median"], rel=1e-2)
    # ratios compare rows of the same allocator setting; the allocator's own effect is a separate ratio
    assert arena_default["speedup_vs_torch"] == pytest.approx(
        arena_torch["step_s_median"] / arena_default["step_s_median"], rel=1e-2)
    assert arena_default["time_vs_default_allocator"] == pytest.approx(
        arena_default["step_s_median"] / default["step_s_median"], rel=1e-2)
    assert arena_default["first_loss"] == default["first_loss"]  # the allocator changes no number
    assert json.loads(out.read_text())["rows"] == records
    assert len([line for line in stdout.splitlines() if line.startswith("|")]) == 2 + len(records)


def test_torch_twin_computes_the_same_iteration_as_l2t_jax():
    """The PyTorch baseline is a like-for-like comparison: float64, same initial state, same results."""
    pytest.importorskip("torch", reason="the PyTorch twin needs PyTorch (pip install -e .[torch])")
    import os

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    proc = subprocess.run(
        # batch 3, T 2, two iterations (momentum carried over). Not batch 2: the tiny VGG's last
        # maps are 1x1, where BN over two samples outputs ±1 whatever its input, and the
        # meta-gradient becomes a cancellation at rounding level (rel. differences 1e-9 to 1e-5).
        [sys.executable, "-m", "benchmarks.torch_reference", "--crosscheck", "--setting", "tiny", "--batch", "3",
         "--T", "2", "--iters", "2", "--threads", "1"],
        cwd=str(REPO), capture_output=True, text=True, timeout=600, env=env,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, proc.stderr[-4000:]
    r = records[0]
    assert r["ok"] and proc.returncode == 0, r
    for mode in ("adjoint", "unroll"):  # the reference's MetaSGD adjoint and the create_graph unroll
        assert max(r[mode]["meta_grad_norm_rel_diff"]) < 1e-9, r
        assert r[mode]["phi_max_rel_diff"] < 1e-9 and r[mode]["theta_max_rel_diff"] < 1e-9, r


def test_cpu_usage_counts_cpu_time_and_fresh_page_faults():
    """CpuUsage against what the block did: 0.3 s of busy loop, then 64 MiB of fresh pages touched."""
    import mmap
    import time

    from benchmarks.common import CpuUsage

    with CpuUsage() as busy:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:
            pass
    assert busy.user_s + busy.sys_s >= 0.25
    n = 64 << 20
    with CpuUsage() as fresh:
        m = mmap.mmap(-1, n)  # anonymous: every page is faulted in on its first write
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages even where the kernel's THP mode is "always"
        for off in range(0, n, 4096):
            m[off] = 1
        m.close()
    assert fresh.minor_faults >= 0.9 * n / 4096  # one fault per 4 KiB page
    per = fresh.per_call(2, prefix="x_")
    assert per["x_minor_faults_per_call"] == round(fresh.minor_faults / 2)


def test_conv_layers_times_each_convolution_beside_torch_on_the_same_work():
    """Per conv shape: each lowering and PyTorch compute the same gradients; GFLOP from the shapes
    (three products, 2 flops per multiply-add, batch 2)."""
    pytest.importorskip("torch", reason="--compare_torch needs PyTorch (pip install -e .[torch])")
    records, stdout = _run("benchmarks.conv_layers", "--model", "tiny", "--batch", "2", "--iters", "2",
                           "--impls", "im2col,xla", "--compare_torch", "--torch_threads", "1")
    assert [(r["cin"], r["cout"], r["size"], r["stride"]) for r in records] == [(3, 8, 8, 1), (8, 16, 4, 2)]
    for r in records:
        out = (r["size"] - 1) // r["stride"] + 1  # 3x3, padding 1
        assert r["gflop"] == pytest.approx(3 * 2 * 2 * out * out * 9 * r["cin"] * r["cout"] / 1e9, rel=1e-3)
        for col in ("im2col", "xla", "torch", "im2col_patches", "im2col_matmuls"):
            assert r[col]["ms"] > 0 and r[col]["minor_faults"] >= 0, (col, r)
        # three implementations of one convolution's backward agree to float32 rounding
        assert r["im2col"]["grad_rel_diff"] == 0.0
        assert r["xla"]["grad_rel_diff"] < 1e-5 and r["torch"]["grad_rel_diff"] < 1e-5
    assert len([line for line in stdout.splitlines() if line.startswith("|")]) == 2 + len(records)


def test_profile_step_splits_the_plain_step_by_kind_of_operation():
    from benchmarks.profile_step import kind

    # names XLA CPU gives its operations (jax 0.10 trace events)
    assert kind("ynn_fusion.20") == kind("dot.3") == "matmul"
    assert kind("concatenate.2") == kind("pad_slice_fusion.7") == "patches"
    assert kind("add_bitcast_fusion") == kind("multiply_reduce_fusion.1") == "other"
    records, _ = _run("benchmarks.profile_step", "--setting", "tiny", "--batch", "4", "--iters", "2")
    r = records[-1]
    _positive(r, "step_s_median", "op_ms_total")
    assert r["user_s_per_call"] >= 0
    assert r["op_ms_by_kind"]["matmul"] > 0  # the convolutions' matmuls were traced
    assert sum(r["op_ms_by_kind"].values()) == pytest.approx(r["op_ms_total"], abs=0.5)
    assert all(t > 0 and k == kind(n) for n, t, k in r["top_ops_ms"])


def test_compile_cost_first_run_cached_rerun_and_torch(tmp_path):
    """compile_cost: a first run fills its own cache, the rerun loads from it and never reaches the compiler's peak."""
    pytest.importorskip("torch", reason="the torch row needs PyTorch (pip install -e .[torch])")
    out = tmp_path / "compile.json"
    records, stdout = _run("benchmarks.compile_cost", "--setting", "tiny", "--batch", "2", "--T", "1", "--modes", "mixed",
                           "--heaps", "keep", "--iters", "1", "--torch_threads", "1", "--out", str(out))
    # "keep" (the default, "release", is every other train_step test's): the child reports the setting it ran,
    # and the CPU scheduler "auto" resolved for mixed mode (l2t_jax.xla_flags)
    # and the convolution "auto" resolved for mixed mode (layers.conv_impl_for)
    assert [(r["mode"], r["heap"], r["scheduler"], r["conv_impl"], r["run"]) for r in records] == [
        ("mixed", "keep", "memory", "im2col_loop", "first"), ("mixed", "keep", "memory", "im2col_loop", "cached"),
        ("torch", "-", "-", "-", "-")]
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        assert "error" not in r, r
        _positive(r, "max_rss_gb", "peak_mem_gb", "iter_s_median", "first_call_s")
        assert r["max_rss_vs_torch"] == pytest.approx(r["max_rss_gb"] / rows[-1]["max_rss_gb"], abs=0.01)
    first, cached, _ = rows
    assert cached["max_rss_gb"] < 0.75 * first["max_rss_gb"]  # measured 0.59 against 1.51 GB
    assert first["xla_temp_gb"] == cached["xla_temp_gb"]  # the same program
    assert len([line for line in stdout.splitlines() if line.startswith("|")]) == 2 + 3


def test_runner_peak_first_run_and_cached_rerun(tmp_path):
    """runner_peak: two whole experiments.run children, the second on the first's compilation cache."""
    from conftest import tiny_config, write_config_file, write_digits_npz

    npz = write_digits_npz(tmp_path / "digits4.npz", 4)
    config = write_config_file(tmp_path / "tiny.py", tiny_config(f"npz:{npz}", epochs=1))
    out = tmp_path / "peak.json"
    records, stdout = _run("benchmarks.runner_peak", "--label", "here", "--out", str(out), "--",
                           f"--config={config}")
    assert [(r["label"], r["run"]) for r in records] == [("here", "first"), ("here", "cached")]
    for r in records:
        assert "error" not in r, r
        _positive(r, "max_rss_gb", "wall_s", "steps")
    assert json.loads(out.read_text())["rows"] == records
    assert len([line for line in stdout.splitlines() if line.startswith("|")]) == 2 + 2


@pytest.mark.parametrize("args, message", [
    ((), "give experiments.run's arguments after --"),
    (("--", "--config=x.py", "--workdir=/tmp/w"), "set by this benchmark"),
])
def test_runner_peak_refuses_bad_arguments(args, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runner_peak", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_step_overhead_times_the_wrapper_beside_jit_dispatch(tmp_path):
    out = tmp_path / "o.json"
    records, _ = _run("benchmarks.step_overhead", "--setting", "tiny", "--batch", "2", "--T", "1", "--calls", "20",
                      "--repeats", "2", "--out", str(out))
    r = records[-1]
    assert json.loads(out.read_text()) == r
    _positive(r, "argument_leaves", "jit_call_ms", "wrapped_call_ms", "signature_ms")
    assert (r["setting"], r["batch"], r["T"], r["calls"]) == ("tiny", 2, 1, 20)
    assert r["overhead_ms"] == pytest.approx(r["wrapped_call_ms"] - r["jit_call_ms"], abs=2e-4)



def test_meta_phases_hvp_and_cross_phases_compute_what_the_lookahead_needs():
    """meta_phases' "hvp" phase is vᵀ∇²L (θ and the stand-in φ') in either mode; its "cross" phase in
    mixed mode keeps φ's part and zeroes θ's, as the look-ahead's first step does. Expectations from
    the jvp of jax.grad of the same loss, written here (independent of the benchmark and of bilevel's modes)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import meta_phases, train_step
    from l2t_jax import bilevel, transfer

    got = {}
    for mode in ("mixed", "reverse"):
        args = meta_phases.parse_args(["--setting", "tiny", "--batch", "2", "--hvp", mode, "--conv_impl", "im2col"])
        s, cfg, models, state, source_vars, x, y, _, _ = train_step.build(args)
        fns = meta_phases.phase_functions(cfg, models, state, source_vars, x, y, jnp.asarray(0.1))
        got[mode] = {k: jax.jit(fns[k][0])(*fns[k][1]) for k in ("hvp", "cross")}
        params, scale, bs, xb, yb, v = fns["hvp"][1]

    def loss(p, m):
        logits, _, _ = bilevel.target_forward(models.target, p, bs, xb)
        return transfer.cross_entropy(logits * m, yb)

    # d/dε ∇_(θ, m) L at (θ + εv, m): the rows of the Hessian the look-ahead's backward pass needs
    _, (want_t, want_m) = jax.jvp(lambda p: jax.grad(loss, argnums=(0, 1))(p, scale), (params,), (v,))
    close = functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=2e-4)
    for mode in ("mixed", "reverse"):
        jax.tree.map(close, got[mode]["hvp"][0], want_t)
        close(got[mode]["hvp"][1], want_m)
        close(got[mode]["cross"][1], want_m)
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0), got["mixed"]["cross"][0])


def test_meta_phases_times_each_phase(tmp_path):
    out = tmp_path / "phases.json"
    records, _ = _run("benchmarks.meta_phases", "--setting", "tiny", "--batch", "2", "--T", "1", "--iters", "1",
                      "--phases", "forward,plain,cross,real_step,lookahead,meta_gradient", "--out", str(out))
    r = records[-1]
    assert json.loads(out.read_text()) == r
    assert list(r["phases"]) == ["forward", "plain", "cross", "real_step", "lookahead", "meta_gradient"]
    for rec in r["phases"].values():
        _positive(rec, "s_median", "s_per_forward", "s_per_plain")
    assert r["phases"]["forward"]["s_per_forward"] == 1.0 and r["phases"]["plain"]["s_per_plain"] == 1.0
    assert r["meta_backward_s"] == pytest.approx(
        r["phases"]["meta_gradient"]["s_median"] - r["phases"]["lookahead"]["s_median"], abs=2e-4)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.meta_phases", "--phases", "forward,nope"],
                         cwd=str(REPO), capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_meta_phases_counts_flops_only_in_loop_free_programs():
    """XLA's cost analysis counts a loop's body once; meta_phases refuses such a count rather than report it short."""
    import jax
    import jax.numpy as jnp

    from benchmarks.meta_phases import _flops

    a = jnp.ones((1024, 1024), jnp.float32)
    b = jnp.ones((1024, 512), jnp.float32)
    assert _flops(jax.jit(jnp.matmul).lower(a, b).compile()) == pytest.approx(2 * 1024 * 1024 * 512 / 1e9, rel=1e-3)
    looped = jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, c: jnp.tanh(c @ b[:512]), x[:, :512]))
    assert _flops(looped.lower(a).compile()) is None
