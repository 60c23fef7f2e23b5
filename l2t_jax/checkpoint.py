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

A complete checkpoint can still be damaged later (a truncated data file, a corrupt
JSON record, a deleted folder). `Checkpointer.newest_intact` tries the checkpoints
newest first; one that fails to restore is logged (one WARNING line: step, path,
reason) and moved, whole, into the sibling folder `<directory>_damaged/<step>`
(never deleted; orbax does not list it there), and the next older one is tried.
What is not damage is not moved: a state whose arrays differ from the code's
(`IncompatibleCheckpointError`), and failures of the machine rather than the files
(out of memory, permissions, a full disk) propagate unchanged.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import jax
import orbax.checkpoint as ocp

from l2t_jax.run_config import ConfigError

log = logging.getLogger(__name__)

PyTree = Any
T = TypeVar("T")

# Failures of the machine, not of the checkpoint's files: never a reason to move one aside.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EMFILE, errno.ENFILE})
_ENVIRONMENT_MARKERS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "out of memory")


class NoIntactCheckpointError(ConfigError):
    """Checkpoints exist (or existed) but none restores: nothing is left to resume from.

    A `ConfigError`, so front ends report it like a config that cannot run (one line,
    exit status 2) instead of starting the run afresh over its damaged history.
    """


class IncompatibleCheckpointError(ConfigError):
    """A checkpoint's state has other arrays (names or shapes) than the code builds: not damage, not moved."""


@dataclasses.dataclass(frozen=True)
class DamagedCheckpoint:
    """A checkpoint that failed to restore and where it was moved."""

    step: int
    path: Path
    moved_to: Path
    reason: str


def _error_chain(e: BaseException) -> list[BaseException]:
    """`e` and its explicit causes, outermost first."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return chain


def failure_reason(e: BaseException, limit: int = 240) -> str:
    """One line saying why a restore failed: the innermost cause's type and first line, shortened.

    Orbax wraps tensorstore's precise error ("OUT_OF_RANGE: ... byte range ...") in a
    generic one whose text is a multi-line dump of the store's spec.
    """
    inner = _error_chain(e)[-1]
    lines = str(inner).strip().splitlines()
    text = f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_environment_error(e: BaseException) -> bool:
    """Whether a restore failed because of the machine (memory, permissions, disk full), not the files."""
    for x in _error_chain(e):
        if isinstance(x, MemoryError):
            return True
        if isinstance(x, OSError) and x.errno in _ENVIRONMENT_ERRNOS:
            return True
        if any(m.lower() in str(x).lower() for m in _ENVIRONMENT_MARKERS):
            return True
    return False


_NOISE_FILTER_INSTALLED = False
# In the file name of orbax's code (its read coroutines and the frames their errors pass through).
_ORBAX_PATH_MARK = f"{os.sep}orbax{os.sep}"


def _drop_closed_loop_noise() -> None:
    """Installs (once per process) a `sys.unraisablehook` that drops tensorstore's late calls into orbax's closed loop.

    When a restore fails, orbax closes its asyncio event loop while tensorstore is still
    finishing the other reads of the damaged checkpoint; each of them then calls
    `loop.call_soon_threadsafe` from a tensorstore thread, which raises
    RuntimeError('Event loop is closed'), reported as an unraisable exception, and
    orbax's own read coroutines of the damaged arrays are dropped with their errors
    ("Exception ignored in: <coroutine ...>"): dozens of bare tracebacks around the one
    WARNING line. A read task whose loop is still open when it is garbage-collected is
    reported instead by asyncio's logger ("Task exception was never retrieved", with a
    traceback): `_OrbaxTaskNoise` drops those. Only exactly these are dropped; everything
    else goes to the hook and handlers that were there before.
    """
    global _NOISE_FILTER_INSTALLED
    if _NOISE_FILTER_INSTALLED:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        e, tb = unraisable.exc_value, unraisable.exc_traceback
        if (
            unraisable.object is None and isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
        ):
            return
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine of orbax's reader, dropped with its loop
        if code is not None and _ORBAX_PATH_MARK in code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrbaxTaskNoise())
    _NOISE_FILTER_INSTALLED = True


class _OrbaxTaskNoise(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" records of orbax's own reads.

    asyncio logs one when a failed task or future nobody awaited is garbage-collected.
    It is orbax's when the task's repr names a coroutine "defined at" an orbax file or
    the exception was raised through orbax's code (the reads of a damaged checkpoint).
    Every other record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if not msg.startswith(("Task exception was never retrieved", "Future exception was never retrieved")):
            return True
        if _ORBAX_PATH_MARK in msg:
            return False
        error = record.exc_info[1] if record.exc_info else None
        for e in _error_chain(error) if error is not None else ():
            tb = e.__traceback__
            while tb is not None:
                if _ORBAX_PATH_MARK in tb.tb_frame.f_code.co_filename:
                    return False
                tb = tb.tb_next
        return True


def _array_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """{orbax parameter name ("params.model.fc.kernel"): shape} of a (possibly abstract) state."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
        out[".".join(str(k) for k in keys)] = tuple(leaf.shape)
    return out


