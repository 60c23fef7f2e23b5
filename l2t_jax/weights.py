"""Weight import/export between PyTorch checkpoints and this library's variables.

Three kinds of files are handled:

* PyTorch state dicts of the reference's architectures (torchvision ResNets,
  the reference's `CResNet` and `VGG_small`), plain or wrapped as the reference
  saves them (`{'state_dict': ..., 'num_classes': ...}`):
  `variables_from_torch`, `variables_to_torch`, `load_pretrained`.
* Run checkpoints of the reference's `train_l2t_ww.py` (target model, matching
  branch, SGD momentum buffers, weight and lambda networks):
  `load_reference_run`, `save_reference_run`.
* This library's own format (msgpack of the variables tree): `save_variables`,
  `load_variables`.

`load_weights` dispatches on the file suffix. Variables are `{"params": ...,
"batch_stats": ...}` trees of numpy arrays, in the layout of `l2t_jax.models`
(conv kernels HWIO, Linear kernels (in, out)).

Torch files are read by `l2t_jax.io.torch_pickle.read_torch_file` (re-exported
here), a reader of both of torch's file formats whose restricted unpickler
resolves only the globals a checkpoint needs, so no weights file can run code
when it is loaded, with or without PyTorch installed. A file that cannot be read
raises `CheckpointReadError` (a `WeightImportError`) with a one-line message
naming the file; PyTorch itself is needed only to write torch files.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from l2t_jax import transfer
from l2t_jax.io.torch_pickle import CheckpointReadError, UnsafeCheckpointError, WeightImportError, read_torch_file
from l2t_jax.io.torch_pickle import map_containers
from l2t_jax.io.torch_pickle import torch_to_numpy as _torch_to_numpy

__all__ = [
    "WeightImportError",
    "CheckpointReadError",
    "UnsafeCheckpointError",
    "TorchEntry",
    "TorchLayout",
    "ReferenceRun",
    "read_torch_file",
    "torch_entries",
    "variables_from_torch",
    "variables_to_torch",
    "unwrap_state_dict",
    "load_pretrained",
    "check_variables",
    "save_variables",
    "load_variables",
    "load_weights",
    "load_reference_run",
    "save_reference_run",
]

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar")
MSGPACK_SUFFIXES = (".msgpack",)
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


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


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
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
    return [e for e in _entries_cached(model_name) if e.path == ("fc", "kernel")][0].torch_key


def _to_flax(value: np.ndarray, layout: str) -> np.ndarray:
    value = np.asarray(value)
    if layout == "conv":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if value.ndim == 4 else value
    if layout == "linear":
        return np.ascontiguousarray(value.T) if value.ndim == 2 else value
    if layout == "counter":
        return np.array(value, dtype=np.int32)
    return np.array(value)


def _to_torch_layout(value: Any, layout: str) -> np.ndarray:
    value = np.asarray(value)
    if layout == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if layout == "linear":
        return np.ascontiguousarray(value.T)
    if layout == "counter":
        return np.array(value, dtype=np.int64)
    return np.array(value)


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "linear" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: Sequence[str]) -> Any:
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
                _set_path(variables[e.collection], e.path, np.zeros((), np.int32))
                continue
            missing.append(f"{e.torch_key} (expected shape {_torch_shape(shape, e.layout)})")
            continue
        value = np.asarray(state_dict[e.torch_key])
        want = _torch_shape(shape, e.layout)
        if tuple(value.shape) != want:
            mismatched.append(f"{e.torch_key}: checkpoint has shape {tuple(value.shape)}, {model_name} needs {want}")
            continue
        _set_path(variables[e.collection], e.path, _to_flax(value, e.layout))
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
            value = _get_path(variables[e.collection], e.path)
        except (KeyError, TypeError):
            missing.append("/".join((e.collection,) + e.path))
            continue
        out[e.torch_key] = _to_torch_layout(value, e.layout)
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
            value = _get_path(variables, key)
        except (KeyError, TypeError):
            problems.append(f"missing {'/'.join(key)}")
            continue
        if tuple(np.shape(value)) != shape:
            problems.append(f"{'/'.join(key)}: shape {tuple(np.shape(value))}, expected {shape}")
    if problems:
        raise WeightImportError(f"variables do not fit {model_name}: " + "; ".join(problems))
    return found


# --------------------------------------------------------------------------------------
# Our own format
# --------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Writes variables as msgpack (`flax.serialization.msgpack_serialize`), atomically.

    Args:
      path: destination file (conventionally `.msgpack`); parent folders are created.
      variables: any tree of arrays, typically {"params", "batch_stats"}.
    """
    import jax
    from flax import serialization

    tree = jax.tree_util.tree_map(np.asarray, _plain(variables))
    _atomic_write(Path(path), serialization.msgpack_serialize(tree))


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


