"""Tests of the experiment runner: l2t_jax.loop / checkpoint / schedule / run_config and experiments.run.

Everything runs on tiny data (scikit-learn digits at 8 px, 4 classes, 48 training
images) with `vgg_tiny`, so a whole run is a few steps; the XLA compilations
dominate, and identical configs share them through the persistent compilation cache
(tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import REPO, require_shared, tiny_config, write_digits_npz
from l2t_jax import bilevel, loop, run_config
from l2t_jax.io.msgpack import load_variables
from l2t_jax.io.weights_file import load_weights
from l2t_jax.checkpoint import Checkpointer
from l2t_jax.models import get_model, init_model
from l2t_jax.schedule import cosine_epoch_lr

CACHE = str(REPO / ".jax_cache")
N_CLASSES = 4


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> Path:
    """Digits 0-3 at 8 px: 16 training + 8 test images per class."""
    return write_digits_npz(tmp_path_factory.mktemp("npz") / "digits4.npz", N_CLASSES)


@pytest.fixture(scope="module")
def scratch_run(npz_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("scratch")
    summary = loop.train(tiny_config(f"npz:{npz_path}"), workdir)
    return workdir, summary


@pytest.fixture(scope="module")
def source_weights(scratch_run) -> str:
    return str(scratch_run[0] / "final_weights.msgpack")


def l2t_config(npz_path, source_weights, **kw):
    return tiny_config(f"npz:{npz_path}", method="l2t_ww", source_weights=source_weights, **kw)


@pytest.fixture(scope="module")
def l2t_run(npz_path, source_weights, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("l2t_ww")
    summary = loop.train(l2t_config(npz_path, source_weights), workdir)
    return workdir, summary


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s",)}


# --------------------------------------------------------------------------- pieces


def test_cosine_schedule_is_the_references():
    E = 200
    assert cosine_epoch_lr(0.1, 0, E) == pytest.approx(0.1 * (1 + math.cos(math.pi / E)) / 2, rel=1e-15)
    assert cosine_epoch_lr(0.1, E // 2 - 1, E) == pytest.approx(0.05, rel=1e-12)
    assert cosine_epoch_lr(0.1, E - 1, E) == pytest.approx(0.0, abs=1e-17)
    lrs = [cosine_epoch_lr(0.1, e, E) for e in range(E)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError):
        cosine_epoch_lr(0.1, E, E)


def test_checkpoint_roundtrip_and_atomic_save(tmp_path):
    model = get_model("vgg_tiny", 3)
    variables = init_model(model, jax.random.key(0), 8)
    cfg = bilevel.BilevelConfig()
    state = bilevel.create_train_state(
        jax.random.key(1), bilevel.Models(model, None), cfg, variables, source_channels=(), target_channels=(16, 32, 64)
    )
    ck = Checkpointer(tmp_path / "ck")
    meta = {"epoch": 1, "sums": {"loss": 0.1 + 0.2}, "history": [{"val_acc": 1 / 3}]}
    ck.save(3, state, meta)
    assert sorted(os.listdir(tmp_path / "ck")) == ["3"]  # renamed into place, no temporary left
    # A save that fails half-way (the JSON item cannot be written) leaves no step 4 behind.
    with pytest.raises(TypeError):
        ck.save(4, state, {"bad": object()})
    # An unfinished temporary folder from a killed save is ignored.
    (tmp_path / "ck" / "5.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
    ck.close()
    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_step() == 3 and ck.all_steps() == [3]
    restored, rmeta = ck.restore(state)
    assert rmeta == meta  # floats round-trip exactly
    assert type(restored.opt_state) is type(state.opt_state)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restored, state)
    assert all(jax.tree.leaves(same))
    assert ck.restore_meta() == meta
    ck.close()


def test_masked_eval_step_counts_only_the_real_rows():
    """`evaluation.eval_step` against top-1 hits and cross-entropy computed in float64 numpy on the 4 real rows."""
    from l2t_jax.evaluation import eval_step

    model = get_model("vgg_tiny", 5)
    variables = init_model(model, jax.random.key(0), 8)
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3), jnp.float32)
    y = jnp.array([0, 1, 2, 3, 4, 0], jnp.int32)
    logits = np.asarray(model.apply(variables, x[:4], train=False)[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want_loss = -sum(logp[i, int(y[i])] for i in range(4))
    want_correct = int((logits.argmax(-1) == np.asarray(y[:4])).sum())
    out = eval_step(model, variables, x, y, jnp.array([1, 1, 1, 1, 0, 0], jnp.float32))
    assert float(out["correct"]) == want_correct
    np.testing.assert_allclose(float(out["loss_sum"]), want_loss, rtol=1e-6)


def test_tiny_models_registered():
    from l2t_jax.transfer import resolve_pairs, tap_sizes

    assert tap_sizes("resnet8", 32) == (32, 16, 8)
    assert tap_sizes("vgg_tiny", 16) == (16, 8, 4) and tap_sizes("vgg_tiny", 8) == (8, 4, 2)
    assert resolve_pairs("one_to_one", "resnet8", "vgg_tiny", 32) == ((0, 0), (1, 1), (2, 2))
    assert len(resolve_pairs("all_to_all", "vgg_tiny", "vgg_tiny", 16)) == 9


def test_config_differences_names_keys():
    a = run_config.to_plain(tiny_config("digits"))
    b = run_config.to_plain(tiny_config("digits", lr=0.05, seed=3, progress_bar=True))
    diff = run_config.config_differences(a, b)
    assert len(diff) == 2 and diff[0].startswith("lr: 0.1 -> 0.05") and diff[1].startswith("seed: 0 -> 3")


# --------------------------------------------------------------------------- whole runs


def test_scratch_run_end_to_end(scratch_run):
    workdir, s = scratch_run
    assert s["method"] == "scratch" and s["seed"] == 0 and s["steps"] == 6
    assert s["pairs"] == "" and s["num_classes"] == N_CLASSES
    for key in ("best_val_acc", "test_acc_at_best_val", "last_test_acc", "wall_time_s"):
        assert isinstance(s[key], float), key
    assert 0 <= s["best_val_acc"] <= 100 and s["best_epoch"] in (1, 2)
    assert s["config"]["method"] == "scratch"
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["best_val_acc"] == s["best_val_acc"]
    assert json.loads((workdir / "config.json").read_text()) == s["config"]
    lines = _read_jsonl(workdir / "metrics.jsonl")
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert [line["step"] for line in lines if line["kind"] == "train"] == [2, 3, 5, 6]
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tb").iterdir())
    v = load_weights(workdir / "final_weights.msgpack", "vgg_tiny", N_CLASSES)
    assert set(v) == {"params", "batch_stats"}
    assert (workdir / "best_weights.msgpack").is_file()
    # the epoch's learning rate is the reference's cosine value
    assert epochs[0]["lr"] == pytest.approx(cosine_epoch_lr(0.1, 0, 2))


@pytest.mark.parametrize("method", ["fm", "l2t_ww"])
def test_transfer_runs_end_to_end(method, npz_path, source_weights, l2t_run, tmp_path):
    if method == "l2t_ww":
        workdir, s = l2t_run
    else:
        workdir = tmp_path
        s = loop.train(tiny_config(f"npz:{npz_path}", method=method, source_weights=source_weights), workdir)
    assert s["method"] == method and s["steps"] == 6 and s["source_model"] == "vgg_tiny" and s["pairs"] == "1-1"
    train_lines = [line for line in _read_jsonl(workdir / "metrics.jsonl") if line["kind"] == "train"]
    assert all(line["wfm"] > 0 for line in train_lines)
    assert all(len(line["lambda"]) == 1 for line in train_lines)
    if method == "l2t_ww":
        assert all("outer_loss" in line and "meta_grad_norm" in line for line in train_lines)
        # φ moved: λ is no longer its initial value (bias 1.0 plus the pooled-feature term)
        assert train_lines[0]["lambda"] != train_lines[-1]["lambda"]
    else:
        assert all(line["lambda"] == [1.0] for line in train_lines)


def _assert_same_state(a, b, where: str) -> None:
    """Every array of two `TrainState`s (θ with the branch, BN statistics, SGD momentum and injected lr,
    φ, Adam's count/mu/nu, step) is bit-identical, with the same dtype, in the same tree structure."""
    la, tree_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))
    lb, tree_b = jax.tree_util.tree_flatten_with_path(jax.device_get(b))
    assert tree_a == tree_b, where
    differ = [
        f"{jax.tree_util.keystr(path)} (max |diff| {np.max(np.abs(np.asarray(u, np.float64) - v)):.3g})"
        for (path, u), (_, v) in zip(la, lb)
        if np.asarray(u).dtype != np.asarray(v).dtype or not np.array_equal(u, v)
    ]
    assert not differ, f"{where}: {len(differ)} of {len(la)} arrays differ: {', '.join(differ[:8])} ..."