def _saved_array_shapes(state_dir: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the arrays a saved state's metadata lists (empty if it lists none).

    Read through the item's handler (not a `Checkpointer`, which would also want, and
    warn about, step-level metadata inside the item's folder).
    """
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(state_dir)
    finally:
        handler.close()
    tree = getattr(metadata, "tree", metadata)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "name"))
    return {str(m.name): tuple(m.shape) for m in leaves if hasattr(m, "name") and hasattr(m, "shape")}


def state_mismatch(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], show: int = 3) -> str:
    """What differs between a saved state's arrays and the wanted ones ('' if nothing), briefly."""

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:show]) + (f" and {len(xs) - show} more" if len(xs) > show else "")

    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    reshaped = sorted(n for n in set(saved) & set(wanted) if saved[n] != wanted[n])
    parts = []
    if missing:
        parts.append(f"not saved: {names(missing)}")
    if extra:
        parts.append(f"saved but not built: {names(extra)}")
    if reshaped:
        parts.append("other shapes: " + names([f"{n} {saved[n]} vs {wanted[n]}" for n in reshaped]))
    return "; ".join(parts)


class Checkpointer:
    """Saves and restores (state, meta) pairs under one directory.

    Args:
      directory: where the checkpoints go (made absolute; created if missing).
      max_to_keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self.damaged_directory = self.directory + "_damaged"
        self.moved: list[DamagedCheckpoint] = []  # moved aside by this object, in order
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

        Raises:
          IncompatibleCheckpointError: the restore failed and the checkpoint's own metadata
            lists other arrays than `like_state` has (another code version or model).
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(int(step), args=args)
        except Exception as e:
            mismatch = self._mismatch(int(step), abstract)
            if mismatch:
                raise IncompatibleCheckpointError(
                    f"checkpoint {step} in {self.directory} holds a state with other arrays than this code builds "
                    f"({mismatch}): it was written by another version of l2t_jax or for another model; resume it "
                    f"with that version, or start the run with another --workdir"
                ) from e
            raise
        return restored.state, dict(restored.meta)

    def _mismatch(self, step: int, abstract: PyTree) -> str:
        """How checkpoint `step`'s saved arrays differ from `abstract`'s; '' if they match or are unreadable.

        Unreadable or empty metadata is damage, for the caller to treat as such.
        """
        try:
            saved = _saved_array_shapes(Path(self.directory) / str(step) / "state")
        except Exception:
            return ""
        return state_mismatch(saved, _array_shapes(abstract)) if saved else ""

    def restore_meta(self, step: Optional[int] = None) -> dict:
        """Only the JSON record of checkpoint `step` (default: the latest)."""
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def damaged(self) -> list[Path]:
        """The folders in `damaged_directory` (checkpoints moved aside by this or an earlier run)."""
        d = Path(self.damaged_directory)
        return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def newest_intact(self, read: Callable[[int], T]) -> Optional[tuple[int, T]]:
        """The newest checkpoint that `read(step)` restores, moving aside those it fails on.

        Args:
          read: restores (part of) checkpoint `step`; any exception means "damaged",
            except `IncompatibleCheckpointError` and failures of the machine
            (`is_environment_error`), which propagate with nothing moved.

        Returns:
          (step, read(step)) for the newest checkpoint that restores; None when there
          is no checkpoint and none was ever moved aside (a fresh run).

        Raises:
          NoIntactCheckpointError: checkpoints exist or were moved aside before, but
            none restores.
        """
        steps = list(reversed(self.all_steps()))
        if steps:
            _drop_closed_loop_noise()
        for step in steps:
            try:
                return step, read(step)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:
                if is_environment_error(e):
                    raise
                self._move_aside(step, e)
        if self.moved:
            details = "; ".join(f"step {m.step}: {m.reason}" for m in self.moved)
            raise NoIntactCheckpointError(
                f"all {len(self.moved)} checkpoints in {self.directory} failed to restore and were moved to "
                f"{self.damaged_directory} ({details}). Nothing is left to resume from: delete the run's "
                f"directory, or start the run with another --workdir"
            )
        earlier = self.damaged()
        if earlier:
            raise NoIntactCheckpointError(
                f"no checkpoint is left in {self.directory}: the {len(earlier)} that failed to restore before are in "
                f"{self.damaged_directory}. Nothing is left to resume from: delete the run's directory, or start "
                f"the run with another --workdir"
            )
        return None

    def _move_aside(self, step: int, error: BaseException) -> DamagedCheckpoint:
        """Moves checkpoint `step` into `damaged_directory` (a free name), logs it, and rescans."""
        src = Path(self.directory) / str(step)
        dest_dir = Path(self.damaged_directory)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest, n = dest_dir / str(step), 1
        while dest.exists():
            dest, n = dest_dir / f"{step}-{n}", n + 1
        os.rename(src, dest)
        self._manager.reload()
        record = DamagedCheckpoint(step, src, dest, failure_reason(error))
        self.moved.append(record)
        log.warning("checkpoint %d (%s) failed to restore (%s); moved it to %s", step, src, record.reason, dest)
        return record

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
