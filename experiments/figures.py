"""The paper's figures from run folders, as PNGs (matplotlib, Agg).

    python -m experiments.figures --out DIR [--heatmap RUN] [--lambda_dist RUN]
        [--saliency FM_RUN L2TW_RUN] [--accuracy_vs_n WORKDIR...]

* `--heatmap RUN` -> DIR/lambda_heatmap.png (+ .json): the mean λ of every pair
  (source tap m, target tap n) over the last epoch's training steps, from
  RUN/metrics.jsonl and the run's pairs; taps without a pair are blank (Fig. 3d).
  Rows and columns without any pair are left out (`--heatmap_all_taps` keeps them).
* `--lambda_dist RUN` -> DIR/lambda_distribution.png (+ lambda_per_sample.npz): the
  per-sample λ of the run's final meta-networks on the test images, as histograms
  for the `--lambda_pairs` pairs (default: up to six with the largest mean λ)
  (Fig. 4). Rebuilt from the run folder: config.json, the source weights it names,
  and final_transfer.msgpack.
* `--saliency RUN RUN...` -> DIR/saliency.png: for `--n_images` test images,
  |∂ logit_y / ∂ x| (max over colour channels) of each run's final target network,
  beside the (de-normalised) image (Fig. 6: FM vs L2T-w).
* `--accuracy_vs_n WORKDIR...` -> DIR/accuracy_vs_n.png (+ .json): test accuracy at
  the best validation epoch against n_per_class, one line per method, mean ± std
  over seeds, one panel per setting (Fig. 5). Full-data runs (n_per_class = 0) are
  left out.

The data functions (`lambda_heatmap_matrix`, `last_epoch_lambda`, `per_sample_lambdas`,
`saliency_maps`, `accuracy_vs_n_series`) and the plotting functions (`plot_*`, pure
data -> `matplotlib.figure.Figure`) can be imported separately.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import table as table_lib
from l2t_jax import data as data_lib

IMAGENET_MEAN = np.asarray(data_lib.IMAGENET_MEAN, np.float32)  # the data pipeline's constants, as float32 arrays
IMAGENET_STD = np.asarray(data_lib.IMAGENET_STD, np.float32)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Writes `fig` as a PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def parse_pairs(spec: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """'m-n,m-n' (summary["pairs"]) or a sequence of (m, n) -> list of (m, n) (`transfer.parse_pairs`, validated)."""
    from l2t_jax.transfer import parse_pairs as parse

    return list(parse(spec))


# --------------------------------------------------------------------------- run folders


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_metrics(run: str | Path) -> list[dict]:
    """The records of RUN/metrics.jsonl."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (not a run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_config_dict(run: str | Path) -> dict:
    """The run's config: summary["config"] when finished, else config.json."""
    run = Path(run)
    if (run / "summary.json").is_file():
        return read_json(run / "summary.json")["config"]
    if (run / "config.json").is_file():
        return read_json(run / "config.json")
    raise FileNotFoundError(f"{run} holds neither summary.json nor config.json (not a run folder?)")


def load_config(run: str | Path):
    """The run's config as an `ml_collections.ConfigDict` (keys added since the run get their defaults)."""
    import ml_collections

    from l2t_jax import run_config

    merged = {**run_config.base_config().to_dict(), **run_config_dict(run)}
    return ml_collections.ConfigDict(merged)


def run_pairs(run: str | Path) -> list[tuple[int, int]]:
    """The run's resolved pairs: summary["pairs"], else resolved from config.json."""
    run = Path(run)
    if (run / "summary.json").is_file():
        return parse_pairs(read_json(run / "summary.json")["pairs"])
    from l2t_jax import run_config

    return list(run_config.resolve(load_config(run)).pairs)


# --------------------------------------------------------------------------- λ heatmap (Fig. 3d)


