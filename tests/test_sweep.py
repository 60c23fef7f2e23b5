"""Tests of experiments.sweep: cell names, commands, skipping, a real tiny sweep, resuming, signals.

The real cells are tiny scratch runs (8 px digits, vgg_tiny, batch 16) that share their
XLA compilations through the persistent cache (--compilation_cache).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, write_digits_npz
from experiments import sweep

CACHE = str(REPO / ".jax_cache")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A config file for tiny scratch runs on digits 0-3 at 8 px (16 train + 8 test images per class)."""
    folder = tmp_path_factory.mktemp("sweep_cfg")
    write_digits_npz(folder / "digits4.npz")
    path = folder / "tiny.py"
    path.write_text(
        "from l2t_jax.run_config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.dataset = 'npz:{folder / 'digits4.npz'}'\n    c.image_size = 8\n    c.val_fraction = 0.25\n"
        "    c.batch_size = 16\n    c.epochs = 2\n    c.target_model = 'vgg_tiny'\n    c.source_model = 'vgg_tiny'\n"
        "    c.method = 'scratch'\n    c.pairs = '1-1'\n    c.eval_batch_size = 16\n    c.log_every = 2\n"
        "    c.num_workers = 1\n    c.progress_bar = False\n    return c\n"
    )
    return path


