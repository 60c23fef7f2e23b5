"""A grid of training runs: the Cartesian product of `--grid` axes, one `experiments.run` per cell.

    python -m experiments.sweep --config=experiments/configs/stl10.py --workdir=ROOT \\
        --grid method=scratch,fm_one_to_one,l2t_ww --grid seed=0,1,2 [--grid n_per_class=25,50] \\
        [--config.KEY=VALUE ...] [--devices=0,1] [--compilation_cache=DIR] [--dry_run]

Cells. Each `--grid KEY=V1,V2,...` is one axis (values separated by ";" instead when
one of them contains a comma: `--grid "pairs=1-1,2-2;3-3"`). A cell is one value
per axis; it runs

    python -m experiments.run --config=CONFIG [--config.KEY=VALUE ...] \\
        --config.AXIS=VALUE ... --workdir=ROOT/<cell>

where <cell> names the grid values with the axes in alphabetical order, e.g.
`method=l2t_ww/n_per_class=50/seed=0` (characters other than letters, digits and
`._-+=,` are replaced by "_"; a name that would be ambiguous or too long gets a
short hash). `--config.KEY=VALUE` overrides are passed to every cell verbatim; a
key may not be both a grid axis and an override.

Scheduling. Without `--devices` the cells run one after another, each in its own
process. With `--devices=0,1,...` there is one worker per device, each taking the
next cell from a queue and running it with CUDA_VISIBLE_DEVICES set to its device.
A cell whose folder holds summary.json is finished and skipped; any other cell is
(re)started, and the runner resumes an interrupted run from its newest checkpoint.
A failed cell does not stop the others.

Records. Each cell's output (stdout and stderr, appended per attempt) goes to
ROOT/<cell>/run.log; ROOT/sweep.json lists the cells with their commands, status
(ok, failed, skipped, interrupted, not_started), exit codes, devices and times, and
is rewritten as cells finish. The exit status is 0 when every cell is finished, 1
when one failed, 128+signal when the sweep was stopped by SIGINT/SIGTERM (forwarded
once to the running cells, which save a checkpoint first). `--dry_run` prints the
commands (finished cells marked) and runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import itertools
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")
_MAX_COMPONENT = 120


# --------------------------------------------------------------------------- the grid


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """'KEY=V1,V2' (or 'KEY=V1;V2') -> (KEY, [V1, V2]); a leading 'config.' is dropped."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if key.startswith("config."):
        key = key[len("config."):]
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
        raise ValueError(f"bad --grid {spec!r}: expected KEY=V1,V2,... (e.g. seed=0,1,2)")
    vals = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if any(v == "" for v in vals):
        raise ValueError(f"bad --grid {spec!r}: an empty value")
    if len(set(vals)) != len(vals):
        raise ValueError(f"bad --grid {spec!r}: a value is repeated")
    return key, vals


def _component(key: str, value: str) -> str:
    text = f"{key}={_UNSAFE.sub('_', value)}"
    if len(text) > _MAX_COMPONENT or _UNSAFE.sub("_", value) != value:
        digest = hashlib.sha1(value.encode()).hexdigest()[:8]
        text = f"{text[:_MAX_COMPONENT - 9]}-{digest}"
    return text


def cell_name(assignment: dict[str, str]) -> str:
    """The cell's folder name: "key=value" per axis, axes in alphabetical order, joined by "/"."""
    return "/".join(_component(k, assignment[k]) for k in sorted(assignment))


