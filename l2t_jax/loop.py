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
  metrics.jsonl        one JSON object per log window ("train") and per epoch ("epoch")
  tb/                  TensorBoard events
  best_weights.msgpack target {"params","batch_stats"} at the best validation epoch
  final_weights.msgpack  ... after the last epoch
  final_transfer.msgpack θ's transfer parts ("branch": matching 1x1 convs, "lwf_head" for LwF)
                       and "meta_params" (φ), after the last epoch
  summary.json         best validation accuracy, test accuracy there, last test accuracy, ...

SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary
and raises `TrainingInterrupted`. Running the same config on the same workdir
resumes from the newest checkpoint (mid-epoch included) and gives the same
numbers as an uninterrupted run.
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
from l2t_jax.checkpoint import Checkpointer
from l2t_jax.models import get_model, init_model, model_info
from l2t_jax.schedule import cosine_epoch_lr
from l2t_jax.transfer import MatchingConfig, format_pairs

log = logging.getLogger(__name__)

PyTree = Any
# Scalar training metrics summed per epoch (batch-size weighted); "lambda" is a vector.
_SCALARS = ("loss", "ce", "wfm", "at", "lwf", "accuracy", "outer_loss", "matching_loss_at_start", "meta_grad_norm")


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal (or the `stop_after_steps` hook) after saving a checkpoint.

    Attributes:
      signum: the signal number (None for the hook).
      epoch, step_in_epoch: where it stopped (0-based epoch, steps done in it).
    """

    def __init__(self, message: str, signum: Optional[int], epoch: int, step_in_epoch: int):
        super().__init__(message)
        self.signum, self.epoch, self.step_in_epoch = signum, epoch, step_in_epoch


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
        remat=config.remat, unroll=config.unroll, lwf_weight=resolved.lwf_weight, lwf_temperature=config.lwf_temperature,
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
        latest = ckpt.latest_step()
        meta = None
        if latest is not None:
            meta = ckpt.restore_meta(latest)
            diff = run_config.config_differences(meta["config"], plain)
            if diff:
                raise run_config.ConfigError(
                    f"{workdir} holds a run with another config (checkpoint {latest}); differing keys:\n  "
                    + "\n  ".join(diff)
                    + "\nuse another --workdir, or rerun with the saved config to resume"
                )
        _write_json(workdir / "config.json", plain)

        log.info("run: %s", run_config.describe(config))
        data = load_run_data(config)
        setup = build(config, pairs, data.num_classes)
        return _run_epochs(config, plain, workdir, ckpt, latest, meta, data, setup,
                           stop_after_steps=stop_after_steps, step_fn_wrapper=step_fn_wrapper)
    finally:
        ckpt.close()


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


def _run_epochs(config, plain, workdir: Path, ckpt: Checkpointer, latest, meta, data: RunData, setup: Setup,
                *, stop_after_steps, step_fn_wrapper) -> dict:
    E, B = config.epochs, config.batch_size
    spe = data_lib.steps_per_epoch(len(data.train), B, config.drop_last)
    if spe < 1:
        raise ValueError(f"{len(data.train)} training images give no batch of {B} (drop_last={config.drop_last})")
    metrics_path = workdir / "metrics.jsonl"
    if latest is None:
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
        if meta["steps_per_epoch"] != spe:
            raise ValueError(f"the checkpoint has {meta['steps_per_epoch']} steps per epoch, the data now give {spe}")
        state, meta = ckpt.restore(setup.initial_state, latest)
        with open(metrics_path, "a+b") as f:  # drop lines written after the checkpoint
            f.truncate(meta["metrics_bytes"])
        log.info("resuming from checkpoint %d: epoch %d, step %d of %d", latest, meta["epoch"] + 1,
                 meta["step_in_epoch"], spe)
    setup.initial_state = None  # the buffers are donated to the first step

    from tensorboardX import SummaryWriter

    # purge_step: TensorBoard drops events from a previous session at or after this step
    tb = SummaryWriter(str(workdir / "tb"), purge_step=meta["global_step"])
    if config.data_parallel:
        step_fn = _data_parallel_step(config, setup, len(data.train))
    else:
        step_fn = bilevel.make_train_step(setup.models, setup.bilevel_config)
    if step_fn_wrapper is not None:
        step_fn = step_fn_wrapper(step_fn)
    stop = _StopFlag()
    stop.install()
    session_start = time.time()
    has_meta = setup.bilevel_config.has_meta_step
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
        with open(metrics_path, "a") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")

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
                    line = {"kind": "train", "epoch": epoch + 1, "step": meta["global_step"], "lr": lr, **w}
                    log_line(line)
                    for k, v in w.items():
                        if k != "lambda":
                            tb.add_scalar(f"train/{k}", v, meta["global_step"])
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
            ev_val, ev_test = (
                evaluate(setup.models.target, variables, ds, config, eval_bs) if ds is not None else None
                for ds in (data.val, data.test)
            )
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
            # The reference keeps the first epoch with the highest validation accuracy
            # (strict improvement); without a validation split the last epoch is kept.
            best = meta["best"]
            improved = best is None or data.val is None or record["val_acc"] > best["val_acc"]
            if improved:
                meta["best"] = {"epoch": epoch + 1, "val_acc": record["val_acc"], "test_acc": record["test_acc"]}
                weights_lib.save_variables(workdir / "best_weights.msgpack", jax.device_get(variables))
            log_line({"kind": "epoch", **{k: v for k, v in record.items() if k != "train"},
                      **{f"train_{k}": v for k, v in train_means.items()}, "best": meta["best"]})
            tb.add_scalar("epoch/lr", lr, meta["global_step"])
            for k, v in train_means.items():
                if k != "lambda":
                    tb.add_scalar(f"epoch/train_{k}", v, meta["global_step"])
            for split, ev in (("val", ev_val), ("test", ev_test)):
                if ev:
                    tb.add_scalar(f"epoch/{split}_acc", ev["acc"], meta["global_step"])
                    tb.add_scalar(f"epoch/{split}_loss", ev["loss"], meta["global_step"])
            if has_meta and train_means.get("lambda"):
                for i, v in enumerate(train_means["lambda"]):
                    tb.add_scalar(f"lambda/pair{i}", v, meta["global_step"])
            lam = f" λ {train_means['lambda_mean']:.2f}" if has_meta and "lambda_mean" in train_means else ""
            log.info(
                "epoch %d/%d lr %.4g | train loss %.4f acc %.2f%s | val %s | test %s | best val %s (epoch %s)",
                epoch + 1, E, lr, train_means.get("loss", float("nan")), train_means.get("accuracy", float("nan")), lam,
                _fmt(record["val_acc"]), _fmt(record["test_acc"]), _fmt(meta["best"]["val_acc"]), meta["best"]["epoch"],
            )
            meta["epoch"] += 1
            meta["step_in_epoch"] = 0
            meta["epoch_acc"] = _new_sums()
            meta["window"] = _new_sums()
            if meta["epoch"] % config.checkpoint_every_epochs == 0 or meta["epoch"] == E or stop.set:
                save(state, meta)
            if stop.set and meta["epoch"] < E:
                raise _interrupted(stop, workdir, meta["epoch"], 0, spe)
        return _finish(config, plain, workdir, state, meta, wall_base + (time.time() - session_start),
                       data.num_classes, setup)
    finally:
        stop.uninstall()
        tb.close()


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _interrupted(stop: _StopFlag, workdir: Path, epoch: int, step: int, spe: int) -> TrainingInterrupted:
    where = f"epoch {epoch + 1}, after step {step}/{spe}" if step else f"the start of epoch {epoch + 1}"
    msg = (
        f"training interrupted ({stop.reason}) at {where}; a checkpoint was saved in {workdir / 'checkpoints'}. "
        f"Rerun the same command (same config, --workdir={workdir}) to resume from there."
    )
    return TrainingInterrupted(msg, stop.signum, epoch, step)


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
    log.info(
        "done: best val %s (epoch %s), test there %s, last test %s, %.0f s",
        _fmt(summary["best_val_acc"]), summary["best_epoch"], _fmt(summary["test_acc_at_best_val"]),
        _fmt(summary["last_test_acc"]), summary["wall_time_s"],
    )
    return summary
