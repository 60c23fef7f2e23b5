"""The training loop: one run of `experiments.run` (data, models, weights, epochs, checkpoints, logs).

    summary = train(config, workdir)     # config: see l2t_jax.run_config.base_config()
    summary = train(spec, workdir)       # or an already resolved run_config.RunSpec

The driver, `_train_and_evaluate`, is short on purpose: `train_epoch` runs one
epoch's steps (metrics fetched every `log_every` steps and checked for NaN),
`end_of_epoch` evaluates, records and checkpoints; the loop's progress is a typed
`loop_state.LoopState` (checkpointed beside the `TrainState`), and every
measurement goes through one `reporter.Reporter` (metrics.jsonl, TensorBoard, the
progress bar, the log). The run's data, models and initial state come from
`run_setup`, its evaluation passes from `evaluation`.

Per epoch e (0-based) of E: the learning rate is the reference's cosine value
lr0·(1+cos(π(e+1)/E))/2; the training batches (shuffled and augmented as a pure
function of (seed, epoch, index), prepared on a background thread) go through the
jitted `bilevel.make_train_step` (source variables and lr passed as arguments; each new
batch shape compiled ahead of its first call and the compiler's freed memory given back
to the OS, `heap.compile_then_release`);
metrics stay on the device and are fetched every `log_every` steps (a non-finite
value stops the run, naming step and term); then the validation and test splits
are evaluated (eval-mode BN) and a checkpoint is written.

Work directory:
  config.json          the run's config
  checkpoints/<step>/  orbax checkpoints (TrainState + JSON progress record)
  checkpoints_damaged/ checkpoints that failed to restore on a resume, moved aside (never deleted)
  metrics.jsonl        one JSON object per log window ("train") and per epoch ("epoch")
  tb/                  TensorBoard events: the scalars of metrics.jsonl, rewritten from it on
                       every start or resume (so a kill -9 loses none of them)
  best_weights.msgpack target {"params","batch_stats"} at the best validation epoch
  final_weights.msgpack  ... after the last epoch
  final_transfer.msgpack θ's transfer parts ("branch": matching 1x1 convs, "lwf_head" for LwF)
                       and "meta_params" (φ), after the last epoch
  summary.json         best validation accuracy, test accuracy there, last test accuracy, ...

SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary
and raises `TrainingInterrupted`. Running the same config on the same workdir
resumes from the newest checkpoint (mid-epoch included) and gives the same
numbers as an uninterrupted run. A checkpoint that fails to restore is moved aside
and the next older one is used (`Checkpointer.newest_intact`); metrics.jsonl is cut
back to the checkpoint actually resumed from. Rerunning a finished run only reports
its summary and changes no file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2t_jax import bilevel, data as data_lib, heap, parallel, run_config
from l2t_jax.checkpoint import Checkpointer, NoIntactCheckpointError
from l2t_jax.evaluation import evaluate_batches
from l2t_jax.io.atomic import write_json_atomic
from l2t_jax.io.msgpack import load_variables, save_variables
from l2t_jax.loop_state import LoopState, MetricSums
from l2t_jax.reporter import Reporter, log_summary
from l2t_jax.run_config import DataSpec, RunSpec
from l2t_jax.run_setup import RunData, Setup, as_device, build, load_run_data
from l2t_jax.schedule import cosine_epoch_lr
from l2t_jax.transfer import format_pairs

log = logging.getLogger(__name__)

PyTree = Any
__all__ = ["train", "evaluate", "load_run_data", "build", "RunData", "Setup", "TrainingInterrupted",
           "NonFiniteMetricError"]


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal (or the `stop_after_steps` hook) after saving a checkpoint.

    `str(e)` names the run's directory as what to resume; a front end that knows the
    command it was started with gives `e.rerun_hint(command)` instead (for the
    quickstart, whose sub-runs all resume through its one command, that is the only
    right advice).

    Attributes:
      signum: the signal number (None for the hook).
      epoch, step_in_epoch: where it stopped (0-based epoch, steps done in it).
      stopped: what happened and where the checkpoint is, without the advice.
    """

    def __init__(self, message: str, signum: Optional[int], epoch: int, step_in_epoch: int, *, stopped: str = ""):
        super().__init__(message)
        self.signum, self.epoch, self.step_in_epoch = signum, epoch, step_in_epoch
        self.stopped = stopped or message

    def rerun_hint(self, command: str) -> str:
        """The message naming `command` (the user's command line, as typed) as what to rerun."""
        return f"{self.stopped} Rerun the same command to resume from there:\n  {command}"


