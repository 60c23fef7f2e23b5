"""Run checkpoints of the reference's `train_l2t_ww.py`, read into (and written from) this library's trees.

The reference (alinlab/L2T-ww) saves its run as one `torch.save` dict: the target
model and the matching branch (`target_model`, `target_branch` state dicts), the
target's `torch.optim.SGD` state (`target_optimizer`, momentum buffers indexed by
parameter position), and the weight and λ networks (`w`, `lw`). `load_reference_run`
turns such a file into a `ReferenceRun` in this library's layouts (conversions of
`l2t_jax.io.torch_layout`); `save_reference_run` writes one back (needs PyTorch),
for a run it read with the file's own entries and key order (`TorchLayout` keeps
what our trees do not hold). `l2t_jax.reference` starts its parity cases from
these files; `l2t_jax.reference_io` compares end states in the reference's names.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from l2t_jax import transfer
from l2t_jax.io.atomic import write_atomic
from l2t_jax.io.torch_layout import (
    get_path,
    is_buffer_key,
    set_path,
    to_flax_layout,
    to_torch_layout,
    torch_entries,
    variables_from_torch,
    variables_to_torch,
)
from l2t_jax.io.torch_pickle import WeightImportError, map_containers, read_torch_file

__all__ = ["ReferenceRun", "TorchLayout", "load_reference_run", "require_entry", "save_reference_run"]


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


def _view_identity(a: np.ndarray) -> tuple | None:
    """(data pointer, shape, strides, dtype): equal for two views of the same memory, as
    torch's shared tensors read by `read_torch_file` are; None for empty arrays and non-arrays."""
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
        if not is_buffer_key(key):
            keys.append(key)
    return keys, aliases


def require_entry(mapping: Mapping, key: str, what: str) -> Any:
    """mapping[key] of a checkpoint dict; a `WeightImportError` naming `what` and the keys there when absent."""
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
    target_sd = require_entry(ck, "target_model", what)
    branch_sd = require_entry(ck, "target_branch", what)
    opt = require_entry(ck, "target_optimizer", what)
    w_sd = require_entry(ck, "w", what)
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
    groups = require_entry(opt, "param_groups", f"{path}: target_optimizer")
    state = require_entry(opt, "state", f"{path}: target_optimizer")
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
    for e in torch_entries(target_model):
        if not e.is_parameter:
            continue
        used.add(e.torch_key)
        param = get_path(variables["params"], e.path)
        buf = buffers.get(("model", e.torch_key))
        if buf is None:
            set_path(mom_model, e.path, np.zeros_like(param))
            continue
        if tuple(buf.shape) != tuple(np.shape(target_sd[e.torch_key])):
            problems.append(f"momentum of {e.torch_key}: shape {tuple(buf.shape)}, parameter {tuple(np.shape(target_sd[e.torch_key]))}")
            continue
        set_path(mom_model, e.path, to_flax_layout(buf, e.layout))
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
    mapped = {e.torch_key for e in torch_entries(target_model)}
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

    def t(a: Any) -> Any:
        return torch.from_numpy(np.array(a))

    ours = variables_to_torch(run.model_name, run.variables)
    layout = run.torch_layout
    entries = {e.torch_key: e for e in torch_entries(run.model_name)}
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

    model_keys = [k for k in layout.key_order if k not in layout.aliases and not is_buffer_key(k)]
    state: dict[int, dict] = {}
    if run.has_momentum_buffers:
        pos = 0
        for key in model_keys:
            e = entries.get(key)
            if e is not None and e.is_parameter:
                state[pos] = {"momentum_buffer": t(to_torch_layout(get_path(run.momentum["model"], e.path), e.layout))}
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

    write_atomic(path, lambda f: torch.save(ck, f))