def last_epoch_lambda(records: Sequence[Mapping]) -> tuple[int, list[float]]:
    """(epoch, per-pair mean λ of its training steps) from the last epoch record of metrics.jsonl."""
    for rec in reversed(records):
        if rec.get("kind") == "epoch":
            lam = rec.get("train_lambda")
            if lam is None:
                lam = (rec.get("train") or {}).get("lambda")
            if lam is None:
                raise ValueError(f"the epoch-{rec.get('epoch')} record has no per-pair λ (a run without pairs?)")
            return int(rec["epoch"]), [float(v) for v in lam]
    raise ValueError("no epoch record in metrics.jsonl (the run has not finished an epoch)")


def lambda_heatmap_matrix(lam_by_pair: Sequence[float], pairs: Sequence[tuple[int, int]], n_source: int,
                          n_target: int) -> np.ndarray:
    """(n_source, n_target) matrix with λ of pair (m, n) at [m, n], NaN where there is no pair."""
    if len(lam_by_pair) != len(pairs):
        raise ValueError(f"{len(lam_by_pair)} λ values for {len(pairs)} pairs")
    mat = np.full((n_source, n_target), np.nan)
    for v, (m, n) in zip(lam_by_pair, pairs):
        if not (0 <= m < n_source and 0 <= n < n_target):
            raise ValueError(f"pair {m}-{n} is outside {n_source} source x {n_target} target taps")
        mat[m, n] = v
    return mat


def plot_lambda_heatmap(lam_by_pair: Sequence[float], pairs: Sequence[tuple[int, int]], n_source: int,
                        n_target: int, *, compact: bool = True, title: Optional[str] = None,
                        source_labels: Optional[Sequence[str]] = None) -> Figure:
    """Heatmap of λ per (source tap, target tap); blank without a pair.

    Args:
      lam_by_pair: λ per pair, in the order of `pairs`.
      pairs: (m, n) = (source tap, target tap).
      n_source, n_target: the numbers of taps.
      compact: leave out taps (rows/columns) that no pair uses.
      title: the figure's title.
      source_labels: a tick label per source tap (default: its index).
    """
    mat = lambda_heatmap_matrix(lam_by_pair, pairs, n_source, n_target)
    rows, cols = np.arange(n_source), np.arange(n_target)
    if compact and pairs:
        rows = np.array(sorted({m for m, _ in pairs}))
        cols = np.array(sorted({n for _, n in pairs}))
    shown = mat[np.ix_(rows, cols)]
    fig = _figure(1.6 + 0.75 * len(cols), 1.2 + 0.55 * len(rows))
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    finite = shown[np.isfinite(shown)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(source_labels[r]) if source_labels else str(r) for r in rows])
    ax.set_xlabel("target tap n")
    ax.set_ylabel("source tap m")
    if shown.size <= 100:
        mid = (vmin + vmax) / 2
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = shown[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if v > mid else "white")
    fig.colorbar(im, ax=ax, label="λ")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def heatmap_from_run(run: str | Path) -> dict:
    """The heatmap's data for a run.

    Returns:
      {"lambda", "pairs", "n_source", "n_target", "epoch", "matrix", "title", "source_labels"}.
      With several sources (config.extra_sources) the source taps are counted across the
      sources, as the run's pairs are, and labelled "s<k>:<tap>".
    """
    from l2t_jax import run_config
    from l2t_jax.models import model_info

    run = Path(run)
    cfg = run_config_dict(run)
    pairs = run_pairs(run)
    if not pairs:
        raise ValueError(f"{run}: method {cfg.get('method')!r} matches no feature pairs (no λ to show)")
    epoch, lam = last_epoch_lambda(read_metrics(run))
    extra = run_config.parse_extra_sources(cfg.get("extra_sources") or "", cfg.get("pairs", ""))
    sources = [cfg["source_model"]] + [s.model for s in extra]
    taps = [len(model_info(m).tap_channels) for m in sources]
    labels = [f"s{k}:{t}" for k, n in enumerate(taps) for t in range(n)] if len(taps) > 1 else None
    n_source = sum(taps)
    n_target = len(model_info(cfg["target_model"]).tap_channels)
    mat = lambda_heatmap_matrix(lam, pairs, n_source, n_target)
    title = (f"mean λ over epoch {epoch}: {cfg['method']}\n"
             f"{' + '.join(sources)} → {cfg['target_model']}, {cfg['dataset']}")
    return {"lambda": lam, "pairs": pairs, "n_source": n_source, "n_target": n_target, "epoch": epoch,
            "matrix": mat, "title": title, "source_labels": labels}