class NonFiniteMetricError(FloatingPointError):
    """A training metric was NaN or infinite (the run stops; checkpoints are left as they were)."""


# --------------------------------------------------------------------------- signals


class _StopFlag:
    """SIGINT/SIGTERM handlers that only record the signal (a second one acts as usual)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.reason: Optional[str] = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        self.reason = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the next step boundary (send it again to abort)", self.reason)
        with contextlib.suppress(Exception):
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def set(self) -> bool:
        return self.reason is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.getsignal(s)
            signal.signal(s, self._handler)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            with contextlib.suppress(Exception):
                signal.signal(s, h)
        self._old.clear()


# --------------------------------------------------------------------------- evaluation


def evaluate(model, variables: PyTree, ds: data_lib.ImageDataset, spec: DataSpec, batch_size: int) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `ds` (the eval transform, eval-mode BN).

    Every batch is padded to `batch_size` (`evaluation.eval_step`), so one compiled
    function serves all of them.
    """
    batches = data_lib.batch_iterator(
        ds, batch_size, train=False, image_size=spec.image_size, seed=spec.seed, epoch=0,
        num_workers=spec.num_workers, resize_to=spec.resize_to or None,
    )
    return evaluate_batches(model, variables, batches, batch_size)


# --------------------------------------------------------------------------- the loop


def train(
    config: ml_collections.ConfigDict | RunSpec,
    workdir: str | os.PathLike,
    *,
    stop_after_steps: Optional[int] = None,
    step_fn_wrapper: Optional[Callable[[Callable], Callable]] = None,
) -> dict:
    """Runs (or resumes) one training run in `workdir`.

    Args:
      config: a run config (`run_config.base_config()` and overrides), resolved here
        once, or a `RunSpec` already resolved from one.
      workdir: the run's directory (created; reused to resume).
      stop_after_steps: testing hook: behave as if a signal arrived once this many
        iterations (counted over the whole run) are done.
      step_fn_wrapper: testing hook: wraps the jitted train step.

    Returns:
      The summary (also written to `workdir/summary.json`).

    Raises:
      run_config.ConfigError / FileNotFoundError / ValueError: bad config, data or weights
        (before any training).
      TrainingInterrupted: after saving a checkpoint on SIGINT/SIGTERM.
      NonFiniteMetricError: a metric became NaN/inf (checkpoints untouched).
    """
    spec = config if isinstance(config, RunSpec) else run_config.resolve(config)
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=spec.schedule.max_checkpoints)
    try:
        found = ckpt.newest_intact(lambda step: LoopState.from_json(ckpt.restore_meta(step)))
        if found is not None:
            latest, saved = found
            diff = run_config.config_differences(saved.config, spec.record)
            if diff:
                raise run_config.ConfigError(
                    f"{workdir} holds a run with another config (checkpoint {latest}); differing keys:\n  "
                    + "\n  ".join(diff)
                    + "\nuse another --workdir, or rerun with the saved config to resume"
                )
            done = _finished_summary(workdir, saved, spec.schedule.epochs)
            if done is not None:
                log_summary(f"{workdir} is already finished (checkpoint {latest}); nothing to do", done)
                return done
        write_json_atomic(workdir / "config.json", spec.record)

        log.info("run: %s", spec.describe())
        data = load_run_data(spec.data)
        setup = build(spec, data.num_classes)
        heap.release_free_memory()  # what building and initialising compiled and freed
        return _train_and_evaluate(spec, workdir, ckpt, found is not None, data, setup,
                                   stop_after_steps=stop_after_steps, step_fn_wrapper=step_fn_wrapper)
    finally:
        ckpt.close()


