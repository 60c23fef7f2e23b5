"""Tests of experiments.table on summary.json files written here (no training)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from experiments import table


def write_summary(root: Path, name: str, *, method: str, seed: int, acc, dataset="tfds:stl10", n_per_class=0,
                  source="resnet32", target="vgg9_bn", pairs="all_to_all", classes="", **config) -> Path:
    """A minimal summary.json of a finished run under root/name."""
    cfg = {"dataset": dataset, "classes": classes, "source_model": source, "target_model": target,
           "n_per_class": n_per_class, "method": method, "seed": seed, "pairs": pairs, "epochs": 200,
           "progress_bar": seed % 2 == 0, **config}
    s = {"method": method, "seed": seed, "dataset": dataset, "source_model": None if method == "scratch" else source,
         "target_model": target, "test_acc_at_best_val": acc, "last_test_acc": None if acc is None else acc - 1.0,
         "best_val_acc": 50.0, "pairs": "", "config": cfg}
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(s))
    return d


def test_paper_numbers_and_dataset_names():
    assert table.PAPER["STL-10"]["l2t_ww"] == (78.31, 0.21)
    assert table.PAPER["CIFAR-100"]["scratch"] == (67.69, 0.22)
    assert table.PAPER["Stanford Dogs"]["lwf_at"] == (72.67, 0.26)
    assert table.PAPER["MIT67"]["fm_one_to_one"] == (54.88, 1.24)
    assert table.PAPER["CUB200"]["l2t_ww_weights"] == (61.75, None)
    assert table.PAPER["Stanford40"]["l2t_ww_original"] == (53.47, None)
    assert "l2t_ww_weights" not in table.PAPER["STL-10"]
    for row in table.PAPER_ROWS:
        assert len(table.PAPER[row]) >= 9
    cases = {
        "tfds:cifar100": "CIFAR-100", "tfds:stl10": "STL-10", "tfds:caltech_birds2011": "CUB200",
        "folder:/data/CUB_200_2011": "CUB200", "folder:mit67": "MIT67", "folder:MIT_67": "MIT67",
        "folder:indoorCVPR_09": "MIT67", "folder:Stanford40": "Stanford40", "folder:stanford_40": "Stanford40",
        "folder:StanfordActions": "Stanford40", "tfds:stanford_dogs": "Stanford Dogs",
        "tfds:cifar10": None, "folder:cifar10-jpeg": None, "digits": None,
    }
    for dataset, row in cases.items():
        assert table.paper_row(dataset) == row, dataset


def test_column_order():
    cols = ["zeta", "l2t_ww+multi", "fm", "l2t_ww", "scratch", "l2t_ww_original", "fm_single", "lwf_at", "at",
            "l2t_w_one_to_one", "l2t_ww_weights", "lwf", "fm_one_to_one", "l2t_w_single", "l2t_w",
            "l2t_ww_first_order", "alpha"]
    assert sorted(cols, key=table.method_order_key) == [
        "scratch", "lwf", "at", "lwf_at", "fm_single", "fm_one_to_one", "l2t_w_single", "l2t_w_one_to_one",
        "l2t_ww", "l2t_ww+multi", "l2t_ww_weights", "l2t_ww_original", "l2t_ww_first_order", "fm", "l2t_w",
        "alpha", "zeta",
    ]


@pytest.fixture()
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "runs"
    stl = {"scratch": [65.0, 66.0, 64.5], "l2t_ww": [78.0, 78.5, 77.0], "fm_one_to_one": [76.0, 75.0]}
    for method, accs in stl.items():
        for seed, acc in enumerate(accs):
            write_summary(root / "stl", f"{method}/seed={seed}", method=method, seed=seed, acc=acc)
    # Appendix C.1 on MIT67 (image folder), a multi-source run, a run without a test accuracy
    for seed, acc in enumerate([63.0, 65.0, 64.0]):
        write_summary(root, f"mit/w{seed}", method="l2t_ww_weights", seed=seed, acc=acc, dataset="folder:mit67",
                      source="resnet34", target="resnet18")
    write_summary(root, "mit/multi", method="l2t_ww", seed=0, acc=66.0, dataset="folder:mit67", source="resnet34",
                  target="resnet18", extra_sources=["resnet50:/w.pth"])
    write_summary(root, "mit/notest", method="l2t_ww", seed=1, acc=None, dataset="folder:mit67",
                  source="resnet34", target="resnet18")
    # limited data: no paper numbers; seeds differ between the cells of the row
    for seed in (0, 1, 2):
        write_summary(root, f"lim/scratch{seed}", method="scratch", seed=seed, acc=40.0 + seed,
                      dataset="tfds:stl10", n_per_class=50)
    for seed in (3, 4, 5):
        write_summary(root, f"lim/l2t{seed}", method="l2t_ww", seed=seed, acc=50.0 + seed, dataset="tfds:stl10",
                      n_per_class=50)
    (root / "junk").mkdir()
    (root / "junk" / "summary.json").write_text("{not json")
    return root


def test_grouping_means_stds_and_paper(runs_dir):
    runs = table.load_runs([runs_dir], warn=lambda msg: None)
    t = table.build_table(runs)
    assert t["columns"] == ["scratch", "fm_one_to_one", "l2t_ww", "l2t_ww+multi", "l2t_ww_weights"]
    # rows: the paper's dataset order; within a dataset, n_per_class ascending, all the data last
    assert [(r["paper_row"], r["n_per_class"]) for r in t["rows"]] == [(None, 50), ("STL-10", 0), ("MIT67", 0)]
    lim, stl, mit = t["rows"]
    assert (stl["dataset"], stl["source_model"], stl["target_model"]) == ("tfds:stl10", "resnet32", "vgg9_bn")
    c = stl["cells"]["l2t_ww"]
    assert c["n"] == 3 and c["seeds"] == [0, 1, 2]
    assert c["mean"] == pytest.approx(statistics.mean([78.0, 78.5, 77.0]))
    assert c["std"] == pytest.approx(statistics.stdev([78.0, 78.5, 77.0]))  # sample std
    assert c["paper"] == {"mean": 78.31, "std": 0.21} and not c["show_n"] and c["mixed_keys"] == []
    assert stl["cells"]["fm_one_to_one"]["n"] == 2 and stl["cells"]["fm_one_to_one"]["show_n"]
    assert stl["cells"]["scratch"]["paper"] == {"mean": 65.18, "std": 0.91}
    # a paper column without runs keeps its paper number only where the table has that column
    assert "lwf" not in stl["cells"] and "l2t_ww_weights" not in stl["cells"]
    # limited data: no paper number; seeds differ between cells -> n shown
    assert lim["cells"]["l2t_ww"]["paper"] is None and lim["cells"]["l2t_ww"]["show_n"]
    assert lim["cells"]["scratch"]["mean"] == pytest.approx(41.0)
    assert lim["cells"]["scratch"]["std"] == pytest.approx(1.0)
    # Appendix C.1, the multi-source column, the run without a test accuracy left out
    assert mit["cells"]["l2t_ww_weights"]["mean"] == pytest.approx(64.0)
    assert mit["cells"]["l2t_ww_weights"]["paper"] == {"mean": 64.10, "std": None}
    assert mit["cells"]["l2t_ww+multi"]["n"] == 1 and mit["cells"]["l2t_ww+multi"]["std"] is None
    assert mit["cells"]["l2t_ww+multi"]["paper"] is None
    assert mit["cells"]["l2t_ww"] == {"n": 0, "paper": {"mean": 64.85, "std": 2.75}}
    assert len(t["skipped"]) == 1 and "notest" in t["skipped"][0]["run"]


def test_markdown(runs_dir):
    md = table.to_markdown(table.build_table(table.load_runs([runs_dir], warn=lambda msg: None)))
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| dataset"))
    assert header == ("| dataset | source → target | n/class | scratch | fm_one_to_one | l2t_ww | l2t_ww+multi "
                      "| l2t_ww_weights |")
    stl = next(line for line in lines if line.startswith("| STL-10"))
    cells = [c.strip() for c in stl.strip("|").split("|")]
    assert cells[:3] == ["STL-10 (tfds:stl10)", "resnet32 → vgg9_bn", "all"]
    sd = statistics.stdev([78.0, 78.5, 77.0])
    assert cells[5] == f"{statistics.mean([78.0, 78.5, 77.0]):.2f} ± {sd:.2f} [78.31 ± 0.21]"
    assert cells[4] == "75.50 ± 0.71 (n=2) [76.38 ± 1.18]"
    mit = next(line for line in lines if line.startswith("| MIT67"))
    cells = [c.strip() for c in mit.strip("|").split("|")]
    assert cells[5] == "— [64.85 ± 2.75]" and cells[6] == "66.00 (n=1)" and cells[7] == "64.00 ± 1.00 [64.10]"
    assert cells[3] == "— [48.91 ± 0.53]"
    lim = next(line for line in lines if "| 50 |" in line)
    assert "(n=3)" in lim and "[" not in lim


def test_pairs_split_columns_and_mixed_configs(tmp_path):
    for seed in (0, 1):
        write_summary(tmp_path, f"fs{seed}", method="fm", seed=seed, acc=70.0 + seed, pairs="single")
        write_summary(tmp_path, f"fo{seed}", method="fm", seed=seed, acc=72.0 + seed, pairs="one_to_one")
    write_summary(tmp_path, "a", method="l2t_ww", seed=0, acc=1.0, lambda_type="relu6")
    write_summary(tmp_path, "b", method="l2t_ww", seed=1, acc=2.0, lambda_type="const")
    t = table.build_table(table.load_runs([tmp_path]))
    assert t["columns"] == ["l2t_ww", "fm[one_to_one]", "fm[single]"]
    cells = t["rows"][0]["cells"]
    assert cells["fm[single]"]["mean"] == pytest.approx(70.5) and cells["fm[one_to_one]"]["mean"] == pytest.approx(72.5)
    assert cells["l2t_ww"]["mixed_keys"] == ["lambda_type"]  # progress_bar differs too, but is incidental
    md = table.to_markdown(t)
    assert "1.50 ± 0.71 (n=2) † [78.31 ± 0.21]" in md and "differ in lambda_type" in md


def test_cli_markdown_json_and_metric(runs_dir, tmp_path, capsys):
    out, js = tmp_path / "t" / "table.md", tmp_path / "t" / "table.json"
    assert table.main([str(runs_dir / "stl"), str(runs_dir / "mit"), "--out", str(out), "--json", str(js)]) == 0
    printed = capsys.readouterr()
    assert printed.out == out.read_text()
    assert "| STL-10" in printed.out and "| MIT67" in printed.out and "| 50 |" not in printed.out
    assert "notest" in printed.err
    data = json.loads(js.read_text())
    assert data["metric"] == "test_acc_at_best_val" and len(data["rows"]) == 2
    assert table.main([str(runs_dir / "stl"), "--metric", "last_test_acc", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["cells"]["scratch"]["mean"] == pytest.approx(statistics.mean([65.0, 66.0, 64.5]) - 1.0)
    assert table.main([str(tmp_path / "nowhere")]) == 2


def test_module_runs_as_a_script(runs_dir):
    p = subprocess.run([sys.executable, "-m", "experiments.table", str(runs_dir / "stl")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "| STL-10 (tfds:stl10) | resnet32 → vgg9_bn | all |" in p.stdout