def test_interrupted_runs_resume_exactly(npz_path, source_weights, tmp_path):
    """Stopped mid-epoch, then at an epoch end, then run to the end: the same numbers and the same whole
    `TrainState` at every checkpoint as one uninterrupted run.

    3 epochs (cosine lr 0.075, 0.025, 0): after both resume points (step 2 of epoch 1 and the end of
    epoch 1) θ still trains at a non-zero learning rate, so its momentum matters; every checkpoint the
    two runs share (steps 3, 6, 9) is compared array by array, so each resume is checked on its own.
    """
    config = l2t_config(npz_path, source_weights, epochs=3, max_checkpoints=3)
    ref_dir = tmp_path / "uninterrupted"
    ref = loop.train(config, ref_dir)
    run = tmp_path / "interrupted"
    with pytest.raises(loop.TrainingInterrupted, match="Rerun the same command") as e:
        loop.train(config, run, stop_after_steps=2)  # epoch 1, step 2 of 3
    assert (e.value.epoch, e.value.step_in_epoch) == (0, 2)
    assert Checkpointer(run / "checkpoints").all_steps() == [2]
    assert not (run / "summary.json").exists()
    with pytest.raises(loop.TrainingInterrupted) as e:
        loop.train(config, run, stop_after_steps=3)  # the end of epoch 1 (evaluated, then saved)
    assert (e.value.epoch, e.value.step_in_epoch) == (1, 0)
    s = loop.train(config, run)

    # the whole state, read back from the checkpoints into a fresh state's shapes (as loop.train does)
    like = loop.build(run_config.resolve(config), N_CLASSES).initial_state
    states = {}
    with Checkpointer(run / "checkpoints") as ck_a, Checkpointer(ref_dir / "checkpoints") as ck_b:
        assert ck_a.all_steps() == ck_b.all_steps() == [3, 6, 9]
        for step, after in ((3, "the mid-epoch resume at step 2"), (6, "the epoch-end resume at step 3"), (9, "the end")):
            (a, meta_a), (b, meta_b) = ck_a.restore(like, step), ck_b.restore(like, step)
            _assert_same_state(a, b, f"checkpoint {step} (after {after})")
            for m in (meta_a, meta_b):
                m.pop("wall_time")
            assert meta_a == meta_b, step
            states[step] = jax.device_get(b)
    # The comparison has teeth: the state holds every part, and θ, momentum, φ and Adam all moved
    # between the checkpoints (a part that stayed put after a resume would be compared vacuously).
    st = states[9]
    assert int(st.step) == 9 and st.params["branch"] and st.meta_params and st.batch_stats
    count = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(st.meta_opt_state) if "count" in str(path)]
    assert count and all(int(c) == 9 for c in count)  # one φ step per iteration
    for earlier, later in ((3, 6), (6, 9)):
        u, v = states[earlier], states[later]
        for part, get in (
            ("θ", lambda t: t.params),
            ("momentum", lambda t: bilevel.momentum_buffers(t.opt_state)),
            ("φ", lambda t: t.meta_params),
            ("Adam", lambda t: t.meta_opt_state),
        ):
            if part == "θ" and later == 9:
                continue  # the last epoch's learning rate is 0: θ stays put, its momentum still moves
            moved = jax.tree.leaves(jax.tree.map(lambda p, q: not np.array_equal(p, q), get(u), get(v)))
            assert any(moved), (part, earlier, later)
    buf = bilevel.momentum_buffers(st.opt_state)
    assert all(np.any(leaf != 0) for leaf in jax.tree.leaves(buf))
    # and the records and outputs
    assert _comparable({**s, "final_weights": 0, "best_weights": 0, "final_transfer": 0}) == _comparable(
        {**ref, "final_weights": 0, "best_weights": 0, "final_transfer": 0}
    )
    assert (run / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    for name in ("final_weights.msgpack", "final_transfer.msgpack"):
        a, b = load_variables(run / name), load_variables(ref_dir / name)
        assert jax.tree.structure(a) == jax.tree.structure(b), name
        assert all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), a, b))), name
    # a finished run rerun just rewrites its outputs
    assert _comparable(loop.train(config, run))["best_val_acc"] == ref["best_val_acc"]