@dataclasses.dataclass
class _Run:
    """What stays fixed while the epochs of one session run."""

    spec: RunSpec
    workdir: Path
    ckpt: Checkpointer
    data: RunData
    setup: Setup
    reporter: Reporter
    step_fn: Callable
    stop: "_StopFlag"
    steps_per_epoch: int
    eval_batch_size: int
    wall_base: float
    session_start: float
    stop_after_steps: Optional[int]

    def wall_time(self) -> float:
        return self.wall_base + (time.time() - self.session_start)

    def save(self, state, progress: LoopState) -> None:
        """Checkpoints `state` with `progress` (nothing when the newest checkpoint is of this very step)."""
        progress.wall_time = self.wall_time()
        if self.ckpt.latest_step() == progress.global_step:
            return  # nothing happened since that checkpoint (e.g. stopped again right after resuming)
        progress.metrics_bytes = self.reporter.metrics_bytes
        self.ckpt.save(progress.global_step, state, progress.to_json())


def _train_and_evaluate(spec: RunSpec, workdir: Path, ckpt: Checkpointer, resume: bool, data: RunData, setup: Setup,
                        *, stop_after_steps, step_fn_wrapper) -> dict:
    """The epochs of one session, from a fresh state or the newest intact checkpoint, then the outputs."""
    sched = spec.schedule
    spe = data_lib.steps_per_epoch(len(data.train), sched.batch_size, sched.drop_last)
    if spe < 1:
        raise ValueError(f"{len(data.train)} training images give no batch of {sched.batch_size} "
                         f"(drop_last={sched.drop_last})")
    if resume:
        latest, (state, progress) = _restore_newest(ckpt, setup.initial_state)
        if progress.steps_per_epoch != spe:
            raise ValueError(f"the checkpoint has {progress.steps_per_epoch} steps per epoch, the data now give {spe}")
    else:
        state, progress = setup.initial_state, LoopState.fresh(spec.record, spec.seed, spe)
    setup.initial_state = None  # the buffers are donated to the first step
    reporter = Reporter(workdir, spe, spec.bilevel.has_meta_step, progress_bar=sched.progress_bar)
    reporter.open(progress.metrics_bytes if resume else 0)
    try:
        if resume:
            log.info("resuming from checkpoint %d: epoch %d, step %d of %d", latest, progress.epoch + 1,
                     progress.step_in_epoch, spe)
        else:
            log.info("fresh start: %d training, %s validation, %s test images, %d classes, %d steps/epoch",
                     len(data.train), len(data.val) if data.val else 0, len(data.test) if data.test else 0,
                     data.num_classes, spe)
        step_fn = _make_step_fn(spec, setup, len(data.train))
        sizes = [len(d) for d in (data.val, data.test) if d is not None]  # one eval batch shape: one compilation
        run = _Run(spec, workdir, ckpt, data, setup, reporter,
                   step_fn_wrapper(step_fn) if step_fn_wrapper is not None else step_fn, _StopFlag(), spe,
                   min(sched.eval_batch_size, max(sizes)) if sizes else sched.eval_batch_size,
                   progress.wall_time, time.time(), stop_after_steps)
        run.stop.install()
        try:
            while progress.epoch < sched.epochs:
                state, lr = train_epoch(run, state, progress)
                end_of_epoch(run, state, progress, lr)
        finally:
            run.stop.uninstall()
        reporter.close()  # every scalar on disk before the summary marks the run finished
        return _finish(run, state, progress)
    finally:
        reporter.close()


