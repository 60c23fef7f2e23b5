"""The config does what it says (issue 12, part 4).

* A method name that fixes a key (`run_config.METHOD_SPECS`: pairs, scheme, meta_kind;
  LwF / AT on) refuses an explicit value that contradicts it, with one ConfigError line
  (exit status 2 from `experiments.run`); a value equal to the fixed one is accepted,
  and a key left unset ("" = the method's own) takes the method's value, which is what
  config.json then records.
* The quickstart validates every sub-run (source, scratch, FM, L2T-ww) before training any.
* `experiments.table` labels a row by what ran: a run without a source (scratch) does not
  borrow the config's unused `source_model`.

No test here trains a network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from l2t_jax import loop, run_config
from l2t_jax.run_config import METHOD_SPECS, ConfigError

CONFIGS = sorted(p for p in (REPO / "experiments" / "configs").glob("*.py") if p.name != "__init__.py")

# A value for each fixable key that no method fixes to.
CONTRADICTING = {"pairs": "0-0", "scheme": "proposed", "meta_kind": "network"}
FIXED_KEYS = ("pairs", "scheme", "meta_kind")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture()
def weights_file(tmp_path) -> str:
    path = tmp_path / "source.msgpack"  # validate checks existence only
    path.write_bytes(b"")
    return str(path)


def digits_config(weights: str, method: str, **overrides):
    """vgg_tiny -> vgg_tiny on the built-in digits, keys the method may fix left unset."""
    c = run_config.base_config()
    c.dataset = "digits"
    c.image_size = 16
    c.source_model = c.target_model = "vgg_tiny"
    c.source_weights = weights
    c.method = method
    for k, v in overrides.items():
        c[k] = v
    return c


def _fixing_cases():
    for name, spec in METHOD_SPECS.items():
        for key in FIXED_KEYS:
            fixed = getattr(spec, key)
            if fixed is not None:
                yield name, key, fixed


FIXING = list(_fixing_cases())


# --------------------------------------------------------------------------- the method's keys


def test_every_fixed_key_is_covered():
    assert {(m, k) for m, k, _ in FIXING} >= {
        ("fm_single", "pairs"), ("fm_one_to_one", "pairs"), ("l2t_w_single", "pairs"),
        ("l2t_w_one_to_one", "pairs"), ("l2t_ww_weights", "meta_kind"), ("l2t_ww_original", "scheme"),
        ("l2t_ww_first_order", "scheme"),
    }


@pytest.mark.parametrize("method, key, fixed", FIXING, ids=[f"{m}-{k}" for m, k, _ in FIXING])
def test_a_method_refuses_a_contradicting_explicit_value(method, key, fixed, weights_file):
    bad = CONTRADICTING[key]
    assert bad != fixed
    c = digits_config(weights_file, method, **{key: bad})
    with pytest.raises(ConfigError, match=rf"method '{method}' sets {key}='{fixed}'; config.{key}='{bad}'"):
        run_config.validate(c)
    with pytest.raises(ConfigError):
        run_config.resolve_method(c)
    # the value the method fixes is accepted; unset takes it
    assert run_config.validate(digits_config(weights_file, method, **{key: fixed})) is not None
    c = digits_config(weights_file, method)
    plain_resolved = run_config.resolve_method(c)
    run_config.validate(c)
    assert c[key] == fixed  # what config.json records
    assert run_config.resolve_method(c) == plain_resolved


def test_unset_keys_take_the_methods_own_values(weights_file):
    for method, spec in METHOD_SPECS.items():
        c = digits_config(weights_file, method)
        r = run_config.resolve_method(c)
        assert r.scheme == (spec.scheme or "proposed")
        assert r.meta_kind == (spec.meta_kind or "network")
        if spec.matching != "scratch":
            want = spec.pairs or "all_to_all"
            assert r.pairs == run_config.transfer.resolve_pairs(want, "vgg_tiny", "vgg_tiny", 16), method


def test_lwf_and_at_methods_refuse_values_that_turn_their_term_off(weights_file):
    for method in ("lwf", "lwf_at"):
        with pytest.raises(ConfigError, match=rf"method '{method}' adds LwF; config.lwf_weight=0"):
            run_config.validate(digits_config(weights_file, method, lwf_weight=0.0))
    for method in ("at", "lwf_at"):
        with pytest.raises(ConfigError, match=rf"method '{method}' adds AT; config.at_beta=0"):
            run_config.validate(digits_config(weights_file, method, at_beta=0.0))
        with pytest.raises(ConfigError, match=r"config.at_pairs='' selects no pairs"):
            run_config.validate(digits_config(weights_file, method, at_pairs=""))
    # keys a method does not use stay free (a sweep shares overrides across methods)
    run_config.validate(digits_config(weights_file, "fm", lwf_weight=0.0, at_beta=0.0, at_pairs=""))
    run_config.validate(digits_config(weights_file, "scratch", pairs="0-0", scheme="original"))


def test_the_runner_refuses_fixed_pairs_on_the_command_line(tmp_path):
    """The issue's case: fm_one_to_one with pairs=4-0 trained one-to-one and recorded "4-0"."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/digits_limited.py",
           f"--workdir={workdir}", "--config.method=fm_one_to_one", "--config.pairs=2-0",
           f"--config.source_weights={REPO / 'setup.cfg'}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: method 'fm_one_to_one' sets pairs='one_to_one'; config.pairs='2-0' conflicts "
                      "(leave config.pairs unset, or choose it with method 'fm')"], p.stderr
    assert not workdir.exists()


