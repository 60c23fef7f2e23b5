"""The evaluation schedule of a run: `eval_every_epochs` and `test_eval="on_improvement"`.

The limited-data study evaluates the 10 000 test images only when validation accuracy
improves (what the best-validation protocol reports) and after the last epoch, and
validation every k epochs. Neither may change training: the per-epoch training
metrics and the final weights equal an every-epoch run's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config, write_digits_npz
from l2t_jax import loop, run_config
from l2t_jax.io.msgpack import load_variables


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    return write_digits_npz(tmp_path_factory.mktemp("digits") / "digits.npz")


def _history(workdir):
    return json.loads((workdir / "summary.json").read_text())["history"]


def test_sparse_evaluation_keeps_training_and_reports_test_at_best_val(npz_path, tmp_path):
    every = tiny_config(f"npz:{npz_path}", epochs=5, lr=0.05)
    sparse = tiny_config(f"npz:{npz_path}", epochs=5, lr=0.05, eval_every_epochs=2, test_eval="on_improvement")
    s_every = loop.train(every, tmp_path / "every")
    s_sparse = loop.train(sparse, tmp_path / "sparse")
    h_every, h_sparse = _history(tmp_path / "every"), _history(tmp_path / "sparse")

    # training is untouched: the same per-epoch training metrics and final weights
    assert _train_metrics(tmp_path / "every") == _train_metrics(tmp_path / "sparse")
    final_every = load_variables(tmp_path / "every" / "final_weights.msgpack")
    final_sparse = load_variables(tmp_path / "sparse" / "final_weights.msgpack")
    for a, b in zip(_leaves(final_every), _leaves(final_sparse), strict=True):
        np.testing.assert_array_equal(a, b)

    # validation at epochs 2, 4 and the last (5), with the same accuracy as the every-epoch run
    evaluated = [h["epoch"] for h in h_sparse if h["val_acc"] is not None]
    assert evaluated == [2, 4, 5]
    for e in evaluated:
        assert h_sparse[e - 1]["val_acc"] == h_every[e - 1]["val_acc"]
    # test only where validation improved (strictly, on the evaluated epochs) and after the last epoch
    best, improved = None, []
    for e in evaluated:
        if best is None or h_sparse[e - 1]["val_acc"] > best:
            best = h_sparse[e - 1]["val_acc"]
            improved.append(e)
    tested = [h["epoch"] for h in h_sparse if h["test_acc"] is not None]
    assert tested == sorted(set(improved) | {5})
    assert s_sparse["best_epoch"] == improved[-1]
    assert s_sparse["test_acc_at_best_val"] == h_every[improved[-1] - 1]["test_acc"]
    assert s_sparse["last_test_acc"] == s_every["last_test_acc"]


def _train_metrics(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [{k: v for k, v in r.items() if k.startswith("train_")} for r in lines if r["kind"] == "epoch"]
    assert len(epochs) == 5 and all(epochs)
    return epochs


def _leaves(tree):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k])
    else:
        yield np.asarray(tree)


@pytest.mark.parametrize("key,value,match", [("eval_every_epochs", 0, "eval_every_epochs"),
                                             ("test_eval", "sometimes", "test_eval")])
def test_bad_eval_schedule_is_a_config_error(npz_path, key, value, match):
    with pytest.raises(run_config.ConfigError, match=match):
        run_config.validate(tiny_config(f"npz:{npz_path}", **{key: value}))


def test_test_split_at_end_only_reports_the_same_figures(npz_path, tmp_path):
    """test_eval="at_end": two test passes (final and best-validation weights), same figures."""
    every = tiny_config(f"npz:{npz_path}", epochs=5, lr=0.05)
    at_end = tiny_config(f"npz:{npz_path}", epochs=5, lr=0.05, test_eval="at_end")
    s_every = loop.train(every, tmp_path / "every")
    s_end = loop.train(at_end, tmp_path / "end")
    assert [h["epoch"] for h in _history(tmp_path / "end") if h["test_acc"] is not None] == [5]
    assert s_end["best_epoch"] == s_every["best_epoch"]
    assert s_end["test_acc_at_best_val"] == s_every["test_acc_at_best_val"]
    assert s_end["last_test_acc"] == s_every["last_test_acc"]
