"""Reading a study: paired differences between methods, and what the meta-parameters did in a run.

    python -m experiments.study_report paired WORKDIR... --method l2t_ww [--against scratch,lwf_at,...]
        [--metric test_acc_at_best_val] [--json OUT]
    python -m experiments.study_report meta RUN [--json OUT]

`paired`: the runs (summary.json under the folders) are grouped by setting (dataset,
n_per_class, target) and method. For every other method, the per-seed difference
`method − other` on the seeds both have, its mean and sample standard deviation, and
beside it the seed-to-seed spread (sample std over seeds) of each of the two methods:
a difference is only worth reading against that spread.

`meta`: for one finished L2T run (final_transfer.msgpack, metrics.jsonl), how far φ
(the meta-networks' parameters) moved from its initial value, per network and overall
(the initial φ is rebuilt from the run's seed, `run_setup.build`); and, per evaluated
epoch, the mean λ per pair, the mean meta-gradient norm and the outer loss from
metrics.jsonl (what the meta step saw over training).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from experiments import table as table_lib


def _std(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (ddof 1); None for fewer than two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def paired_differences(runs: Sequence[table_lib.Run], method: str, against: Optional[Sequence[str]] = None,
                       metric: str = "test_acc_at_best_val") -> list[dict[str, Any]]:
    """Per setting and other method: the per-seed differences `method − other` of `metric`.

    Returns:
      one dict per (setting, other): {"setting", "method", "other", "seeds", "diffs",
      "mean_diff", "std_diff", "spread_method", "spread_other", "wins"} (spreads: sample
      std over each method's own seeds; wins: how many seeds `method` is ahead on).
    """
    by: dict[tuple, dict[str, dict[Any, float]]] = {}
    for r in runs:
        value = r.summary.get(metric)
        if value is None:
            continue
        dataset, _classes, _src, target, n = r.setting
        by.setdefault((dataset, target, n), {}).setdefault(r.method, {})[r.seed] = float(value)
    out = []
    for setting in sorted(by, key=lambda s: (s[0], s[1], s[2])):
        cells = by[setting]
        if method not in cells:
            continue
        others = [m for m in (against or sorted(cells, key=table_lib.method_order_key)) if m != method and m in cells]
        for other in others:
            seeds = sorted(set(cells[method]) & set(cells[other]), key=str)
            diffs = [cells[method][s] - cells[other][s] for s in seeds]
            out.append({
                "setting": {"dataset": setting[0], "target": setting[1], "n_per_class": setting[2]},
                "method": method, "other": other, "seeds": seeds, "diffs": diffs,
                "mean_diff": sum(diffs) / len(diffs) if diffs else None, "std_diff": _std(diffs),
                "spread_method": _std(list(cells[method].values())), "spread_other": _std(list(cells[other].values())),
                "wins": sum(d > 0 for d in diffs),
            })
    return out


def _f(v: Optional[float], fmt: str = "{:+.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def paired_markdown(rows: Sequence[dict], metric: str) -> str:
    lines = [f"Paired differences of {metric} (percentage points; per seed, then mean ± sample std over seeds):", "",
             "| setting | method − other | per seed | mean ± std | wins | seed spread (method / other) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["setting"]
        per_seed = ", ".join(f"s{seed}: {d:+.2f}" for seed, d in zip(r["seeds"], r["diffs"]))
        lines.append(
            f"| {s['dataset']} N={s['n_per_class']} {s['target']} | {r['method']} − {r['other']} | {per_seed or '-'} "
            f"| {_f(r['mean_diff'])} ± {_f(r['std_diff'], '{:.2f}')} | {r['wins']}/{len(r['diffs'])} "
            f"| {_f(r['spread_method'], '{:.2f}')} / {_f(r['spread_other'], '{:.2f}')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- meta dynamics


def _norm(tree) -> float:
    import jax
    import numpy as np

    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in jax.tree.leaves(tree)))


def phi_movement(run: str | Path) -> dict[str, Any]:
    """How far φ moved: ||φ_final − φ_0|| and ||φ_0|| per meta-network group ("w.<i>", "lw.<i>") and overall.

    φ_0 is the run's initial φ, rebuilt exactly from its config (`run_setup.build` with
    the run's seed); φ_final is final_transfer.msgpack's "meta_params".
    """
    import jax

    from l2t_jax import run_config
    from l2t_jax.io.msgpack import load_variables
    from l2t_jax.run_setup import build
    from experiments.figures import load_config

    run = Path(run)
    path = run / "final_transfer.msgpack"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not finished")
    spec = run_config.resolve(load_config(run))
    if not spec.bilevel.matching.has_meta_params:
        raise ValueError(f"method {spec.method!r} has no meta-parameters")
    summary = json.loads((run / "summary.json").read_text())
    setup = build(spec, int(summary["num_classes"]))
    phi0 = jax.device_get(setup.initial_state.meta_params)
    phi1 = load_variables(path)["meta_params"]
    groups = {}
    for kind in ("w", "lw"):
        for i, (a, b) in enumerate(zip(_as_list(phi0.get(kind)), _as_list(phi1.get(kind)))):
            delta = jax.tree.map(lambda x, y: y - x, a, b)
            groups[f"{kind}.{i}"] = {"initial_norm": _norm(a), "change_norm": _norm(delta)}
    total0 = math.sqrt(sum(g["initial_norm"] ** 2 for g in groups.values()))
    total_d = math.sqrt(sum(g["change_norm"] ** 2 for g in groups.values()))
    return {"groups": groups, "initial_norm": total0, "change_norm": total_d,
            "relative_change": total_d / total0 if total0 else None, "steps": summary.get("steps")}


def _as_list(tree) -> list:
    """φ's per-pair networks as a list: a list, a msgpack-restored one (keys "0", "1", ...), or one group."""
    if not tree:
        return []
    if isinstance(tree, (list, tuple)):
        return list(tree)
    if all(str(k).isdigit() for k in tree):
        return [tree[k] for k in sorted(tree, key=int)]
    return [tree]  # λ type "const": one vector for every pair


def meta_history(run: str | Path) -> list[dict[str, Any]]:
    """Per epoch record of metrics.jsonl: epoch, val_acc, mean λ per pair, meta-gradient norm, outer loss."""
    out = []
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "epoch":
            continue
        out.append({k: rec.get(src) for k, src in (
            ("epoch", "epoch"), ("val_acc", "val_acc"), ("lambda", "train_lambda"), ("lambda_mean", "train_lambda_mean"),
            ("meta_grad_norm", "train_meta_grad_norm"), ("outer_loss", "train_outer_loss"), ("wfm", "train_wfm"),
            ("ce", "train_ce"))})
    return out


def meta_markdown(run: Path, moved: dict, history: Sequence[dict], every: int = 20) -> str:
    lines = [f"Meta-parameters of {run}:", "",
             f"φ moved by {moved['change_norm']:.4g} from an initial norm of {moved['initial_norm']:.4g} "
             f"(relative change {moved['relative_change']:.3g}) in {moved['steps']} steps.", "",
             "| group | initial norm | change norm | relative |", "|---|---|---|---|"]
    for name, g in moved["groups"].items():
        rel = f"{g['change_norm'] / g['initial_norm']:.3g}" if g["initial_norm"] else "— (starts at 0)"
        lines.append(f"| {name} | {g['initial_norm']:.4g} | {g['change_norm']:.4g} | {rel} |")
    lines += ["", "| epoch | val acc | mean λ | λ min / max over pairs | meta-grad norm | outer loss | L_wfm |",
              "|---|---|---|---|---|---|---|"]
    for h in history:
        if h["epoch"] % every and h is not history[-1] and h["epoch"] != 1:
            continue
        lam = h["lambda"] or []
        rng = f"{min(lam):.3f} / {max(lam):.3f}" if lam else "-"
        lines.append(f"| {h['epoch']} | {_f(h['val_acc'], '{:.1f}')} | {_f(h['lambda_mean'], '{:.3f}')} | {rng} "
                     f"| {_f(h['meta_grad_norm'], '{:.3g}')} | {_f(h['outer_loss'], '{:.3f}')} | {_f(h['wfm'], '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.study_report", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("paired", help="per-seed differences between methods")
    a.add_argument("workdirs", nargs="+")
    a.add_argument("--method", default="l2t_ww")
    a.add_argument("--against", default="", help="comma-separated methods (default: every other method)")
    a.add_argument("--metric", default="test_acc_at_best_val")
    a.add_argument("--json", default="")
    m = sub.add_parser("meta", help="what φ, λ and the meta-gradient did in one run")
    m.add_argument("run")
    m.add_argument("--json", default="")
    m.add_argument("--every", type=int, default=20, help="show every k-th epoch (and the first and last)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "paired":
            runs = table_lib.load_runs(args.workdirs)
            against = [s.strip() for s in args.against.split(",") if s.strip()] or None
            rows = paired_differences(runs, args.method, against, args.metric)
            if not rows:
                raise ValueError(f"no run of method {args.method!r} with another method beside it under {args.workdirs}")
            print(paired_markdown(rows, args.metric), end="")
            out: Any = rows
        else:
            moved, history = phi_movement(args.run), meta_history(args.run)
            print(meta_markdown(Path(args.run), moved, history, args.every), end="")
            out = {"phi": moved, "history": history}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