def train_epoch(run: _Run, state, progress: LoopState) -> tuple[Any, float]:
    """The remaining steps of epoch `progress.epoch`; returns the state and the epoch's learning rate.

    Metrics stay on the device and are fetched every `log_every` steps and at the end
    of the epoch (a non-finite one stops the run). A stop request (signal or
    `stop_after_steps`) inside the epoch saves a checkpoint at the step boundary and
    raises `TrainingInterrupted`; at the epoch's end it is left to `end_of_epoch`.
    """
    spec, sched, spe = run.spec, run.spec.schedule, run.steps_per_epoch
    epoch = progress.epoch
    lr = cosine_epoch_lr(sched.lr, epoch, sched.epochs)
    lr_arr = jnp.asarray(lr, jnp.float32)
    batches = data_lib.batch_iterator(
        run.data.train, sched.batch_size, train=True, image_size=spec.data.image_size, seed=spec.seed, epoch=epoch,
        start_step=progress.step_in_epoch, drop_remainder=sched.drop_last, num_workers=spec.data.num_workers,
        resize_to=spec.data.resize_to or None,
    )
    bar = run.reporter.epoch_bar(epoch, sched.epochs, progress.step_in_epoch)
    pending: list[tuple[int, dict]] = []  # (batch size, device metrics) not fetched yet

    def close_window() -> None:
        _fetch(run, progress, pending, lr)
        run.reporter.train_window(epoch, progress.global_step, lr, progress.window.means(), bar)
        progress.window = MetricSums()

    try:
        for x, y in batches:
            state, m = run.step_fn(state, run.setup.source_variables, x, y, lr_arr)
            pending.append((len(y), m))
            progress.step_in_epoch += 1
            progress.global_step += 1
            bar.update(1)
            s = progress.step_in_epoch
            if s % sched.log_every == 0 or s == spe:
                close_window()
            if run.stop_after_steps is not None and progress.global_step >= run.stop_after_steps and not run.stop.set:
                run.stop.request(f"stop_after_steps={run.stop_after_steps}")
            if run.stop.set and s < spe:
                _fetch(run, progress, pending, lr)
                run.save(state, progress)
                raise _interrupted(run.stop, run.workdir, epoch, s, spe)
        if pending:
            close_window()
    finally:
        batches.close()
        bar.close()
    return state, lr


def _fetch(run: _Run, progress: LoopState, pending: list[tuple[int, dict]], lr: float) -> None:
    """Fetches the pending steps' metrics into the epoch's and the window's sums; NaN / inf stops the run."""
    fetched = jax.device_get([m for _, m in pending])
    first = progress.step_in_epoch - len(pending)
    for i, ((n, _), m) in enumerate(zip(pending, fetched)):
        bad = _non_finite_terms(m)
        if bad:
            s, spe, epoch = first + i, run.steps_per_epoch, progress.epoch
            raise NonFiniteMetricError(
                f"non-finite training metric at step {epoch * spe + s + 1} of the run (epoch {epoch + 1}, "
                f"step {s + 1}/{spe} of the epoch, lr {lr:g}): {', '.join(bad)}. The run is stopped; "
                f"the checkpoints in {run.ckpt.directory} are left as they were (newest: {run.ckpt.latest_step()})."
            )
        progress.epoch_sums.add(m, n)
        progress.window.add(m, n)
    pending.clear()


