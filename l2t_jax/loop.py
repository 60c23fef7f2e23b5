"""The training loop: one run of `experiments.run` (data, models, weights, epochs, checkpoints, logs).

    summary = train(config, workdir)     # config: see l2t_jax.run_config.base_config()

Per epoch e (0-based) of E: the learning rate is the reference's cosine value
lr0·(1+cos(π(e+1)/E))/2; the training batches (shuffled and augmented as a pure
function of (seed, epoch, index), prepared on a background thread) go through the
jitted `bilevel.make_train_step` (source variables and lr passed as arguments);
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
import functools
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

from l2t_jax import bilevel, data as data_lib, parallel, run_config, weights as weights_lib
from l2t_jax.checkpoint import Checkpointer, NoIntactCheckpointError
from l2t_jax.models import get_model, init_model, model_info
from l2t_jax.schedule import cosine_epoch_lr
from l2t_jax.transfer import MatchingConfig, format_pairs

log = logging.getLogger(__name__)

PyTree = Any
# Scalar training metrics summed per epoch (batch-size weighted); "lambda" is a vector.
_SCALARS = ("loss", "ce", "wfm", "at", "lwf", "accuracy", "outer_loss", "matching_loss_at_start", "meta_grad_norm")


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


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class RunData:
    """The splits of a run. `val`/`test` may be None (no validation / no test split)."""

    train: data_lib.ImageDataset
    val: Optional[data_lib.ImageDataset]
    test: Optional[data_lib.ImageDataset]
    num_classes: int


def _select_classes(ds: data_lib.ImageDataset, classes: list[int]) -> data_lib.ImageDataset:
    bad = [c for c in classes if c >= ds.num_classes]
    if bad:
        raise run_config.ConfigError(f"config.classes names class(es) {bad}, but the dataset has {ds.num_classes}")
    keep = np.flatnonzero(np.isin(ds.labels, classes))
    sub = ds.subset(keep)
    remap = np.full(ds.num_classes, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    names = tuple(ds.class_names[c] for c in classes) if ds.class_names else None
    return data_lib.ImageDataset(sub.images, remap[sub.labels], len(classes), names)


def load_run_data(config: ml_collections.ConfigDict) -> RunData:
    """Loads the dataset and makes the run's train / validation / test splits.

    The validation split is `val_fraction` of every class of the training set
    (seeded by `seed`); the limited-data subset (`n_per_class`) is then drawn from
    what remains. Small-image (<= 64 px) training sets are decoded into memory.
    """
    source = config.dataset
    if source in run_config.BUILTIN_DATASETS:
        from l2t_jax.digits import load_digits_dataset

        splits = load_digits_dataset(config.image_size)
    else:
        kw: dict[str, Any] = {}
        if source.startswith("tfds:"):
            kw["download"] = not config.offline
            kw["num_workers"] = max(config.num_workers, 1)
        elif source.startswith("folder:"):
            kw["num_workers"] = max(config.num_workers, 1)
        splits = data_lib.load_dataset(source, config.data_dir or None, **kw)
    if "train" not in splits:
        raise ValueError(f"dataset {source!r} has no 'train' split (splits: {sorted(splits)})")
    classes = run_config.parse_classes(config.classes)
    if classes is not None:
        splits = {k: _select_classes(v, classes) for k, v in splits.items()}
    train = splits["train"]
    if len(train) == 0:
        raise ValueError(f"dataset {source!r}: the training split is empty")
    val = None
    if config.val_fraction > 0:
        train, val = data_lib.train_val_split(train, config.val_fraction, seed=config.seed)
        if len(val) == 0:
            log.warning("val_fraction=%s leaves no validation image; selecting on the last epoch", config.val_fraction)
            val = None
    if config.n_per_class:
        train = data_lib.per_class_subset(train, config.n_per_class, seed=config.seed)
    test = splits.get("test")
    if test is None:
        log.warning("dataset %r has no test split; test accuracy will be null", source)
    if config.image_size <= data_lib.SMALL_IMAGE_MAX:
        workers = max(config.num_workers, 1)
        train = data_lib.to_memory(train, workers)
        val = data_lib.to_memory(val, workers) if val is not None else None
        test = data_lib.to_memory(test, workers) if test is not None else None
    return RunData(train, val, test, train.num_classes)


# --------------------------------------------------------------------------- models, weights, state


@dataclasses.dataclass
class Setup:
    """Everything the epochs need, built from the config."""

    models: bilevel.Models
    bilevel_config: bilevel.BilevelConfig
    source_variables: PyTree
    initial_state: bilevel.TrainState
    source_num_classes: Optional[int]


def _as_device(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.asarray(a), tree)


def build(config: ml_collections.ConfigDict, pairs, num_classes: int) -> Setup:
    """Models, source weights, the target's initial variables and the fresh `TrainState`."""
    target = get_model(config.target_model, num_classes, conv_impl=config.conv_impl)
    key_init, key_state = jax.random.split(jax.random.key(config.seed))
    target_vars = init_model(target, key_init, config.image_size)
    if config.target_weights:
        loaded = weights_lib.load_weights(os.path.expanduser(config.target_weights), config.target_model)
        n_loaded = int(np.shape(loaded["params"]["fc"]["kernel"])[1])
        if n_loaded != num_classes:
            log.info("target_weights classify %d classes, the task %d: the classifier is re-initialised",
                     n_loaded, num_classes)
            loaded["params"]["fc"] = jax.device_get(target_vars["params"]["fc"])
        target_vars = {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}
    target_vars = _as_device(jax.tree.map(lambda a: np.asarray(a, np.float32), target_vars))

    resolved = run_config.resolve_method(config)
    sources, source_vars_list, n_source = [], [], None
    for src in resolved.sources:
        loaded = weights_lib.load_weights(os.path.expanduser(src.weights), src.model, src.num_classes or None)
        n = int(np.shape(loaded["params"]["fc"]["kernel"])[1])
        n_source = n if n_source is None else n_source
        sources.append(get_model(src.model, n, conv_impl=config.conv_impl))
        source_vars_list.append(_as_device(jax.tree.map(lambda a: np.asarray(a, np.float32), loaded)))
    if len(sources) > 1:
        source, source_vars = tuple(sources), tuple(source_vars_list)
    elif sources:
        source, source_vars = sources[0], source_vars_list[0]
    else:
        source, source_vars = None, {}
    source_channels = tuple(c for src in resolved.sources for c in model_info(src.model).tap_channels)

    bcfg = bilevel.BilevelConfig(
        matching=MatchingConfig(
            pairs=tuple(pairs), method=resolved.matching, beta=config.beta,
            lambda_type=config.lambda_type, meta_kind=resolved.meta_kind,
        ),
        T=config.T, scheme=resolved.scheme, momentum=config.momentum, weight_decay=config.wd,
        meta_lr=config.meta_lr, meta_weight_decay=config.meta_wd, bn_updates=config.bn_updates,
        remat=config.remat, unroll=config.unroll, hvp=config.hvp, lwf_weight=resolved.lwf_weight, lwf_temperature=config.lwf_temperature,
        at_pairs=resolved.at_pairs, at_beta=config.at_beta,
    )
    models = bilevel.Models(target, source)
    state = bilevel.create_train_state(
        key_state, models, bcfg, target_vars,
        source_channels=source_channels,
        target_channels=model_info(config.target_model).tap_channels,
        learning_rate=config.lr, lambda_init=config.lambda_init, lwf_classes=n_source or 0,
    )
    return Setup(models, bcfg, source_vars, state, n_source)


