"""Peak memory and time of one training iteration against the unroll length T, with and without remat.

    python -m benchmarks.unroll_memory [--setting stl10] [--batch 128] [--Ts 1,2,4,8] [--iters 2]
        [--remat_modes off,on,loop,mixed,torch] [--conv_impl auto] [--timeout 3600] [--out FILE.json]

For each T and each mode one `python -m benchmarks.train_step ... --no_plain` runs
in a fresh child process, so peaks never accumulate across configurations. Modes:
"off" (no remat; the look-ahead steps unrolled, the default `BilevelConfig`), "on"
(`remat=True`; the steps stay a loop) and "loop" (no remat, `unroll=False`: the
steps as a `lax.scan` loop, for comparison with "off"), "mixed" (`hvp="mixed"`,
its look-ahead a loop) and "torch" (the authors' algorithm in PyTorch,
`python -m benchmarks.torch_reference ... --no_plain`, its default adjoint
meta-gradient), so that every mode of one T is timed in the same run. Per configuration:

* iter_s_median, compile_s (from the child);
* peak_mem_gb: GPU, the device's peak_bytes_in_use; CPU, the child's RSS sampled
  during its timed iterations, after the compiler's freed heap went back to the OS
  (runtime + code + arrays + the step's temporaries; rss_before_iters_gb is the
  level the iterations start from);
* child_max_rss_gb: the child's lifetime peak RSS from the kernel (`wait4`),
  compilation included; recorded even when the child dies (e.g. out of memory);
* xla_temp_gb: XLA's own count of the compiled iteration's temporaries
  (deterministic, the cleanest measure of what remat saves); none for "torch";
* speedup_vs_torch: the "torch" row's time over this row's, when "torch" ran for this T.

With `--out`, the document is rewritten after every configuration, and a rerun with
the same settings keeps the rows it already holds (errors are retried): a long
table resumes after an interruption. Kept rows were timed in the earlier run; the
machine's load at each row is in its loadavg_1m.

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
#: the PyTorch twin (benchmarks.torch_reference), not a BilevelConfig
TORCH = "torch"

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--Ts", default="1,2,4,8", help="comma-separated unroll lengths")
    p.add_argument("--remat_modes", default="off,on",
                   help="comma-separated subset of off,on,loop (reverse-over-reverse meta-gradient), "
                        "mixed (hvp='mixed', its look-ahead a loop), torch (the PyTorch twin)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per configuration (after a warm-up)")
    p.add_argument("--conv_impl", default="auto", choices=("auto", "xla", "im2col", "im2col_single"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--pairs", default=None, help="default: the setting's (all_to_all)")
    p.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads in the 'torch' rows")
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
    if not modes or any(m not in MODES and m != TORCH for m in modes):
        p.error(f"--remat_modes must be a comma-separated subset of {','.join([*MODES, TORCH])}")
    if TORCH in modes and args.dtype != "float32":
        p.error("--remat_modes torch: the PyTorch twin runs in float32 only")
    args.remat_modes = modes
    return args


def run_child(cmd: list[str], timeout: float | None, cwd: str | Path = REPO,
              env: dict | None = None) -> tuple[int, str, int, float]:
    """Runs `cmd` in `cwd` (stderr inherited); returns (exit code, stdout, child's max RSS in bytes, wall s)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=out, text=True)
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


def run_row_child(cmd: list[str], timeout: float | None, row: dict) -> dict | None:
    """Runs a row's child; puts its max RSS and wall time in `row`, and on failure its error.

    Returns the child's JSON record, or None when it failed (the row then says why).
    """
    rc, text, maxrss, wall = run_child(cmd, timeout)
    row.update(child_max_rss_gb=gb(maxrss), child_wall_s=rounded(wall, 1))
    if rc == 0:
        return common.parse_last_json(text)
    why = "killed (timeout or out of memory?)" if rc < 0 else f"exit code {rc}"
    log(f"T={row['T']} mode={row['mode']}: child failed: {why}")
    row.update(error=why, exit_code=rc)
    return None


def measure_torch(args, T: int) -> dict:
    """The PyTorch twin's iteration at this T, in its own child process."""
    cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--setting", args.setting, "--batch", str(args.batch),
           "--T", str(T), "--iters", str(args.iters), "--no_plain"]
    if args.pairs:
        cmd += ["--pairs", args.pairs]
    if args.torch_threads:
        cmd += ["--threads", str(args.torch_threads)]
    row = {"benchmark": "unroll_memory", "setting": args.setting, "batch": args.batch, "T": T, "mode": TORCH}
    r = run_row_child(cmd, args.timeout, row)
    if r is None:
        return row
    row.update(
        iter_s_median=r["torch_iter_s_median"],
        iter_s_all=r["torch_iter_s_all"],
        compile_s=None,
        peak_mem_gb=r["torch_peak_mem_gb"],
        peak_mem_source=r["torch_peak_mem_source"],
        baseline_rss_gb=r.get("torch_baseline_rss_gb"),
        xla_temp_gb=None,
        iters=r["iters"],
        torch_mode=r["torch_mode"],
        torch_threads=r.get("torch_threads"),
        num_pairs=r["num_pairs"],
        device=r["device"],
        torch=r.get("torch"),
        loadavg_1m=r.get("loadavg_1m"),
    )
    return row


