"""Results table from finished runs: mean ± std over seeds, with the paper's numbers beside ours.

    python -m experiments.table WORKDIR... [--out table.md] [--json table.json]
        [--metric test_acc_at_best_val]

Every `summary.json` under the given folders (searched recursively; a
`summary.json` path itself is accepted too) is one run. Runs are grouped

* into rows by setting: dataset (and `classes`, when a run selects some), source
  model -> target model, n_per_class (0 = all the training data), all read from
  summary["config"]. A run without a source (scratch: summary["source_model"] is null)
  sits in the row of its config's source model, beside the transfers it is the baseline
  of; a row where no run used a source shows "(none)" as its source (source_model "" in
  the JSON), not the config's unused `source_model`;
* into columns by method (summary["method"]), in the paper's order (scratch, lwf,
  at, lwf_at, fm_single, fm_one_to_one, l2t_w_single, l2t_w_one_to_one, l2t_ww),
  then the others (l2t_ww_weights, l2t_ww_original, l2t_ww_first_order, fm, l2t_w,
  anything else alphabetically). A multi-source run (non-empty
  config["extra_sources"]) goes to "<method>+multi". When one row holds runs of a
  method with different `config.pairs`, that method's columns are split by pairs
  ("fm[single]", "fm[one_to_one]").

A cell is the mean ± sample standard deviation (ddof 1) of `--metric` (default: the
test accuracy at the best validation epoch, the paper's protocol) over its runs.
"(n=K)" follows when fewer than 3 runs made it, when a seed repeats, or when the
cell's seeds are not the ones most cells of its row share (the larger set on a tie).
Beside it, in brackets, the paper's number where one exists: Table 1 (and Appendix C for l2t_ww_weights / l2t_ww_original on CUB200,
MIT67 and Stanford40), only for full-data rows (n_per_class = 0) of a paper dataset.
A cell mixing runs whose configs differ in more than the seed is flagged with "†"
and the differing keys are listed under the table.

Markdown goes to stdout (and `--out`); `--json PATH` ("-" = stdout, instead of the
markdown) writes the same numbers with each cell's values, seeds and run folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

# --------------------------------------------------------------------------- the paper

PAPER_METHODS = (
    "scratch", "lwf", "at", "lwf_at", "fm_single", "fm_one_to_one", "l2t_w_single", "l2t_w_one_to_one", "l2t_ww",
)
OTHER_METHODS = ("l2t_ww_weights", "l2t_ww_original", "l2t_ww_first_order", "fm", "l2t_w")
PAPER_ROWS = ("CIFAR-100", "STL-10", "CUB200", "MIT67", "Stanford40", "Stanford Dogs")

# Table 1: (mean, std) per row, in PAPER_METHODS order.
_TABLE1 = {
    "CIFAR-100": ((67.69, 0.22), (69.23, 0.09), (67.54, 0.40), (68.75, 0.09), (69.40, 0.67), (69.97, 0.24),
                  (70.27, 0.09), (70.02, 0.19), (70.96, 0.61)),
    "STL-10": ((65.18, 0.91), (68.64, 0.58), (74.19, 0.22), (75.06, 0.57), (75.00, 0.34), (76.38, 1.18),
               (74.35, 0.92), (76.42, 0.52), (78.31, 0.21)),
    "CUB200": ((42.15, 0.75), (45.52, 0.66), (57.74, 1.17), (58.90, 1.32), (47.60, 0.31), (48.93, 0.40),
               (51.95, 0.83), (56.61, 0.20), (65.05, 1.19)),
    "MIT67": ((48.91, 0.53), (53.73, 2.14), (59.18, 1.57), (61.42, 1.68), (55.15, 0.93), (54.88, 1.24),
              (60.41, 0.37), (59.78, 1.90), (64.85, 2.75)),
    "Stanford40": ((36.93, 0.68), (39.73, 1.63), (59.29, 0.91), (60.20, 1.34), (42.93, 1.48), (44.50, 0.96),
                   (46.25, 3.66), (48.19, 1.42), (63.08, 0.88)),
    "Stanford Dogs": ((58.08, 0.26), (66.33, 0.45), (69.70, 0.08), (72.67, 0.26), (66.05, 0.76), (67.25, 0.88),
                      (69.16, 0.70), (69.84, 1.45), (78.08, 0.96)),
}
# Appendix C (no standard deviations given): C.1 meta-weights, C.2 the original bilevel scheme.
_APPENDIX_C = {
    "CUB200": {"l2t_ww_weights": 61.75, "l2t_ww_original": 35.38},
    "MIT67": {"l2t_ww_weights": 64.10, "l2t_ww_original": 54.18},
    "Stanford40": {"l2t_ww_weights": 58.88, "l2t_ww_original": 53.47},
}


def paper_numbers() -> dict[str, dict[str, tuple[float, Optional[float]]]]:
    """{paper row: {method: (mean, std or None)}} (Table 1 and Appendix C)."""
    out: dict[str, dict[str, tuple[float, Optional[float]]]] = {}
    for row, values in _TABLE1.items():
        out[row] = dict(zip(PAPER_METHODS, values))
    for row, values in _APPENDIX_C.items():
        out[row].update({m: (v, None) for m, v in values.items()})
    return out


PAPER = paper_numbers()

# (paper row, lower-case substrings of the dataset string), checked in this order.
_DATASET_NAMES = (
    ("CIFAR-100", ("cifar100", "cifar-100", "cifar_100")),
    ("STL-10", ("stl10", "stl-10", "stl_10")),
    ("CUB200", ("cub", "caltech_birds")),
    ("MIT67", ("mit67", "mit_67", "indoor")),
    ("Stanford40", ("stanford40", "stanford_40", "actions")),
    ("Stanford Dogs", ("dogs",)),
)


def paper_row(dataset: str) -> Optional[str]:
    """The paper's row for a dataset string ("tfds:stl10" -> "STL-10"), or None."""
    low = dataset.lower()
    for row, keys in _DATASET_NAMES:
        if any(k in low for k in keys):
            return row
    return None