def end_of_epoch(run: _Run, state, progress: LoopState, lr: float) -> None:
    """Evaluates (as the schedule says), records the epoch, keeps the best weights, checkpoints.

    The reference keeps the first epoch with the highest validation accuracy (strict
    improvement); without a validation split the last epoch is kept. With
    test_eval="at_end" the best epoch's weights, saved when it happened, are tested
    once after the last epoch.
    """
    sched, data, target = run.spec.schedule, run.data, run.setup.models.target
    epoch, best = progress.epoch, progress.best
    variables = bilevel.target_variables(state)
    last = epoch + 1 == sched.epochs
    evaluating = sched.evaluates(epoch + 1)
    ev_val = _evaluate_split(run, variables, data.val, "val", progress) if evaluating and data.val is not None else None
    improved = evaluating and (best is None or ev_val is None or ev_val["acc"] > best["val_acc"])
    test_now = {"each_eval": evaluating, "on_improvement": improved or last, "at_end": last}[sched.test_eval]
    ev_test = _evaluate_split(run, variables, data.test, "test", progress) \
        if test_now and data.test is not None else None
    train_means = progress.epoch_sums.means()
    record = {
        "epoch": epoch + 1, "lr": lr,
        "train": train_means,
        "val_acc": ev_val["acc"] if ev_val else None, "val_loss": ev_val["loss"] if ev_val else None,
        "test_acc": ev_test["acc"] if ev_test else None, "test_loss": ev_test["loss"] if ev_test else None,
    }
    progress.history.append(record)
    if improved:
        progress.best = {"epoch": epoch + 1, "val_acc": record["val_acc"], "test_acc": record["test_acc"]}
        save_variables(run.workdir / "best_weights.msgpack", jax.device_get(variables))
    elif last and sched.test_eval == "at_end" and data.test is not None:
        best_vars = as_device(load_variables(run.workdir / "best_weights.msgpack"))
        progress.best["test_acc"] = evaluate(target, best_vars, data.test, run.spec.data, run.eval_batch_size)["acc"]
    run.reporter.epoch_end(record, train_means, progress.best, sched.epochs)
    progress.next_epoch()
    if progress.epoch % sched.checkpoint_every_epochs == 0 or progress.epoch == sched.epochs or run.stop.set:
        run.save(state, progress)
    if run.stop.set and progress.epoch < sched.epochs:
        raise _interrupted(run.stop, run.workdir, progress.epoch, 0, run.steps_per_epoch)


def _evaluate_split(run: _Run, variables, ds: data_lib.ImageDataset, split: str, progress: LoopState) -> dict:
    ev = evaluate(run.setup.models.target, variables, ds, run.spec.data, run.eval_batch_size)
    if not math.isfinite(ev["loss"]):
        raise NonFiniteMetricError(
            f"non-finite {split}_loss={ev['loss']} after epoch {progress.epoch + 1} (step {progress.global_step} of "
            f"the run): the network's parameters are broken. The run is stopped; the checkpoints in "
            f"{run.ckpt.directory} are left as they were (newest: {run.ckpt.latest_step()})."
        )
    return ev


def _non_finite_terms(m: dict) -> list[str]:
    bad = []
    for k, v in m.items():
        a = np.asarray(v)
        if not np.all(np.isfinite(a)):
            bad.append(f"{k}={a.tolist()}" if a.ndim else f"{k}={float(a)}")
    return bad


def _make_step_fn(spec: RunSpec, setup: Setup, n_train: int) -> Callable:
    """The jitted training step: one device, or data-parallel over this process's devices.

    Each new batch shape is compiled ahead of its first call and the compiler's freed
    memory returned to the OS before the step runs (`heap.compile_then_release`).
    """
    if not spec.data_parallel:
        return heap.compile_then_release(bilevel.make_train_step(setup.models, setup.bilevel_config))
    if jax.process_count() > 1:
        raise run_config.ConfigError(
            "config.data_parallel splits batches over one process's devices; on several hosts build the step "
            "with l2t_jax.parallel.make_parallel_train_step (each process feeding its rows of the global batch)"
        )
    mesh = parallel.make_mesh(jax.local_devices())
    B = spec.schedule.batch_size
    last = n_train % B

    def check(size: int, what: str) -> None:
        try:
            parallel.check_batch_size(mesh, size)
        except ValueError as e:
            raise run_config.ConfigError(
                f"{what} with config.data_parallel={spec.data_parallel!r} over {mesh.size} devices: {e}"
            ) from None

    check(B, f"config.batch_size={B}")
    if last and not spec.schedule.drop_last:
        check(last, f"the last batch of each epoch ({last} of the {n_train} training images; "
                    f"or set config.drop_last=True)")
    log.info("data-parallel training step over %d devices (%s BN statistics)", mesh.size, spec.data_parallel)
    return heap.compile_then_release(
        parallel.make_parallel_train_step(setup.models, setup.bilevel_config, mesh, bn=spec.data_parallel))


