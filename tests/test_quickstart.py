"""The offline quickstart driver, shortened (1-2 epochs, two methods), through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_quickstart_cli_runs_offline_and_prints_the_table(tmp_path):
    env = {**os.environ, "L2T_SHARED": str(tmp_path / "no-shared-here")}  # needs nothing from ../shared
    cmd = [
        sys.executable, "-m", "experiments.run", "--config=experiments/configs/quickstart.py",
        f"--workdir={tmp_path / 'qs'}", f"--compilation_cache={REPO / '.jax_cache'}",
        "--config.source.epochs=2", "--config.target.epochs=2", "--config.methods=scratch,fm",
        "--config.source.progress_bar=False", "--config.target.progress_bar=False",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "| method | pairs | best val acc | test acc @ best val | last-epoch test acc | time (s) |" in p.stdout
    assert "| scratch | - |" in p.stdout and "| fm | one_to_one |" in p.stdout
    qs = tmp_path / "qs"
    assert (qs / "results.md").read_text().count("\n| ") >= 3
    results = json.loads((qs / "results.json").read_text())
    assert [r["method"] for r in results["targets"]] == ["scratch", "fm"]
    fm = json.loads((qs / "fm" / "summary.json").read_text())
    assert fm["config"]["source_weights"] == str(qs / "source" / "best_weights.msgpack")
    assert fm["config"]["n_per_class"] == 10 and fm["config"]["classes"] == "5-9"
    src = json.loads((qs / "source" / "summary.json").read_text())
    assert src["method"] == "scratch" and src["config"]["classes"] == "0-4"

    # rerunning the finished quickstart changes no file (contents and modification times)
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in qs.rglob("*") if f.is_file()}
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    after = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in qs.rglob("*") if f.is_file()}
    assert after == before, sorted(str(f) for f in set(before) ^ set(after) | {f for f in before if before[f] != after.get(f)})
