"""`python -m l2t_jax.reference precision`: the float32 meta-gradient against the float64 one.

The group statistics are checked against their definitions on known vectors; the
end-to-end report on a tiny digits run is checked for structure, for a float64
side that is the exact meta-gradient (an independent `meta_gradient` call on the
same state and batch), and for float32 being close to it on this well-conditioned
tiny problem.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import tiny_config, write_digits_npz
from l2t_jax import precision, reference
from l2t_jax.io.msgpack import save_variables
from l2t_jax.models import get_model, init_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    npz = write_digits_npz(root / "digits.npz")
    src = root / "source.msgpack"
    save_variables(src, jax.device_get(init_model(get_model("vgg_tiny", 5), jax.random.key(3), 8)))
    return npz, src


def _config(setting, **overrides):
    npz, src = setting
    return tiny_config(f"npz:{npz}", method="l2t_ww", pairs="1-1,2-2,2-1", source_weights=str(src), T=2,
                       **overrides)


def test_group_statistics_are_their_definitions():
    g64 = {"w": [{"kernel": np.array([[3.0, 4.0]]), "bias": np.array([0.0])}],
           "lw": [{"kernel": np.array([[1.0]]), "bias": np.array([-1.0])}]}
    g32 = {"w": [{"kernel": np.array([[3.0, 4.0]]) * 1.01, "bias": np.array([0.0])}],  # w: 1 % longer, same direction
           "lw": [{"kernel": np.array([[1.0]]), "bias": np.array([1.0])}]}  # lw: orthogonal
    rows = {r["group"]: r for r in precision.compare_gradients(g32, g64)}
    assert set(rows) == {"w.0", "lw.0", "all w", "all lw", "all"}
    assert rows["w.0"]["rel_l2"] == pytest.approx(0.01, rel=1e-12)
    assert rows["w.0"]["cosine"] == pytest.approx(1.0, abs=1e-15) and rows["w.0"]["norm64"] == pytest.approx(5.0)
    assert rows["lw.0"]["rel_l2"] == pytest.approx(np.sqrt(4 / 2)) and rows["lw.0"]["cosine"] == pytest.approx(0.0)
    # all of φ: |(0.03, 0.04, 0, 0, 2)| / |(3, 4, 0, 1, -1)|
    assert rows["all"]["rel_l2"] == pytest.approx(np.sqrt(0.0025 + 4) / np.sqrt(27), rel=1e-12)


def test_report_on_a_tiny_run(setting):
    from l2t_jax import bilevel, loop, run_config

    config = _config(setting)
    report = precision.meta_gradient_precision(config, batches=2)
    assert [b["batch"] for b in report["batches"]] == [0, 1]
    groups = [r["group"] for r in report["batches"][0]["rows"]]
    assert groups == ["w.0", "w.1", "w.2", "lw.0", "lw.1", "lw.2", "all w", "all lw", "all"]
    for b in report["batches"]:
        for r in b["rows"]:
            assert r["norm64"] > 0 and 0 <= r["rel_l2"] < 1e-3 and r["cosine"] > 0.999999, r

    # the float64 side is the exact meta-gradient of the first training batch at the fresh state
    spec = run_config.resolve(config)
    data = loop.load_run_data(spec.data)
    setup = loop.build(spec, data.num_classes)
    x, y = next(iter(__import__("l2t_jax.data", fromlist=["batch_iterator"]).batch_iterator(
        data.train, config.batch_size, train=True, image_size=config.image_size, seed=config.seed, epoch=0,
        num_workers=1)))
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)  # noqa: E731
                                 else np.asarray(a), t)
    s = setup.initial_state
    xs = np.asarray(x, np.float64)
    feats = bilevel.source_features(setup.models.source, f64(setup.source_variables), xs)
    g = bilevel.meta_gradient(f64(s.meta_params), f64(s.params), f64(bilevel.with_learning_rate(s.opt_state, config.lr)),
                              f64(s.batch_stats), xs, y, feats, model=setup.models.target, cfg=setup.bilevel_config)[0]
    want = float(np.sqrt(sum(np.sum(np.asarray(a) ** 2) for a in jax.tree.leaves(g))))
    got = next(r for r in report["batches"][0]["rows"] if r["group"] == "all")["norm64"]
    assert got == pytest.approx(want, rel=1e-12)


def test_cli(setting, tmp_path, capsys, monkeypatch):
    npz, src = setting
    cfg_file = tmp_path / "tiny.py"
    cfg_file.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom conftest import tiny_config\n"
        "def get_config():\n    return tiny_config(%r, method='l2t_ww', pairs='1-1', source_weights=%r, T=1)\n"
        % (str(__import__("pathlib").Path(__file__).parent), f"npz:{npz}", str(src)))
    out = tmp_path / "report.json"
    assert reference.main(["precision", f"--config={cfg_file}", "--batches=1", f"--json={out}"]) == 0
    printed = capsys.readouterr().out
    assert "meta-gradient float32 vs float64" in printed and "all lw" in printed
    assert json.loads(out.read_text())["summary"]
    # a method without meta-parameters: one line, exit 2 (absl parses flags once per process: a child)
    proc = subprocess.run([sys.executable, "-m", "l2t_jax.reference", "precision", f"--config={cfg_file}",
                           "--config.method=scratch"], capture_output=True, text=True, timeout=300,
                          cwd=str(REPO))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no meta-parameters" in proc.stderr
    assert "Traceback" not in proc.stderr