def grid_cells(axes: Sequence[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The Cartesian product of the axes (first axis outermost), as {key: value} dicts."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a grid axis is given twice: {keys}")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def override_key(arg: str) -> str:
    """'--config.a.b=V' -> 'a.b'."""
    return arg[len("--config."):].partition("=")[0]


def runner_command(config: str, overrides: Sequence[str], assignment: dict[str, str], workdir: Path,
                   compilation_cache: str = "", python: str = sys.executable) -> list[str]:
    """The `experiments.run` command line of one cell."""
    cmd = [python, "-m", "experiments.run", f"--config={config}", *overrides]
    cmd += [f"--config.{k}={v}" for k, v in assignment.items()]
    if compilation_cache:
        cmd.append(f"--compilation_cache={compilation_cache}")
    cmd.append(f"--workdir={workdir}")
    return cmd


def check_keys(config_path: str, keys: Sequence[str]) -> list[str]:
    """Keys (dotted paths) absent from the config file's `get_config()`; [] when it cannot be loaded."""
    path = Path(config_path.partition(":")[0])
    try:
        spec = importlib.util.spec_from_file_location("_sweep_config", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(REPO))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(REPO))
        config = module.get_config()
    except Exception as e:  # the runner will report it, per cell
        print(f"warning: could not load {config_path} to check the keys ({type(e).__name__}: {e})", file=sys.stderr)
        return []
    missing = []
    for key in keys:
        node = config
        for part in key.split("."):
            try:
                node = node[part]
            except (KeyError, TypeError, AttributeError):
                missing.append(key)
                break
    return missing


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class Cell:
    name: str
    assignment: dict[str, str]
    workdir: Path
    command: list[str]
    status: str = "not_started"  # not_started | running | ok | failed | skipped | interrupted
    returncode: Optional[int] = None
    device: Optional[str] = None
    started: Optional[str] = None
    wall_s: Optional[float] = None

    @property
    def finished(self) -> bool:
        return (self.workdir / "summary.json").is_file()

    def record(self) -> dict:
        return {
            "name": self.name, "grid": self.assignment, "workdir": str(self.workdir), "command": self.command,
            "status": self.status, "returncode": self.returncode, "device": self.device, "started": self.started,
            "wall_s": self.wall_s, "log": str(self.workdir / "run.log"),
        }


