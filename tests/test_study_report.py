"""experiments.study_report: paired differences between methods, and φ / λ over an L2T run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_config, write_digits_npz
from experiments import study_report, table as table_lib
from l2t_jax import loop


def _summary(root: Path, method: str, seed: int, acc: float, n: int = 25) -> None:
    d = root / f"n={n}" / f"method={method}" / f"seed={seed}"
    d.mkdir(parents=True)
    config = {"method": method, "seed": seed, "dataset": "npz:c10.npz", "n_per_class": n, "source_model": "resnet32",
              "target_model": "vgg9_bn", "classes": ""}
    (d / "summary.json").write_text(json.dumps({"method": method, "seed": seed, "test_acc_at_best_val": acc,
                                                "source_model": None if method == "scratch" else "resnet32",
                                                "config": config}))


def test_paired_differences_per_seed(tmp_path):
    accs = {"scratch": [38.0, 35.5, 37.5], "l2t_ww": [40.0, 35.0, 39.5], "fm_one_to_one": [40.5, 36.0]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            _summary(tmp_path, method, seed, acc)
    _summary(tmp_path, "l2t_ww", 0, 50.0, n=50)  # another setting: not paired with N = 25
    rows = study_report.paired_differences(table_lib.load_runs([tmp_path]), "l2t_ww")
    by = {(r["setting"]["n_per_class"], r["other"]): r for r in rows}
    assert set(by) == {(25, "scratch"), (25, "fm_one_to_one")}
    s = by[(25, "scratch")]
    assert s["seeds"] == [0, 1, 2] and s["diffs"] == pytest.approx([2.0, -0.5, 2.0]) and s["wins"] == 2
    assert s["mean_diff"] == pytest.approx(3.5 / 3)
    assert s["std_diff"] == pytest.approx(math.sqrt(((2 - 3.5 / 3) ** 2 * 2 + (-0.5 - 3.5 / 3) ** 2) / 2))
    assert s["spread_other"] == pytest.approx(math.sqrt(((38 - 37) ** 2 + (35.5 - 37) ** 2 + (37.5 - 37) ** 2) / 2))
    f = by[(25, "fm_one_to_one")]  # only the seeds both methods have
    assert f["seeds"] == [0, 1] and f["diffs"] == pytest.approx([-0.5, -1.0]) and f["wins"] == 0
    md = study_report.paired_markdown(rows, "test_acc_at_best_val")
    assert "| npz:c10.npz N=25 vgg9_bn | l2t_ww − scratch | s0: +2.00, s1: -0.50, s2: +2.00 | +1.17 ± 1.44 | 2/3 |" in md


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    npz = write_digits_npz(root / "d.npz")
    loop.train(tiny_config(f"npz:{npz}", epochs=1), root / "scratch")
    src = str(root / "scratch" / "final_weights.msgpack")
    out = {}
    for name, meta_lr in (("frozen", 0.0), ("moving", 1e-2)):
        loop.train(tiny_config(f"npz:{npz}", method="l2t_ww", pairs="0-0,1-1,2-2", source_weights=src,
                               meta_lr=meta_lr, epochs=2), root / name)
        out[name] = root / name
    return out


def test_phi_movement_rebuilds_the_initial_phi(runs):
    frozen = study_report.phi_movement(runs["frozen"])  # meta_lr 0: φ never moves, so φ_0 must be rebuilt exactly
    assert set(frozen["groups"]) == {"w.0", "w.1", "w.2", "lw.0", "lw.1", "lw.2"}
    assert frozen["change_norm"] == 0.0 and frozen["initial_norm"] > 0 and frozen["steps"] == 6
    moving = study_report.phi_movement(runs["moving"])
    assert moving["initial_norm"] == frozen["initial_norm"]  # same seed, same φ_0
    assert moving["change_norm"] > 0 and all(g["change_norm"] > 0 for g in moving["groups"].values())


def test_meta_history_and_cli(runs, tmp_path, capsys):
    hist = study_report.meta_history(runs["moving"])
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(len(h["lambda"]) == 3 and h["outer_loss"] > 0 for h in hist)
    # the reference's cosine schedule gives the last epoch lr 0: the look-ahead cannot move θ, so the
    # meta-gradient is exactly zero there, and not before
    assert hist[0]["meta_grad_norm"] > 0 and hist[1]["meta_grad_norm"] == 0.0
    assert study_report.main(["meta", str(runs["moving"]), "--json", str(tmp_path / "m.json")]) == 0
    assert "relative change" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["phi"]["change_norm"] > 0
    assert study_report.main(["meta", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