def method_order_key(column: str) -> tuple:
    """Sort key of a column label: the paper's methods, then the known others, then the rest."""
    base, _, rest = column.partition("+")
    base, _, qualifier = base.partition("[")
    if base in PAPER_METHODS:
        rank = (0, PAPER_METHODS.index(base), "")
    elif base in OTHER_METHODS:
        rank = (1, OTHER_METHODS.index(base), "")
    else:
        rank = (2, 0, base)
    return rank + (rest, qualifier)


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    """One finished run (a summary.json)."""

    path: Path  # the run's folder
    summary: dict

    @property
    def config(self) -> dict:
        return self.summary.get("config") or {}

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.config.get("method"))

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    @property
    def multi_source(self) -> bool:
        return bool(self.config.get("extra_sources"))

    @property
    def uses_source(self) -> bool:
        """Whether the run used a source network (summary["source_model"]; older summaries: not scratch)."""
        if "source_model" in self.summary:
            return self.summary["source_model"] is not None
        return self.method != "scratch"

    @property
    def setting(self) -> tuple[str, str, str, str, int]:
        """(dataset, classes, source_model, target_model, n_per_class)."""
        c = self.config
        return (
            str(c.get("dataset", self.summary.get("dataset", ""))),
            str(c.get("classes", "") or ""),
            str(c.get("source_model", self.summary.get("source_model")) or ""),
            str(c.get("target_model", self.summary.get("target_model")) or ""),
            int(c.get("n_per_class", 0) or 0),
        )


def find_summaries(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every summary.json under the given folders (or the given files), each once, sorted."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p).expanduser()
        if p.is_file():
            found.add(p.resolve())
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"no such folder: {p}")
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tb"))
            if "summary.json" in files:
                found.add((Path(root) / "summary.json").resolve())
    return sorted(found)