def test_config_json_records_what_the_method_runs(weights_file, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*_a, **_k):
        raise Stop

    monkeypatch.setattr(loop, "load_run_data", stop)  # config.json is written before the data are loaded
    c = digits_config(weights_file, "l2t_ww_original", pairs="one_to_one")
    with pytest.raises(Stop):
        loop.train(c, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["method"], saved["pairs"], saved["scheme"], saved["meta_kind"]) == (
        "l2t_ww_original", "one_to_one", "original", "network")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_leave_the_fixed_keys_to_the_method(path):
    """`--config.method=NAME` works on every shipped config for every method name."""
    config = _load(path)
    runs = [config.source, config.target] if "target" in config else [config]
    for c in runs:
        for method in run_config.METHODS:
            c.method = method
            try:
                run_config.resolve_method(c)
            except ConfigError as e:  # e.g. AT's pairs on an unsuitable default source: not a conflict
                assert " sets " not in str(e), f"{path.stem} with method {method}: {e}"


def test_resuming_compares_what_ran_not_how_it_was_written(weights_file):
    """A run directory recorded before the keys were left to the method still resumes."""
    current = digits_config(weights_file, "fm_one_to_one")
    run_config.validate(current)
    plain = run_config.to_plain(current)
    legacy = {**plain, "pairs": "all_to_all", "scheme": "proposed", "meta_kind": "network"}
    assert run_config.config_differences(legacy, plain) == []
    unset = run_config.to_plain(digits_config(weights_file, "fm_one_to_one"))
    assert run_config.config_differences(plain, unset) == []
    other = {**plain, "method": "fm", "pairs": "one_to_one"}
    assert run_config.config_differences(other, plain) == ["method: 'fm' -> 'fm_one_to_one'"]


# --------------------------------------------------------------------------- quickstart


def test_quickstart_validates_every_sub_run_before_training_any(tmp_path, monkeypatch):
    from experiments import quickstart

    trained = []

    def train(config, workdir, **kw):
        trained.append(workdir)
        raise AssertionError(f"trained {workdir} before every sub-run was validated")

    monkeypatch.setattr(quickstart.loop, "train", train)
    config = _load(REPO / "experiments" / "configs" / "quickstart.py")
    config.pairs.l2t_ww = "7-0"  # vgg_tiny has 3 taps: only the L2T-ww run is wrong
    with pytest.raises(ConfigError, match=r"l2t_ww.*config.pairs='7-0'"):
        quickstart.run_quickstart(config, str(tmp_path / "qs"))
    assert trained == []
    assert not list(tmp_path.rglob("checkpoints"))


def test_quickstart_cli_fails_before_training_on_an_l2t_ww_only_error(tmp_path):
    env = {**os.environ, "L2T_SHARED": str(tmp_path / "no-shared-here")}
    qs = tmp_path / "qs"
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/quickstart.py",
           f"--workdir={qs}", "--config.pairs.l2t_ww=7-0", "--config.source.epochs=2", "--config.target.epochs=2",
           "--config.source.progress_bar=False", "--config.target.progress_bar=False"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "l2t_ww" in errors[0] and "config.pairs='7-0'" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("summary.json"))


def test_quickstart_methods_that_fix_their_pairs_need_no_pairs_entry(tmp_path):
    from experiments import quickstart

    config = _load(REPO / "experiments" / "configs" / "quickstart.py")
    c = quickstart.target_config(config, "fm_one_to_one", str(tmp_path / "w.msgpack"))
    assert run_config.resolve_method(c).pairs == run_config.transfer.resolve_pairs(
        "one_to_one", "vgg_tiny", "vgg_tiny", 16)


# --------------------------------------------------------------------------- the results table


def _summary(root: Path, name: str, *, method: str, classes: str, seed: int, acc: float,
             source_used: bool, config_source: str) -> None:
    """A summary.json as loop writes it: summary["source_model"] is None when no source was used."""
    cfg = {"dataset": "digits", "classes": classes, "source_model": config_source, "target_model": "vgg_tiny",
           "n_per_class": 10 if classes == "5-9" else 0, "method": method, "seed": seed, "pairs": "all_to_all"}
    s = {"method": method, "seed": seed, "dataset": "digits", "target_model": "vgg_tiny",
         "source_model": config_source if source_used else None, "test_acc_at_best_val": acc, "config": cfg}
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(s))


def test_table_labels_the_quickstart_source_row_by_what_ran(tmp_path):
    from experiments import table

    qs = tmp_path / "qs"
    _summary(qs, "source", method="scratch", classes="0-4", seed=0, acc=95.0, source_used=False,
             config_source="resnet34")  # base_config's unused default
    for m, used in (("scratch", False), ("fm", True), ("l2t_ww", True)):
        _summary(qs, m, method=m, classes="5-9", seed=0, acc=60.0, source_used=used, config_source="vgg_tiny")
    t = table.build_table(table.load_runs([qs]))
    rows = {r["classes"]: r for r in t["rows"]}
    assert rows["0-4"]["source_model"] == ""
    assert rows["5-9"]["source_model"] == "vgg_tiny" and set(rows["5-9"]["cells"]) == {"scratch", "fm", "l2t_ww"}
    md = table.to_markdown(t)
    assert "resnet34" not in md
    src_line = next(line for line in md.splitlines() if "classes 0-4" in line)
    assert "| (none) → vgg_tiny |" in src_line
    assert any("classes 5-9" in line and "| vgg_tiny → vgg_tiny |" in line for line in md.splitlines())