def _sweep(*args, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.sweep", f"--compilation_cache={CACHE}", *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _record(root: Path) -> dict:
    return json.loads((root / "sweep.json").read_text())


# --------------------------------------------------------------------------- the grid


def test_axes_cells_and_names():
    assert sweep.parse_axis("method=scratch,fm_one_to_one,l2t_ww") == ("method", ["scratch", "fm_one_to_one", "l2t_ww"])
    assert sweep.parse_axis("config.seed=0,1") == ("seed", ["0", "1"])
    assert sweep.parse_axis("pairs=1-1,2-2;3-3") == ("pairs", ["1-1,2-2", "3-3"])
    for bad in ("seed", "=1,2", "seed=0,,1", "seed=0,0", "a b=1"):
        with pytest.raises(ValueError):
            sweep.parse_axis(bad)
    cells = sweep.grid_cells([("method", ["scratch", "l2t_ww"]), ("seed", ["0", "1", "2"]),
                              ("n_per_class", ["25", "50"])])
    assert len(cells) == 12 and cells[0] == {"method": "scratch", "seed": "0", "n_per_class": "25"}
    assert cells[1] == {"method": "scratch", "seed": "0", "n_per_class": "50"}  # the last axis varies fastest
    name = sweep.cell_name({"method": "l2t_ww", "seed": "0", "n_per_class": "50"})
    assert name == "method=l2t_ww/n_per_class=50/seed=0"
    # unsafe characters are replaced and a hash keeps the names distinct; long values are shortened
    a = sweep.cell_name({"source_weights": "/w/a b.pth"})
    b = sweep.cell_name({"source_weights": "/w/a_b.pth"})
    assert a != b and "/" not in a and " " not in a and a.startswith("source_weights=_w_a_b.pth-")
    assert b.startswith("source_weights=_w_a_b.pth-")
    assert len(sweep.cell_name({"k": "x" * 500})) <= 120
    assert sweep.cell_name({"pairs": "1-1,2-2"}) == "pairs=1-1,2-2"
    with pytest.raises(ValueError):
        sweep.grid_cells([("seed", ["0"]), ("seed", ["1"])])


def test_dry_run_commands_and_finished_cells(config_file, tmp_path, capsys):
    root = tmp_path / "root"
    done = root / "method=fm/n_per_class=25/seed=1"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    rc = sweep.main([f"--config={config_file}", f"--workdir={root}", "--grid", "method=scratch,fm",
                     "--grid", "seed=0,1", "--grid=n_per_class=25", "--config.epochs=7", "--config.pairs=0-0,1-1",
                     "--dry_run", "--devices=0,1"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = [line for line in lines if not line.startswith("# ") or line.startswith("# finished")]
    assert len(cmds) == 4 and lines[-1].startswith("# 4 cell(s), 1 finished; devices 0,1")
    first = shlex.split(cmds[0])
    assert first == [sys.executable, "-m", "experiments.run", f"--config={config_file}", "--config.epochs=7",
                     "--config.pairs=0-0,1-1", "--config.method=scratch", "--config.seed=0", "--config.n_per_class=25",
                     f"--workdir={root / 'method=scratch/n_per_class=25/seed=0'}"]
    assert cmds[3].startswith("# finished, skipped: ") and cmds[3].endswith(f"--workdir={done}")
    assert not (root / "sweep.json").exists()  # a dry run writes nothing


def test_bad_arguments(config_file, tmp_path, capsys):
    base = [f"--config={config_file}", f"--workdir={tmp_path / 'r'}"]
    assert sweep.main(base + ["--grid", "no_such_key=1,2", "--dry_run"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert sweep.main(base + ["--grid", "seed=0,1", "--config.seed=3", "--dry_run"]) == 2
    assert sweep.main(base + ["--grid", "seed", "--dry_run"]) == 2
    assert sweep.main([f"--config={tmp_path / 'none.py'}", f"--workdir={tmp_path}", "--dry_run"]) == 2
    with pytest.raises(SystemExit):
        sweep.main(base + ["--config.seed", "3"])  # overrides are --config.KEY=VALUE
    assert not (tmp_path / "r").exists()


def test_finished_cells_are_skipped(config_file, tmp_path, capsys):
    root = tmp_path / "root"
    for seed in (0, 1):
        (root / f"seed={seed}").mkdir(parents=True)
        (root / f"seed={seed}" / "summary.json").write_text("{}")
    assert sweep.main([f"--config={config_file}", f"--workdir={root}", "--grid", "seed=0,1"]) == 0
    rec = _record(root)
    assert [c["status"] for c in rec["cells"]] == ["skipped", "skipped"]
    assert rec["grid"] == {"seed": ["0", "1"]} and not (root / "seed=0" / "run.log").exists()
    assert "2 skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------- real cells


def test_tiny_sweep_failing_cell_and_resume(config_file, tmp_path):
    """Two cells on two 'devices': one trains, one has a bad value (recorded, the other goes on, exit 1).

    Then the sweep again, sequentially: the cell left without its summary (as if killed after
    its last checkpoint) is resumed by the runner, the failed cell is tried again.
    """
    root = tmp_path / "root"
    args = (f"--config={config_file}", f"--workdir={root}", "--grid", "lr=0.1,-1")
    p = _sweep(*args, "--devices=0,1")
    out, err = p.communicate(timeout=240)
    assert p.returncode == 1, out + err
    rec = _record(root)
    cells = {c["name"]: c for c in rec["cells"]}
    assert list(cells) == ["lr=0.1", "lr=-1"]
    ok, bad = cells["lr=0.1"], cells["lr=-1"]
    assert (ok["status"], ok["returncode"]) == ("ok", 0)
    assert (bad["status"], bad["returncode"]) == ("failed", 2)
    assert {ok["device"], bad["device"]} == {"0", "1"}
    assert ok["command"][-1] == f"--workdir={root / 'lr=0.1'}" and "--config.lr=0.1" in ok["command"]
    summary = json.loads((root / "lr=0.1" / "summary.json").read_text())
    assert summary["config"]["lr"] == 0.1 and summary["steps"] == 6
    log = (root / "lr=-1" / "run.log").read_text()
    assert "config.lr must be >= 0" in log and "CUDA_VISIBLE_DEVICES=" in log
    assert "lr=-1" in err and "1 ok" in out and "1 failed" in out
    (root / "lr=0.1" / "summary.json").unlink()
    p = _sweep(*args)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 1, out + err
    cells = {c["name"]: c for c in _record(root)["cells"]}
    assert [c["status"] for c in cells.values()] == ["ok", "failed"]
    assert cells["lr=-1"]["device"] is None
    assert (root / "lr=-1" / "run.log").read_text().count("===== ") == 2
    assert "resuming from checkpoint 6" in (root / "lr=0.1" / "run.log").read_text()
    again = json.loads((root / "lr=0.1" / "summary.json").read_text())
    assert again["test_acc_at_best_val"] == summary["test_acc_at_best_val"] and again["steps"] == 6


def _stub_cell(workdir: Path, name: str, code: str) -> sweep.Cell:
    return sweep.Cell(name, {"cell": name}, workdir, [sys.executable, "-c", code])


def test_signal_is_forwarded_once_and_later_cells_wait(tmp_path):
    """In-process, with stub cells: SIGTERM to the sweep reaches the running cell; the next cell never starts."""
    started, got = tmp_path / "started", tmp_path / "got"
    code = ("import pathlib, signal, sys, time\n"
            f"def h(s, f):\n    pathlib.Path({str(got)!r}).open('a').write('x')\n    sys.exit(128 + s)\n"
            "signal.signal(signal.SIGTERM, h)\n"
            f"pathlib.Path({str(started)!r}).write_text('1')\n"
            "time.sleep(60)\n")
    cells = [_stub_cell(tmp_path / "a", "a", code), _stub_cell(tmp_path / "b", "b", "raise SystemExit(0)")]

    def kill_when_started():
        deadline = time.time() + 30
        while not started.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_when_started, daemon=True).start()
    rc = sweep.Sweep(tmp_path, cells, None, {}).run()
    assert rc == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert got.read_text() == "x"  # forwarded exactly once
    rec = _record(tmp_path)
    assert [(c["status"], c["returncode"]) for c in rec["cells"]] == [
        ("interrupted", 128 + signal.SIGTERM), ("not_started", None)]


def test_cuda_visible_devices_reaches_the_cell(tmp_path):
    """Each worker runs its cells with CUDA_VISIBLE_DEVICES set to its device (a stub command here)."""
    cells = []
    for i in range(4):
        wd = tmp_path / f"c{i}"
        cmd = [sys.executable, "-c", "import os, pathlib, sys; "
               f"pathlib.Path({str(wd)!r}, 'dev').write_text(os.environ['CUDA_VISIBLE_DEVICES']); "
               f"pathlib.Path({str(wd)!r}, 'summary.json').write_text('{{}}'); sys.exit({i % 2 * 3})"]
        cells.append(sweep.Cell(f"c{i}", {"i": str(i)}, wd, cmd))
    rc = sweep.Sweep(tmp_path, cells, ["3", "5"], {}).run()
    assert rc == 1  # cells 1 and 3 exit 3
    rec = _record(tmp_path)
    assert [c["status"] for c in rec["cells"]] == ["ok", "failed", "ok", "failed"]
    assert [c["returncode"] for c in rec["cells"]] == [0, 3, 0, 3]
    for c in rec["cells"]:
        assert c["device"] in ("3", "5")
        assert (Path(c["workdir"]) / "dev").read_text() == c["device"]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "3"
