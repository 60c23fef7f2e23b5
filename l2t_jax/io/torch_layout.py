"""PyTorch state dicts <-> this library's variables: names, layouts, conversions.

The reference's architectures (torchvision ResNets, the reference's `CResNet` and
`VGG_small`) name their tensors differently and store them in other layouts than
`l2t_jax.models`. `torch_entries` lists, for one registered model, every tensor of
its PyTorch state dict with its place in our variables and its layout;
`variables_from_torch` / `variables_to_torch` convert whole state dicts with it,
and `load_pretrained` reads a torch file (plain, or wrapped as the reference
saves it: `{'state_dict': ..., 'num_classes': ...}`) into variables.

Variables are `{"params": ..., "batch_stats": ...}` trees of numpy arrays, in the
layout of `l2t_jax.models` (conv kernels HWIO, Linear kernels (in, out)); PyTorch's
are OIHW and (out, in). Torch files are read by `l2t_jax.io.torch_pickle`, which
runs no code from them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from l2t_jax.io.torch_pickle import (
    CheckpointReadError,
    WeightImportError,
    read_torch_file,
)
from l2t_jax.io.torch_pickle import torch_to_numpy as _torch_to_numpy

__all__ = [
    "BUFFER_NAMES",
    "TORCH_SUFFIXES",
    "TorchEntry",
    "check_variables",
    "get_path",
    "is_buffer_key",
    "load_pretrained",
    "set_path",
    "to_flax_layout",
    "to_torch_layout",
    "torch_entries",
    "torch_shape",
    "unwrap_state_dict",
    "variables_from_torch",
    "variables_to_torch",
]

#: Suffixes of PyTorch weight files (`torch.save` output).
TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar")
#: Last name component of the BatchNorm buffers in a state dict (not parameters).
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer_key(key: str) -> bool:
    """Whether a state-dict key names a BatchNorm buffer rather than a parameter."""
    return key.rsplit(".", 1)[-1] in BUFFER_NAMES


# --------------------------------------------------------------------------------------
# Name mapping
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TorchEntry:
    """One tensor of a PyTorch state dict and where it lives in our variables.

    Attributes:
      torch_key: the PyTorch state-dict key.
      collection: "params" or "batch_stats".
      path: the path inside that collection.
      layout: "conv" (OIHW <-> HWIO), "linear" ((out, in) <-> (in, out)),
        "same" (no change) or "counter" (int64 scalar <-> int32 scalar; optional on
        import, 0 when absent, as PyTorch does for pre-0.4 checkpoints).
    """

    torch_key: str
    collection: str
    path: tuple[str, ...]
    layout: str

    @property
    def is_parameter(self) -> bool:
        return self.collection == "params"


def _conv(key: str, path: tuple[str, ...], bias: bool = False) -> list[TorchEntry]:
    out = [TorchEntry(f"{key}.weight", "params", path + ("kernel",), "conv")]
    if bias:
        out.append(TorchEntry(f"{key}.bias", "params", path + ("bias",), "same"))
    return out


def _bn(key: str, path: tuple[str, ...]) -> list[TorchEntry]:
    return [
        TorchEntry(f"{key}.weight", "params", path + ("scale",), "same"),
        TorchEntry(f"{key}.bias", "params", path + ("bias",), "same"),
        TorchEntry(f"{key}.running_mean", "batch_stats", path + ("mean",), "same"),
        TorchEntry(f"{key}.running_var", "batch_stats", path + ("var",), "same"),
        TorchEntry(f"{key}.num_batches_tracked", "batch_stats", path + ("num_batches_tracked",), "counter"),
    ]


def _linear(key: str, path: tuple[str, ...]) -> list[TorchEntry]:
    return [
        TorchEntry(f"{key}.weight", "params", path + ("kernel",), "linear"),
        TorchEntry(f"{key}.bias", "params", path + ("bias",), "same"),
    ]


def _cifar_resnet_entries(depth: int) -> list[TorchEntry]:
    k = (depth - 2) // 6
    entries = _conv("conv1", ("conv1",), bias=True) + _bn("bn1", ("bn1",))
    names = []
    for first, rest in (("block1", "blocks2"), ("block3", "blocks4"), ("block5", "blocks6")):
        names.append((first, first != "block1"))
        names.extend((f"{rest}.{i}", False) for i in range(k - 1))
    for g, (tk, down) in enumerate(names):
        p = (f"block{g}",)
        entries += _conv(f"{tk}.conv1", p + ("conv1",)) + _bn(f"{tk}.bn1", p + ("bn1",))
        entries += _conv(f"{tk}.conv2", p + ("conv2",)) + _bn(f"{tk}.bn2", p + ("bn2",))
        if down:
            entries += _conv(f"{tk}.downsample.0", p + ("down_conv",)) + _bn(f"{tk}.downsample.1", p + ("down_bn",))
    return entries + _linear("fc", ("fc",))


def _vgg_entries(cfg: Sequence[Any]) -> list[TorchEntry]:
    entries: list[TorchEntry] = []
    idx = conv = 0
    for v in cfg:
        if v == "M":
            idx += 1
        else:
            entries += _conv(f"features.{idx}", (f"conv{conv}",), bias=True)
            entries += _bn(f"features.{idx + 1}", (f"bn{conv}",))
            idx += 3  # conv, BN, ReLU
            conv += 1
    return entries + _linear("classifier", ("fc",))


def _imagenet_resnet_entries(layers: Sequence[int], bottleneck: bool) -> list[TorchEntry]:
    entries = _conv("conv1", ("conv1",)) + _bn("bn1", ("bn1",))
    expansion = 4 if bottleneck else 1
    inplanes = 64
    for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for j in range(blocks):
            tk, p = f"layer{s}.{j}", (f"layer{s}_{j}",)
            stride = 2 if (s > 1 and j == 0) else 1
            convs = 3 if bottleneck else 2
            for c in range(1, convs + 1):
                entries += _conv(f"{tk}.conv{c}", p + (f"conv{c}",)) + _bn(f"{tk}.bn{c}", p + (f"bn{c}",))
            if stride != 1 or inplanes != planes * expansion:
                entries += _conv(f"{tk}.downsample.0", p + ("down_conv",)) + _bn(f"{tk}.downsample.1", p + ("down_bn",))
            inplanes = planes * expansion
    return entries + _linear("fc", ("fc",))


@functools.cache
def _expected_shapes(model_name: str, num_classes: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{(collection, *path): (shape, dtype)} of the Flax model's variables (traced, not computed)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from l2t_jax.models import get_model, model_info

    info = model_info(model_name)
    model = get_model(model_name, num_classes)
    x = jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    flat = traverse_util.flatten_dict(dict(shapes))
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


@functools.cache
def _entries_cached(model_name: str) -> tuple[TorchEntry, ...]:
    from l2t_jax.models import get_model, model_info

    info = model_info(model_name)
    model = get_model(model_name, 1)
    if info.family == "cifar_resnet":
        entries = _cifar_resnet_entries(model.depth)
    elif info.family == "vgg":
        entries = _vgg_entries(model.cfg)
    elif info.family == "imagenet_resnet":
        entries = _imagenet_resnet_entries(model.layers, model.bottleneck)
    else:
        raise ValueError(f"no PyTorch name mapping for model family {info.family!r} ({model_name})")
    # The mapping must cover the Flax variables exactly once (guards the tables above).
    ours = {(e.collection,) + e.path for e in entries}
    theirs = set(_expected_shapes(model_name, 1))
    if ours != theirs or len(ours) != len(entries):
        raise AssertionError(
            f"internal error: PyTorch mapping of {model_name} does not match its Flax variables: "
            f"unmapped {sorted(theirs - ours)[:5]}, spurious {sorted(ours - theirs)[:5]}"
        )
    return tuple(entries)


def torch_entries(model_name: str) -> list[TorchEntry]:
    """The PyTorch state-dict layout of `model_name`, in PyTorch registration order.

    Args:
      model_name: a registered model (see `l2t_jax.models.available_models`).

    Returns:
      One `TorchEntry` per tensor of the PyTorch state dict that our model uses.
    """
    return list(_entries_cached(model_name))


def _fc_key(model_name: str) -> str:
    return next(e.torch_key for e in _entries_cached(model_name) if e.path == ("fc", "kernel"))


def to_flax_layout(value: np.ndarray, layout: str) -> np.ndarray:
    """A PyTorch tensor (numpy) in our layout: see `TorchEntry.layout` (a new array)."""
    value = np.asarray(value)
    if layout == "conv":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if value.ndim == 4 else value
    if layout == "linear":
        return np.ascontiguousarray(value.T) if value.ndim == 2 else value
    if layout == "counter":
        return np.array(value, dtype=np.int32)
    return np.array(value)


def to_torch_layout(value: Any, layout: str) -> np.ndarray:
    """One of our leaves in PyTorch's layout: the inverse of `to_flax_layout` (a new array)."""
    value = np.asarray(value)
    if layout == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if layout == "linear":
        return np.ascontiguousarray(value.T)
    if layout == "counter":
        return np.array(value, dtype=np.int64)
    return np.array(value)


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The PyTorch shape of a leaf of our `shape` stored with `layout`."""
    if layout == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "linear" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: Sequence[str]) -> Any:
    """tree[path[0]][path[1]]... (KeyError / TypeError when absent)."""
    for p in path:
        tree = tree[p]
    return tree


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):  # nn.DataParallel
        return collections.OrderedDict((k[len("module.") :], v) for k, v in state_dict.items())
    return state_dict


def _infer_num_classes(model_name: str, state_dict: Mapping[str, Any], num_classes: int | None) -> int:
    fc = _fc_key(model_name)
    if fc not in state_dict:
        if num_classes is not None:
            return num_classes
        raise WeightImportError(f"{model_name}: state dict has no classifier weight {fc!r}; cannot infer num_classes")
    found = int(np.shape(state_dict[fc])[0])
    if num_classes is not None and num_classes != found:
        raise WeightImportError(
            f"{model_name}: num_classes={num_classes} was requested but the checkpoint's classifier "
            f"{fc!r} has {found} outputs (shape {tuple(np.shape(state_dict[fc]))})"
        )
    return found


def variables_from_torch(model_name: str, state_dict: Mapping[str, Any], num_classes: int | None = None) -> dict:
    """Converts a PyTorch state dict of the reference architecture to our variables.

    Keys the model does not use (e.g. the reference VGG's `alphas`, `new_bn`,
    `w1`) are ignored; a `module.` prefix on every key is stripped. BN
    `num_batches_tracked` may be absent (old torchvision files) and is then 0.

    Args:
      model_name: a registered model name ("resnet32", "vgg9_bn", "resnet18", ...).
      state_dict: key -> array (numpy or torch tensors).
      num_classes: expected classifier size; inferred from the classifier when None.

    Returns:
      {"params": ..., "batch_stats": ...} of numpy arrays (dtypes as stored,
      counters int32).

    Raises:
      WeightImportError: naming every missing key and every shape mismatch, or a
        num_classes that disagrees with the classifier.
    """
    state_dict = _strip_module_prefix(_as_numpy_dict(state_dict))
    num_classes = _infer_num_classes(model_name, state_dict, num_classes)
    expected = _expected_shapes(model_name, num_classes)
    variables: dict = {"params": {}, "batch_stats": {}}
    missing, mismatched = [], []
    for e in _entries_cached(model_name):
        shape, _ = expected[(e.collection,) + e.path]
        if e.torch_key not in state_dict:
            if e.layout == "counter":
                set_path(variables[e.collection], e.path, np.zeros((), np.int32))
                continue
            missing.append(f"{e.torch_key} (expected shape {torch_shape(shape, e.layout)})")
            continue
        value = np.asarray(state_dict[e.torch_key])
        want = torch_shape(shape, e.layout)
        if tuple(value.shape) != want:
            mismatched.append(f"{e.torch_key}: checkpoint has shape {tuple(value.shape)}, {model_name} needs {want}")
            continue
        set_path(variables[e.collection], e.path, to_flax_layout(value, e.layout))
    # Keys the model does not use are ignored, except inside the modules it does use:
    # there they mean another depth or configuration (e.g. resnet32 weights for resnet20).
    entries = _entries_cached(model_name)
    mapped = {e.torch_key for e in entries}
    own = {e.torch_key.split(".")[0] for e in entries}
    unexpected = [k for k in state_dict if k not in mapped and k.split(".")[0] in own]
    if missing or mismatched or unexpected:
        lines = [f"cannot import a PyTorch state dict into {model_name} (num_classes={num_classes}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        if unexpected:
            shown = ", ".join(unexpected[:12]) + (f", ... ({len(unexpected)} in all)" if len(unexpected) > 12 else "")
            lines.append(
                f"  unexpected keys inside {model_name}'s own modules (weights of another depth or configuration?): {shown}"
            )
        raise WeightImportError("\n".join(lines))
    return variables


def _as_numpy_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    if any(type(v).__module__.startswith("torch") for v in state_dict.values()):
        return _torch_to_numpy(collections.OrderedDict(state_dict))
    return state_dict


def variables_to_torch(model_name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Exports our variables as a PyTorch state dict (numpy arrays, PyTorch names and layouts).

    Args:
      model_name: a registered model name.
      variables: {"params", "batch_stats"} of that model (numpy or jax arrays).

    Returns:
      An ordered dict key -> numpy array in PyTorch registration order, with
      `num_batches_tracked` as int64 scalars; `torch.from_numpy` of each value
      loads into the reference architecture with `strict=True`.
    """
    out: dict[str, np.ndarray] = collections.OrderedDict()
    missing = []
    for e in _entries_cached(model_name):
        try:
            value = get_path(variables[e.collection], e.path)
        except (KeyError, TypeError):
            missing.append("/".join((e.collection,) + e.path))
            continue
        out[e.torch_key] = to_torch_layout(value, e.layout)
    if missing:
        raise WeightImportError(f"variables of {model_name} lack: {', '.join(missing)}")
    return out