def load_runs(paths: Iterable[str | os.PathLike], warn=None) -> list[Run]:
    """The runs under `paths`; unreadable summaries (or ones without a method) are reported and skipped."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    runs = []
    for f in find_summaries(paths):
        try:
            s = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            warn(f"{f}: unreadable ({e}); skipped")
            continue
        if not isinstance(s, dict) or not (s.get("method") or (s.get("config") or {}).get("method")):
            warn(f"{f}: not a run summary (no method); skipped")
            continue
        runs.append(Run(f.parent, s))
    return runs


# Config keys that do not change the numbers (or name where things are), ignored when
# checking that the runs of one cell share their configuration.
_INCIDENTAL_KEYS = frozenset({
    "seed", "progress_bar", "num_workers", "offline", "data_dir", "log_every", "checkpoint_every_epochs",
    "max_checkpoints", "eval_batch_size", "conv_impl", "remat", "unroll", "hvp", "source_weights", "target_weights",
})


def _differing_keys(configs: Sequence[dict]) -> list[str]:
    """Keys whose values differ between runs; a key a run's record lacks (written before the key
    existed) counts as the key's default."""
    from l2t_jax.run_config import base_config

    defaults = base_config().to_dict()
    keys = set().union(*(c.keys() for c in configs)) - _INCIDENTAL_KEYS
    return sorted(k for k in keys
                  if len({json.dumps(c.get(k, defaults.get(k)), sort_keys=True) for c in configs}) > 1)


def column_labels(runs: Sequence[Run]) -> list[str]:
    """The column of each run: method, "+multi" for multi-source runs, "[pairs]" where pairs differ in a row."""
    base = [r.method + ("+multi" if r.multi_source else "") for r in runs]
    pairs_seen: dict[tuple, set] = {}
    for r, b in zip(runs, base):
        pairs_seen.setdefault((r.setting, b), set()).add(str(r.config.get("pairs", "")))
    split = {b for (_, b), seen in pairs_seen.items() if len(seen) > 1}
    out = []
    for r, b in zip(runs, base):
        if b in split:
            m, plus, rest = b.partition("+")
            b = f"{m}[{r.config.get('pairs', '')}]{plus}{rest}"
        out.append(b)
    return out


# --------------------------------------------------------------------------- the table


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _row_sort_key(setting: tuple) -> tuple:
    dataset, classes, source, target, n = setting
    row = paper_row(dataset)
    rank = PAPER_ROWS.index(row) if row else len(PAPER_ROWS)
    return (rank, dataset, classes, source, target, n == 0, n)


def build_table(runs: Sequence[Run], metric: str = "test_acc_at_best_val") -> dict:
    """Groups runs into rows (settings) and columns (methods) and computes every cell.

    Returns:
      {"metric", "columns": [labels in order], "rows": [{"dataset", "classes", "source_model",
      "target_model", "n_per_class", "paper_row", "cells": {column: cell}}], "skipped": [...]}
      where a cell is {"mean", "std", "n", "values", "seeds", "runs", "show_n", "mixed_keys",
      "paper": {"mean", "std"} or None}; a column without runs in a row has only its paper number
      (when one exists), with n = 0.
    """
    skipped = []
    usable = []
    for r in runs:
        v = r.summary.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            usable.append(r)
        else:
            skipped.append({"run": str(r.path), "reason": f"{metric} is {v!r}"})
    labels = column_labels(usable)
    with_source = {r.setting for r in usable if r.uses_source}

    def row_of(r: Run) -> tuple:
        # a setting no run used a source in is labelled by what ran: no source
        dataset, classes, source, target, n = r.setting
        return r.setting if r.setting in with_source else (dataset, classes, "", target, n)

    groups: dict[tuple, dict[str, list[Run]]] = {}
    for r, col in zip(usable, labels):
        groups.setdefault(row_of(r), {}).setdefault(col, []).append(r)
    columns = sorted(set(labels), key=method_order_key)
    rows = []
    for setting in sorted(groups, key=_row_sort_key):
        dataset, classes, source, target, n_per_class = setting
        prow = paper_row(dataset) if n_per_class == 0 and not classes else None
        cells: dict[str, dict] = {}
        for col in columns:
            members = sorted(groups[setting].get(col, []), key=lambda r: (str(r.seed), str(r.path)))
            paper = None
            if prow is not None and col in PAPER[prow]:
                m, s = PAPER[prow][col]
                paper = {"mean": m, "std": s}
            if not members:
                if paper is not None:
                    cells[col] = {"n": 0, "paper": paper}
                continue
            values = [float(r.summary[metric]) for r in members]
            mean, std = mean_std(values)
            cells[col] = {
                "mean": mean, "std": std, "n": len(values), "values": values,
                "seeds": [r.seed for r in members], "runs": [str(r.path) for r in members],
                "mixed_keys": _differing_keys([r.config for r in members]), "paper": paper,
            }
        # n is shown for fewer than 3 runs, for repeated seeds, and for seeds other than the row's usual ones
        # (the seed set most cells of the row share, the larger on a tie; when that leaves a tie, every
        # cell shows n).
        seed_sets = {col: tuple(sorted(map(str, c["seeds"]))) for col, c in cells.items() if c["n"]}
        rank = {ss: (list(seed_sets.values()).count(ss), len(ss)) for ss in set(seed_sets.values())}
        top = max(rank.values(), default=None)
        usual = [ss for ss, k in rank.items() if k == top]
        for col, ss in seed_sets.items():
            c = cells[col]
            c["show_n"] = c["n"] < 3 or len(set(ss)) < c["n"] or len(usual) > 1 or ss != usual[0]
        rows.append({
            "dataset": dataset, "classes": classes, "source_model": source, "target_model": target,
            "n_per_class": n_per_class, "paper_row": prow, "cells": cells,
        })
    return {"metric": metric, "columns": columns, "rows": rows, "skipped": skipped}


