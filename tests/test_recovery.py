"""Tests of recovering runs: damaged checkpoints, TensorBoard after kill -9, finished reruns, the resume hint.

Every run is the tiny 2-epoch x 3-step digits run of `conftest.tiny_config` (or a
longer one of the same shape where a process has to be killed mid-run), so the XLA
compilations, shared through the persistent cache, dominate.

* A run stopped by the `stop_after_steps` hook at steps 2, 3 and 5 holds checkpoints
  3 and 5 (max_checkpoints=2); its newest one is damaged in several ways and the
  rerun must resume from checkpoint 3, move checkpoint 5 aside (not delete it), name
  it in one WARNING line and end with the numbers of an uninterrupted run.
* With every checkpoint damaged, the CLI exits with status 2 and one `error:` line.
* After a kill -9 and a resume, TensorBoard holds every step of metrics.jsonl once.
* Rerunning a finished run leaves every file of its directory as it was.
* The SIGTERM hint of the quickstart names the command to rerun, not a sub-run folder.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config, write_config_file, write_digits_npz
from l2t_jax import loop, run_config
from l2t_jax.io.msgpack import load_variables

CACHE = str(REPO / ".jax_cache")
STEPS_PER_EPOCH = 3  # 48 training images in batches of 16


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> Path:
    """Digits 0-3 at 8 px: 16 training + 8 test images per class."""
    return write_digits_npz(tmp_path_factory.mktemp("npz") / "digits4.npz", 4)


@pytest.fixture(scope="module")
def reference(npz_path, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted tiny scratch run: (workdir, summary)."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, loop.train(tiny_config(f"npz:{npz_path}"), workdir)


@pytest.fixture(scope="module")
def interrupted(npz_path, tmp_path_factory) -> Path:
    """The same run stopped at steps 2, 3 (an epoch end) and 5: checkpoints 3 and 5 remain."""
    workdir = tmp_path_factory.mktemp("interrupted")
    for stop in (2, 3, 5):
        with pytest.raises(loop.TrainingInterrupted):
            loop.train(tiny_config(f"npz:{npz_path}"), workdir, stop_after_steps=stop)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "5"]
    return workdir


def _copy_run(src: Path, dest: Path) -> Path:
    """A copy of a run directory (file times kept) for one test to change."""
    return Path(shutil.copytree(src, dest))


def _comparable(summary: dict) -> dict:
    """A summary without what differs between two directories or sessions (paths, wall time)."""
    drop = ("wall_time_s", "final_weights", "best_weights", "final_transfer")
    return {k: v for k, v in summary.items() if k not in drop}


def _assert_same_final_weights(a: Path, b: Path) -> None:
    va = load_variables(a / "final_weights.msgpack")
    vb = load_variables(b / "final_weights.msgpack")
    assert all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), va, vb)))


def _truncate_state_data(step_dir: Path) -> None:
    """Cuts the largest array data file of the state in half (as a full disk or a kill mid-copy would)."""
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated_state_data": _truncate_state_data,
    "corrupt_meta_json": lambda d: (d / "meta" / "metadata").write_text('{"epoch": 1, '),
    "missing_meta_folder": lambda d: shutil.rmtree(d / "meta"),
    "missing_state_folder": lambda d: shutil.rmtree(d / "state"),
    "corrupt_orbax_state_metadata": lambda d: (d / "state" / "_METADATA").write_text("{garbage"),
    "corrupt_ocdbt_manifest": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"\x00garbage"),
}


def _cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.run", f"--compilation_cache={CACHE}", *args]


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(_cli_command(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(p: subprocess.Popen, ckpt_dir: Path, min_step: int, timeout: float = 240) -> int:
    """Polls until a complete checkpoint >= min_step exists (the process must still run); returns its step."""
    deadline = time.time() + timeout
    while True:
        steps = [int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit()] if ckpt_dir.is_dir() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def _tb_scalars(tb_dir: Path) -> Iterator[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TensorBoard event files of `tb_dir`, read raw.

    The files are TFRecords (u64 length, u32 crc, payload, u32 crc) of `Event` protos
    (tensorboardX's copy of the proto; the `tensorboard` package is not installed). A
    torn record at the end of a file (a killed writer) is ignored, as TensorBoard does.
    """
    from tensorboardX.proto import event_pb2

    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + n + 4 > len(data):
                break
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                yield v.tag, int(event.step), float(v.simple_value)


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    """{relative path: (mtime_ns, content)} of every file under root, and every folder with its mtime."""
    out: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root)) + "/"] = (p.stat().st_mtime_ns, b"")
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    damage, npz_path, reference, interrupted, tmp_path, caplog
):
    ref_dir, ref = reference
    workdir = _copy_run(interrupted, tmp_path / "run")
    damaged = workdir / "checkpoints" / "5"
    DAMAGES[damage](damaged)
    left = sorted(str(p.relative_to(damaged)) for p in damaged.rglob("*"))

    caplog.set_level(logging.INFO)
    s = loop.train(tiny_config(f"npz:{npz_path}"), workdir)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("l2t_jax")]
    assert len(warnings) == 1, warnings
    assert "checkpoint 5" in warnings[0] and str(damaged) in warnings[0], warnings[0]
    assert "resuming from checkpoint 3" in caplog.text
    # moved aside, whole, where orbax does not look
    moved = workdir / "checkpoints_damaged" / "5"
    assert moved.is_dir() and str(moved) in warnings[0]
    assert sorted(str(p.relative_to(moved)) for p in moved.rglob("*")) == left
    # the same numbers as the uninterrupted run
    assert _comparable(s) == _comparable(ref)
    assert _comparable(json.loads((workdir / "summary.json").read_text())) == _comparable(ref)
    assert (workdir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    _assert_same_final_weights(workdir, ref_dir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


def test_all_checkpoints_damaged_is_one_clear_error(npz_path, interrupted, tmp_path):
    workdir = _copy_run(interrupted, tmp_path / "run")
    for step in ("3", "5"):
        _truncate_state_data(workdir / "checkpoints" / step)
    cfg = write_config_file(tmp_path / "cfg.py", tiny_config(f"npz:{npz_path}"))
    p = _cli(f"--config={cfg}", f"--workdir={workdir}")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    msg = error_lines[0]
    assert "2 checkpoints" in msg and str(workdir / "checkpoints") in msg, msg
    assert str(workdir / "checkpoints_damaged") in msg and "--workdir" in msg, msg
    assert sorted(p.name for p in (workdir / "checkpoints_damaged").iterdir()) == ["3", "5"]
    assert not [d for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()]
    # and again on the next try: no silent fresh start over the damaged run
    with pytest.raises(run_config.ConfigError, match="checkpoints_damaged"):
        loop.train(tiny_config(f"npz:{npz_path}"), workdir)
    assert (workdir / "metrics.jsonl").stat().st_size > 0


# --------------------------------------------------------------------------- TensorBoard after kill -9


def test_tensorboard_holds_every_logged_step_once_after_kill9(npz_path, tmp_path):
    cfg = write_config_file(tmp_path / "cfg.py", tiny_config(f"npz:{npz_path}", epochs=24, log_every=1))
    workdir = tmp_path / "run"
    args = (f"--config={cfg}", f"--workdir={workdir}")
    p = _cli(*args)
    _wait_for_checkpoint(p, workdir / "checkpoints", min_step=3 * STEPS_PER_EPOCH)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    p = _cli(*args)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "resuming from checkpoint" in err

    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scalars = list(_tb_scalars(workdir / "tb"))
    counts = Counter((tag, step) for tag, step, _ in scalars)
    assert [k for k, n in counts.items() if n > 1] == []
    value = {(tag, step): v for tag, step, v in scalars}
    train = [line for line in lines if line["kind"] == "train"]
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert len(train) == 24 * STEPS_PER_EPOCH and len(epochs) == 24
    assert sorted(s for t, s in counts if t == "train/loss") == [line["step"] for line in train]
    for line in train:
        assert value[("train/loss", line["step"])] == pytest.approx(line["loss"], rel=1e-6)
        assert value[("train/accuracy", line["step"])] == pytest.approx(line["accuracy"], rel=1e-6)
    assert sorted(s for t, s in counts if t == "epoch/val_acc") == [e["epoch"] * STEPS_PER_EPOCH for e in epochs]
    for e in epochs:
        step = e["epoch"] * STEPS_PER_EPOCH
        assert value[("epoch/val_acc", step)] == pytest.approx(e["val_acc"], rel=1e-6)
        assert value[("epoch/test_loss", step)] == pytest.approx(e["test_loss"], rel=1e-6)
        assert value[("epoch/train_loss", step)] == pytest.approx(e["train_loss"], rel=1e-6)


# --------------------------------------------------------------------------- finished runs


def test_rerunning_a_finished_run_changes_nothing(npz_path, reference, tmp_path, caplog):
    ref_dir, ref = reference
    workdir = _copy_run(ref_dir, tmp_path / "run")
    before = _files(workdir)
    time.sleep(0.02)  # a rewrite would get a later mtime
    caplog.set_level(logging.INFO)
    s = loop.train(tiny_config(f"npz:{npz_path}"), workdir)
    after = _files(workdir)
    assert sorted(after) == sorted(before)
    changed = [k for k in before if before[k] != after[k]]
    assert changed == []
    assert "already finished" in caplog.text
    assert f"best val {ref['best_val_acc']:.2f}" in caplog.text
    assert s == json.loads((workdir / "summary.json").read_text())
    assert _comparable(s) == _comparable(ref)


# --------------------------------------------------------------------------- the resume hint


def test_quickstart_interrupt_hint_names_the_command(npz_path, tmp_path):
    import ml_collections

    source = tiny_config(f"npz:{npz_path}", epochs=40, log_every=1)
    qs = ml_collections.ConfigDict({
        "experiment": "quickstart", "methods": "scratch", "pairs": {"fm": "1-1"},
        "source": source.to_dict(), "target": tiny_config(f"npz:{npz_path}").to_dict(),
    })
    cfg = write_config_file(tmp_path / "qs_cfg.py", qs)
    workdir = tmp_path / "qs"
    args = (f"--config={cfg}", f"--workdir={workdir}")
    p = _cli(*args)
    _wait_for_checkpoint(p, workdir / "source" / "checkpoints", min_step=STEPS_PER_EPOCH)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "training interrupted (SIGTERM)" in err and "Rerun the same command" in err, err
    command = shlex.join(["-m", "experiments.run", f"--compilation_cache={CACHE}", *args])
    assert command in err, err
    assert f"--workdir={workdir / 'source'}" not in err, err


def _unretrieved_task_failure(filename: str) -> None:
    """Runs, in a fresh event loop, a task whose coroutine is defined in `filename` and fails; never awaits it."""
    import asyncio
    import gc

    namespace: dict = {}
    exec(compile("async def read_shard():\n    raise ValueError('OUT_OF_RANGE: damaged')\n", filename, "exec"), namespace)
    loop_ = asyncio.new_event_loop()
    try:
        task = loop_.create_task(namespace["read_shard"]())
        loop_.run_until_complete(asyncio.sleep(0.01))
        assert task.done()
    finally:
        loop_.close()
    del task
    gc.collect()


def _unretrieved_future_failure(filename: str) -> None:
    """Sets on a future, never retrieved, an error raised by a function defined in `filename`."""
    import asyncio
    import gc

    namespace: dict = {}
    exec(compile("def read_shard():\n    raise ValueError('OUT_OF_RANGE: damaged')\n", filename, "exec"), namespace)
    loop_ = asyncio.new_event_loop()
    try:
        future = loop_.create_future()
        try:
            namespace["read_shard"]()
        except ValueError as e:
            future.set_exception(e)
    finally:
        loop_.close()
    del future
    gc.collect()


def test_orbax_unretrieved_task_errors_are_dropped_and_others_kept(caplog):
    """CI once saw asyncio's "Task exception was never retrieved" traceback of an orbax read after a failed restore."""
    from l2t_jax import checkpoint

    checkpoint._drop_closed_loop_noise()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_task_failure(os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "reader.py"))
        assert not [r for r in caplog.records if r.name == "asyncio"]
        _unretrieved_task_failure(os.path.join(os.sep, "site-packages", "mine", "reader.py"))
        kept = [r for r in caplog.records if r.name == "asyncio"]
        assert len(kept) == 1 and kept[0].getMessage().startswith("Task exception was never retrieved"), kept
        _unretrieved_future_failure(os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "reader.py"))
        assert len([r for r in caplog.records if r.name == "asyncio"]) == 1
        _unretrieved_future_failure(os.path.join(os.sep, "site-packages", "mine", "reader.py"))
        kept = [r for r in caplog.records if r.name == "asyncio"]
        assert len(kept) == 2 and kept[1].getMessage().startswith("Future exception was never retrieved"), kept