# --------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(model, variables, x, y, mask):
    """`bilevel.eval_step` with a validity mask (batches are padded to one shape: one compile)."""
    logits, _ = model.apply(variables, x, train=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), -1)[:, 0]
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {"correct": jnp.sum(hit * mask), "loss_sum": jnp.sum(nll * mask)}


def evaluate(
    model, variables: PyTree, ds: data_lib.ImageDataset, config, batch_size: Optional[int] = None
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `ds` (eval transform, eval-mode BN).

    Every batch is padded to `batch_size` (default: eval_batch_size, at most len(ds)),
    so one compiled function serves all of them.
    """
    bs = batch_size or min(config.eval_batch_size, len(ds))
    batches = data_lib.batch_iterator(
        ds, bs, train=False, image_size=config.image_size, seed=config.seed, epoch=0,
        num_workers=config.num_workers, resize_to=config.resize_to or None,
    )
    outs = []
    for x, y in batches:
        n = len(y)
        mask = np.zeros(bs, np.float32)
        mask[:n] = 1.0
        if n < bs:
            x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(bs - n, y.dtype)])
        outs.append(_eval_batch(model, variables, x, y, mask))
    outs = jax.device_get(outs)
    correct = sum(int(round(float(o["correct"]))) for o in outs)
    loss = sum(float(o["loss_sum"]) for o in outs)
    return {"acc": 100.0 * correct / len(ds), "loss": loss / len(ds), "correct": correct, "n": len(ds)}


# --------------------------------------------------------------------------- metrics


def _new_sums() -> dict:
    return {"n": 0, "steps": 0, "sums": {}, "lambda": None}


def _accumulate(acc: dict, m: dict, n: int) -> None:
    """Adds one step's fetched metrics (batch size n) into `acc` (float64, in step order)."""
    acc["n"] += n
    acc["steps"] += 1
    for k in _SCALARS:
        if k in m:
            acc["sums"][k] = acc["sums"].get(k, 0.0) + float(m[k]) * n
    lam = [float(v) for v in np.asarray(m["lambda"]).reshape(-1)]
    acc["lambda"] = lam if acc["lambda"] is None else [a + b for a, b in zip(acc["lambda"], lam)]


def _means(acc: dict) -> dict:
    if acc["n"] == 0:
        return {}
    out = {k: v / acc["n"] for k, v in acc["sums"].items()}
    if "accuracy" in out:
        out["accuracy"] *= 100.0
    if acc["lambda"]:
        lam = [v / acc["steps"] for v in acc["lambda"]]
        out["lambda"] = lam
        out["lambda_mean"] = float(np.mean(lam))
    return out


def _non_finite_terms(m: dict) -> list[str]:
    bad = []
    for k, v in m.items():
        a = np.asarray(v)
        if not np.all(np.isfinite(a)):
            bad.append(f"{k}={a.tolist()}" if a.ndim else f"{k}={float(a)}")
    return bad


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


# --------------------------------------------------------------------------- the loop


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_after_steps: Optional[int] = None,
    step_fn_wrapper: Optional[Callable[[Callable], Callable]] = None,
) -> dict:
    """Runs (or resumes) one training run in `workdir`.

    Args:
      config: a run config (`run_config.base_config()` and overrides).
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
    pairs = run_config.validate(config)
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    plain = run_config.to_plain(config)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.max_checkpoints)
    try:
        found = ckpt.newest_intact(lambda step: _checked_meta(ckpt.restore_meta(step)))
        if found is not None:
            latest, meta = found
            diff = run_config.config_differences(meta["config"], plain)
            if diff:
                raise run_config.ConfigError(
                    f"{workdir} holds a run with another config (checkpoint {latest}); differing keys:\n  "
                    + "\n  ".join(diff)
                    + "\nuse another --workdir, or rerun with the saved config to resume"
                )
            done = _finished_summary(workdir, meta, config.epochs)
            if done is not None:
                _log_summary(f"{workdir} is already finished (checkpoint {latest}); nothing to do", done)
                return done
        _write_json(workdir / "config.json", plain)

        log.info("run: %s", run_config.describe(config))
        data = load_run_data(config)
        setup = build(config, pairs, data.num_classes)
        return _run_epochs(config, plain, workdir, ckpt, found is not None, data, setup,
                           stop_after_steps=stop_after_steps, step_fn_wrapper=step_fn_wrapper)
    finally:
        ckpt.close()


# Keys of the JSON progress record that a resume reads.
_META_KEYS = ("config", "epoch", "step_in_epoch", "global_step", "seed", "steps_per_epoch", "epoch_acc", "window",
              "best", "history", "metrics_bytes", "wall_time")


def _checked_meta(meta: dict) -> dict:
    """`meta` if it has every key a resume reads (else ValueError: a damaged record, not a resumable one)."""
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"the progress record lacks {', '.join(missing)}")
    return meta


def _finished_summary(workdir: Path, meta: dict, epochs: int) -> Optional[dict]:
    """The summary of a finished run (its last checkpoint done with every epoch, its outputs written), else None.

    A run killed between its last checkpoint and its summary is not finished: the
    resume then only writes the outputs.
    """
    outputs = [workdir / n for n in ("summary.json", "final_weights.msgpack", "final_transfer.msgpack")]
    if meta["epoch"] < epochs or not all(p.is_file() for p in outputs):
        return None
    try:
        summary = json.loads(outputs[0].read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == meta["global_step"] else None


def _log_summary(headline: str, summary: dict) -> None:
    log.info(
        "%s: best val %s (epoch %s), test there %s, last test %s, %.0f s",
        headline, _fmt(summary.get("best_val_acc")), summary.get("best_epoch"),
        _fmt(summary.get("test_acc_at_best_val")), _fmt(summary.get("last_test_acc")), summary.get("wall_time_s", 0.0),
    )


def _data_parallel_step(config, setup: Setup, n_train: int) -> Callable:
    """`parallel.make_parallel_train_step` over this process's devices, after checking the batch sizes."""
    if jax.process_count() > 1:
        raise run_config.ConfigError(
            "config.data_parallel splits batches over one process's devices; on several hosts build the step "
            "with l2t_jax.parallel.make_parallel_train_step (each process feeding its rows of the global batch)"
        )
    mesh = parallel.make_mesh(jax.local_devices())
    B, last = config.batch_size, n_train % config.batch_size

    def check(size: int, what: str) -> None:
        try:
            parallel.check_batch_size(mesh, size)
        except ValueError as e:
            raise run_config.ConfigError(
                f"{what} with config.data_parallel={config.data_parallel!r} over {mesh.size} devices: {e}"
            ) from None

    check(B, f"config.batch_size={B}")
    if last and not config.drop_last:
        check(last, f"the last batch of each epoch ({last} of the {n_train} training images; "
                    f"or set config.drop_last=True)")
    log.info("data-parallel training step over %d devices (%s BN statistics)", mesh.size, config.data_parallel)
    return parallel.make_parallel_train_step(setup.models, setup.bilevel_config, mesh, bn=config.data_parallel)


