"""Test-session setup shared by every test file.

* float64 is enabled for the whole session (the exactness tests need it); code
  under test keeps float32 where it is given float32, which tests check.
* A persistent compilation cache under the repo (ignored by git) makes repeated
  compiles cheap within one CI run and across local runs.
* `shared_dir()` locates ../shared (env var L2T_SHARED overrides) and
  `require_shared(rel)` skips with the missing path named when a file is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_dir() -> Path:
    """../shared beside the repository, or $L2T_SHARED."""
    return Path(os.environ.get("L2T_SHARED", REPO.parent / "shared")).resolve()


def require_shared(rel: str) -> Path:
    """Path of `rel` under the shared folder; skips the test, naming the path, if it is absent."""
    path = shared_dir() / rel
    if not path.exists():
        pytest.skip(f"shared artefact not found: {path} (set L2T_SHARED to the folder holding it)")
    return path


# --------------------------------------------------------------------------- tiny runs shared by test files


def write_digits_npz(path: Path, n_classes: int = 4, n_train: int = 16, n_test: int = 8) -> Path:
    """scikit-learn's digits 0..n_classes-1 at 8 px as an npz dataset (x, y, x_test, y_test), seeded."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    rgb = np.repeat(np.round(d.images * (255 / 16)).astype(np.uint8)[..., None], 3, -1)
    rng = np.random.default_rng(0)
    tr, te = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        tr.extend(idx[:n_train])
        te.extend(idx[n_train:n_train + n_test])
    np.savez(path, x=rgb[tr], y=d.target[tr], x_test=rgb[te], y_test=d.target[te])
    return path


def tiny_config(dataset: str, **overrides):
    """A run of 2 epochs x 3 steps of 16 images on 8 px digits with vgg_tiny (scratch unless overridden)."""
    from l2t_jax import run_config

    c = run_config.base_config()
    c.dataset = dataset
    c.image_size = 8
    c.val_fraction = 0.25  # 4 of 16 per class -> 48 training, 16 validation images
    c.batch_size = 16
    c.epochs = 2
    c.target_model = "vgg_tiny"
    c.source_model = "vgg_tiny"
    c.method = "scratch"
    c.pairs = "1-1"
    c.eval_batch_size = 16
    c.log_every = 2
    c.num_workers = 1
    c.progress_bar = False
    for k, v in overrides.items():
        c[k] = v
    return c
