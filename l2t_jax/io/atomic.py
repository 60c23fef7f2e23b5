"""Atomic file writes: a reader finds the old file or the new one, never a part of one.

Every writer here writes to a fresh temporary file beside the target (same folder,
so the same filesystem, named `.{name}.{random}.tmp`), flushes and fsyncs it, then
`os.replace`s it onto the target. If anything fails (or the process is interrupted
by an exception) the temporary file is removed and the target is left as it was.
Parent folders are created. The file gets the permissions of a plain `open(path,
"w")` (0o666 less the umask).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["write_atomic", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _create_temp(path: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls `write(f)` on a binary file object, then puts the file at `path` atomically.

    For writers that stream into a file object (`torch.save(obj, f)`, `np.savez(f, ...)`).

    Args:
      path: destination file; parent folders are created.
      write: writes the whole content to the file object it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see the module docstring)."""
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` as UTF-8, atomically (see the module docstring)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Writes `obj` as indented JSON (`json.dumps(obj, indent=2, sort_keys=...)` + newline), atomically.

    Args:
      path: destination file.
      obj: a JSON-serialisable object.
      sort_keys: sort the keys of every object (the runner's config.json and
        summary.json); False keeps insertion order.
    """
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
