"""The lifetime peak memory of whole `experiments.run` processes: a first run and a cached rerun.

    python -m benchmarks.runner_peak [--repo DIR] [--label NAME] [--timeout S] [--out FILE.json]
        -- --config=experiments/configs/cifar10_limited.py --config.epochs=2 ...

Runs `python -m experiments.run ARGS --workdir=W --compilation_cache=C` twice, each
in a fresh child process with a new work directory: "first" with C a new, empty
folder (the compile), "cached" with C as the first left it (a rerun, a resumed run,
the next seed of a sweep). Per row: max_rss_gb (the child's lifetime peak RSS from the
kernel, `wait4`), wall_s, and the steps and last test accuracy of its summary.json
(none for a composition such as the quickstart). --repo runs the runner of another
checkout (its `l2t_jax` and `experiments` are imported from there: an A/B of two
commits on the same arguments). Data paths in ARGS are resolved against this checkout.

stdout: one JSON line per row, then a Markdown table; --out also writes one JSON
document {"rows": [...], "args": [...], ...}. Idle machine only (wall times).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks.common import gb, log, rounded
from benchmarks.unroll_memory import REPO, run_child


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(REPO), help="the checkout whose experiments.run is measured")
    p.add_argument("--label", default=None, help="a name for the rows (default: the checkout's git commit)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per child before it is killed")
    p.add_argument("--out", default=None)
    args = p.parse_args(own)
    if not run_args:
        p.error("give experiments.run's arguments after --")
    if any(a.startswith(("--workdir", "--compilation_cache")) for a in run_args):
        p.error("--workdir and --compilation_cache are set by this benchmark")
    args.run_args = [_absolute(a) for a in run_args]
    args.repo = str(Path(args.repo).resolve())
    if args.label is None:
        r = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        args.label = (r.stdout.strip() or Path(args.repo).name) + ("+changes" if dirty else "")
    return args


def _absolute(arg: str) -> str:
    """--config=PATH / --config.x=PATH / npz:PATH made absolute when PATH exists here (the child runs elsewhere)."""
    if "=" not in arg:
        return arg
    key, value = arg.split("=", 1)
    prefix, path = (value.split(":", 1) if ":" in value else ("", value))
    if path and (REPO / path).exists():
        path = str((REPO / path).resolve())
        value = f"{prefix}:{path}" if prefix else path
    return f"{key}={value}"


def measure(args, run: str, cache: str, work_root: str) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"{run}_", dir=work_root)
    cmd = [sys.executable, "-m", "experiments.run", *args.run_args, f"--workdir={workdir}",
           f"--compilation_cache={cache}"]
    env = dict(os.environ, PYTHONPATH=args.repo)
    env.setdefault("L2T_SHARED", str(REPO.parent / "shared"))  # the source weights, wherever the child runs
    rc, _, maxrss, wall = run_child(cmd, args.timeout, cwd=args.repo, env=env)
    row = {"label": args.label, "run": run, "max_rss_gb": gb(maxrss), "wall_s": rounded(wall, 1)}
    if rc != 0:
        row["error"] = "killed (timeout or out of memory?)" if rc < 0 else f"exit code {rc}"
        return row
    summary = Path(workdir) / "summary.json"  # a single run's (a composition such as the quickstart has none)
    s = json.loads(summary.read_text()) if summary.exists() else {}
    row.update(steps=s.get("steps"), last_test_acc=s.get("last_test_acc"))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| runner | run | lifetime peak GB | wall s | steps |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["label"], r["run"], r.get("max_rss_gb"), r.get("wall_s"), r.get("steps", r.get("error"))]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="l2t_runner_peak_") as root:
        cache = os.path.join(root, "xla")
        for run in ("first", "cached"):
            log(f"{args.label}: {run} run")
            rows.append(measure(args, run, cache, root))
            common.emit(rows[-1])
    print(table(rows))
    if args.out:
        common.write_rows(args.out, "runner_peak", rows, repo=args.repo, label=args.label, run_args=args.run_args)
    return rows


if __name__ == "__main__":
    main()