def test_sigint_in_process_saves_mid_epoch(npz_path, tmp_path):
    def interrupt_at_step_2(step_fn):
        calls = {"n": 0}

        def wrapped(*args):
            out = step_fn(*args)
            calls["n"] += 1
            if calls["n"] == 2:
                signal.raise_signal(signal.SIGINT)  # the handler only sets a flag
            return out

        return wrapped

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(loop.TrainingInterrupted, match=r"\(SIGINT\) at epoch 1, after step 2/3") as e:
        loop.train(tiny_config(f"npz:{npz_path}"), tmp_path, step_fn_wrapper=interrupt_at_step_2)
    assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    meta = Checkpointer(tmp_path / "checkpoints").restore_meta()
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (0, 2, 2)


def test_resume_with_another_config_is_refused(npz_path, tmp_path):
    config = tiny_config(f"npz:{npz_path}", epochs=1)
    with pytest.raises(loop.TrainingInterrupted):
        loop.train(config, tmp_path, stop_after_steps=1)
    with pytest.raises(run_config.ConfigError, match=r"(?s)differing keys.*lr: 0.1 -> 0.2.*wd: 0.0001 -> 0.0"):
        loop.train(tiny_config(f"npz:{npz_path}", epochs=1, lr=0.2, wd=0.0), tmp_path)


