"""The runner's persistent compilation cache: where "auto" puts it, bad folders, and that it is on by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config_file
from l2t_jax.compile_cache import ENV_VAR, cache_dir


@pytest.mark.parametrize("value,environ,expected", [
    ("auto", {ENV_VAR: "/data/xla", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/data/xla"),
    ("auto", {ENV_VAR: "none", "HOME": "/h"}, None),
    ("auto", {ENV_VAR: "NONE", "HOME": "/h"}, None),
    ("auto", {ENV_VAR: "", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/l2t_jax/xla"),
    ("auto", {ENV_VAR: "auto", "HOME": "/h"}, "/h/.cache/l2t_jax/xla"),
    ("auto", {"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/l2t_jax/xla"),
    ("AUTO", {"HOME": "/h"}, "/h/.cache/l2t_jax/xla"),
    ("none", {ENV_VAR: "/data/xla"}, None),
    ("", {ENV_VAR: "/data/xla"}, None),
    ("/tmp/c", {ENV_VAR: "/data/xla"}, "/tmp/c"),
    (" rel/c ", {}, "rel/c"),
])
def test_cache_dir_resolution(value, environ, expected):
    got = cache_dir(value, environ)
    assert (None if got is None else str(got)) == expected


def test_cache_dir_expands_the_user_folder():
    assert cache_dir("~/xla", {}) == Path(os.path.expanduser("~/xla"))


def test_enable_none_changes_nothing():
    import jax

    from l2t_jax.compile_cache import enable

    before = jax.config.jax_compilation_cache_dir
    assert enable(cache_dir("none")) is None
    assert jax.config.jax_compilation_cache_dir == before


def _run(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **environ})


def test_a_cache_that_cannot_be_a_folder_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = write_config_file(tmp_path / "cfg.py", tiny_config("digits", epochs=1))
    for args, environ in (([f"--compilation_cache={blocker / 'xla'}"], {}), ([], {ENV_VAR: str(blocker)})):
        proc = _run([f"--config={cfg}", f"--workdir={tmp_path / 'w'}", *args], environ)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr and last.startswith("error: the compilation cache "), proc.stderr
        assert "--compilation_cache=none" in last
        assert not (tmp_path / "w").exists()


def test_runs_use_the_cache_by_default_and_reruns_hit_it(tmp_path):
    """No --compilation_cache: the first run fills $L2T_JAX_COMPILATION_CACHE, a second run compiles nothing new."""
    cache = tmp_path / "xla"
    environ = {ENV_VAR: str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cfg = write_config_file(tmp_path / "cfg.py", tiny_config("digits", epochs=1))
    first = _run([f"--config={cfg}", f"--workdir={tmp_path / 'w1'}"], environ)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"compiled programs are cached in {cache.resolve()}" in first.stderr
    entries = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    assert len(entries) >= 2, entries  # the train step and the evaluation at least
    second = _run([f"--config={cfg}", f"--workdir={tmp_path / 'w2'}"], environ)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == entries
    off = _run([f"--config={cfg}", f"--workdir={tmp_path / 'w3'}", "--compilation_cache=none"],
               {**environ, ENV_VAR: str(tmp_path / "unused")})
    assert off.returncode == 0, off.stderr[-3000:]
    assert "compiled programs are cached" not in off.stderr
    assert not (tmp_path / "unused").exists()