def _fmt_num(mean: float, std: Optional[float]) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_cell(cell: Optional[dict]) -> str:
    """One markdown cell: "ours (n=K)† [paper]"; "—" when empty."""
    if not cell:
        return "—"
    parts = []
    if cell["n"]:
        text = _fmt_num(cell["mean"], cell["std"])
        if cell.get("show_n"):
            text += f" (n={cell['n']})"
        if cell.get("mixed_keys"):
            text += " †"
        parts.append(text)
    else:
        parts.append("—")
    if cell.get("paper"):
        parts.append(f"[{_fmt_num(cell['paper']['mean'], cell['paper']['std'])}]")
    return " ".join(parts)


METRIC_NAMES = {
    "test_acc_at_best_val": "test accuracy at the best validation epoch",
    "last_test_acc": "test accuracy after the last epoch",
    "best_val_acc": "best validation accuracy",
    "last_val_acc": "validation accuracy after the last epoch",
}


def to_markdown(table: dict) -> str:
    """The table as markdown (a title line, the table, footnotes)."""
    metric = table["metric"]
    lines = [
        f"Top-1 % ({METRIC_NAMES.get(metric, metric)}), mean ± sample std over seeds; "
        "[paper: Table 1 / Appendix C] where the paper reports the setting.",
        "",
    ]
    if not table["rows"]:
        lines.append("(no finished runs found)")
        return "\n".join(lines) + "\n"
    cols = table["columns"]
    lines.append("| dataset | source → target | n/class | " + " | ".join(cols) + " |")
    lines.append("|---|---|---|" + "---|" * len(cols))
    notes = []
    for row in table["rows"]:
        name = row["dataset"] + (f" (classes {row['classes']})" if row["classes"] else "")
        if row["paper_row"]:
            name = f"{row['paper_row']} ({name})"
        arrow = f"{row['source_model'] or '(none)'} → {row['target_model']}"
        n = str(row["n_per_class"]) if row["n_per_class"] else "all"
        lines.append(f"| {name} | {arrow} | {n} | " + " | ".join(format_cell(row["cells"].get(c)) for c in cols) + " |")
        for c in cols:
            cell = row["cells"].get(c)
            if cell and cell.get("mixed_keys"):
                notes.append(f"† {name}, {n}/class, {c}: its runs differ in {', '.join(cell['mixed_keys'])}")
    if notes:
        lines += [""] + notes
    if table["skipped"]:
        lines += ["", f"{len(table['skipped'])} run(s) without a {metric} value were left out."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.table", description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", help="folders searched for summary.json (recursively)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--json", dest="json_out", help="write the table as JSON to this file ('-': stdout, no markdown)")
    p.add_argument("--metric", default="test_acc_at_best_val",
                   help="summary key to tabulate (test_acc_at_best_val, last_test_acc, best_val_acc, ...)")
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.workdirs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = build_table(runs, args.metric)
    for s in table["skipped"]:
        print(f"warning: {s['run']}: {s['reason']}; left out", file=sys.stderr)
    md = to_markdown(table)
    if args.out:
        Path(args.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).expanduser().write_text(md)
    if args.json_out:
        text = json.dumps(table, indent=2) + "\n"
        if args.json_out == "-":
            sys.stdout.write(text)
        else:
            Path(args.json_out).expanduser().parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).expanduser().write_text(text)
    if args.json_out != "-":
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
