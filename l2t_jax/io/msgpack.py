"""This library's own weights format: the variables tree as msgpack.

`save_variables` writes any tree of arrays (typically `{"params", "batch_stats"}`
of a model, or the runner's transfer state) with
`flax.serialization.msgpack_serialize`, atomically (`l2t_jax.io.atomic`);
`load_variables` reads it back as numpy arrays. The runner writes
`best_weights.msgpack`, `final_weights.msgpack` and `final_transfer.msgpack` this way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from l2t_jax.io.atomic import write_bytes_atomic
from l2t_jax.io.torch_pickle import CheckpointReadError

__all__ = ["MSGPACK_SUFFIXES", "load_variables", "save_variables"]

#: Suffixes of this library's weight files.
MSGPACK_SUFFIXES = (".msgpack",)


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Writes variables as msgpack (`flax.serialization.msgpack_serialize`), atomically.

    Args:
      path: destination file (conventionally `.msgpack`); parent folders are created.
      variables: any tree of arrays, typically {"params", "batch_stats"}.
    """
    import jax
    from flax import serialization

    tree = jax.tree_util.tree_map(np.asarray, _plain(variables))
    write_bytes_atomic(path, serialization.msgpack_serialize(tree))


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


def load_variables(path: str | os.PathLike) -> dict:
    """Reads a file written by `save_variables`.

    Args:
      path: the `.msgpack` file.

    Returns:
      The tree of numpy arrays.

    Raises:
      FileNotFoundError: `path` does not exist.
      CheckpointReadError: the file is not msgpack of a variables tree (one
        line naming the file).
    """
    from flax import serialization

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not path.is_file():
        raise CheckpointReadError(f"{path} is not a weights file (a directory?); pass a .msgpack file written by save_variables")
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack and flax raise ValueError, TypeError, ... for bytes that are not their format
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointReadError(
            f"{path}: not a weights file written by save_variables ({type(e).__name__}: {reason}); "
            "pass a .msgpack file written by this library"
        ) from e
    if not isinstance(tree, dict):
        raise CheckpointReadError(f"{path}: holds a msgpack {type(tree).__name__}, not a variables tree; pass a .msgpack file written by save_variables")
    return tree

