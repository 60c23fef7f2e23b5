"""The offline quickstart: pretrain a small source, transfer it three ways, compare.

Driven by `experiments/configs/quickstart.py` through `experiments.run`:

1. train `config.source` (a plain supervised run, e.g. a tiny VGG on digits 0-4);
2. for each method in `config.methods`, train `config.target` (e.g. few-shot digits
   5-9) with that method, the source's best-validation weights as source, and the
   pairs `config.pairs[method]` (a method whose name fixes its pairs, such as
   fm_one_to_one, needs no entry);
3. print and write (`results.md`, `results.json`) a side-by-side table of accuracies.

The quickstart is a composition of ordinary runs: `sub_runs` resolves every stage to a
`run_config.RunSpec` before any of them trains (a mistake that only concerns the last
run stops the command at once), and each is trained by `loop.train` in its own
sub-directory (`source/`, `<method>/`), so rerunning the command resumes an
interrupted quickstart where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections

from l2t_jax import loop, run_config
from l2t_jax.run_config import ConfigError

log = logging.getLogger(__name__)


def target_config(config: ml_collections.ConfigDict, method: str, source_weights: str) -> ml_collections.ConfigDict:
    """The run config of one target run of the comparison."""
    c = ml_collections.ConfigDict(config.target.to_dict())
    c.method = method
    spec = run_config.METHOD_SPECS.get(method)
    if spec is None or spec.matching != "scratch" or spec.lwf or spec.at:  # the run uses the source
        if method in config.pairs:
            c.pairs = config.pairs[method]
        c.source_model = config.source.target_model
        c.source_weights = source_weights
    return c


def _needs_pairs_entry(method: str) -> bool:
    spec = run_config.METHOD_SPECS.get(method)
    return spec is not None and spec.matching != "scratch" and spec.pairs is None


def sub_runs(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, run_config.RunSpec]:
    """{"source": its run, method: its target run, ...}, every one resolved before any trains.

    Raises:
      ConfigError / FileNotFoundError naming the sub-run (the targets' source weights,
      which the source run writes, need not exist yet).
    """
    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("config.methods names no method")
    for m in methods:
        if _needs_pairs_entry(m) and m not in config.pairs:
            raise ConfigError(f"config.methods names {m!r} but config.pairs has no entry for it")
    source_weights = str(workdir / "source" / "best_weights.msgpack")
    configs = {"source": ml_collections.ConfigDict(config.source.to_dict())}
    for m in methods:
        configs[m] = target_config(config, m, source_weights)
    runs = {}
    for name, c in configs.items():
        if name == "source":
            what = "the source run (config.source)"
        else:
            entry = f", pairs from config.pairs.{name}" if name in config.pairs else ""
            what = f"the {name} run (config.target with method {name}{entry})"
        try:
            runs[name] = run_config.resolve(c, pending=(source_weights,))
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{what}: {e}") from None
    return runs


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


def _write_if_changed(path: Path, text: str) -> None:
    """Writes `text` unless the file already holds exactly it (a finished rerun changes nothing)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def run_quickstart(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole comparison; returns {"source": summary, "targets": {method: summary}, "table": str}."""
    workdir = Path(workdir).expanduser().resolve()
    runs = sub_runs(config, workdir)
    log.info("quickstart: source run")
    source = loop.train(runs.pop("source"), workdir / "source")
    targets = {}
    for m, c in runs.items():
        log.info("quickstart: target run %s", m)
        targets[m] = loop.train(c, workdir / m)
    rows = [
        {
            "method": m,
            "pairs": runs[m].record["pairs"] if runs[m].pairs else "-",
            **{k: s[k] for k in ("best_val_acc", "test_acc_at_best_val", "last_test_acc", "wall_time_s")},
        }
        for m, s in targets.items()
    ]
    table = results_table(rows)
    # the runs' own wall times (not this call's): a rerun of a finished quickstart writes the same files
    total = sum(float(s["wall_time_s"]) for s in (source, *targets.values()))
    n_train = config.target.n_per_class or "all"
    header = (
        f"Source {config.source.target_model} on {config.source.dataset} classes {config.source.classes}: "
        f"test acc {_fmt(source['test_acc_at_best_val']).strip()} %.\n"
        f"Target {config.target.target_model} on {config.target.dataset} classes {config.target.classes}, "
        f"{n_train} training images per class, {config.target.epochs} epochs, seed {config.target.seed} "
        f"(accuracies in %):\n"
    )
    text = header + "\n" + table + f"\n\nTotal wall time {total:.0f} s.\n"
    _write_if_changed(workdir / "results.md", text)
    _write_if_changed(workdir / "results.json", json.dumps(
        {"source": {k: v for k, v in source.items() if k != "history"}, "targets": rows,
         "total_wall_time_s": total}, indent=2, sort_keys=True) + "\n")
    print("\n" + text, flush=True)
    return {"source": source, "targets": targets, "table": table}