# --------------------------------------------------------------------------- resume and outputs


def _restore_newest(ckpt: Checkpointer, like_state) -> tuple[int, tuple[Any, LoopState]]:
    """(step, (state, progress)) of the newest checkpoint whose state and record restore (damaged ones moved aside)."""

    def read(step: int) -> tuple[Any, LoopState]:
        state, record = ckpt.restore(like_state, step)
        return state, LoopState.from_json(record)

    found = ckpt.newest_intact(read)
    if found is None:
        raise NoIntactCheckpointError(f"the checkpoints in {ckpt.directory} disappeared while the run was starting")
    return found


def _finished_summary(workdir: Path, saved: LoopState, epochs: int) -> Optional[dict]:
    """The summary of a finished run (its last checkpoint done with every epoch, its outputs written), else None.

    A run killed between its last checkpoint and its summary is not finished: the
    resume then only writes the outputs.
    """
    outputs = [workdir / n for n in ("summary.json", "final_weights.msgpack", "final_transfer.msgpack")]
    if saved.epoch < epochs or not all(p.is_file() for p in outputs):
        return None
    try:
        summary = json.loads(outputs[0].read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == saved.global_step else None


def _interrupted(stop: "_StopFlag", workdir: Path, epoch: int, step: int, spe: int) -> TrainingInterrupted:
    where = f"epoch {epoch + 1}, after step {step}/{spe}" if step else f"the start of epoch {epoch + 1}"
    stopped = f"training interrupted ({stop.reason}) at {where}; a checkpoint was saved in {workdir / 'checkpoints'}."
    msg = f"{stopped} Rerun the same command (same config, --workdir={workdir}) to resume from there."
    return TrainingInterrupted(msg, stop.signum, epoch, step, stopped=stopped)


def _finish(run: _Run, state, progress: LoopState) -> dict:
    """Writes the final weights, θ's transfer parts and φ, and summary.json; returns the summary."""
    spec, workdir, setup = run.spec, run.workdir, run.setup
    variables = jax.device_get(bilevel.target_variables(state))
    save_variables(workdir / "final_weights.msgpack", variables)
    # θ's matching branch (and LwF head) and φ (for figures: λ per pair and per sample, learned w).
    transfer_state = jax.device_get(
        {**{k: v for k, v in state.params.items() if k != "model"}, "meta_params": state.meta_params}
    )
    save_variables(workdir / "final_transfer.msgpack", transfer_state)
    hist = progress.history
    last = hist[-1] if hist else {}
    best = progress.best or {}
    summary = {
        "method": spec.method,
        "seed": spec.seed,
        "dataset": spec.data.dataset,
        "source_model": spec.sources[0].model if setup.models.source is not None else None,
        "target_model": spec.target.model,
        "num_classes": run.data.num_classes,
        "pairs": format_pairs(setup.bilevel_config.matching.pairs),
        "epochs": spec.schedule.epochs,
        "steps": progress.global_step,
        "best_val_acc": best.get("val_acc"),
        "best_epoch": best.get("epoch"),
        "test_acc_at_best_val": best.get("test_acc"),
        "last_val_acc": last.get("val_acc"),
        "last_test_acc": last.get("test_acc"),
        "wall_time_s": run.wall_time(),
        "final_weights": str(workdir / "final_weights.msgpack"),
        "best_weights": str(workdir / "best_weights.msgpack"),
        "final_transfer": str(workdir / "final_transfer.msgpack"),
        "at_pairs": format_pairs(setup.bilevel_config.at_pairs) if setup.bilevel_config.at_pairs else None,
        "history": [{k: v for k, v in r.items() if k != "train"} for r in hist],
        "config": spec.record,
    }
    write_json_atomic(workdir / "summary.json", summary)
    log_summary("done", summary)
    return summary