def measure(args, T: int, mode: str) -> dict:
    if mode == TORCH:
        return measure_torch(args, T)
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
    row = {"benchmark": "unroll_memory", "setting": args.setting, "batch": args.batch, "T": T, "remat": remat,
           "unroll": BilevelConfig(remat=remat, unroll=unroll, hvp=hvp).unrolled, "hvp": hvp, "mode": mode}
    r = run_row_child(cmd, args.timeout, row)
    if r is None:
        return row
    row.update(
        iter_s_median=r["iter_s_median"],
        iter_s_all=r["iter_s_all"],
        compile_s=r["compile_s"],
        peak_mem_gb=r["peak_mem_gb"],
        peak_mem_source=r["peak_mem_source"],
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
    )
    return row


def _mode_label(r: dict) -> str:
    return {"off": "off (unrolled)", "on": "remat", "loop": "off (loop)", "mixed": "mixed (loop)",
            TORCH: "PyTorch (authors' algorithm)"}.get(r.get("mode", ""), str(r.get("mode")))


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def add_torch_ratios(rows: list[dict]) -> None:
    """speedup_vs_torch and peak_vs_torch on every JAX row whose T has a finished "torch" row."""
    ref = {r["T"]: r for r in rows if r.get("mode") == TORCH and "error" not in r}
    for r in rows:
        t = ref.get(r["T"])
        if t is None or r is t or "error" in r:
            continue
        r["speedup_vs_torch"] = rounded(t["iter_s_median"] / r["iter_s_median"], 3)
        r["peak_vs_torch"] = rounded(r["peak_mem_gb"] / t["peak_mem_gb"], 3)


def table(rows: list[dict]) -> str:
    """Markdown table; "vs off" compares each row with the same T in mode "off", "vs torch" with mode "torch"."""
    base = {r["T"]: r for r in rows if r.get("mode", "off") == "off" and "error" not in r}
    lines = [
        "| T | mode | iter s (median) | compile s | peak mem GB | child max RSS GB | XLA temp GB | peak vs off "
        "| time vs off | speed-up vs torch | peak vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {_mode_label(r)} | {r['error']} | — | — | "
                         f"{_fmt(r.get('child_max_rss_gb'), '.2f')} | — | — | — | — | — |")
            continue
        b = base.get(r["T"])
        rel = rel_t = "—"
        if b is not None and b is not r and b.get("peak_mem_gb"):
            rel = f"{r['peak_mem_gb'] / b['peak_mem_gb']:.2f}x"
            rel_t = f"{r['iter_s_median'] / b['iter_s_median']:.2f}x"
        lines.append(
            f"| {r['T']} | {_mode_label(r)} | {_fmt(r['iter_s_median'], '.3f')} | "
            f"{_fmt(r['compile_s'], '.1f')} | {_fmt(r['peak_mem_gb'], '.3f')} | {_fmt(r['child_max_rss_gb'], '.3f')} | "
            f"{_fmt(r.get('xla_temp_gb'), '.3f')} | {rel} | {rel_t} | "
            f"{_fmt(r.get('speedup_vs_torch'), '.2f')} | {_fmt(r.get('peak_vs_torch'), '.2f')} |"
        )
    return "\n".join(lines)


def _same_settings(args) -> dict:
    return {"setting": args.setting, "batch": args.batch, "conv_impl": args.conv_impl, "dtype": args.dtype,
            "pairs": args.pairs, "iters": args.iters}


def finished_rows(args) -> dict[tuple[int, str], dict]:
    """Rows without error already in `--out` from a run with the same settings, by (T, mode): the resume."""
    if not args.out or not Path(args.out).is_file():
        return {}
    try:
        doc = json.loads(Path(args.out).read_text())
    except (OSError, json.JSONDecodeError) as e:
        log(f"{args.out}: not a previous run's output ({e}); it will be overwritten")
        return {}
    if doc.get("settings") != _same_settings(args):
        log(f"{args.out}: written with other settings ({doc.get('settings')}); it will be overwritten")
        return {}
    derived = ("speedup_vs_torch", "peak_vs_torch")  # recomputed from this run's rows by add_torch_ratios
    return {(r["T"], r["mode"]): {k: v for k, v in r.items() if k not in derived}
            for r in doc.get("rows", []) if "error" not in r}


def write_out(args, rows: list[dict]) -> None:
    if not args.out:
        return
    doc = {"benchmark": "unroll_memory", "setting": args.setting, "batch": args.batch,
           "settings": _same_settings(args), "rows": rows, **common.host_info()}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(args.out)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    configs = [(T, mode) for T in args.Ts for mode in args.remat_modes]
    log(f"{len(configs)} configurations ({args.setting}, batch {args.batch}), one child process each")
    done = finished_rows(args)
    rows = []
    for i, (T, mode) in enumerate(configs, 1):
        if (T, mode) in done:
            log(f"[{i}/{len(configs)}] T={T} mode={mode}: kept from {args.out}")
            row = done[T, mode]
        else:
            log(f"[{i}/{len(configs)}] T={T} mode={mode}")
            row = measure(args, T, mode)
        rows.append(row)
        common.emit(row)
        write_out(args, rows)  # after every row: a long table survives an interruption
    add_torch_ratios(rows)
    print(table(rows), flush=True)
    write_out(args, rows)
    if args.out:
        log(f"wrote {args.out}")
    if any("error" in r for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