def _run_epochs(config, plain, workdir: Path, ckpt: Checkpointer, resume: bool, data: RunData, setup: Setup,
                *, stop_after_steps, step_fn_wrapper) -> dict:
    E, B = config.epochs, config.batch_size
    spe = data_lib.steps_per_epoch(len(data.train), B, config.drop_last)
    if spe < 1:
        raise ValueError(f"{len(data.train)} training images give no batch of {B} (drop_last={config.drop_last})")
    metrics_path = workdir / "metrics.jsonl"
    has_meta = setup.bilevel_config.has_meta_step
    if not resume:
        state = setup.initial_state
        meta = {
            "config": plain, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "seed": config.seed,
            "steps_per_epoch": spe, "epoch_acc": _new_sums(), "window": _new_sums(), "best": None,
            "history": [], "metrics_bytes": 0, "wall_time": 0.0,
        }
        metrics_path.write_bytes(b"")
        log.info("fresh start: %d training, %s validation, %s test images, %d classes, %d steps/epoch",
                 len(data.train), len(data.val) if data.val else 0, len(data.test) if data.test else 0,
                 data.num_classes, spe)
    else:
        latest, (state, meta) = _restore_newest(ckpt, setup.initial_state)
        if meta["steps_per_epoch"] != spe:
            raise ValueError(f"the checkpoint has {meta['steps_per_epoch']} steps per epoch, the data now give {spe}")
        with open(metrics_path, "a+b") as f:  # drop lines written after the checkpoint resumed from
            f.truncate(meta["metrics_bytes"])
        log.info("resuming from checkpoint %d: epoch %d, step %d of %d", latest, meta["epoch"] + 1,
                 meta["step_in_epoch"], spe)
    setup.initial_state = None  # the buffers are donated to the first step

    tb = _open_tensorboard(workdir / "tb", _read_metrics(metrics_path), spe, has_meta)
    if config.data_parallel:
        step_fn = _data_parallel_step(config, setup, len(data.train))
    else:
        step_fn = bilevel.make_train_step(setup.models, setup.bilevel_config)
    if step_fn_wrapper is not None:
        step_fn = step_fn_wrapper(step_fn)
    stop = _StopFlag()
    stop.install()
    session_start = time.time()
    # one evaluation batch shape for both splits (one compilation)
    sizes = [len(d) for d in (data.val, data.test) if d is not None]
    eval_bs = min(config.eval_batch_size, max(sizes)) if sizes else config.eval_batch_size

    def save(state, meta) -> None:
        meta["wall_time"] = wall_base + (time.time() - session_start)
        if ckpt.latest_step() == meta["global_step"]:
            return  # nothing happened since that checkpoint (e.g. stopped again right after resuming)
        meta["metrics_bytes"] = metrics_path.stat().st_size
        ckpt.save(meta["global_step"], state, meta)

    def log_line(obj: dict) -> None:
        """Appends a line to metrics.jsonl (the record) and its scalars to TensorBoard (a view of it)."""
        with open(metrics_path, "a") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")
        for tag, value, step in _tb_scalars(obj, spe, has_meta):
            tb.add_scalar(tag, value, step)

    wall_base = meta["wall_time"]
    try:
        while meta["epoch"] < E:
            epoch = meta["epoch"]
            lr = cosine_epoch_lr(config.lr, epoch, E)
            lr_arr = jnp.asarray(lr, jnp.float32)
            start = meta["step_in_epoch"]
            batches = data_lib.batch_iterator(
                data.train, B, train=True, image_size=config.image_size, seed=config.seed, epoch=epoch,
                start_step=start, drop_remainder=config.drop_last, num_workers=config.num_workers,
                resize_to=config.resize_to or None,
            )
            bar = _progress(spe, start, f"epoch {epoch + 1}/{E}", config.progress_bar)
            pending: list[tuple[int, dict]] = []  # (batch size, device metrics)

            def flush():
                fetched = jax.device_get([m for _, m in pending])
                first = meta["step_in_epoch"] - len(pending)
                for i, ((n, _), m) in enumerate(zip(pending, fetched)):
                    bad = _non_finite_terms(m)
                    if bad:
                        s = first + i
                        raise NonFiniteMetricError(
                            f"non-finite training metric at step {epoch * spe + s + 1} of the run (epoch {epoch + 1}, "
                            f"step {s + 1}/{spe} of the epoch, lr {lr:g}): {', '.join(bad)}. The run is stopped; "
                            f"the checkpoints in {ckpt.directory} are left as they were (newest: {ckpt.latest_step()})."
                        )
                    _accumulate(meta["epoch_acc"], m, n)
                    _accumulate(meta["window"], m, n)
                pending.clear()

            def close_window():
                w = _means(meta["window"])
                if w:
                    log_line({"kind": "train", "epoch": epoch + 1, "step": meta["global_step"], "lr": lr, **w})
                    post = {"loss": f"{w['loss']:.3f}", "acc": f"{w['accuracy']:.1f}"}
                    if has_meta and "lambda_mean" in w:
                        post["λ"] = f"{w['lambda_mean']:.2f}"
                    bar.set_postfix(post, refresh=False)
                meta["window"] = _new_sums()

            try:
                for x, y in batches:
                    state, m = step_fn(state, setup.source_variables, x, y, lr_arr)
                    pending.append((len(y), m))
                    meta["step_in_epoch"] += 1
                    meta["global_step"] += 1
                    bar.update(1)
                    s = meta["step_in_epoch"]
                    if s % config.log_every == 0 or s == spe:
                        flush()
                        close_window()
                    if stop_after_steps is not None and meta["global_step"] >= stop_after_steps and not stop.set:
                        stop.request(f"stop_after_steps={stop_after_steps}")
                    if stop.set and s < spe:
                        flush()
                        save(state, meta)
                        raise _interrupted(stop, workdir, epoch, s, spe)
                if pending:
                    flush()
                    close_window()
            finally:
                batches.close()
                bar.close()

            # end of epoch: evaluate, record, checkpoint
            variables = bilevel.target_variables(state)
            best = meta["best"]
            last = epoch + 1 == E
            evaluating = last or (epoch + 1) % config.eval_every_epochs == 0
            ev_val = evaluate(setup.models.target, variables, data.val, config, eval_bs) \
                if evaluating and data.val is not None else None
            # The reference keeps the first epoch with the highest validation accuracy
            # (strict improvement); without a validation split the last epoch is kept.
            improved = evaluating and (best is None or ev_val is None or ev_val["acc"] > best["val_acc"])
            test_now = {"each_eval": evaluating, "on_improvement": improved or last, "at_end": last}[config.test_eval]
            ev_test = evaluate(setup.models.target, variables, data.test, config, eval_bs) \
                if test_now and data.test is not None else None
            for split, ev in (("val", ev_val), ("test", ev_test)):
                if ev is not None and not math.isfinite(ev["loss"]):
                    raise NonFiniteMetricError(
                        f"non-finite {split}_loss={ev['loss']} after epoch {epoch + 1} (step {meta['global_step']} of "
                        f"the run): the network's parameters are broken. The run is stopped; the checkpoints in "
                        f"{ckpt.directory} are left as they were (newest: {ckpt.latest_step()})."
                    )
            train_means = _means(meta["epoch_acc"])
            record = {
                "epoch": epoch + 1, "lr": lr,
                "train": train_means,
                "val_acc": ev_val["acc"] if ev_val else None, "val_loss": ev_val["loss"] if ev_val else None,
                "test_acc": ev_test["acc"] if ev_test else None, "test_loss": ev_test["loss"] if ev_test else None,
            }
            meta["history"].append(record)
            if improved:
                meta["best"] = {"epoch": epoch + 1, "val_acc": record["val_acc"], "test_acc": record["test_acc"]}
                weights_lib.save_variables(workdir / "best_weights.msgpack", jax.device_get(variables))
            elif last and config.test_eval == "at_end" and data.test is not None:
                # the best-validation epoch's weights, saved when it happened, tested once now
                best_vars = weights_lib.load_variables(workdir / "best_weights.msgpack")
                meta["best"]["test_acc"] = evaluate(setup.models.target, _as_device(best_vars), data.test, config,
                                                    eval_bs)["acc"]
            log_line({"kind": "epoch", **{k: v for k, v in record.items() if k != "train"},
                      **{f"train_{k}": v for k, v in train_means.items()}, "best": meta["best"]})
            lam = f" λ {train_means['lambda_mean']:.2f}" if has_meta and "lambda_mean" in train_means else ""
            log.info(
                "epoch %d/%d lr %.4g | train loss %.4f acc %.2f%s | val %s | test %s | best val %s (epoch %s)",
                epoch + 1, E, lr, train_means.get("loss", float("nan")), train_means.get("accuracy", float("nan")), lam,
                _fmt(record["val_acc"]), _fmt(record["test_acc"]), _fmt((meta["best"] or {}).get("val_acc")),
                (meta["best"] or {}).get("epoch"),
            )
            meta["epoch"] += 1
            meta["step_in_epoch"] = 0
            meta["epoch_acc"] = _new_sums()
            meta["window"] = _new_sums()
            if meta["epoch"] % config.checkpoint_every_epochs == 0 or meta["epoch"] == E or stop.set:
                save(state, meta)
            if stop.set and meta["epoch"] < E:
                raise _interrupted(stop, workdir, meta["epoch"], 0, spe)
        tb.close()  # every scalar on disk before the summary marks the run finished
        return _finish(config, plain, workdir, state, meta, wall_base + (time.time() - session_start),
                       data.num_classes, setup)
    finally:
        stop.uninstall()
        tb.close()


