"""Peak memory and time of one training iteration against the unroll length T, with and without remat.

    python -m benchmarks.unroll_memory [--setting stl10] [--batch 128] [--Ts 1,2,4,8] [--iters 2]
        [--remat_modes off,on,loop] [--conv_impl auto] [--timeout 3600] [--out FILE.json]

For each T and each mode one `python -m benchmarks.train_step ... --no_plain` runs
in a fresh child process, so peaks never accumulate across configurations. Modes:
"off" (no remat; the look-ahead steps unrolled, the default `BilevelConfig`), "on"
(`remat=True`; the steps stay a loop) and "loop" (no remat, `unroll=False`: the
steps as a `lax.scan` loop, for comparison with "off"). Per configuration:

* iter_s_median, compile_s (from the child);
* peak_mem_gb: GPU, the device's peak_bytes_in_use; CPU, the child's RSS sampled
  during its timed iterations, after the compiler's freed heap went back to the OS
  (runtime + code + arrays + the step's temporaries; rss_before_iters_gb is the
  level the iterations start from);
* child_max_rss_gb: the child's lifetime peak RSS from the kernel (`wait4`),
  compilation included; recorded even when the child dies (e.g. out of memory);
* xla_temp_gb: XLA's own count of the compiled iteration's temporaries
  (deterministic, the cleanest measure of what remat saves).

stdout: one JSON line per configuration as it finishes, then a Markdown table
(lines starting with "|"); progress on stderr. `--out` also writes one JSON
document {"rows": [...], ...}. A full table at batch 128 on a 2-core CPU takes
a long time (per configuration: ~1 min compile, T=8 iterations of a minute or
more); use --batch / --Ts / --iters for quick runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import gb, log, rounded
from l2t_jax.bilevel import BilevelConfig

#: mode -> (remat, unroll, hvp) of the child's BilevelConfig
MODES = {"off": (False, True, "reverse"), "on": (True, True, "reverse"), "loop": (False, False, "reverse"),
         "mixed": (False, True, "mixed")}  # mixed mode's look-ahead is always a loop (BilevelConfig.unrolled)

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--Ts", default="1,2,4,8", help="comma-separated unroll lengths")
    p.add_argument("--remat_modes", default="off,on",
                   help="comma-separated subset of off,on,loop (reverse-over-reverse meta-gradient), "
                        "mixed (hvp='mixed', its look-ahead a loop)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per configuration (after a warm-up)")
    p.add_argument("--conv_impl", default="auto", choices=("auto", "xla", "im2col", "im2col_single"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--pairs", default=None, help="default: the setting's (all_to_all)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration before its child is killed")
    p.add_argument("--compilation_cache", default=None, help="passed to each child (tests only)")
    p.add_argument("--out", default=None, help="also write all rows as one JSON document here")
    args = p.parse_args(argv)
    try:
        args.Ts = [int(t) for t in args.Ts.split(",") if t.strip()]
    except ValueError:
        p.error(f"--Ts must be comma-separated integers, got {args.Ts!r}")
    modes = [m.strip() for m in args.remat_modes.split(",") if m.strip()]
    if not args.Ts or any(t < 1 for t in args.Ts):
        p.error("--Ts must list integers >= 1")
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--remat_modes must be a comma-separated subset of {','.join(MODES)}")
    args.remat_modes = modes
    return args


def run_child(cmd: list[str], timeout: float | None) -> tuple[int, str, int, float]:
    """Runs `cmd` (stderr inherited); returns (exit code, stdout, child's max RSS in bytes, wall s)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=out, text=True)
        timer = None
        if timeout:
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return proc.returncode, text, maxrss, wall


def measure(args, T: int, mode: str) -> dict:
    remat, unroll, hvp = MODES[mode]
    cmd = [
        sys.executable, "-m", "benchmarks.train_step", "--setting", args.setting, "--batch", str(args.batch),
        "--T", str(T), "--iters", str(args.iters), "--conv_impl", args.conv_impl, "--dtype", args.dtype, "--no_plain",
    ]
    if remat:
        cmd.append("--remat")
    if not unroll:
        cmd.append("--no_unroll")
    if hvp != "reverse":
        cmd += ["--hvp", hvp]
    if args.pairs:
        cmd += ["--pairs", args.pairs]
    if args.compilation_cache:
        cmd += ["--compilation_cache", args.compilation_cache]
    rc, text, maxrss, wall = run_child(cmd, args.timeout)
    row = {"benchmark": "unroll_memory", "setting": args.setting, "batch": args.batch, "T": T, "remat": remat,
           "unroll": BilevelConfig(remat=remat, unroll=unroll, hvp=hvp).unrolled, "hvp": hvp, "mode": mode}
    if rc != 0:
        why = "killed (timeout or out of memory?)" if rc < 0 else f"exit code {rc}"
        log(f"T={T} mode={mode}: child failed: {why}")
        row.update(error=why, exit_code=rc, child_max_rss_gb=gb(maxrss), child_wall_s=rounded(wall, 1))
        return row
    r = common.parse_last_json(text)
    row.update(
        iter_s_median=r["iter_s_median"],
        iter_s_all=r["iter_s_all"],
        compile_s=r["compile_s"],
        peak_mem_gb=r["peak_mem_gb"],
        peak_mem_source=r["peak_mem_source"],
        child_max_rss_gb=gb(maxrss),
        baseline_rss_gb=r.get("baseline_rss_gb"),
        rss_before_iters_gb=r.get("rss_before_iters_gb"),
        xla_temp_gb=r.get("xla_temp_gb"),
        xla_argument_gb=r.get("xla_argument_gb"),
        iters=r["iters"],
        conv_impl=args.conv_impl,
        dtype=args.dtype,
        num_pairs=r["num_pairs"],
        device=r["device"],
        jax=r["jax"],
        loadavg_1m=r.get("loadavg_1m"),
        child_wall_s=rounded(wall, 1),
    )
    return row


def _mode_label(r: dict) -> str:
    return {"off": "off (unrolled)", "on": "remat", "loop": "off (loop)", "mixed": "mixed (loop)"}.get(r.get("mode", ""), str(r.get("mode")))


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    """Markdown table; the last columns compare each row with the same T in mode "off"."""
    base = {r["T"]: r for r in rows if r.get("mode", "off") == "off" and "error" not in r}
    lines = [
        "| T | mode | iter s (median) | compile s | peak mem GB | child max RSS GB | XLA temp GB | peak vs off | time vs off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {_mode_label(r)} | {r['error']} | — | — | "
                         f"{_fmt(r.get('child_max_rss_gb'), '.2f')} | — | — | — |")
            continue
        b = base.get(r["T"])
        rel = rel_t = "—"
        if b is not None and b is not r and b.get("peak_mem_gb"):
            rel = f"{r['peak_mem_gb'] / b['peak_mem_gb']:.2f}x"
            rel_t = f"{r['iter_s_median'] / b['iter_s_median']:.2f}x"
        lines.append(
            f"| {r['T']} | {_mode_label(r)} | {_fmt(r['iter_s_median'], '.3f')} | "
            f"{_fmt(r['compile_s'], '.1f')} | {_fmt(r['peak_mem_gb'], '.3f')} | {_fmt(r['child_max_rss_gb'], '.3f')} | "
            f"{_fmt(r.get('xla_temp_gb'), '.3f')} | {rel} | {rel_t} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    configs = [(T, mode) for T in args.Ts for mode in args.remat_modes]
    log(f"{len(configs)} configurations ({args.setting}, batch {args.batch}), one child process each")
    rows = []
    for i, (T, mode) in enumerate(configs, 1):
        log(f"[{i}/{len(configs)}] T={T} mode={mode}")
        row = measure(args, T, mode)
        rows.append(row)
        common.emit(row)
    print(table(rows), flush=True)
    if args.out:
        doc = {"benchmark": "unroll_memory", "setting": args.setting, "batch": args.batch, "rows": rows,
               **common.host_info()}
        Path(args.out).write_text(json.dumps(doc, indent=1))
        log(f"wrote {args.out}")
    if any("error" in r for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