def test_nan_guard_names_step_and_term(npz_path, tmp_path):
    def poison(step_fn):
        calls = {"n": 0}

        def wrapped(state, src, x, y, lr):
            state, m = step_fn(state, src, x, y, lr)
            calls["n"] += 1
            if calls["n"] == 5:  # epoch 2, step 2
                m = {**m, "loss": jnp.float32(np.nan), "ce": jnp.float32(np.inf)}
            return state, m

        return wrapped

    config = tiny_config(f"npz:{npz_path}")
    with pytest.raises(loop.NonFiniteMetricError) as e:
        loop.train(config, tmp_path, step_fn_wrapper=poison)
    msg = str(e.value)
    assert "step 5 of the run" in msg and "epoch 2" in msg and "step 2/3" in msg
    assert "loss=nan" in msg and "ce=inf" in msg and "wfm" not in msg
    ck = Checkpointer(tmp_path / "checkpoints")
    assert ck.all_steps() == [3]  # the epoch-1 checkpoint, untouched
    ck.close()


def test_nan_guard_on_a_diverging_run(npz_path, tmp_path):
    with pytest.raises(loop.NonFiniteMetricError, match=r"non-finite training metric at step \d+ .*(loss|ce)="):
        loop.train(tiny_config(f"npz:{npz_path}", lr=1e12, epochs=2, log_every=1), tmp_path)


# --------------------------------------------------------------------------- data sources


def test_image_folder_dataset(tmp_path):
    tar_path = require_shared("data/cifar10-jpeg.tar")
    classes, want = ("airplane", "automobile", "bird", "cat"), {"train": 16, "test": 4}
    counts: dict = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in classes:
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) < want[parts[0]]:
                counts[key] = counts.get(key, 0) + 1
                dest = tmp_path.joinpath("cifar", *parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
            if len(counts) == 2 * len(classes) and all(counts[k] == want[k[0]] for k in counts):
                break
    config = tiny_config(f"folder:{tmp_path / 'cifar'}", resize_to=8, epochs=1)
    s = loop.train(config, tmp_path / "run")
    assert s["steps"] == 3 and s["last_test_acc"] is not None
    # data_dir is the base of relative folder paths
    config = tiny_config("folder:cifar", data_dir=str(tmp_path), resize_to=8, epochs=1, seed=1)
    assert loop.train(config, tmp_path / "run2")["steps"] == 3


def test_builtin_digits_and_class_selection(tmp_path):
    config = tiny_config("digits", classes="6-9", n_per_class=4, batch_size=8, epochs=1, val_fraction=0.1)
    data = loop.load_run_data(run_config.resolve(config).data)
    assert data.num_classes == 4 and len(data.train) == 16
    assert data.train.class_names == ("6", "7", "8", "9")
    assert sorted(set(data.test.labels.tolist())) == [0, 1, 2, 3]
    assert data.train.images.shape[1:] == (8, 8, 3)


def test_target_weights_initialise_the_target(source_weights, tmp_path):
    """The 4-class scratch run's weights initialise a 4-class and a 3-class target (classifier re-drawn)."""
    src = load_variables(source_weights)
    for classes, n in (("6-9", 4), ("7-9", 3)):
        same_fc = n == N_CLASSES
        config = tiny_config("digits", classes=classes, target_weights=source_weights)
        setup = loop.build(run_config.resolve(config), n)
        got = jax.device_get(setup.initial_state.params["model"])
        np.testing.assert_array_equal(got["conv0"]["kernel"], src["params"]["conv0"]["kernel"])
        assert np.array_equal(got["fc"]["kernel"], src["params"]["fc"]["kernel"]) == same_fc
        assert got["fc"]["kernel"].shape[1] == n


# --------------------------------------------------------------------------- the shared reference data


def test_shared_checksums_cover_the_reference_data():
    files = conftest.shared_manifest()
    for rel in ("reference/tinyimagenet-resnet32.pth.tar", "data/cifar10-jpeg.tar",
                "reference/cases/stl10_vgg9/expected.npz", "reference/trajectories/resnet32_resnet32/expected.pth"):
        assert rel in files, rel
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in files.values())