# --------------------------------------------------------------------------- per-sample λ (Fig. 4)


def per_sample_lambdas(run: str | Path, *, max_images: Optional[int] = None,
                       batch_size: Optional[int] = None) -> tuple[list[tuple[int, int]], np.ndarray]:
    """λ of every pair for every test image, from the run's final φ.

    Rebuilds the run from its folder: config.json (the data and the source weights it
    names must still be there), final_transfer.msgpack (φ). Test images get the
    evaluation transform, as `loop.evaluate` does (the validation split when the data
    have no test split).

    Returns:
      (pairs, lam): lam float (N, P), lam[i, p] = λ of pair p for image i.
    """
    import jax
    import jax.numpy as jnp

    from l2t_jax import bilevel, data as data_lib, loop, run_config, transfer, weights

    run = Path(run)
    config = load_config(run)
    spec = run_config.resolve(config)
    path = run / "final_transfer.msgpack"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not finished (or predates final_transfer.msgpack)")
    data = loop.load_run_data(spec.data)
    setup = loop.build(spec, data.num_classes)
    matching = setup.bilevel_config.matching
    meta = jax.tree.map(jnp.asarray, weights.load_variables(path)["meta_params"])
    if not matching.has_meta_params or not meta.get("lw"):
        raise ValueError(f"method {config.method!r} learns no λ (λ = 1 for every sample)")
    ds = data.test if data.test is not None else data.val
    if ds is None:
        raise ValueError("the run's data have neither a test nor a validation split")
    if max_images is not None and max_images < len(ds):
        ds = ds.subset(np.arange(max_images))
    source, src_vars = setup.models.source, setup.source_variables
    setup.initial_state = None

    @jax.jit
    def lambdas(src_vars, meta, x):
        feats = bilevel.source_features(source, src_vars, x)
        _, lam = transfer.meta_outputs(meta, transfer.pool(feats), matching)
        return jnp.stack(lam, axis=-1)

    bs = min(batch_size or spec.schedule.eval_batch_size, len(ds))
    out = []
    d = spec.data
    for x, y in data_lib.batch_iterator(ds, bs, train=False, image_size=d.image_size, seed=spec.seed, epoch=0,
                                        num_workers=max(d.num_workers, 1), resize_to=d.resize_to or None):
        n = len(y)
        if n < bs:  # one shape, one compilation
            x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)])
        out.append(np.asarray(lambdas(src_vars, meta, x))[:n])
    return list(spec.pairs), np.concatenate(out).astype(np.float64)


def select_pairs(lam: np.ndarray, max_pairs: int = 6) -> list[int]:
    """Indices of up to `max_pairs` pairs with the largest mean λ (in pair order)."""
    order = np.argsort(-lam.mean(axis=0), kind="stable")[:max_pairs]
    return sorted(int(i) for i in order)


