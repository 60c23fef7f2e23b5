"""The offline quickstart: pretrain a small source, transfer it three ways, compare.

Driven by `experiments/configs/quickstart.py` through `experiments.run`:

1. train `config.source` (a plain supervised run, e.g. a tiny VGG on digits 0-4);
2. for each method in `config.methods`, train `config.target` (e.g. few-shot digits
   5-9) with that method, the source's best-validation weights as source, and the
   pairs `config.pairs[method]`;
3. print and write (`results.md`, `results.json`) a side-by-side table of accuracies.

Every stage is an ordinary run in its own sub-directory (`source/`, `<method>/`), so
rerunning the command resumes an interrupted quickstart where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ml_collections

from l2t_jax import loop

log = logging.getLogger(__name__)


def target_config(config: ml_collections.ConfigDict, method: str, source_weights: str) -> ml_collections.ConfigDict:
    """The run config of one target run of the comparison."""
    c = ml_collections.ConfigDict(config.target.to_dict())
    c.method = method
    if method != "scratch":
        c.pairs = config.pairs[method]
        c.source_model = config.source.target_model
        c.source_weights = source_weights
    return c


def _fmt(v) -> str:
    return "  n/a" if v is None else f"{v:5.1f}"


def results_table(rows: list[dict]) -> str:
    """A Markdown table of the runs' accuracies."""
    lines = [
        "| method | pairs | best val acc | test acc @ best val | last-epoch test acc | time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['pairs']} | {_fmt(r['best_val_acc'])} | {_fmt(r['test_acc_at_best_val'])} "
            f"| {_fmt(r['last_test_acc'])} | {r['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)


def run_quickstart(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole comparison; returns {"source": summary, "targets": {method: summary}, "table": str}."""
    t0 = time.time()
    workdir = Path(workdir).expanduser().resolve()
    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    for m in methods:
        if m != "scratch" and m not in config.pairs:
            raise ValueError(f"config.methods names {m!r} but config.pairs has no entry for it")
    log.info("quickstart: source run")
    source = loop.train(config.source, workdir / "source")
    source_weights = str(workdir / "source" / "best_weights.msgpack")
    targets = {}
    for m in methods:
        log.info("quickstart: target run %s", m)
        targets[m] = loop.train(target_config(config, m, source_weights), workdir / m)
    rows = [
        {
            "method": m,
            "pairs": "-" if m == "scratch" else config.pairs[m],
            **{k: s[k] for k in ("best_val_acc", "test_acc_at_best_val", "last_test_acc", "wall_time_s")},
        }
        for m, s in targets.items()
    ]
    table = results_table(rows)
    total = time.time() - t0
    n_train = config.target.n_per_class or "all"
    header = (
        f"Source {config.source.target_model} on {config.source.dataset} classes {config.source.classes}: "
        f"test acc {_fmt(source['test_acc_at_best_val']).strip()} %.\n"
        f"Target {config.target.target_model} on {config.target.dataset} classes {config.target.classes}, "
        f"{n_train} training images per class, {config.target.epochs} epochs, seed {config.target.seed} "
        f"(accuracies in %):\n"
    )
    text = header + "\n" + table + f"\n\nTotal wall time {total:.0f} s.\n"
    (workdir / "results.md").write_text(text)
    (workdir / "results.json").write_text(
        json.dumps({"source": {k: v for k, v in source.items() if k != "history"}, "targets": rows,
                    "total_wall_time_s": total}, indent=2) + "\n"
    )
    print("\n" + text, flush=True)
    return {"source": source, "targets": targets, "table": table}
