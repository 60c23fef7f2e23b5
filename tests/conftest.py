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
