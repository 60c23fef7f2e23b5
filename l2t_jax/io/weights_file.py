"""`load_weights`: model variables from any supported weights file, chosen by its suffix.

`.pth`, `.pth.tar`, `.pt`, `.tar` go to `l2t_jax.io.torch_layout.load_pretrained`
(PyTorch files, read without running code from them); `.msgpack` to
`l2t_jax.io.msgpack.load_variables` (this library's own format). Either way the
variables are checked against the model's shapes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from l2t_jax.io.msgpack import MSGPACK_SUFFIXES, load_variables
from l2t_jax.io.torch_layout import TORCH_SUFFIXES, check_variables, load_pretrained
from l2t_jax.io.torch_pickle import CheckpointReadError, WeightImportError

__all__ = ["load_weights"]


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def load_weights(path: str | os.PathLike, model_name: str, num_classes: int | None = None) -> dict:
    """Loads model variables from any supported file, chosen by suffix.

    `.pth`, `.pth.tar`, `.pt`, `.tar`: PyTorch (torchvision state dict, the
    reference's `{'state_dict', 'num_classes'}`, or a reference run checkpoint's
    target); `.msgpack`: `save_variables` output.

    Args:
      path: the weights file.
      model_name: registered model name.
      num_classes: expected classes (checked), inferred when None.

    Returns:
      {"params", "batch_stats"} checked against the model's shapes.

    Raises:
      FileNotFoundError: `path` does not exist.
      CheckpointReadError: the file cannot be read as weights (a directory, an
        unknown suffix, not a checkpoint, truncated, or refused as unsafe).
      WeightImportError: the weights do not fit `model_name` / `num_classes`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_dir():
        raise CheckpointReadError(
            f"{path} is a directory; loading from a run checkpoint directory is not supported yet "
            f"(pass a {'/'.join(TORCH_SUFFIXES + MSGPACK_SUFFIXES)} file)"
        )
    if _has_suffix(path, MSGPACK_SUFFIXES):
        variables = load_variables(path)
        try:
            check_variables(model_name, variables, num_classes)
        except WeightImportError as e:
            raise WeightImportError(f"{path}: {e}") from None
        return variables
    if _has_suffix(path, TORCH_SUFFIXES):
        return load_pretrained(path, model_name, num_classes)
    raise CheckpointReadError(
        f"{path}: unknown weights format (suffix); expected one of {', '.join(TORCH_SUFFIXES + MSGPACK_SUFFIXES)}"
    )