def unwrap_state_dict(obj: Any) -> tuple[Mapping[str, Any], int | None]:
    """Finds the model state dict inside a loaded checkpoint.

    Accepts a plain state dict (torchvision files), the reference's
    `{'state_dict': ..., 'num_classes': ...}` and a reference run checkpoint
    (`{'target_model': ...}`).

    Args:
      obj: what `read_torch_file` returned.

    Returns:
      (state_dict, num_classes recorded in the file or None).
    """
    if not isinstance(obj, Mapping):
        raise WeightImportError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        n = obj.get("num_classes")
        return obj["state_dict"], (int(n) if isinstance(n, (int, np.integer)) else None)
    if "target_model" in obj and isinstance(obj["target_model"], Mapping):
        return obj["target_model"], None
    if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, np.ndarray) for v in obj.values()):
        return obj, None
    raise WeightImportError(
        f"checkpoint is neither a state dict nor a dict with 'state_dict'/'target_model'; top-level keys: {list(obj)[:10]}"
    )


def load_pretrained(path: str | os.PathLike, model_name: str, num_classes: int | None = None) -> dict:
    """Loads a PyTorch checkpoint (torchvision file or the reference's) into our variables.

    Args:
      path: `.pth`/`.pth.tar`/`.pt`/`.tar` file.
      model_name: registered model name.
      num_classes: expected classes (checked against the file), inferred when None.

    Returns:
      {"params", "batch_stats"}.

    Raises:
      CheckpointReadError: the file is not a readable PyTorch checkpoint or is
        refused as unsafe (`read_torch_file`; nothing from it has run).
      WeightImportError: the checkpoint does not fit `model_name` / `num_classes`.
    """
    try:
        state_dict, recorded = unwrap_state_dict(read_torch_file(path))
    except CheckpointReadError:
        raise
    except WeightImportError as e:
        raise WeightImportError(f"{path}: {e}") from None
    if recorded is not None and num_classes is not None and recorded != num_classes:
        raise WeightImportError(f"{path}: checkpoint records num_classes={recorded}, but num_classes={num_classes} was requested")
    try:
        return variables_from_torch(model_name, state_dict, num_classes if num_classes is not None else recorded)
    except WeightImportError as e:
        raise WeightImportError(f"{path}: {e}") from None


