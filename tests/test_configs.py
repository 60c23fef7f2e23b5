"""Every experiment config loads, validates (or names the missing file), and resolves every method."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import REPO
from l2t_jax import run_config

CONFIGS = sorted(p for p in (REPO / "experiments" / "configs").glob("*.py") if p.name != "__init__.py")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_or_names_what_is_missing(path):
    config = _load(path)
    runs = [config.source, config.target] if "target" in config else [config]  # quickstart: two stages
    for c in runs:
        if not c.source_weights and c.method != "scratch":
            c.source_weights = str(REPO / "setup.cfg")  # a file; its loading is not validated here
        try:
            pairs = run_config.validate(c)
        except FileNotFoundError as e:  # data or weights the user provides: the message names the path
            assert "not found" in str(e) or "does not exist" in str(e)
            continue
        assert pairs == run_config.resolve(c).pairs


@pytest.mark.parametrize("name, n_pairs", [("stl10", 15), ("cifar100", 15), ("cub200", 16), ("mit67", 16)])
def test_papers_all_to_all_pair_counts(name, n_pairs):
    c = _load(REPO / "experiments" / "configs" / f"{name}.py")
    assert len(run_config.resolve_method(c).pairs) == n_pairs


@pytest.mark.parametrize("method", run_config.METHODS)
def test_every_method_resolves_on_the_32px_and_224px_settings(method):
    for name in ("stl10", "cub200"):
        c = _load(REPO / "experiments" / "configs" / f"{name}.py")
        c.method = method
        r = run_config.resolve_method(c)
        assert (len(r.pairs) > 0) == (r.matching != "scratch")
        assert (len(r.at_pairs) > 0) == (method in ("at", "lwf_at"))
        assert (len(r.sources) > 0) == (method != "scratch")