def plot_lambda_distributions(lam: np.ndarray, pairs: Sequence[tuple[int, int]],
                              pair_indices: Optional[Sequence[int]] = None, *, bins: int = 30,
                              title: Optional[str] = None) -> Figure:
    """Histograms of per-sample λ, one panel per selected pair.

    Args:
      lam: (N, P) per-sample λ.
      pairs: the P pairs (m, n).
      pair_indices: which pairs (default `select_pairs(lam)`).
    """
    lam = np.asarray(lam)
    if lam.ndim != 2 or lam.shape[1] != len(pairs):
        raise ValueError(f"λ of shape {lam.shape} for {len(pairs)} pairs")
    idx = list(pair_indices) if pair_indices is not None else select_pairs(lam)
    ncol = min(3, len(idx))
    nrow = math.ceil(len(idx) / ncol)
    fig = _figure(3.2 * ncol, 2.4 * nrow + (0.3 if title else 0))
    lo, hi = float(lam[:, idx].min()), float(lam[:, idx].max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    for k, p in enumerate(idx):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        v = lam[:, p]
        ax.hist(v, bins=bins, range=(lo, hi), color="tab:blue", alpha=0.8)
        m, n = pairs[p]
        ax.set_title(f"pair {m}-{n}: mean {v.mean():.3f}, std {v.std():.3f}", fontsize=8)
        ax.set_xlabel("λ")
        ax.set_ylabel("images")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------- saliency (Fig. 6)


_SALIENCY_FN = None


def _saliency_fn():
    """The jitted saliency computation (the model a static argument: one compilation per network and shape)."""
    global _SALIENCY_FN
    if _SALIENCY_FN is None:
        import functools

        import jax
        import jax.numpy as jnp

        @functools.partial(jax.jit, static_argnums=0)
        def fn(model, variables, x, y):
            def picked_logits(x):
                logits, _ = model.apply(variables, x, train=False)
                return jnp.sum(jnp.take_along_axis(logits, y[:, None], axis=-1))

            return jnp.max(jnp.abs(jax.grad(picked_logits)(x)), axis=-1)

        _SALIENCY_FN = fn
    return _SALIENCY_FN


def saliency_maps(model, variables, x, y) -> np.ndarray:
    """|∂ logit_y / ∂ x|, max over channels, in evaluation mode: (B, H, W, 3) -> (B, H, W).

    Args:
      model: a network whose `apply(variables, x, train=False)` returns (logits, features) (hashable).
      variables: its variables.
      x: normalised images; y: (B,) the classes whose logits are differentiated.
    """
    import jax.numpy as jnp

    return np.asarray(_saliency_fn()(model, variables, jnp.asarray(x), jnp.asarray(y, jnp.int32)))


def denormalize(x: np.ndarray) -> np.ndarray:
    """Normalised (ImageNet mean/std) images back to [0, 1] RGB."""
    return np.clip(np.asarray(x, np.float32) * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def plot_saliency(images: np.ndarray, maps: Mapping[str, np.ndarray], labels: Optional[Sequence[str]] = None,
                  *, title: Optional[str] = None) -> Figure:
    """One row per image: the image, then each run's saliency map (scaled to its own maximum).

    Args:
      images: (B, H, W, 3) in [0, 1].
      maps: {run label: (B, H, W) saliency}.
      labels: a caption per image (e.g. its class).
    """
    b = len(images)
    ncol = 1 + len(maps)
    fig = _figure(2.0 * ncol, 2.0 * b + (0.3 if title else 0))
    for i in range(b):
        ax = fig.add_subplot(b, ncol, i * ncol + 1)
        ax.imshow(images[i], interpolation="nearest")
        ax.set_axis_off()
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=8)
        for j, (name, s) in enumerate(maps.items()):
            ax = fig.add_subplot(b, ncol, i * ncol + 2 + j)
            m = np.asarray(s[i], np.float64)
            peak = m.max()
            ax.imshow(m / peak if peak > 0 else m, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def saliency_from_runs(runs: Sequence[str | Path], *, n_images: int = 4, seed: int = 0,
                       weights_file: str = "final_weights.msgpack") -> dict:
    """Saliency of `n_images` test images (chosen with `seed`) under each run's target network.

    All runs must share their data (dataset, classes, image size). Returns {"images" (B, H, W, 3)
    in [0, 1], "labels" [str], "indices", "maps": {label: (B, H, W)}}.
    """
    from l2t_jax import data as data_lib, loop, run_config, weights
    from l2t_jax.models import get_model

    runs = [Path(r) for r in runs]
    configs = [load_config(r) for r in runs]
    data_keys = ("dataset", "data_dir", "classes", "image_size", "resize_to")
    for r, c in zip(runs[1:], configs[1:]):
        diff = [k for k in data_keys if c[k] != configs[0][k]]
        if diff:
            raise ValueError(f"{r} and {runs[0]} differ in their data ({', '.join(diff)})")
    data_spec = run_config.resolve_data(configs[0])
    data = loop.load_run_data(data_spec)
    ds = data.test if data.test is not None else data.val
    if ds is None:
        raise ValueError("the run's data have neither a test nor a validation split")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds), size=min(n_images, len(ds)), replace=False))
    sub = ds.subset(idx)
    x, y = next(iter(data_lib.batch_iterator(sub, len(sub), train=False, image_size=data_spec.image_size,
                                             seed=data_spec.seed, epoch=0, num_workers=1,
                                             resize_to=data_spec.resize_to or None)))
    maps: dict[str, np.ndarray] = {}
    for r, c in zip(runs, configs):
        path = r / weights_file
        variables = weights.load_variables(path)
        variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[1])
        model = get_model(c.target_model, num_classes, conv_impl=c.conv_impl)
        label = f"{c.method} ({r.name})"
        if label in maps:
            label = f"{c.method} ({r})"
        maps[label] = saliency_maps(model, variables, x.astype(np.float32), y)
    names = ds.class_names
    labels = [f"{names[int(t)]}" if names else f"class {int(t)}" for t in y]
    return {"images": denormalize(x), "labels": labels, "indices": idx.tolist(), "maps": maps}