def check_variables(model_name: str, variables: Mapping[str, Any], num_classes: int | None = None) -> int:
    """Checks that `variables` fit `model_name` (every leaf present with its shape).

    Args:
      model_name: registered model name.
      variables: {"params", "batch_stats"}.
      num_classes: expected classifier size; inferred from "fc" when None.

    Returns:
      The number of classes.

    Raises:
      WeightImportError: naming every missing leaf, shape mismatch or a num_classes mismatch.
    """
    try:
        found = int(np.shape(variables["params"]["fc"]["kernel"])[1])
    except (KeyError, TypeError, IndexError):
        raise WeightImportError(f"variables have no params/fc/kernel; not a {model_name}") from None
    if num_classes is not None and num_classes != found:
        raise WeightImportError(f"num_classes={num_classes} was requested but the weights' classifier has {found} outputs")
    problems = []
    for key, (shape, _) in _expected_shapes(model_name, found).items():
        try:
            value = get_path(variables, key)
        except (KeyError, TypeError):
            problems.append(f"missing {'/'.join(key)}")
            continue
        if tuple(np.shape(value)) != shape:
            problems.append(f"{'/'.join(key)}: shape {tuple(np.shape(value))}, expected {shape}")
    if problems:
        raise WeightImportError(f"variables do not fit {model_name}: " + "; ".join(problems))
    return found

