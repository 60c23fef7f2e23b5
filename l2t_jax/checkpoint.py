"""Run checkpoints: the `TrainState` and a JSON record of the loop's progress, saved atomically.

One checkpoint = an orbax `Composite` of

* "state": the `bilevel.TrainState` (`StandardSave`; restored with `StandardRestore`
  against an abstract target built from a fresh state, so optax's NamedTuple states
  come back with their types);
* "meta": a JSON dict (`JsonSave`): epoch, step within the epoch, seed, partial-epoch
  metric sums, best-validation record, history ... (floats round-trip exactly).

Orbax writes every checkpoint into `<step>.orbax-checkpoint-tmp-<n>` and renames it
to `<step>` only when complete, so a run killed while saving leaves the previous
checkpoint as the latest (unfinished temporary folders are ignored).
Checkpoints are identified by the global iteration count.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    """Saves and restores (state, meta) pairs under one directory.

    Args:
      directory: where the checkpoints go (made absolute; created if missing).
      max_to_keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # Synchronous: the state's buffers are donated to the next training step,
            # so the save must be complete before the loop goes on.
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's id, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Ids of every complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Writes checkpoint `step` (blocks until it is on disk, renamed into place).

        Args:
          step: the checkpoint id (the global iteration count; must grow).
          state: the `TrainState` (any pytree of arrays).
          meta: a JSON-serialisable dict.
        """
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, like_state: PyTree, step: Optional[int] = None) -> tuple[PyTree, dict]:
        """Reads checkpoint `step` (default: the latest).

        Args:
          like_state: a state with the structure, shapes and dtypes to restore into
            (e.g. a freshly created one; only its abstract shape is used).
          step: checkpoint id; None for the newest.

        Returns:
          (state, meta).
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(int(step), args=args)
        return restored.state, dict(restored.meta)

    def restore_meta(self, step: Optional[int] = None) -> dict:
        """Only the JSON record of checkpoint `step` (default: the latest)."""
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
