"""Tests of l2t_jax.xla_flags: XLA CPU's scheduler, chosen in XLA_FLAGS before JAX starts.

What the choice does to the training step's memory and time is measured by
`benchmarks.compile_cost --cpu_schedulers` (results/benchmarks/README.md, "The CPU
scheduler"). Here: the flag string, "auto" per hvp mode, the refusal once a backend
runs, and in child processes (XLA reads its flags once per process) that the flag
reaches XLA's compiler and changes no number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2t_jax import xla_flags

CHILD = Path(__file__).with_name("_scheduler_child.py")
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def test_auto_takes_depth_first_order_in_mixed_mode_only():
    assert xla_flags.cpu_scheduler_for("mixed") == "memory"
    assert xla_flags.cpu_scheduler_for("reverse") == "concurrency"
    assert xla_flags.cpu_scheduler_for("reverse", "memory") == "memory"
    assert xla_flags.cpu_scheduler_for("mixed", "concurrency") == "concurrency"
    with pytest.raises(ValueError, match="unknown CPU scheduler 'fast'"):
        xla_flags.cpu_scheduler_for("mixed", "fast")


def test_the_flag_replaces_an_earlier_setting_and_keeps_the_others():
    other = "--xla_force_host_platform_device_count=4"
    assert xla_flags.with_cpu_scheduler("", "memory") == f"{FLAG}=false"
    assert xla_flags.with_cpu_scheduler(f"{other} {FLAG}=true", "memory") == f"{other} {FLAG}=false"
    assert xla_flags.with_cpu_scheduler(f"{FLAG}=false {other}", "concurrency") == other  # XLA's default: no flag
    with pytest.raises(ValueError):
        xla_flags.with_cpu_scheduler("", "auto")


def test_use_cpu_scheduler_refuses_once_a_backend_runs(monkeypatch):
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    monkeypatch.setattr(xla_flags, "backends_started", lambda: False)
    assert xla_flags.use_cpu_scheduler("memory", env) == f"--xla_dump_to=/tmp/d {FLAG}=false"
    assert env["XLA_FLAGS"].endswith(f"{FLAG}=false")
    monkeypatch.setattr(xla_flags, "backends_started", lambda: True)
    xla_flags.use_cpu_scheduler("memory", env)  # already so: nothing to change, no refusal
    with pytest.raises(RuntimeError, match="before JAX starts a backend"):
        xla_flags.use_cpu_scheduler("concurrency", env)
    assert env["XLA_FLAGS"].endswith(f"{FLAG}=false")  # unchanged by the refusal


def test_choose_cpu_scheduler_resolves_then_sets(monkeypatch):
    monkeypatch.setattr(xla_flags, "backends_started", lambda: False)
    env = {}
    assert xla_flags.choose_cpu_scheduler("mixed", environ=env) == "memory"
    assert env["XLA_FLAGS"] == f"{FLAG}=false"
    assert xla_flags.choose_cpu_scheduler("mixed", "concurrency", env) == "concurrency"
    assert env["XLA_FLAGS"] == ""
    with pytest.raises(ValueError, match="unknown CPU scheduler"):
        xla_flags.choose_cpu_scheduler("reverse", "fast", env)


def _child(which: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, str(CHILD), which], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_flag_reaches_xla_and_changes_no_number():
    memory, concurrency, late = _child("memory"), _child("concurrency"), _child("late")
    assert memory["xla_flags"] == f"{FLAG}=false" and concurrency["xla_flags"] == ""
    # eight independent branches: breadth-first order holds all eight 256 KB products, depth-first far fewer
    assert memory["branchy_temp_bytes"] * 2 <= concurrency["branchy_temp_bytes"], (memory, concurrency)
    assert memory["digest"] == concurrency["digest"]  # two mixed-mode steps, bit for bit
    assert "before JAX starts a backend" in late["refused"] and late["xla_flags"] == ""