class Sweep:
    """Runs the cells (sequentially, or one worker per device) and keeps ROOT/sweep.json current."""

    def __init__(self, root: Path, cells: list[Cell], devices: Optional[list[str]], header: dict):
        self.root, self.cells, self.devices, self.header = root, cells, devices, header
        self.lock = threading.RLock()  # re-entered by the signal handler on the main thread
        self.stop = threading.Event()
        self.signum: Optional[int] = None
        self.procs: dict[str, subprocess.Popen] = {}

    def write_record(self) -> None:
        from l2t_jax.io.atomic import write_text_atomic

        with self.lock:
            obj = {**self.header, "updated": _now(), "cells": [c.record() for c in self.cells]}
            write_text_atomic(self.root / "sweep.json", json.dumps(obj, indent=2) + "\n")

    def _say(self, msg: str) -> None:
        with self.lock:
            print(msg, flush=True)

    def run_cell(self, cell: Cell, device: Optional[str]) -> None:
        if cell.finished:
            cell.status = "skipped"
            self._say(f"[skip] {cell.name}: finished (summary.json present)")
            return
        cell.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        cell.device, cell.started, cell.status = device, _now(), "running"
        self._say(f"[start] {cell.name}" + (f" on device {device}" if device is not None else ""))
        start = time.time()
        with open(cell.workdir / "run.log", "a") as log:
            log.write(f"\n===== {_now()} sweep: {shlex.join(cell.command)}"
                      + (f" (CUDA_VISIBLE_DEVICES={device})" if device is not None else "") + "\n")
            log.flush()
            try:
                proc = subprocess.Popen(cell.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                log.write(f"sweep: could not start: {e}\n")
                cell.status, cell.returncode, cell.wall_s = "failed", None, 0.0
                self._say(f"[fail] {cell.name}: could not start ({e})")
                return
            with self.lock:
                self.procs[cell.name] = proc
            if self.stop.is_set():  # a signal arrived while starting it
                _signal(proc, self.signum or signal.SIGTERM)
            rc = proc.wait()
            with self.lock:
                self.procs.pop(cell.name, None)
        cell.returncode, cell.wall_s = rc, round(time.time() - start, 3)
        if rc == 0 and cell.finished:
            cell.status = "ok"
        elif self.stop.is_set() and rc != 0:
            cell.status = "interrupted"
        else:
            cell.status = "failed"
        self._say(f"[{cell.status}] {cell.name} (exit {rc}, {cell.wall_s:.1f} s, log {cell.workdir / 'run.log'})")

    def _worker(self, jobs: "queue.Queue[Cell]", device: Optional[str]) -> None:
        while not self.stop.is_set():
            try:
                cell = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                self.run_cell(cell, device)
            except Exception as e:  # keep the other cells going
                cell.status = "failed"
                self._say(f"[fail] {cell.name}: {type(e).__name__}: {e}")
            self.write_record()

    def _on_signal(self, signum, frame) -> None:
        if self.stop.is_set():
            return
        self.signum = signum
        self.stop.set()
        with self.lock:
            procs = list(self.procs.values())
            print(f"\nsweep: {signal.Signals(signum).name}: stopping; the running cells save a checkpoint "
                  "(rerun the same sweep to resume)", file=sys.stderr, flush=True)
        for p in procs:
            _signal(p, signum)

    def run(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_record()
        jobs: queue.Queue[Cell] = queue.Queue()
        for c in self.cells:
            jobs.put(c)
        old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, self._on_signal)
        try:
            workers = [threading.Thread(target=self._worker, args=(jobs, d), daemon=True)
                       for d in (self.devices or [None])]
            for w in workers:
                w.start()
            for w in workers:
                while w.is_alive():
                    w.join(0.2)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self.write_record()
        counts: dict[str, int] = {}
        for c in self.cells:
            counts[c.status] = counts.get(c.status, 0) + 1
        print("sweep: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" ({self.root / 'sweep.json'})",
              flush=True)
        failed = [c.name for c in self.cells if c.status == "failed"]
        if failed:
            print("failed cells:\n  " + "\n  ".join(failed), file=sys.stderr)
        if self.signum is not None:
            return 128 + int(self.signum)
        return 1 if failed else 0


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                epilog="Any --config.KEY=VALUE is passed to every cell verbatim.")
    p.add_argument("--config", required=True, help="experiment config file (experiments/configs/*.py)")
    p.add_argument("--workdir", required=True, help="the sweep's root folder (one sub-folder per cell)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="one axis of the grid")
    p.add_argument("--devices", default="", help="comma-separated device ids: one worker per device")
    p.add_argument("--compilation_cache", default="",
                   help="passed to every run (persistent XLA cache folder, or 'none'; default: the runner's, "
                        "$L2T_JAX_COMPILATION_CACHE or ~/.cache/l2t_jax/xla)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.") and "=" in a]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        p.error(f"unrecognised arguments: {' '.join(unknown)} (config overrides are --config.KEY=VALUE)")
    return args, overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        axes = [parse_axis(g) for g in args.grid]
        cells_assign = grid_cells(axes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = args.config
    cfg_file, colon, cfg_arg = config.partition(":")
    if not Path(cfg_file).expanduser().is_file():
        print(f"error: --config: no such file: {cfg_file}", file=sys.stderr)
        return 2
    config = str(Path(cfg_file).expanduser().resolve()) + colon + cfg_arg
    both = sorted({k for k, _ in axes} & {override_key(o) for o in overrides})
    if both:
        print(f"error: key(s) {both} given both as a grid axis and as a --config override", file=sys.stderr)
        return 2
    missing = check_keys(config, [k for k, _ in axes] + [override_key(o) for o in overrides])
    if missing:
        print(f"error: the config {cfg_file} has no key(s) {missing} (see l2t_jax/run_config.py)", file=sys.stderr)
        return 2
    root = Path(args.workdir).expanduser().resolve()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] or None
    names = [cell_name(a) for a in cells_assign]
    if len(set(names)) != len(names):
        print("error: two cells would share a folder name", file=sys.stderr)
        return 2
    cache = ""
    if args.compilation_cache.strip():  # else each run's own default ("auto")
        from l2t_jax.compile_cache import cache_dir

        folder = cache_dir(args.compilation_cache)
        cache = "none" if folder is None else str(folder.resolve())
    cells = [
        Cell(name, a, root / name, runner_command(config, overrides, a, root / name, cache))
        for name, a in zip(names, cells_assign)
    ]
    if args.dry_run:
        for c in cells:
            mark = "# finished, skipped: " if c.finished else ""
            print(f"{mark}{shlex.join(c.command)}")
        print(f"# {len(cells)} cell(s), {sum(c.finished for c in cells)} finished; "
              f"{'devices ' + ','.join(devices) if devices else 'sequential'}; cwd {REPO}")
        return 0
    header = {
        "config": config, "overrides": overrides, "grid": {k: v for k, v in axes}, "devices": devices,
        "root": str(root), "cwd": str(REPO), "started": _now(),
    }
    return Sweep(root, cells, devices, header).run()


if __name__ == "__main__":
    sys.exit(main())
