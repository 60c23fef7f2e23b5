"""How far a float32 meta-gradient is from the exact (float64) one, on a config's own data and state.

    python -m l2t_jax.reference precision --config=experiments/configs/stl10.py [--config.KEY=VALUE ...]
        [--batches=N] [--workdir=RUN] [--json=OUT.json]

The meta-gradient differentiates through T + 1 SGD steps, so float32 rounding in
the inner gradients is amplified by the look-ahead's second-order terms. How much
depends on the setting: small batches and deep, high-resolution networks amplify it
most. This tool answers "is float32 safe here?" before a long run: on the first N
training batches of the config (augmented as training sees them) it takes the
meta-gradient at the run's state — the fresh initial state, or with `--workdir` the
newest checkpoint of a run — once in float32 and once in float64 (the same state
cast up), and prints per meta-parameter group (each pair's weight network `w.i`
and λ network `lw.i`, then all `w`, all `lw`, everything) the relative L2 error
and the cosine between the two. The state is treated as θ₁, the point the
look-ahead starts from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

PyTree = Any


def _groups(meta: PyTree) -> dict[str, list[np.ndarray]]:
    """{group: leaves}: "w.i" / "lw.i" per pair (or "lw" for λ type const), in pair order."""
    import jax

    out: dict[str, list[np.ndarray]] = {}
    for kind in ("w", "lw"):
        value = meta.get(kind)
        if value is None:
            continue
        if isinstance(value, dict):  # λ type "const": one vector for all pairs
            out[kind] = [np.asarray(a) for a in jax.tree.leaves(value)]
            continue
        for i, net in enumerate(value):
            out[f"{kind}.{i}"] = [np.asarray(a) for a in jax.tree.leaves(net)]
    return out


def compare_gradients(g32: PyTree, g64: PyTree) -> list[dict]:
    """Rows {group, rel_l2, cosine, norm64} per pair network, per kind and over all of φ.

    Args:
      g32, g64: meta-gradients with φ's structure (float32 and float64).
    """
    a, b = _groups(g32), _groups(g64)
    rows = []

    def row(name: str, xs: list[np.ndarray], ys: list[np.ndarray]) -> dict:
        x = np.concatenate([np.ravel(v).astype(np.float64) for v in xs]) if xs else np.zeros(0)
        y = np.concatenate([np.ravel(v).astype(np.float64) for v in ys]) if ys else np.zeros(0)
        ny, nx = float(np.linalg.norm(y)), float(np.linalg.norm(x))
        rel = float(np.linalg.norm(x - y) / ny) if ny > 0 else (0.0 if nx == 0 else float("inf"))
        cos = float(np.dot(x, y) / (nx * ny)) if nx > 0 and ny > 0 else float("nan")
        return {"group": name, "rel_l2": rel, "cosine": cos, "norm64": ny}

    for name in b:
        rows.append(row(name, a[name], b[name]))
    for kind in ("w", "lw"):
        names = [n for n in b if n == kind or n.startswith(kind + ".")]
        if names:
            rows.append(row(f"all {kind}", [v for n in names for v in a[n]], [v for n in names for v in b[n]]))
    rows.append(row("all", [v for n in b for v in a[n]], [v for n in b for v in b[n]]))
    return rows


def meta_gradient_precision(config, batches: int = 4, workdir: Optional[str] = None) -> dict:
    """The float32-vs-float64 meta-gradient report of `config` (an ml_collections run config).

    Args:
      config: a run config (`experiments/configs/*.py` with overrides).
      batches: how many training batches (the first of epoch 0).
      workdir: a run folder whose newest checkpoint gives the state (None: the fresh state).
    Returns:
      {"setting", "state", "batches": [{"batch", "rows"}], "summary": rows of the worst batch per group}.
    Raises:
      run_config.ConfigError: the config cannot run, or has no meta-parameters.
    """
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from l2t_jax import bilevel, data as data_lib, loop, run_config
    from l2t_jax.checkpoint import Checkpointer

    spec = run_config.resolve(config)
    data = loop.load_run_data(spec.data)
    setup = loop.build(spec, data.num_classes)
    if not setup.bilevel_config.has_meta_step:
        raise run_config.ConfigError(f"config.method={spec.method!r} has no meta-parameters: nothing to compare")
    state, where = setup.initial_state, "initial state"
    if workdir:
        ckpt = Checkpointer(Path(workdir).expanduser() / "checkpoints")
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: pass a run folder of experiments.run")
        state, _ = ckpt.restore(state, step)
        where = f"checkpoint {step} of {workdir}"
    cfg, models = setup.bilevel_config, setup.models

    def cast(tree, dtype):
        return jax.tree.map(lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                            else jnp.asarray(a), tree)

    @jax.jit
    def grad_fn(meta, params, opt_state, batch_stats, source_vars, x, y):
        src_logits, feats = bilevel.source_outputs(models.source, source_vars, x)
        return bilevel.meta_gradient(meta, params, opt_state, batch_stats, x, y, feats, model=models.target,
                                     cfg=cfg, src_logits=src_logits)[0]

    def at(dtype, x, y):
        opt = bilevel.with_learning_rate(state.opt_state, float(spec.schedule.lr))
        args = cast((state.meta_params, state.params, opt, state.batch_stats, setup.source_variables, x), dtype)
        return jax.device_get(grad_fn(*args, jnp.asarray(y, jnp.int32)))

    sched, ds = spec.schedule, spec.data
    it = data_lib.batch_iterator(data.train, min(sched.batch_size, len(data.train)), train=True,
                                 image_size=ds.image_size, seed=spec.seed, epoch=0, num_workers=1,
                                 resize_to=ds.resize_to or None)
    source = spec.sources[0].model if spec.sources else config.source_model
    out = {"setting": {"target": spec.target.model, "source": source, "method": spec.method,
                       "batch_size": sched.batch_size, "T": int(cfg.T), "image_size": ds.image_size,
                       "pairs": len(spec.pairs), "lr": float(sched.lr)},
           "state": where, "batches": []}
    for k, (x, y) in enumerate(it):
        if k >= batches:
            break
        rows = compare_gradients(at(jnp.float32, x, y), at(jnp.float64, x, y))
        out["batches"].append({"batch": k, "rows": rows})
    it.close()  # stop the batch generator's prefetching
    worst = {}
    for b in out["batches"]:
        for r in b["rows"]:
            if r["group"] not in worst or r["rel_l2"] > worst[r["group"]]["rel_l2"]:
                worst[r["group"]] = dict(r, batch=b["batch"])
    out["summary"] = list(worst.values())
    return out


def format_report(report: dict) -> str:
    """The report as a table: per group the worst batch's relative error and cosine."""
    s = report["setting"]
    lines = [f"meta-gradient float32 vs float64: {s['source']} -> {s['target']}, {s['method']}, "
             f"{s['pairs']} pairs, T {s['T']}, batch {s['batch_size']}, {s['image_size']} px, lr {s['lr']:g}; "
             f"{report['state']}; {len(report['batches'])} batches",
             f"{'group':<10} {'worst rel L2':>13} {'cosine there':>13} {'|g64|':>11} {'batch':>6}"]
    for r in report["summary"]:
        lines.append(f"{r['group']:<10} {r['rel_l2']:13.3e} {r['cosine']:13.9f} {r['norm64']:11.3e} {r['batch']:>6}")
    per_batch = ", ".join(f"{next(r['rel_l2'] for r in b['rows'] if r['group'] == 'all'):.2e}"
                          for b in report["batches"])
    lines.append(f"all of φ, per batch: {per_batch}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """absl entry point (flags parsed by `run_cli`)."""
    from l2t_jax import run_config

    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        report = meta_gradient_precision(_CONFIG.value, _BATCHES.value, _WORKDIR.value or None)
    except (run_config.ConfigError, FileNotFoundError, ValueError) as e:
        if _DEBUG.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if _JSON.value:
        Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_JSON.value).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "run config file (experiments/configs/*.py)")
    batches = flags.DEFINE_integer("batches", 4, "training batches to compare on")
    workdir = flags.DEFINE_string("workdir", "", "run folder: take the state of its newest checkpoint")
    out = flags.DEFINE_string("json", "", "also write the report as JSON here")
    debug = flags.DEFINE_bool("debug", False, "show the traceback of an error")
    flags.mark_flags_as_required(["config"])
    return config, batches, workdir, out, debug


_CONFIG = _BATCHES = _WORKDIR = _JSON = _DEBUG = None


def run_cli(argv: list[str]) -> int:
    """`python -m l2t_jax.reference precision ...`: absl flags from `argv` (program name first)."""
    global _CONFIG, _BATCHES, _WORKDIR, _JSON, _DEBUG
    from l2t_jax.cli import run_absl

    if _CONFIG is None:
        _CONFIG, _BATCHES, _WORKDIR, _JSON, _DEBUG = _define_flags()
    return run_absl(main, argv)
