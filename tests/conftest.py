"""Test-session setup shared by every test file.

* float64 is enabled for the whole session (the exactness tests need it); code
  under test keeps float32 where it is given float32, which tests check.
* A persistent compilation cache under the repo (ignored by git) makes repeated
  compiles cheap within one CI run and across local runs.
* `shared_dir()` locates ../shared (env var L2T_SHARED overrides) and
  `require_shared(rel)` returns a file or folder there after checking it against the
  sha256 recorded in tests/shared_checksums.json. A missing or stale (checksum
  mismatch) copy skips the test with the reason; under CI (environment CI=true, set by
  .ci/run) it fails it instead, so the independent checks cannot silently vanish.
  After a deliberate change of the shared data, `python tests/conftest.py` re-records
  the checksums from the current copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The runner's default cache ("auto") for every command a test starts: the repository's, never ~/.cache.
os.environ.setdefault("L2T_JAX_COMPILATION_CACHE", str(REPO / ".jax_cache"))


def shared_dir() -> Path:
    """../shared beside the repository, or $L2T_SHARED."""
    return Path(os.environ.get("L2T_SHARED", REPO.parent / "shared")).resolve()


SHARED_CHECKSUMS = REPO / "tests" / "shared_checksums.json"


def in_ci() -> bool:
    """True when the environment says CI (CI=true/1/yes, as CI systems and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def shared_manifest() -> dict[str, dict]:
    """{path under the shared folder: {"size", "sha256"}} of every shared file a test reads."""
    return json.loads(SHARED_CHECKSUMS.read_text())["files"]


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def shared_unavailable(message: str):
    """Skips the test with `message`; under CI fails it (a missing check is an error there)."""
    if in_ci():
        pytest.fail(f"{message} [CI=true: the reference data is required here, so this is an error, not a skip]",
                    pytrace=False)
    pytest.skip(message)


def require_shared(rel: str) -> Path:
    """Path of `rel` (a file or a folder) under the shared folder, checked against its recorded checksums.

    Every file recorded in tests/shared_checksums.json at `rel` or under it must be there with
    its recorded size and sha256; otherwise the test is skipped, naming the file and what is wrong
    (missing or stale), or failed under CI=true. A `rel` with no recorded file is an error in the
    test itself (record its checksum).
    """
    rel = rel.strip("/")
    root = shared_dir()
    manifest = shared_manifest()
    wanted = sorted(k for k in manifest if k == rel or k.startswith(rel + "/"))
    if not wanted:
        pytest.fail(f"shared artefact {rel!r} has no checksum in {SHARED_CHECKSUMS.name}: record it there "
                    f"(python tests/conftest.py {rel})", pytrace=False)
    hint = f"(set L2T_SHARED to the folder holding reference/ and data/; now {root})"
    missing = [k for k in wanted if not (root / k).is_file()]
    if missing:
        named = [root / rel] if not (root / rel).exists() else [root / k for k in missing]
        shared_unavailable(f"shared artefact not found: {', '.join(map(str, named))} {hint}")
    stale = []
    for k in wanted:
        path, want = root / k, manifest[k]
        size = path.stat().st_size
        if size != want["size"]:
            stale.append(f"{path}: {size} bytes, recorded {want['size']}")
        else:
            got = file_sha256(path)
            if got != want["sha256"]:
                stale.append(f"{path}: sha256 {got[:16]}..., recorded {want['sha256'][:16]}...")
    if stale:
        shared_unavailable(f"stale shared artefact (differs from {SHARED_CHECKSUMS.name}): {'; '.join(stale)} "
                           f"{hint}")
    return root / rel


def _record_checksums(rels: list[str]) -> None:
    """Re-records the checksums of `rels` (default: every recorded file) from the current shared folder."""
    root = shared_dir()
    doc = json.loads(SHARED_CHECKSUMS.read_text()) if SHARED_CHECKSUMS.exists() else {"files": {}}
    files = doc["files"]
    for rel in rels or list(files):
        rel = rel.strip("/")
        paths = [root / rel] if (root / rel).is_file() else sorted(p for p in (root / rel).rglob("*") if p.is_file())
        for p in paths:
            files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    doc["files"] = dict(sorted(files.items()))
    SHARED_CHECKSUMS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{len(files)} checksums in {SHARED_CHECKSUMS}")


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


def write_config_file(path: Path, config) -> Path:
    """A config file for `experiments.run` that gives exactly `config` (a ConfigDict of plain values)."""
    import runpy

    plain = json.dumps(config.to_dict())
    path.write_text(
        "import json\n\nimport ml_collections\n\n\n"
        f"def get_config():\n    return ml_collections.ConfigDict(json.loads({plain!r}))\n"
    )
    assert runpy.run_path(str(path))["get_config"]().to_dict() == json.loads(plain)
    return path


if __name__ == "__main__":  # python tests/conftest.py [REL ...]: re-record checksums from the shared folder
    import sys

    _record_checksums(sys.argv[1:])
