"""Tests of experiments.figures: the data functions, the plots, the CLI.

Two tiny runs (8 px digits, vgg_tiny, 2 epochs: a scratch run that is also the source,
then L2T-ww on pair 1-1, the same settings as tests/test_runner.py, so compilations are
shared through the persistent cache) feed the λ and saliency figures; the heatmap and
accuracy-vs-n figures also run on files written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, write_digits_npz
from experiments import figures
from l2t_jax import data as data_lib, loop


def assert_png(path: Path, min_size: int = 50) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_size


# --------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> Path:
    """Digits 0-3 at 8 px: 16 training + 8 test images per class."""
    return write_digits_npz(tmp_path_factory.mktemp("npz") / "digits4.npz")


@pytest.fixture(scope="module")
def scratch_run(npz_path, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("scratch")
    loop.train(tiny_config(f"npz:{npz_path}"), workdir)
    return workdir


@pytest.fixture(scope="module")
def l2t_run(npz_path, scratch_run, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("l2t_ww")
    source = str(scratch_run / "final_weights.msgpack")
    loop.train(tiny_config(f"npz:{npz_path}", method="l2t_ww", source_weights=source), workdir)
    return workdir


# --------------------------------------------------------------------------- λ heatmap


def test_heatmap_matrix_puts_each_lambda_at_its_pair():
    pairs = [(4, 0), (9, 2), (14, 4), (4, 1)]
    mat = figures.lambda_heatmap_matrix([0.5, 1.5, 2.5, 3.5], pairs, 15, 5)
    assert mat.shape == (15, 5)
    assert (mat[4, 0], mat[9, 2], mat[14, 4], mat[4, 1]) == (0.5, 1.5, 2.5, 3.5)
    assert np.isnan(mat).sum() == 15 * 5 - 4
    with pytest.raises(ValueError, match="3 λ values for 4 pairs"):
        figures.lambda_heatmap_matrix([1, 2, 3], pairs, 15, 5)
    with pytest.raises(ValueError, match="outside"):
        figures.lambda_heatmap_matrix([1], [(15, 0)], 15, 5)
    assert figures.parse_pairs("4-0,9-2, 14-4") == [(4, 0), (9, 2), (14, 4)]


def test_last_epoch_lambda_reads_the_last_epoch_record():
    records = [
        {"kind": "train", "epoch": 1, "lambda": [9.0, 9.0]},
        {"kind": "epoch", "epoch": 1, "train_lambda": [1.0, 2.0]},
        {"kind": "train", "epoch": 2, "lambda": [8.0, 8.0]},
        {"kind": "epoch", "epoch": 2, "train_lambda": [3.0, 4.0]},
        {"kind": "train", "epoch": 3, "lambda": [7.0, 7.0]},  # an unfinished epoch
    ]
    assert figures.last_epoch_lambda(records) == (2, [3.0, 4.0])
    assert figures.last_epoch_lambda([{"kind": "epoch", "epoch": 1, "train": {"lambda": [5]}}]) == (1, [5.0])
    with pytest.raises(ValueError, match="no epoch record"):
        figures.last_epoch_lambda(records[:1])


def test_heatmap_cli_on_a_written_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"method": "l2t_ww", "source_model": "resnet32", "target_model": "vgg9_bn", "dataset": "tfds:stl10"}
    (run / "summary.json").write_text(json.dumps({"pairs": "4-0,9-2,14-4", "config": cfg}))
    lines = [{"kind": "epoch", "epoch": 1, "train_lambda": [1.0, 1.0, 1.0]},
             {"kind": "train", "epoch": 2, "lambda": [0.0, 0.0, 0.0]},
             {"kind": "epoch", "epoch": 2, "train_lambda": [0.25, 2.0, 5.5]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    h = figures.heatmap_from_run(run)
    assert (h["n_source"], h["n_target"], h["epoch"]) == (15, 5, 2)
    expected = np.full((15, 5), np.nan)
    expected[4, 0], expected[9, 2], expected[14, 4] = 0.25, 2.0, 5.5
    np.testing.assert_array_equal(h["matrix"], expected)
    out = tmp_path / "out"
    assert figures.main(["--out", str(out), "--heatmap", str(run)]) == 0
    assert_png(out / "lambda_heatmap.png")
    saved = json.loads((out / "lambda_heatmap.json").read_text())
    assert saved["matrix"][9][2] == 2.0 and saved["matrix"][0][0] is None
    assert saved["pairs"] == [[4, 0], [9, 2], [14, 4]]
    compact = figures.plot_lambda_heatmap(h["lambda"], h["pairs"], 15, 5)
    full = figures.plot_lambda_heatmap(h["lambda"], h["pairs"], 15, 5, compact=False)
    assert full.get_size_inches()[1] > compact.get_size_inches()[1]
    shown = compact.axes[0].images[0].get_array()
    assert shown.shape == (3, 3) and int(np.ma.count_masked(shown)) == 6


def test_heatmap_of_a_multi_source_run_counts_taps_across_sources(tmp_path):
    run = tmp_path / "multi"
    run.mkdir()
    cfg = {"method": "l2t_ww", "source_model": "vgg_tiny", "target_model": "vgg9_bn", "dataset": "digits",
           "pairs": "1-1", "extra_sources": "resnet32:/w.pth:4-1"}
    (run / "summary.json").write_text(json.dumps({"pairs": "1-1,7-1", "config": cfg}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "train_lambda": [0.5, 1.5]}) + "\n")
    h = figures.heatmap_from_run(run)
    assert (h["n_source"], h["n_target"]) == (3 + 15, 5)
    assert h["source_labels"][:4] == ["s0:0", "s0:1", "s0:2", "s1:0"] and h["source_labels"][7] == "s1:4"
    assert h["matrix"][1, 1] == 0.5 and h["matrix"][7, 1] == 1.5 and np.isnan(h["matrix"]).sum() == 18 * 5 - 2
    fig = figures.plot_lambda_heatmap(h["lambda"], h["pairs"], h["n_source"], h["n_target"],
                                      source_labels=h["source_labels"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["s0:1", "s1:4"]
    # a run without matching pairs (e.g. AT) has no λ to show
    (run / "summary.json").write_text(json.dumps({"pairs": "", "config": {**cfg, "method": "at"}}))
    with pytest.raises(ValueError, match="no feature pairs"):
        figures.heatmap_from_run(run)


# --------------------------------------------------------------------------- real runs: λ


def test_heatmap_and_per_sample_lambda_of_a_real_run(l2t_run, tmp_path):
    epoch_lines = [json.loads(line) for line in (l2t_run / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in epoch_lines if line["kind"] == "epoch"][-1]
    h = figures.heatmap_from_run(l2t_run)
    assert h["pairs"] == [(1, 1)] and h["matrix"].shape == (3, 3)
    assert h["matrix"][1, 1] == last["train_lambda"][0] and np.isnan(h["matrix"]).sum() == 8

    pairs, lam = figures.per_sample_lambdas(l2t_run)
    assert pairs == [(1, 1)] and lam.shape == (32, 1)  # 8 test images per class
    assert np.all((lam >= 0) & (lam <= 6)) and lam.std() > 0  # ReLU6, per sample
    # batching and padding do not change the values: 5 images in batches of 2
    _, few = figures.per_sample_lambdas(l2t_run, max_images=5, batch_size=2)
    np.testing.assert_allclose(few, lam[:5], rtol=1e-5, atol=1e-6)

    out = tmp_path / "out"
    assert figures.main(["--out", str(out), "--heatmap", str(l2t_run), "--lambda_dist", str(l2t_run),
                         "--lambda_pairs", "1-1"]) == 0
    assert_png(out / "lambda_heatmap.png")
    assert_png(out / "lambda_distribution.png")
    saved = np.load(out / "lambda_per_sample.npz")
    np.testing.assert_array_equal(saved["lam"], lam)
    assert saved["pairs"].tolist() == [[1, 1]]
    assert figures.main(["--out", str(out), "--lambda_dist", str(l2t_run), "--lambda_pairs", "0-0"]) == 2


def test_lambda_needs_a_run_with_a_lambda_network(scratch_run):
    with pytest.raises(ValueError, match="learns no λ"):
        figures.per_sample_lambdas(scratch_run)


def test_lambda_distribution_plot_and_pair_choice():
    rng = np.random.default_rng(0)
    lam = rng.uniform(0, 1, (50, 8)) + np.arange(8)
    assert figures.select_pairs(lam, 3) == [5, 6, 7]
    pairs = [(m, n) for m in range(4) for n in range(2)]
    fig = figures.plot_lambda_distributions(lam, pairs)
    assert len(fig.axes) == 6
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["pair 1-0", "pair 1-1", "pair 2-0", "pair 2-1",
                                                               "pair 3-0", "pair 3-1"]
    fig = figures.plot_lambda_distributions(lam, pairs, [0])
    assert len(fig.axes) == 1
    with pytest.raises(ValueError):
        figures.plot_lambda_distributions(lam, pairs[:3])


# --------------------------------------------------------------------------- saliency


class _Linear:
    """A stand-in network: logits = flatten(x) @ W (no features)."""

    def __init__(self, w):
        self.w = w

    def apply(self, variables, x, train=False):
        assert not train
        return x.reshape(x.shape[0], -1) @ variables["w"], []


def test_saliency_is_max_abs_input_gradient_of_the_true_logit():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4 * 4 * 3, 5))
    x = rng.normal(size=(2, 4, 4, 3))
    y = np.array([3, 1])
    s = figures.saliency_maps(_Linear(w), {"w": jnp.asarray(w)}, x, y)
    assert s.shape == (2, 4, 4)
    for i in range(2):
        np.testing.assert_allclose(s[i], np.abs(w[:, y[i]].reshape(4, 4, 3)).max(-1), rtol=1e-6)


def test_denormalize_inverts_the_input_normalisation():
    img = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    np.testing.assert_allclose(figures.denormalize(data_lib.normalize(img)), img / 255.0, atol=1e-6)


def test_saliency_of_real_runs(scratch_run, l2t_run, tmp_path):
    s = figures.saliency_from_runs([scratch_run, l2t_run], n_images=3)
    assert s["images"].shape == (3, 8, 8, 3) and 0.0 <= s["images"].min() and s["images"].max() <= 1.0
    assert list(s["maps"]) == [f"scratch ({scratch_run.name})", f"l2t_ww ({l2t_run.name})"]
    a, b = s["maps"].values()
    assert a.shape == b.shape == (3, 8, 8) and (a >= 0).all() and a.max() > 0 and not np.allclose(a, b)
    assert len(s["labels"]) == 3 and all(lbl.startswith("class ") or lbl.isdigit() for lbl in s["labels"])
    fig = figures.plot_saliency(s["images"], s["maps"], s["labels"])
    assert len(fig.axes) == 9
    out = tmp_path / "out"
    assert figures.main(["--out", str(out), "--saliency", str(scratch_run), str(l2t_run), "--n_images", "3"]) == 0
    assert_png(out / "saliency.png")


# --------------------------------------------------------------------------- accuracy vs n


def _summary(root: Path, name: str, method: str, n: int, seed: int, acc: float, dataset="folder:cifar10-jpeg"):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"dataset": dataset, "source_model": "resnet32", "target_model": "vgg9_bn", "n_per_class": n,
           "method": method, "seed": seed, "pairs": "all_to_all"}
    (d / "summary.json").write_text(json.dumps({"method": method, "seed": seed, "test_acc_at_best_val": acc,
                                                "config": cfg}))


def test_accuracy_vs_n(tmp_path):
    root = tmp_path / "runs"
    accs = {("scratch", 25): [30.0, 32.0, 34.0], ("scratch", 50): [40.0, 41.0], ("l2t_ww", 25): [38.0],
            ("l2t_ww", 50): [50.0, 52.0, 54.0]}
    for (method, n), values in accs.items():
        for seed, acc in enumerate(values):
            _summary(root, f"{method}/n{n}/s{seed}", method, n, seed, acc)
    _summary(root, "full", "scratch", 0, 0, 90.0)  # all the data: not a point of the figure
    series = figures.accuracy_vs_n_series(figures.table_lib.load_runs([root]))
    ((name, lines),) = series.items()
    assert name == "folder:cifar10-jpeg, resnet32→vgg9_bn" and list(lines) == ["scratch", "l2t_ww"]
    (n25, m25, s25, k25), (n50, m50, s50, k50) = lines["scratch"]
    assert (n25, k25, n50, k50) == (25, 3, 50, 2)
    assert m25 == pytest.approx(32.0) and s25 == pytest.approx(2.0)
    assert m50 == pytest.approx(40.5) and s50 == pytest.approx(np.std([40.0, 41.0], ddof=1))
    assert lines["l2t_ww"][0] == (25, 38.0, None, 1)
    fig = figures.plot_accuracy_vs_n(series)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["scratch", "l2t_ww"]
    out = tmp_path / "out"
    assert figures.main(["--out", str(out), "--accuracy_vs_n", str(root)]) == 0
    assert_png(out / "accuracy_vs_n.png")
    saved = json.loads((out / "accuracy_vs_n.json").read_text())
    assert saved[name]["l2t_ww"][1][:2] == [50, 52.0]
    # two settings -> two panels
    _summary(root, "stl/a", "scratch", 25, 0, 20.0, dataset="tfds:stl10")
    assert len(figures.plot_accuracy_vs_n(figures.accuracy_vs_n_series(figures.table_lib.load_runs([root]))).axes) == 2


def test_cli_needs_a_figure(tmp_path, capsys):
    with pytest.raises(SystemExit):
        figures.main(["--out", str(tmp_path)])
    assert figures.main(["--out", str(tmp_path), "--heatmap", str(tmp_path / "none")]) == 2
    assert "not a run folder" in capsys.readouterr().err