def _restore_newest(ckpt: Checkpointer, like_state) -> tuple[int, tuple[Any, dict]]:
    """(step, (state, meta)) of the newest checkpoint whose state and record restore (damaged ones moved aside)."""

    def read(step: int) -> tuple[Any, dict]:
        state, meta = ckpt.restore(like_state, step)
        return state, _checked_meta(meta)

    found = ckpt.newest_intact(read)
    if found is None:
        raise NoIntactCheckpointError(f"the checkpoints in {ckpt.directory} disappeared while the run was starting")
    return found


def _read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl (none if it is absent); an unreadable line is skipped with a warning."""
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not JSON; TensorBoard will lack it", path, i + 1)
    return out


# Fields of a "train" record that are not scalars of the window.
_TRAIN_NON_SCALARS = frozenset({"kind", "epoch", "step", "lr", "lambda"})


def _tb_scalars(line: dict, steps_per_epoch: int, has_meta: bool) -> list[tuple[str, float, int]]:
    """The TensorBoard scalars (tag, value, global step) of one metrics.jsonl record.

    The one mapping from the record to TensorBoard, used while training and when the
    events are rebuilt from metrics.jsonl, so both give the same scalars. An epoch
    record's step is the step count at its end (epoch x steps per epoch).
    """
    if line.get("kind") == "train":
        step = int(line["step"])
        return [(f"train/{k}", v, step) for k, v in line.items() if k not in _TRAIN_NON_SCALARS and v is not None]
    if line.get("kind") != "epoch":
        return []
    step = int(line["epoch"]) * steps_per_epoch
    out = [("epoch/lr", line["lr"], step)]
    out += [(f"epoch/{k}", v, step) for k, v in line.items() if k.startswith("train_") and k != "train_lambda"]
    for split in ("val", "test"):
        for what in ("acc", "loss"):
            if line.get(f"{split}_{what}") is not None:
                out.append((f"epoch/{split}_{what}", line[f"{split}_{what}"], step))
    if has_meta and line.get("train_lambda"):
        out += [(f"lambda/pair{i}", v, step) for i, v in enumerate(line["train_lambda"])]
    return out


def _open_tensorboard(tb_dir: Path, lines: list[dict], steps_per_epoch: int, has_meta: bool):
    """A TensorBoard writer on a fresh events file that already holds the scalars of `lines`.

    metrics.jsonl is the record and TensorBoard a view of it: the old event files
    (which lack whatever was buffered when a run was killed, and hold steps beyond the
    checkpoint resumed from) are replaced by one rebuilt from the record, so every
    logged step is there exactly once.
    """
    from tensorboardX import SummaryWriter

    tb_dir.mkdir(parents=True, exist_ok=True)
    for old in tb_dir.glob("events.out.tfevents.*"):
        old.unlink()
    tb = SummaryWriter(str(tb_dir))
    for line in lines:
        for tag, value, step in _tb_scalars(line, steps_per_epoch, has_meta):
            tb.add_scalar(tag, value, step)
    tb.flush()
    return tb


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _interrupted(stop: _StopFlag, workdir: Path, epoch: int, step: int, spe: int) -> TrainingInterrupted:
    where = f"epoch {epoch + 1}, after step {step}/{spe}" if step else f"the start of epoch {epoch + 1}"
    stopped = f"training interrupted ({stop.reason}) at {where}; a checkpoint was saved in {workdir / 'checkpoints'}."
    msg = f"{stopped} Rerun the same command (same config, --workdir={workdir}) to resume from there."
    return TrainingInterrupted(msg, stop.signum, epoch, step, stopped=stopped)


def _finish(config, plain, workdir: Path, state, meta, wall_time: float, num_classes: int, setup: Setup) -> dict:
    variables = jax.device_get(bilevel.target_variables(state))
    weights_lib.save_variables(workdir / "final_weights.msgpack", variables)
    # θ's matching branch (and LwF head) and φ (for figures: λ per pair and per sample, learned w).
    transfer_state = jax.device_get(
        {**{k: v for k, v in state.params.items() if k != "model"}, "meta_params": state.meta_params}
    )
    weights_lib.save_variables(workdir / "final_transfer.msgpack", transfer_state)
    hist = meta["history"]
    last = hist[-1] if hist else {}
    best = meta["best"] or {}
    summary = {
        "method": config.method,
        "seed": config.seed,
        "dataset": config.dataset,
        "source_model": config.source_model if setup.models.source is not None else None,
        "target_model": config.target_model,
        "num_classes": num_classes,
        "pairs": format_pairs(setup.bilevel_config.matching.pairs),
        "epochs": config.epochs,
        "steps": meta["global_step"],
        "best_val_acc": best.get("val_acc"),
        "best_epoch": best.get("epoch"),
        "test_acc_at_best_val": best.get("test_acc"),
        "last_val_acc": last.get("val_acc"),
        "last_test_acc": last.get("test_acc"),
        "wall_time_s": wall_time,
        "final_weights": str(workdir / "final_weights.msgpack"),
        "best_weights": str(workdir / "best_weights.msgpack"),
        "final_transfer": str(workdir / "final_transfer.msgpack"),
        "at_pairs": format_pairs(setup.bilevel_config.at_pairs) if setup.bilevel_config.at_pairs else None,
        "history": [{k: v for k, v in r.items() if k != "train"} for r in hist],
        "config": plain,
    }
    _write_json(workdir / "summary.json", summary)
    _log_summary("done", summary)
    return summary
