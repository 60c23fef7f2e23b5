"""The PyTorch twin of the scratch run (experiments/torch_scratch.py) against the JAX loop.

* it trains on exactly the JAX loop's batches (pixels and labels of every batch of every
  epoch, as `batch_iterator` gives them with the loop's arguments), with the reference's
  per-epoch cosine learning rate, and writes the summary / metrics the comparison reads;
* float64: from the same initial weights, two epochs of the twin (its own `train_epoch`)
  and of `l2t_jax.bilevel.train_step` (method scratch) on the same batches end at the
  same weights, BN running statistics included, to ~1e-12;
* a run killed after a checkpoint resumes to the numbers of an uninterrupted run, and a
  finished run is only reported.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch twin needs PyTorch (pip install -e .[torch])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import REPO, tiny_config, write_digits_npz  # noqa: E402
from experiments import torch_scratch as ts  # noqa: E402
from l2t_jax import bilevel, data as data_lib, loop, run_config  # noqa: E402
from l2t_jax.models import model_info  # noqa: E402
from l2t_jax.io.torch_layout import variables_from_torch, variables_to_torch  # noqa: E402

TIME_KEYS = ("train_time_s", "epoch_time_s")


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return "npz:" + str(write_digits_npz(tmp_path_factory.mktemp("data") / "digits.npz"))


def config_for(dataset: str, **kw):
    # 48 training images at batch 20: batches of 20, 20, 8 (the partial last batch kept, as the JAX loop keeps it)
    c = tiny_config(dataset, epochs=3, eval_every_epochs=2, test_eval="at_end", batch_size=20, lr=0.1)
    for k, v in kw.items():
        c[k] = v
    return c


def strip_times(history):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in history]


@pytest.fixture(scope="module")
def recorded_run(digits, tmp_path_factory):
    """An uninterrupted 3-epoch run, recording what each training step received."""
    seen = []
    orig = ts.train_step

    def spy(model, opt, x, y):
        seen.append((x.numpy().copy(), y.numpy().copy(), opt.param_groups[0]["lr"], x.dtype))
        return orig(model, opt, x, y)

    workdir = tmp_path_factory.mktemp("run")
    ts.train_step = spy
    try:
        summary = ts.run(config_for(digits), workdir, threads=1, checkpoint_every=1, log=quiet, command="test")
    finally:
        ts.train_step = orig
    return summary, seen, workdir


def test_trains_on_the_jax_loops_batches_with_the_reference_lr(digits, recorded_run):
    summary, seen, _ = recorded_run
    config = config_for(digits)
    data = loop.load_run_data(run_config.resolve(config).data)
    E = config.epochs
    expected = []
    for epoch in range(E):
        # the JAX loop's call (loop._run_epochs), written out here independently
        it = data_lib.batch_iterator(data.train, config.batch_size, train=True, image_size=config.image_size,
                                     seed=config.seed, epoch=epoch, start_step=0, drop_remainder=config.drop_last,
                                     num_workers=config.num_workers, resize_to=None)
        expected += [(epoch, x, y) for x, y in it]
    assert [len(y) for _, _, y in expected] == [20, 20, 8] * E
    assert len(seen) == len(expected)
    for (x, y, lr, dtype), (epoch, xe, ye) in zip(seen, expected):
        assert dtype == torch.float32
        np.testing.assert_array_equal(x, np.transpose(xe, (0, 3, 1, 2)))  # NHWC -> NCHW, bit for bit
        np.testing.assert_array_equal(y, ye)
        assert lr == pytest.approx(config.lr * (1 + math.cos(math.pi * (epoch + 1) / E)) / 2, abs=1e-15)
    # the batches differ between epochs (reshuffled and re-augmented), as they should
    assert not np.array_equal(seen[0][0], seen[3][0])
    assert [r["lr"] for r in summary["history"]] == [s[2] for s in seen[::3]]
    assert summary["history"][-1]["lr"] == 0.0


def test_summary_and_metrics(recorded_run):
    summary, _, workdir = recorded_run
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("best_val_acc", "best_epoch", "test_acc_at_best_val", "last_test_acc", "history", "wall_time_s",
                "command", "config"):
        assert key in summary, key
    assert summary["framework"] == "pytorch" and summary["command"] == "test"
    assert summary["epochs"] == 3 and summary["steps"] == 9 and summary["num_classes"] == 4
    hist = summary["history"]
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    for r in hist:
        assert {"epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc"} <= set(r)
        assert math.isfinite(r["train_loss"]) and 0 <= r["train_acc"] <= 100
    # validation every 2 epochs and after the last; test only at the end
    assert [r["val_acc"] is None for r in hist] == [True, False, False]
    assert [r["test_acc"] is None for r in hist] == [True, True, False]
    assert summary["last_test_acc"] == hist[-1]["test_acc"]
    # best: the first strictly highest validation accuracy; its test accuracy measured at the end
    vals = [r["val_acc"] for r in hist if r["val_acc"] is not None]
    assert summary["best_val_acc"] == max(vals)
    assert summary["best_epoch"] == next(r["epoch"] for r in hist if r["val_acc"] == max(vals))
    assert summary["test_acc_at_best_val"] is not None
    if summary["best_epoch"] == 3:
        assert summary["test_acc_at_best_val"] == summary["last_test_acc"]
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3] and all(ln["kind"] == "epoch" for ln in lines)
    assert [ln["train_loss"] for ln in lines] == [r["train_loss"] for r in hist]
    assert (workdir / "final_weights.pt").is_file() and (workdir / "best_weights.pt").is_file()
    assert not (workdir / ts.CHECKPOINT).exists()
    sd = torch.load(workdir / "final_weights.pt", weights_only=True)
    assert set(sd) == set(ts.load_twins().make_torch_model("vgg_tiny", 4).state_dict())


def test_reference_initialisation():
    twins = ts.load_twins()
    torch.manual_seed(0)
    model = ts.reference_init_(twins.make_torch_model("vgg9_bn", 10)).requires_grad_(False)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        std = float(m.weight.detach().std())
        assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.1, (m, std)
        assert float(m.bias.abs().max()) == 0.0
    assert abs(float(model.classifier.weight.detach().std()) / 0.01 - 1) < 0.1 and float(model.classifier.bias.abs().max()) == 0
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())


def test_init_jax_is_the_jax_runs_initial_weights(digits):
    config = config_for(digits)
    spec = run_config.resolve(config)
    data = loop.load_run_data(spec.data)
    model = ts.build_model(config, data.num_classes, init="jax")
    setup = loop.build(spec, data.num_classes)
    want = variables_to_torch("vgg_tiny", jax.device_get(bilevel.target_variables(setup.initial_state)))
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in got.items():
        np.testing.assert_array_equal(v.numpy(), np.asarray(want[k]), err_msg=k)
        assert v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32), k


def test_float64_epochs_equal_jax_train_step(digits):
    """Same initial weights, same batches: the twin and bilevel.train_step (scratch) agree in float64."""
    config = config_for(digits, epochs=4)
    spec = run_config.resolve(config)
    data = loop.load_run_data(spec.data)
    model = ts.build_model(config, data.num_classes).double()
    init_sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    opt = ts.make_optimizer(model, config)

    setup = loop.build(spec, data.num_classes)
    assert setup.bilevel_config.matching.pairs == () and not setup.bilevel_config.has_meta_step
    v64 = jax.tree.map(jnp.asarray, variables_from_torch("vgg_tiny", init_sd, data.num_classes))
    state = bilevel.create_train_state(
        jax.random.key(0), setup.models, setup.bilevel_config, v64, source_channels=(),
        target_channels=model_info("vgg_tiny").tap_channels, learning_rate=config.lr,
    )
    step = jax.jit(functools.partial(bilevel.train_step, models=setup.models, cfg=setup.bilevel_config))

    for epoch in range(2):  # lr 0.085, then 0.05: momentum carried across the change
        lr = config.lr * (1 + math.cos(math.pi * (epoch + 1) / config.epochs)) / 2
        tr = ts.train_epoch(model, opt, data.train, config, epoch, lr, dtype=torch.float64)
        losses = []
        for x, y in data_lib.batch_iterator(data.train, config.batch_size, train=True, image_size=config.image_size,
                                            seed=config.seed, epoch=epoch, drop_remainder=config.drop_last,
                                            num_workers=config.num_workers):
            state, m = step(state, {}, jnp.asarray(x, jnp.float64), jnp.asarray(y), jnp.asarray(lr, jnp.float64))
            losses.append((float(m["loss"]), len(y)))
        jax_loss = sum(v * n for v, n in losses) / sum(n for _, n in losses)
        assert tr["loss"] == pytest.approx(jax_loss, rel=1e-12, abs=1e-12)

    got = variables_to_torch("vgg_tiny", jax.device_get(bilevel.target_variables(state)))
    final = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(got) == set(final)
    worst, moved = 0.0, 0.0
    for k, ref in final.items():
        a = np.asarray(got[k])
        if k.endswith("num_batches_tracked"):
            assert int(a) == int(ref) == 6, k
            continue
        assert a.dtype == np.float64 and ref.dtype == np.float64, k
        # Relative to the tensor's magnitude, floored at 1e-3: a conv bias feeding a BN has a zero gradient
        # (the BN removes it), so it stays at 0 up to rounding noise (~1e-17) in both frameworks.
        scale = max(float(np.abs(ref).max()), float(np.abs(init_sd[k]).max()), 1e-3)
        worst = max(worst, float(np.abs(a - ref).max()) / scale)
        moved = max(moved, float(np.abs(ref - init_sd[k]).max()) / scale)
    assert moved > 1e-2, "the weights barely moved: the comparison would not mean anything"
    assert worst < 1e-10, worst  # measured: ~1e-15


def test_resume_after_a_kill_gives_the_uninterrupted_numbers(digits, recorded_run, tmp_path, monkeypatch):
    summary, _, _ = recorded_run
    orig = ts.train_epoch
    calls = []

    def dies_in_epoch_3(model, opt, ds, config, epoch, lr, dtype=torch.float32):
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt  # killed in the third epoch: the checkpoint after epoch 2 remains
        return orig(model, opt, ds, config, epoch, lr, dtype)

    monkeypatch.setattr(ts, "train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        ts.run(config_for(digits), tmp_path, checkpoint_every=1, log=quiet, command="test")
    assert (tmp_path / ts.CHECKPOINT).is_file() and not (tmp_path / "summary.json").exists()
    # another config on this workdir is refused, naming the key
    with pytest.raises(run_config.ConfigError, match="lr"):
        ts.run(config_for(digits, lr=0.2), tmp_path, checkpoint_every=1, log=quiet)
    monkeypatch.setattr(ts, "train_epoch", orig)
    resumed = ts.run(config_for(digits), tmp_path, checkpoint_every=1, log=quiet, command="test")
    assert strip_times(resumed["history"]) == strip_times(summary["history"])
    for key in ("best_val_acc", "best_epoch", "test_acc_at_best_val", "last_test_acc", "steps"):
        assert resumed[key] == summary[key], key
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    # a finished run is only reported
    mtime = (tmp_path / "summary.json").stat().st_mtime_ns
    again = ts.run(config_for(digits), tmp_path, checkpoint_every=1, log=quiet, command="test")
    assert again == json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "summary.json").stat().st_mtime_ns == mtime


def test_refuses_methods_other_than_scratch(digits, tmp_path):
    with pytest.raises(run_config.ConfigError, match="scratch"):
        ts.run(config_for(digits, method="fm"), tmp_path, log=quiet)


def test_command_line(digits, tmp_path):
    """The same config file and --config.KEY overrides as experiments.run; an unknown key is exit status 2."""
    cfg = tmp_path / "tiny.py"
    cfg.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import tiny_config

        def get_config():
            return tiny_config({digits!r}, epochs=3, eval_every_epochs=2, test_eval="at_end", batch_size=20)
    """))
    base = [sys.executable, "-m", "experiments.torch_scratch", f"--config={cfg}", "--threads=1"]
    out = subprocess.run(base + ["--config.epochs=2", "--config.lr=0.05", f"--workdir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "epoch 2/2 lr 0" in out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["lr"] == 0.05 and summary["epochs"] == 2 and summary["threads"] == 1
    assert "--config.lr=0.05" in summary["command"] and "experiments.torch_scratch" in summary["command"]
    bad = subprocess.run(base + ["--config.no_such_key=1", f"--workdir={tmp_path / 'bad'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr, bad.stderr[-3000:]
