"""The resolved run (`run_config.resolve` -> `RunSpec`), the loop's typed state (`loop_state`) and the dataset parser."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, write_digits_npz
from l2t_jax import data as data_lib, loop, run_config
from l2t_jax.loop_state import SCALAR_METRICS, LoopState, MetricSums


# --------------------------------------------------------------------------- resolve


def test_resolve_leaves_the_config_alone_and_records_what_runs(tmp_path):
    npz = write_digits_npz(tmp_path / "d.npz")
    c = tiny_config(f"npz:{npz}")
    before = run_config.to_plain(c)
    spec = run_config.resolve(c)
    assert run_config.to_plain(c) == before  # resolve reads the config, never writes it
    # the record is the config with the keys the method fixes set to what runs (as `validate` fills them in)
    filled = copy.deepcopy(c)
    run_config.validate(filled)
    assert spec.record == run_config.to_plain(filled)
    assert (spec.record["pairs"], spec.record["scheme"], spec.record["meta_kind"]) == ("1-1", "proposed", "network")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.schedule.epochs = 3


def test_resolve_maps_every_key_to_its_place(tmp_path):
    npz = write_digits_npz(tmp_path / "d.npz")
    c = tiny_config(f"npz:{npz}", lr=0.03, wd=2e-4, momentum=0.8, T=3, meta_lr=1e-3, meta_wd=0.0, beta=0.25,
                    lambda_type="relu", hvp="mixed", remat=True, eval_every_epochs=2, test_eval="at_end", seed=4,
                    n_per_class=3, classes="0,2,4", data_dir=str(tmp_path), lambda_init=0.5)
    s = run_config.resolve(c)
    b = s.bilevel
    assert (b.weight_decay, b.momentum, b.T, b.meta_lr, b.meta_weight_decay) == (2e-4, 0.8, 3, 1e-3, 0.0)
    assert (b.matching.beta, b.matching.lambda_type, b.hvp, b.remat) == (0.25, "relu", "mixed", True)
    assert (s.schedule.lr, s.schedule.eval_every_epochs, s.schedule.test_eval) == (0.03, 2, "at_end")
    assert (s.seed, s.data.seed, s.data.n_per_class, s.data.classes) == (4, 4, 3, (0, 2, 4))
    assert s.data.source == data_lib.DatasetSpec("npz", str(npz), Path(npz)) and s.lambda_init == 0.5
    # which epochs are evaluated: every second one and the last
    assert [e for e in range(1, 8) if dataclasses.replace(s.schedule, epochs=7).evaluates(e)] == [2, 4, 6, 7]


def test_loop_resolves_the_config_once(tmp_path, monkeypatch):
    npz = write_digits_npz(tmp_path / "d.npz")
    calls = []
    real = run_config.resolve

    def counting(config, **kw):
        calls.append(1)
        return real(config, **kw)

    monkeypatch.setattr(run_config, "resolve", counting)
    summary = loop.train(tiny_config(f"npz:{npz}", epochs=1), tmp_path / "run")
    assert summary["steps"] == 3 and len(calls) == 1
    # a RunSpec is taken as it is
    spec = real(tiny_config(f"npz:{npz}", epochs=1))
    assert loop.train(spec, tmp_path / "run2")["steps"] == 3 and len(calls) == 1


def test_mixed_mode_builds_tap_loop_convolutions_unless_told_otherwise(tmp_path):
    """run_setup.build: conv_impl "auto" in mixed mode gives the tap-loop derivative on CPU
    (`layers.conv_impl_for`); reverse mode and an explicit lowering keep theirs."""
    import jax

    from l2t_jax import run_setup

    npz = write_digits_npz(tmp_path / "d.npz")
    expected = "im2col_loop" if jax.default_backend() == "cpu" else "auto"
    for overrides, impl in (({"hvp": "mixed"}, expected), ({}, "auto"), ({"hvp": "mixed", "conv_impl": "xla"}, "xla")):
        spec = run_config.resolve(tiny_config(f"npz:{npz}", **overrides))
        assert run_setup.build(spec, 10).models.target.conv_impl == impl, overrides


# --------------------------------------------------------------------------- the dataset parser


def test_parse_dataset_forms(tmp_path):
    P = data_lib.parse_dataset
    assert P("digits") == data_lib.DatasetSpec("builtin", "digits")
    assert P("tfds:stl10", "/d") == data_lib.DatasetSpec("tfds", "stl10")
    assert P("folder:cifar", str(tmp_path)) == data_lib.DatasetSpec("folder", "cifar", tmp_path / "cifar")
    assert P("npz:/abs/x.npz", str(tmp_path)).path == Path("/abs/x.npz")  # absolute paths ignore data_dir
    assert P("x.npz") == data_lib.DatasetSpec("npz", "x.npz", Path("x.npz"))
    for bad in ("", "tfds:", "hdf5:x", "cifar"):
        with pytest.raises(ValueError, match="unknown dataset source"):
            P(bad)
    with pytest.raises(run_config.ConfigError, match="config.dataset='hdf5:x': unknown source"):
        run_config.resolve(tiny_config("hdf5:x"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_config.resolve(tiny_config("folder:nowhere", data_dir=str(tmp_path)))


# --------------------------------------------------------------------------- the loop's state


def _record() -> dict:
    """A progress record as the loop wrote it before `LoopState` existed (the keys a resume reads)."""
    sums = {"n": 32, "steps": 2, "sums": {"loss": 70.5, "accuracy": 9.0}, "lambda": [1.5, 0.25]}
    return {
        "config": {"method": "l2t_ww", "seed": 1}, "epoch": 3, "step_in_epoch": 2, "global_step": 11, "seed": 1,
        "steps_per_epoch": 3, "epoch_acc": sums, "window": {"n": 0, "steps": 0, "sums": {}, "lambda": None},
        "best": {"epoch": 2, "val_acc": 41.25, "test_acc": None},
        "history": [{"epoch": 1, "lr": 0.1, "train": {}, "val_acc": 30.0, "val_loss": 2.0, "test_acc": None,
                     "test_loss": None}],
        "metrics_bytes": 1234, "wall_time": 56.5,
    }


def test_loop_state_reads_and_writes_the_checkpoint_record():
    rec = _record()
    state = LoopState.from_json(json.loads(json.dumps(rec)))
    assert (state.epoch, state.step_in_epoch, state.global_step, state.epoch_sums.n) == (3, 2, 11, 32)
    assert state.to_json() == rec
    assert json.dumps(state.to_json(), sort_keys=True) == json.dumps(rec, sort_keys=True)
    for key in rec:
        broken = {k: v for k, v in rec.items() if k != key}
        with pytest.raises(ValueError, match=f"the progress record lacks {key}"):
            LoopState.from_json(broken)
    state.next_epoch()
    assert (state.epoch, state.step_in_epoch, state.epoch_sums, state.window) == (4, 0, MetricSums(), MetricSums())


def test_metric_sums_are_batch_weighted_means():
    rng = np.random.default_rng(0)
    steps = [({k: float(rng.normal()) for k in SCALAR_METRICS} | {"lambda": rng.uniform(size=3)}, n)
             for n in (16, 16, 5)]
    acc = MetricSums()
    for m, n in steps:
        acc.add(m, n)
    means = acc.means()
    w = np.array([n for _, n in steps], np.float64)
    for k in SCALAR_METRICS:
        want = float(np.dot([m[k] for m, _ in steps], w) / w.sum()) * (100.0 if k == "accuracy" else 1.0)
        np.testing.assert_allclose(means[k], want, rtol=1e-12, err_msg=k)
    lam = np.mean([m["lambda"] for m, _ in steps], axis=0)  # λ: a plain mean over steps
    np.testing.assert_allclose(means["lambda"], lam, rtol=1e-12)
    np.testing.assert_allclose(means["lambda_mean"], lam.mean(), rtol=1e-12)
    assert MetricSums().means() == {}
    assert MetricSums.from_json(json.loads(json.dumps(acc.to_json()))) == acc
