"""Data parallelism (`l2t_jax.parallel`): several devices and several processes.

The pytest process has one CPU device (JAX fixes the count when it is imported), so
the multi-device runs happen in subprocesses (tests/_parallel_worker.py) with
`--xla_force_host_platform_device_count`; they print a JSON line and write their
end states to .npz files that the tests compare. Tiny VGGs, float64, 3 full steps
(real step, unrolled meta step with T=1, Adam on φ), global batch 8.

* 4 devices, bn="sync": θ, BN statistics, momentum, φ and Adam's state equal those of
  the plain single-device `bilevel.make_train_step` on the same global batches.
* 4 devices, bn="local": equal to one device running the same step with "ghost"
  batch norm over 4 groups (per-group BN, written without collectives), so the
  pmean'd gradients of every SGD step, the outer loss and the meta-gradient through
  them are exact; the real step equals SGD on the mean of the 4 per-shard gradients.
* both modes: every device's copy of the state is bitwise identical.
* 2 processes x 2 CPU devices on 127.0.0.1 (`jax.distributed` + gloo): both modes end
  where the single-process references end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from l2t_jax import bilevel, parallel

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_parallel_worker.py")
TOL = 1e-10  # float64; summation order differs between one and several devices


def _env(cache: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                     "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if cache:
        env["L2T_JAX_CACHE"] = str(REPO / ".jax_cache")
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, "worker printed no RESULT line"
    return json.loads(lines[-1][len("RESULT "):])


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """One subprocess with 4 CPU devices: the checks' numbers and the reference end states."""
    out = tmp_path_factory.mktemp("parallel") / "reference.npz"
    proc = subprocess.run([sys.executable, str(WORKER), "devices", "4", str(out)], capture_output=True,
                          text=True, timeout=900, env=_env(cache=True), cwd=REPO)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    return _result(proc.stdout), out


def test_sync_bn_four_devices_equal_one_device(four_devices):
    r, _ = four_devices
    assert r["device_count"] == 4
    assert r["sync_vs_one_device"] < TOL, r
    assert r["sync_metrics_vs_one_device"] < TOL, r
    assert r["sync_num_batches_tracked"] == 6  # two BN updates per iteration, as the reference
    assert r["sync_mixed_hvp_vs_one_device"] < TOL, r  # hvp="mixed" (a custom VJP) under shard_map
    assert r["sync_replicas_identical"]


def test_local_bn_is_exact_per_device_statistics(four_devices):
    r, _ = four_devices
    assert r["local_vs_ghost"] < TOL, r
    assert r["local_metrics_vs_ghost"] < TOL, r
    assert r["local_real_step_vs_per_shard_mean"] < TOL, r
    assert r["local_replicas_identical"]
    assert r["local_num_batches_tracked"] == 6
    # not vacuous: per-device statistics do change the result
    assert r["local_vs_sync"] > 1e-4, r
    assert r["sync_real_step_vs_per_shard_mean"] > 1e-4, r


def test_indivisible_global_batch_is_a_clear_error(four_devices):
    r, _ = four_devices
    assert r["indivisible_error"] and "not divisible by the number of devices 4" in r["indivisible_error"]


def test_runner_data_parallel_equals_one_device(tmp_path):
    """`--config.data_parallel=sync` on 4 devices trains as one device does (float32: the
    batch sums are split over devices), and a batch that does not divide is refused."""
    proc = subprocess.run([sys.executable, str(WORKER), "runner", "4", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env=_env(cache=True), cwd=REPO)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    r = _result(proc.stdout)
    assert r["devices"] == 4
    assert r["single"]["step_devices"] == [1] and r["sync"]["step_devices"] == [4]
    single, sync = r["single"]["train"], r["sync"]["train"]
    assert len(single) == len(sync) == 6  # 2 epochs x 3 steps, a line per step
    for a, b in zip(single, sync):
        assert a["step"] == b["step"]
        for k in ("loss", "ce", "wfm", "outer_loss"):
            assert b[k] == pytest.approx(a[k], rel=2e-4, abs=1e-6), (a["step"], k, a[k], b[k])
    assert abs(r["sync"]["last_test_acc"] - r["single"]["last_test_acc"]) <= 100 / 32 + 1e-6  # one image at most
    assert r["error"] and "batch_size=6" in r["error"] and "4 devices" in r["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_err(a: dict, b: dict, mode: str, ref: str) -> float:
    """Largest relative error over the saved leaves, each part (params, momentum, ...) its own scale."""
    groups: dict = {}
    for key in b.files:
        if key.startswith(ref + "["):
            groups.setdefault(key[len(ref):].split("]")[0], []).append(key[len(ref):])
    worst = 0.0
    for suffixes in groups.values():
        refs = [np.asarray(b[ref + s], np.float64) for s in suffixes]
        big = max([float(np.abs(v).max()) for v in refs if v.size] + [1e-300])
        for s, v in zip(suffixes, refs):
            u = np.asarray(a[mode + s], np.float64)
            assert u.shape == v.shape, s
            if v.size:
                worst = max(worst, float(np.abs(u - v).max()) / max(float(np.abs(v).max()), 1e-3 * big))
    return worst


def test_two_processes_equal_one_process(four_devices, tmp_path):
    """2 processes x 2 CPU devices (global mesh of 4) == one process, for both BN modes."""
    _, reference = four_devices
    port = _free_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), "process", str(i), "2", str(port), str(outs[i]), "2"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(cache=False), cwd=REPO))
        deadline = time.monotonic() + 600
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
            except subprocess.TimeoutExpired:
                pytest.fail("two-process run timed out")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, _tail(log)
    results = [_result(log) for log in logs]
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["global_devices"] == 4 and r["local_devices"] == 2 for r in results)
    a, b = (np.load(o) for o in outs)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:  # both processes hold the same replicated state
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ref = np.load(reference)
    assert _group_err(a, ref, "sync", "plain") < TOL
    assert _group_err(a, ref, "local", "ghost") < TOL
    assert _group_err(a, ref, "sync_metrics", "plain_metrics") < TOL
    assert _group_err(a, ref, "local_metrics", "ghost_metrics") < TOL


# --------------------------------------------------------------------------- in-process (one device)


def test_api_errors_and_single_process_defaults(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False  # no cluster: a no-op
    assert parallel.initialize_distributed(num_processes=1) is False
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == 1
    cfg = bilevel.BilevelConfig()
    with pytest.raises(ValueError, match="bn mode"):
        parallel.make_parallel_train_step(bilevel.Models(None, None), cfg, mesh, bn="ghost")
    with pytest.raises(ValueError, match="no axis"):
        parallel.make_parallel_train_step(bilevel.Models(None, None), cfg, mesh, axis_name="batch")
    x, y = parallel.shard_batch(mesh, np.zeros((3, 2)), np.arange(3))
    assert x.shape == (3, 2) and y.shape == (3,)
    assert parallel.process_rows(mesh, 6) == slice(0, 6)
    tree = parallel.replicate(mesh, {"a": np.ones(2), "b": 0.5})
    assert parallel.fetch_replicated(tree)["b"] == 0.5