# --------------------------------------------------------------------------- accuracy vs n (Fig. 5)


def accuracy_vs_n_series(runs: Sequence["table_lib.Run"], metric: str = "test_acc_at_best_val") -> dict:
    """{setting label: {method column: [(n, mean, std or None, count), ...] sorted by n}}.

    Runs with n_per_class = 0 (all the data) or without the metric are left out.
    """
    usable = [r for r in runs if isinstance(r.summary.get(metric), (int, float)) and r.setting[4] > 0]
    labels = table_lib.column_labels(usable)
    grouped: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r, col in zip(usable, labels):
        dataset, classes, source, target, n = r.setting
        name = dataset + (f" (classes {classes})" if classes else "") + f", {source}→{target}"
        grouped.setdefault(name, {}).setdefault(col, {}).setdefault(n, []).append(float(r.summary[metric]))
    out: dict[str, dict[str, list]] = {}
    for name in sorted(grouped):
        out[name] = {}
        for col in sorted(grouped[name], key=table_lib.method_order_key):
            pts = []
            for n in sorted(grouped[name][col]):
                mean, std = table_lib.mean_std(grouped[name][col][n])
                pts.append((n, mean, std, len(grouped[name][col][n])))
            out[name][col] = pts
    return out


def plot_accuracy_vs_n(series: Mapping[str, Mapping[str, Sequence[tuple]]], *, ylabel: str = "test accuracy (%)",
                       log_x: bool = True) -> Figure:
    """Accuracy against images per class: one panel per setting, one line (mean ± std) per method."""
    k = max(len(series), 1)
    fig = _figure(4.8 * k, 3.6)
    for i, (name, lines) in enumerate(series.items()):
        ax = fig.add_subplot(1, k, i + 1)
        ns = sorted({p[0] for pts in lines.values() for p in pts})
        for j, (col, pts) in enumerate(lines.items()):
            # each method's points moved sideways by a few per cent of N, so that error bars at
            # the same N stay apart; the ticks mark the true N
            shift = 1.0 + 0.025 * (j - (len(lines) - 1) / 2)
            n = [p[0] * shift for p in pts]
            mean = [p[1] for p in pts]
            std = [p[2] or 0.0 for p in pts]
            ax.errorbar(n, mean, yerr=std, marker="o", markersize=4, capsize=3, label=col)
        if log_x and ns:
            ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("training images per class")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--heatmap", metavar="RUN", help="run folder: mean λ per (source tap, target tap)")
    p.add_argument("--heatmap_all_taps", action="store_true", help="show the taps no pair uses")
    p.add_argument("--lambda_dist", metavar="RUN", help="run folder: per-sample λ histograms on test images")
    p.add_argument("--lambda_pairs", default="", help="pairs to show, e.g. '4-0,14-4' (default: largest mean λ)")
    p.add_argument("--max_images", type=int, default=None, help="use only the first N test images for λ")
    p.add_argument("--saliency", nargs="+", metavar="RUN", help="run folders (e.g. an FM and an L2T-w run)")
    p.add_argument("--n_images", type=int, default=4, help="images in the saliency figure")
    p.add_argument("--accuracy_vs_n", nargs="+", metavar="WORKDIR", help="folders searched for summary.json")
    p.add_argument("--metric", default="test_acc_at_best_val", help="summary key for --accuracy_vs_n")
    args = p.parse_args(argv)
    if not (args.heatmap or args.lambda_dist or args.saliency or args.accuracy_vs_n):
        p.error("nothing to draw: give --heatmap, --lambda_dist, --saliency and/or --accuracy_vs_n")
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        if args.heatmap:
            h = heatmap_from_run(args.heatmap)
            fig = plot_lambda_heatmap(h["lambda"], h["pairs"], h["n_source"], h["n_target"],
                                      compact=not args.heatmap_all_taps, title=h["title"],
                                      source_labels=h["source_labels"])
            written.append(save_png(fig, out / "lambda_heatmap.png"))
            record = {k: v for k, v in h.items() if k != "matrix"}
            record["matrix"] = [[None if math.isnan(v) else v for v in row] for row in h["matrix"].tolist()]
            (out / "lambda_heatmap.json").write_text(json.dumps(record, indent=1) + "\n")
        if args.lambda_dist:
            pairs, lam = per_sample_lambdas(args.lambda_dist, max_images=args.max_images)
            chosen = None
            if args.lambda_pairs:
                want = parse_pairs(args.lambda_pairs)
                missing = [f"{m}-{n}" for m, n in want if (m, n) not in pairs]
                if missing:
                    raise ValueError(f"--lambda_pairs: the run has no pair(s) {missing}")
                chosen = [pairs.index(q) for q in want]
            cfg = run_config_dict(args.lambda_dist)
            fig = plot_lambda_distributions(lam, pairs, chosen,
                                            title=f"per-sample λ on {len(lam)} test images: {cfg['method']}, "
                                                  f"{cfg['dataset']}")
            written.append(save_png(fig, out / "lambda_distribution.png"))
            np.savez(out / "lambda_per_sample.npz", lam=lam, pairs=np.asarray(pairs, np.int64).reshape(-1, 2))
        if args.saliency:
            s = saliency_from_runs(args.saliency, n_images=args.n_images)
            fig = plot_saliency(s["images"], s["maps"], s["labels"], title="|∂ logit_y / ∂ x| (max over channels)")
            written.append(save_png(fig, out / "saliency.png"))
        if args.accuracy_vs_n:
            runs = table_lib.load_runs(args.accuracy_vs_n)
            series = accuracy_vs_n_series(runs, args.metric)
            if not series:
                raise ValueError("no limited-data runs (n_per_class > 0) with a "
                                 f"{args.metric} value under {args.accuracy_vs_n}")
            ylabel = f"{table_lib.METRIC_NAMES.get(args.metric, args.metric)} (%)"
            fig = plot_accuracy_vs_n(series, ylabel=ylabel)
            written.append(save_png(fig, out / "accuracy_vs_n.png"))
            (out / "accuracy_vs_n.json").write_text(json.dumps(series, indent=1) + "\n")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