# --------------------------------------------------------------------------------------
# Reference run checkpoints
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TorchLayout:
    """What of a reference run checkpoint our trees do not hold, kept to re-save it exactly.

    Attributes:
      key_order: the target state dict's keys, in file order.
      unused: target state-dict entries our model does not use (PyTorch layout).
      aliases: key -> the earlier key whose tensor it shares (e.g. `w.0.weight` -> `w1.weight`).
      unused_momentum: momentum buffers of unused parameters, by key.
      group_extra: the SGD param group's other fields (dampening, maximize, ...).
      extra_top: top-level checkpoint entries other than the five known ones.
    """

    key_order: list[str]
    unused: dict[str, np.ndarray]
    aliases: dict[str, str]
    unused_momentum: dict[str, np.ndarray]
    group_extra: dict[str, Any]
    extra_top: dict[str, Any]


@dataclasses.dataclass
class ReferenceRun:
    """A reference run checkpoint in this library's layout.

    Attributes:
      model_name: target model name.
      num_classes: target classes.
      pairs: [(source tap, target tap)].
      variables: {"params", "batch_stats"} of the target.
      branch: per pair {"kernel": (C_t, C_s), "bias": (C_s,)} (the 1x1 matching convs).
      momentum: {"model": like variables["params"], "branch": like branch}; zeros
        where the checkpoint has no buffer.
      has_momentum_buffers: whether the optimizer state held any buffer (False
        before the first step: then PyTorch's first step sets buf = g, which the
        zero buffers reproduce).
      meta_params: {"w": [{"kernel": (C_s, C_s), "bias": (C_s,)}],
        "lw": [{"kernel": (C_s, 1), "bias": (1,)}] or {"weights": (P,)} (λ type
        "const") or None (no λ networks)}.
      hyper: {"lr", "momentum", "weight_decay", "nesterov"} of the SGD param group.
      torch_layout: what `save_reference_run` needs to rewrite the file exactly
        (None for runs not read from a file).
    """

    model_name: str
    num_classes: int
    pairs: list[tuple[int, int]]
    variables: dict
    branch: list[dict]
    momentum: dict
    has_momentum_buffers: bool
    meta_params: dict
    hyper: dict
    torch_layout: TorchLayout | None = None


def _is_buffer_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _BUFFER_NAMES


def _view_identity(a: np.ndarray) -> tuple | None:
    if not isinstance(a, np.ndarray) or a.nbytes == 0:
        return None
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


