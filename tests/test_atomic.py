"""The atomic file writer: content, the runner's JSON format, no partial or stray files."""

from __future__ import annotations

import json
import os
import stat

import pytest

from l2t_jax.io.atomic import (
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

OBJ = {"b": [1, 2.5, None], "a": {"z": "λ", "y": True}, "c": "text"}


def test_json_is_the_runners_format(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, OBJ)
    # what the runner's config.json / summary.json have always held
    assert path.read_bytes() == (json.dumps(OBJ, indent=2, sort_keys=True) + "\n").encode()
    write_json_atomic(path, OBJ, sort_keys=False)
    assert path.read_text() == json.dumps(OBJ, indent=2) + "\n"
    assert list(json.loads(path.read_text())) == ["b", "a", "c"]


def test_bytes_text_and_streams_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "deep" / "er" / "f.bin"  # parent folders are created
    write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_text_atomic(path, "ünïcode\n")
    assert path.read_bytes() == "ünïcode\n".encode()
    write_atomic(path, lambda f: (f.write(b"ab"), f.write(b"cd")))
    assert path.read_bytes() == b"abcd"
    assert os.listdir(path.parent) == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "f.json"
    write_json_atomic(path, OBJ)
    before = path.read_bytes()

    def half_then_fail(f):
        f.write(b"{ half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, half_then_fail)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})  # not serialisable: nothing is written
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["f.json"]


def test_permissions_follow_the_umask_like_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a", b"x")
        with open(tmp_path / "b", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    modes = [stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in ("a", "b")]
    assert modes == [0o644, 0o644]