@pytest.mark.parametrize("ci", ["", "false", "true"])
def test_missing_or_stale_shared_data_skips_or_under_ci_fails(ci, tmp_path, monkeypatch):
    """require_shared: present and unchanged -> the path; missing or stale -> a skip naming the file,
    a failure under CI=true; a path without a recorded checksum -> a failure."""
    import hashlib

    root = tmp_path / "shared"
    contents = {"reference/w.pth": b"weights", "reference/case/a.npz": b"a", "reference/case/b.npz": b"bb",
                "reference/same_size.npz": b"original", "reference/gone.pth": b"x"}
    manifest = {k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in contents.items()}
    for k, v in contents.items():
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        (root / k).write_bytes(v)
    (root / "reference/gone.pth").unlink()
    (root / "reference/same_size.npz").write_bytes(b"0riginal")  # same size, other bytes: only sha256 sees it
    (root / "reference/case/b.npz").write_bytes(b"b")  # another size
    monkeypatch.setenv("L2T_SHARED", str(root))
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(conftest, "shared_manifest", lambda: manifest)

    assert conftest.require_shared("reference/w.pth") == root / "reference/w.pth"
    assert conftest.require_shared("reference/case/a.npz") == root / "reference/case/a.npz"
    outcome = pytest.fail.Exception if ci == "true" else pytest.skip.Exception
    for rel, pattern in (
        ("reference/gone.pth", r"not found: \S*reference/gone.pth"),
        ("reference/same_size.npz", r"stale .*same_size.npz: sha256 [0-9a-f]{16}\.\.\., recorded"),
        ("reference/case", r"stale .*case/b.npz: 1 bytes, recorded 2"),  # a folder: every recorded file in it
        ("reference", r"not found: \S*gone.pth"),
    ):
        with pytest.raises(outcome, match=pattern) as e:
            conftest.require_shared(rel)
        assert ("CI=true" in str(e.value)) == (ci == "true")
    with pytest.raises(pytest.fail.Exception, match=r"'reference/new.pth' has no checksum in shared_checksums.json"):
        conftest.require_shared("reference/new.pth")