def _parameter_keys(state_dict: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Keys of a state dict that are parameters, deduplicated as `Module.parameters()` does.

    Returns:
      (parameter keys in registration order, {alias key: canonical key}).
    """
    seen: dict[tuple, str] = {}
    keys, aliases = [], {}
    for key, value in state_dict.items():
        ident = _view_identity(np.asarray(value)) if isinstance(value, np.ndarray) else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        if not _is_buffer_key(key):
            keys.append(key)
    return keys, aliases


def _require(mapping: Mapping, key: str, what: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        have = list(mapping)[:10] if isinstance(mapping, Mapping) else type(mapping).__name__
        raise WeightImportError(f"{what}: missing {key!r} (has {have})")
    return mapping[key]


def load_reference_run(
    path: str | os.PathLike,
    *,
    target_model: str,
    num_classes: int,
    pairs: str | Sequence[Sequence[int]],
    source_tap_channels: Sequence[int],
    target_tap_channels: Sequence[int],
) -> ReferenceRun:
    """Reads a run checkpoint of the reference's `train_l2t_ww.py`.

    The momentum buffers of `target_optimizer` are indexed by the position of
    each parameter in `list(target_model.parameters()) +
    list(target_branch.parameters())`; that order is the state dicts' key order
    with buffers skipped and shared tensors (the reference VGG's `w.i` aliases of
    `w1..w3`) counted once. The count is checked against the optimizer's
    parameter list.

    Args:
      path: the checkpoint (`torch.save` of the reference's `state` dict).
      target_model: registered name of the target model.
      num_classes: target classes (checked against the classifier).
      pairs: "m-n,..." or [(m, n)], in the reference's order.
      source_tap_channels: channels of each source tap (C_s = source_tap_channels[m]).
      target_tap_channels: channels of each target tap (C_t = target_tap_channels[n]).

    Returns:
      A `ReferenceRun`.

    Raises:
      WeightImportError: naming every missing entry or shape mismatch, or when
        the parameter count disagrees with the optimizer's.
    """
    path = Path(path)
    ck = read_torch_file(path)
    if not isinstance(ck, Mapping):
        raise WeightImportError(f"{path}: expected the reference's run state dict, got {type(ck).__name__}")
    pairs = list(transfer.parse_pairs(pairs))
    what = f"{path}"
    target_sd = _require(ck, "target_model", what)
    branch_sd = _require(ck, "target_branch", what)
    opt = _require(ck, "target_optimizer", what)
    w_sd = _require(ck, "w", what)
    lw_sd = ck.get("lw")

    try:
        variables = variables_from_torch(target_model, target_sd, num_classes)
    except WeightImportError as e:
        raise WeightImportError(f"{path}: target_model: {e}") from None

    problems: list[str] = []

    def fetch(sd: Mapping, key: str, shape: tuple[int, ...], where: str) -> np.ndarray | None:
        if key not in sd:
            problems.append(f"{where}: missing {key!r} (expected shape {shape})")
            return None
        value = np.asarray(sd[key])
        if tuple(value.shape) != shape:
            problems.append(f"{where}: {key!r} has shape {tuple(value.shape)}, expected {shape}")
            return None
        return value

    def cs(m: int) -> int:
        if not 0 <= m < len(source_tap_channels):
            raise WeightImportError(f"pair source index {m} outside the source's {len(source_tap_channels)} taps")
        return int(source_tap_channels[m])

    def ct(n: int) -> int:
        if not 0 <= n < len(target_tap_channels):
            raise WeightImportError(f"pair target index {n} outside the target's {len(target_tap_channels)} taps")
        return int(target_tap_channels[n])

    branch = []
    for i, (m, n) in enumerate(pairs):
        wgt = fetch(branch_sd, f"{i}.weight", (cs(m), ct(n), 1, 1), "target_branch")
        b = fetch(branch_sd, f"{i}.bias", (cs(m),), "target_branch")
        branch.append({"kernel": None if wgt is None else np.ascontiguousarray(wgt[:, :, 0, 0].T), "bias": None if b is None else np.array(b)})

    w_list = []
    for i, (m, _) in enumerate(pairs):
        wgt = fetch(w_sd, f"{i}.weight", (cs(m), cs(m)), "w")
        b = fetch(w_sd, f"{i}.bias", (cs(m),), "w")
        w_list.append({"kernel": None if wgt is None else np.ascontiguousarray(wgt.T), "bias": None if b is None else np.array(b)})
    lw: Any
    if lw_sd is None:
        lw = None
    elif "weights" in lw_sd:
        value = fetch(lw_sd, "weights", (len(pairs),), "lw")
        lw = {"weights": None if value is None else np.array(value)}
    else:
        lw = []
        for i, (m, _) in enumerate(pairs):
            wgt = fetch(lw_sd, f"{i}.weight", (1, cs(m)), "lw")
            b = fetch(lw_sd, f"{i}.bias", (1,), "lw")
            lw.append({"kernel": None if wgt is None else np.ascontiguousarray(wgt.T), "bias": None if b is None else np.array(b)})

    if problems:
        raise WeightImportError(f"{path}: cannot read the reference run:\n  " + "\n  ".join(problems))

    # ---- optimizer ----
    groups = _require(opt, "param_groups", f"{path}: target_optimizer")
    state = _require(opt, "state", f"{path}: target_optimizer")
    if not groups:
        raise WeightImportError(f"{path}: target_optimizer has no param groups")
    hyper_keys = ("lr", "momentum", "weight_decay", "nesterov")
    g0 = groups[0]
    for g in groups[1:]:
        if any(g.get(k) != g0.get(k) for k in hyper_keys + ("dampening",)):
            raise WeightImportError(f"{path}: param groups with different SGD settings are not supported")
    if g0.get("dampening", 0) not in (0, 0.0) or g0.get("maximize", False):
        raise WeightImportError(f"{path}: SGD with dampening or maximize is not supported ({ {k: g0.get(k) for k in ('dampening', 'maximize')} })")
    hyper = {k: (bool(g0[k]) if k == "nesterov" else float(g0[k])) for k in hyper_keys if k in g0}
    if len(hyper) != len(hyper_keys):
        raise WeightImportError(f"{path}: SGD param group lacks {[k for k in hyper_keys if k not in g0]}")
    ids = [pid for g in groups for pid in g["params"]]

    model_keys, aliases = _parameter_keys(target_sd)
    branch_keys, branch_aliases = _parameter_keys(branch_sd)
    if branch_aliases:
        raise WeightImportError(f"{path}: target_branch has shared tensors {branch_aliases}")
    if len(model_keys) + len(branch_keys) != len(ids):
        raise WeightImportError(
            f"{path}: the optimizer tracks {len(ids)} parameters but the state dicts hold "
            f"{len(model_keys)} (target_model, after merging {len(aliases)} shared tensors) + "
            f"{len(branch_keys)} (target_branch) = {len(model_keys) + len(branch_keys)}; cannot map momentum buffers"
        )
    buffers: dict[tuple[str, str], np.ndarray] = {}
    for pos, key in enumerate([("model", k) for k in model_keys] + [("branch", k) for k in branch_keys]):
        entry = state.get(ids[pos])
        if isinstance(entry, Mapping) and entry.get("momentum_buffer") is not None:
            buffers[key] = np.asarray(entry["momentum_buffer"])
    has_buffers = any(isinstance(v, Mapping) and v.get("momentum_buffer") is not None for v in state.values())

    mom_model: dict = {}
    used = set()
    for e in _entries_cached(target_model):
        if not e.is_parameter:
            continue
        used.add(e.torch_key)
        param = _get_path(variables["params"], e.path)
        buf = buffers.get(("model", e.torch_key))
        if buf is None:
            _set_path(mom_model, e.path, np.zeros_like(param))
            continue
        if tuple(buf.shape) != tuple(np.shape(target_sd[e.torch_key])):
            problems.append(f"momentum of {e.torch_key}: shape {tuple(buf.shape)}, parameter {tuple(np.shape(target_sd[e.torch_key]))}")
            continue
        _set_path(mom_model, e.path, _to_flax(buf, e.layout))
    mom_branch = []
    for i, b in enumerate(branch):
        out = {}
        for name, tk in (("kernel", f"{i}.weight"), ("bias", f"{i}.bias")):
            buf = buffers.get(("branch", tk))
            if b[name] is None:
                out[name] = None
            elif buf is None:
                out[name] = np.zeros_like(b[name])
            elif name == "kernel" and buf.shape == (b[name].shape[1], b[name].shape[0], 1, 1):
                out[name] = np.ascontiguousarray(buf[:, :, 0, 0].T)
            elif name == "bias" and buf.shape == b[name].shape:
                out[name] = np.array(buf)
            else:
                problems.append(f"momentum of target_branch {tk}: shape {tuple(buf.shape)}")
        mom_branch.append(out)
    if problems:
        raise WeightImportError(f"{path}: cannot read the reference run:\n  " + "\n  ".join(problems))

    sd_keys = list(target_sd)
    mapped = {e.torch_key for e in _entries_cached(target_model)}
    layout = TorchLayout(
        key_order=sd_keys,
        unused={k: np.array(v) for k, v in target_sd.items() if k not in mapped and k not in aliases},
        aliases=dict(aliases),
        unused_momentum={k: np.array(buffers[("model", k)]) for k in model_keys if k not in used and ("model", k) in buffers},
        group_extra={k: v for k, v in g0.items() if k not in hyper_keys and k != "params"},
        extra_top={k: v for k, v in ck.items() if k not in ("target_model", "target_branch", "target_optimizer", "w", "lw")},
    )
    return ReferenceRun(
        model_name=target_model,
        num_classes=int(np.shape(variables["params"]["fc"]["kernel"])[1]),
        pairs=pairs,
        variables=variables,
        branch=branch,
        momentum={"model": mom_model, "branch": mom_branch},
        has_momentum_buffers=has_buffers,
        meta_params={"w": w_list, "lw": lw},
        hyper=hyper,
        torch_layout=layout,
    )


def _to_torch_tree(obj: Any) -> Any:
    import torch

    return map_containers(lambda a: torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a, obj)


def save_reference_run(path: str | os.PathLike, run: ReferenceRun) -> None:
    """Writes `run` as the reference's run checkpoint (needs torch; atomic).

    With `run.torch_layout` (runs read by `load_reference_run`) the file has the
    original key order, unused entries, shared tensors and their momentum
    buffers; otherwise the target state dict holds exactly our model's keys.
    `load_reference_run` reads the file back to the same run.

    Args:
      path: destination file.
      run: the run.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError("writing reference checkpoints needs PyTorch: install l2t_jax[torch]") from e

    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    ours = variables_to_torch(run.model_name, run.variables)
    layout = run.torch_layout
    entries = {e.torch_key: e for e in _entries_cached(run.model_name)}
    if layout is None:
        layout = TorchLayout(list(ours), {}, {}, {}, {"dampening": 0, "maximize": False, "foreach": None, "differentiable": False, "fused": None}, {})
    target_sd: collections.OrderedDict = collections.OrderedDict()
    for key in layout.key_order:
        if key in layout.aliases:
            target_sd[key] = target_sd[layout.aliases[key]]
        elif key in ours:
            target_sd[key] = t(ours[key])
        elif key in layout.unused:
            target_sd[key] = t(layout.unused[key])
        else:
            raise WeightImportError(f"save_reference_run: no value for {key!r}")
    missing = [k for k in ours if k not in target_sd]
    if missing:
        raise WeightImportError(f"save_reference_run: layout lacks keys {missing[:5]}")

    branch_sd: collections.OrderedDict = collections.OrderedDict()
    for i, b in enumerate(run.branch):
        branch_sd[f"{i}.weight"] = t(np.asarray(b["kernel"]).T[:, :, None, None])
        branch_sd[f"{i}.bias"] = t(b["bias"])

    model_keys = [k for k in layout.key_order if k not in layout.aliases and not _is_buffer_key(k)]
    state: dict[int, dict] = {}
    if run.has_momentum_buffers:
        pos = 0
        for key in model_keys:
            e = entries.get(key)
            if e is not None and e.is_parameter:
                state[pos] = {"momentum_buffer": t(_to_torch_layout(_get_path(run.momentum["model"], e.path), e.layout))}
            elif key in layout.unused_momentum:
                state[pos] = {"momentum_buffer": t(layout.unused_momentum[key])}
            pos += 1
        for i, b in enumerate(run.momentum["branch"]):
            state[pos] = {"momentum_buffer": t(np.asarray(b["kernel"]).T[:, :, None, None])}
            state[pos + 1] = {"momentum_buffer": t(b["bias"])}
            pos += 2
    n_params = len(model_keys) + 2 * len(run.branch)
    group = {
        "lr": float(run.hyper["lr"]),
        "momentum": float(run.hyper["momentum"]),
        "dampening": 0,
        "weight_decay": float(run.hyper["weight_decay"]),
        "nesterov": bool(run.hyper["nesterov"]),
    }
    group.update({k: v for k, v in layout.group_extra.items() if k not in group})
    group["params"] = list(range(n_params))

    w_sd: collections.OrderedDict = collections.OrderedDict()
    for i, p in enumerate(run.meta_params["w"]):
        w_sd[f"{i}.weight"] = t(np.asarray(p["kernel"]).T)
        w_sd[f"{i}.bias"] = t(p["bias"])
    ck: dict[str, Any] = {
        "target_model": target_sd,
        "target_branch": branch_sd,
        "target_optimizer": {"state": state, "param_groups": [group]},
        "w": w_sd,
    }
    lw = run.meta_params.get("lw")
    if isinstance(lw, Mapping):
        ck["lw"] = collections.OrderedDict(weights=t(lw["weights"]))
    elif lw is not None:
        lw_sd: collections.OrderedDict = collections.OrderedDict()
        for i, p in enumerate(lw):
            lw_sd[f"{i}.weight"] = t(np.asarray(p["kernel"]).T)
            lw_sd[f"{i}.bias"] = t(p["bias"])
        ck["lw"] = lw_sd
    for k, v in layout.extra_top.items():
        ck[k] = _to_torch_tree(v)

    path = Path(path)
    buf = io.BytesIO()
    torch.save(ck, buf)
    _atomic_write(path, buf.getvalue())
