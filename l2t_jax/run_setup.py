"""What a run needs before its first step: its data splits, its models, its weights and its initial state.

    data = load_run_data(spec.data)            # train / validation / test splits
    setup = build(spec, data.num_classes)      # models, source variables, the fresh TrainState

Both read the resolved `run_config.RunSpec`, never the config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax import bilevel, data as data_lib
from l2t_jax.io.weights_file import load_weights
from l2t_jax.models import get_model, init_model, model_info
from l2t_jax.models.layers import conv_impl_for
from l2t_jax.run_config import ConfigError, DataSpec, RunSpec

log = logging.getLogger(__name__)

PyTree = Any


@dataclasses.dataclass
class RunData:
    """The splits of a run. `val`/`test` may be None (no validation / no test split)."""

    train: data_lib.ImageDataset
    val: Optional[data_lib.ImageDataset]
    test: Optional[data_lib.ImageDataset]
    num_classes: int


def _select_classes(ds: data_lib.ImageDataset, classes: tuple[int, ...]) -> data_lib.ImageDataset:
    bad = [c for c in classes if c >= ds.num_classes]
    if bad:
        raise ConfigError(f"config.classes names class(es) {bad}, but the dataset has {ds.num_classes}")
    keep = np.flatnonzero(np.isin(ds.labels, classes))
    sub = ds.subset(keep)
    remap = np.full(ds.num_classes, -1, np.int64)
    remap[list(classes)] = np.arange(len(classes))
    names = tuple(ds.class_names[c] for c in classes) if ds.class_names else None
    return data_lib.ImageDataset(sub.images, remap[sub.labels], len(classes), names)


def load_run_data(spec: DataSpec) -> RunData:
    """Loads the dataset and makes the run's train / validation / test splits.

    The validation split is `val_fraction` of every class of the training set
    (seeded by the run's seed); the limited-data subset (`n_per_class`) is then drawn
    from what remains. Small-image (<= 64 px) training sets are decoded into memory.
    """
    source = spec.dataset
    if spec.source.kind == "builtin":
        from l2t_jax.digits import load_digits_dataset

        splits = load_digits_dataset(spec.image_size)
    else:
        kw: dict[str, Any] = {}
        if spec.source.kind == "tfds":
            kw["download"] = not spec.offline
            kw["num_workers"] = max(spec.num_workers, 1)
        elif spec.source.kind == "folder":
            kw["num_workers"] = max(spec.num_workers, 1)
        splits = data_lib.load_dataset(source, spec.data_dir or None, **kw)
    if "train" not in splits:
        raise ValueError(f"dataset {source!r} has no 'train' split (splits: {sorted(splits)})")
    if spec.classes is not None:
        splits = {k: _select_classes(v, spec.classes) for k, v in splits.items()}
    train = splits["train"]
    if len(train) == 0:
        raise ValueError(f"dataset {source!r}: the training split is empty")
    val = None
    if spec.val_fraction > 0:
        train, val = data_lib.train_val_split(train, spec.val_fraction, seed=spec.seed)
        if len(val) == 0:
            log.warning("val_fraction=%s leaves no validation image; selecting on the last epoch", spec.val_fraction)
            val = None
    if spec.n_per_class:
        train = data_lib.per_class_subset(train, spec.n_per_class, seed=spec.seed)
    test = splits.get("test")
    if test is None:
        log.warning("dataset %r has no test split; test accuracy will be null", source)
    if spec.image_size <= data_lib.SMALL_IMAGE_MAX:
        workers = max(spec.num_workers, 1)
        train = data_lib.to_memory(train, workers)
        val = data_lib.to_memory(val, workers) if val is not None else None
        test = data_lib.to_memory(test, workers) if test is not None else None
    return RunData(train, val, test, train.num_classes)


@dataclasses.dataclass
class Setup:
    """Everything the epochs need, built from the run spec.

    `initial_state` is set to None once the loop has handed it to the first step
    (whose buffers it donates).
    """

    models: bilevel.Models
    bilevel_config: bilevel.BilevelConfig
    source_variables: PyTree
    initial_state: Optional[bilevel.TrainState]
    source_num_classes: Optional[int]


def as_device(tree: PyTree) -> PyTree:
    """Every leaf as a device array."""
    return jax.tree.map(lambda a: jnp.asarray(a), tree)


def _float32_on_device(tree: PyTree) -> PyTree:
    return as_device(jax.tree.map(lambda a: np.asarray(a, np.float32), tree))


def build(spec: RunSpec, num_classes: int) -> Setup:
    """Models, source weights, the target's initial variables and the fresh `TrainState`.

    The target's initial variables come from the run's seed (split into an init key and
    the state's key); `target.weights`, when given, replace them (a classifier of
    another size keeps its fresh initialisation).
    """
    conv_impl = conv_impl_for(spec.target.conv_impl, spec.bilevel.hvp)  # "auto": the tap loop in mixed mode on CPU
    target = get_model(spec.target.model, num_classes, conv_impl=conv_impl)
    key_init, key_state = jax.random.split(jax.random.key(spec.seed))
    target_vars = init_model(target, key_init, spec.data.image_size)
    if spec.target.weights:
        loaded = load_weights(os.path.expanduser(spec.target.weights), spec.target.model)
        n_loaded = int(np.shape(loaded["params"]["fc"]["kernel"])[1])
        if n_loaded != num_classes:
            log.info("target_weights classify %d classes, the task %d: the classifier is re-initialised",
                     n_loaded, num_classes)
            loaded["params"]["fc"] = jax.device_get(target_vars["params"]["fc"])
        target_vars = {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}
    target_vars = _float32_on_device(target_vars)

    sources, source_vars_list, n_source = [], [], None
    for src in spec.sources:
        loaded = load_weights(os.path.expanduser(src.weights), src.model, src.num_classes or None)
        n = int(np.shape(loaded["params"]["fc"]["kernel"])[1])
        n_source = n if n_source is None else n_source
        sources.append(get_model(src.model, n, conv_impl=conv_impl))
        source_vars_list.append(_float32_on_device(loaded))
    if len(sources) > 1:
        source, source_vars = tuple(sources), tuple(source_vars_list)
    elif sources:
        source, source_vars = sources[0], source_vars_list[0]
    else:
        source, source_vars = None, {}

    models = bilevel.Models(target, source)
    state = bilevel.create_train_state(
        key_state, models, spec.bilevel, target_vars,
        source_channels=spec.source_channels,
        target_channels=model_info(spec.target.model).tap_channels,
        learning_rate=spec.schedule.lr, lambda_init=spec.lambda_init, lwf_classes=n_source or 0,
    )
    return Setup(models, spec.bilevel, source_vars, state, n_source)