# --------------------------------------------------------------------------- errors before training


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"pairs": "7-1"}, run_config.ConfigError, r"pairs.*out of range: 7-1"),
        ({"pairs": "1_1"}, run_config.ConfigError, r"bad pair '1_1'"),
        ({"target_model": "resnet9000"}, run_config.ConfigError, r"target_model='resnet9000' is not a known model"),
        ({"source_model": "vgg99"}, run_config.ConfigError, r"source_model='vgg99' is not a known model"),
        ({"source_weights": "/nonexistent/s.msgpack"}, FileNotFoundError, r"source_weights.*/nonexistent/s.msgpack"),
        ({"method": "l2t_ww", "source_weights": ""}, run_config.ConfigError, r"needs config.source_weights"),
        ({"target_weights": "/nonexistent/t.pth"}, FileNotFoundError, r"target_weights"),
        ({"dataset": "npz:/nonexistent/d.npz"}, FileNotFoundError, r"/nonexistent/d.npz"),
        ({"dataset": "folder:/nonexistent/dir"}, FileNotFoundError, r"/nonexistent/dir"),
        ({"dataset": "mnist"}, run_config.ConfigError, r"unknown source"),
        ({"method": "fancy"}, run_config.ConfigError, r"method='fancy' is not one of"),
        ({"nesterov": True}, run_config.ConfigError, r"nesterov"),
        ({"cpu_scheduler": "fastest"}, run_config.ConfigError, r"cpu_scheduler='fastest' is not one of auto"),
    ],
)
def test_bad_configs_fail_before_training(overrides, error, pattern, npz_path, source_weights, tmp_path):
    config = tiny_config(f"npz:{npz_path}", method="fm", source_weights=source_weights)
    for k, v in overrides.items():
        config[k] = v
    with pytest.raises(error, match=pattern):
        loop.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_errors(npz_path, tmp_path):
    with pytest.raises(ValueError, match="fewer than n_per_class=99"):
        loop.train(tiny_config(f"npz:{npz_path}", n_per_class=99), tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds dataset 'stl10'"):
        loop.train(tiny_config("tfds:stl10", data_dir=str(tmp_path / "tfds")), tmp_path / "run")


# --------------------------------------------------------------------------- the CLI


def _write_config(path: Path, npz: Path, **kw) -> Path:
    body = "\n".join(f"    c.{k} = {v!r}" for k, v in kw.items())
    path.write_text(
        "from l2t_jax.run_config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.dataset = 'npz:{npz}'\n    c.image_size = 8\n    c.val_fraction = 0.25\n    c.batch_size = 16\n"
        "    c.target_model = 'vgg_tiny'\n    c.method = 'scratch'\n    c.eval_batch_size = 16\n"
        "    c.num_workers = 1\n    c.progress_bar = False\n" + body + "\n    return c\n"
    )
    return path


def _cli(*args, **popen):
    cmd = [sys.executable, "-m", "experiments.run", f"--compilation_cache={CACHE}", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_cli_unknown_key_is_a_clear_error(npz_path, tmp_path):
    cfg = _write_config(tmp_path / "cfg.py", npz_path)
    p = _cli(f"--config={cfg}", "--config.meta_lrr=1e-3", f"--workdir={tmp_path / 'w'}")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "unknown config key 'meta_lrr' in --config.meta_lrr=1e-3" in err and "meta_lr" in err
    assert "Traceback" not in err


def test_cli_chooses_the_cpu_scheduler_before_jax_starts(npz_path, tmp_path):
    """Mixed mode runs with XLA's depth-first scheduler, set while XLA can still read it; a bad value exits 2."""
    cfg = _write_config(tmp_path / "cfg.py", npz_path, epochs=1, hvp="mixed")
    p = _cli(f"--config={cfg}", f"--workdir={tmp_path / 'w'}")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "XLA CPU scheduler: memory" in err and "flags stay" not in err, err
    p = _cli(f"--config={cfg}", "--config.cpu_scheduler=fastest", f"--workdir={tmp_path / 'w2'}")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err, err
    assert "config.cpu_scheduler='fastest' is not one of auto, concurrency, memory" in err


def test_cli_sigterm_saves_and_rerun_resumes(npz_path, tmp_path):
    cfg = _write_config(tmp_path / "cfg.py", npz_path, epochs=40, log_every=1)
    workdir = tmp_path / "w"
    args = (f"--config={cfg}", f"--workdir={workdir}")
    p = _cli(*args)
    ck = workdir / "checkpoints"
    deadline = time.time() + 150
    while not (ck.is_dir() and any(d.name.isdigit() for d in ck.iterdir())):  # the first epoch is done
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "training interrupted (SIGTERM)" in err and "Rerun the same command" in err
    meta = Checkpointer(ck).restore_meta()
    assert 0 < meta["global_step"] < 120 and not (workdir / "summary.json").exists()
    # another config on this workdir is refused, naming the key
    p = _cli(*args, "--config.epochs=3")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "epochs: 40 -> 3" in err, err
    # the same command resumes from the checkpoint and finishes
    p = _cli(*args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"resuming from checkpoint {meta['global_step']}" in err
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 120 and len(summary["history"]) == 40
