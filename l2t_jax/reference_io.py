"""A training state in the reference's names and PyTorch layouts, and a trajectory case's expected end state.

The reference (alinlab/L2T-ww `train_l2t_ww.py`) keeps its run in PyTorch objects:
`target_model` and `target_branch` state dicts, a `torch.optim.SGD` state dict whose
momentum buffers are indexed by the position of the parameter in
`list(target_model.parameters()) + list(target_branch.parameters())`, the weight and
λ networks `w` / `lw`, and a `torch.optim.Adam` state dict over
`list(w.parameters()) + list(lw.parameters())`. This module flattens both sides into
one dict of numpy arrays with the same keys, so that two end states can be compared
leaf by leaf:

    target_model.<key>       every parameter and BN buffer our model uses
    target_branch.<i>.weight / .bias   the 1x1 matching convs, (C_s, C_t, 1, 1) / (C_s,)
    momentum.<i>             SGD buffer of the i-th parameter (reference order)
    w.<i>.weight / .bias, lw.<i>.weight / .bias (or lw.weights for λ type "const")
    adam.exp_avg.<i>, adam.exp_avg_sq.<i>   i: position in w's then lw's parameters
    scalar.loss (K,), scalar.outer_loss (K,)

Parameters the reference's class registers but never uses in its forward pass (the
VGG's `new_classifier`, the ResNet's `alphas`, ...) are not part of the model's
function: they are left out (their names are listed as `unused`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from l2t_jax.io import torch_layout
from l2t_jax.io.torch_pickle import read_torch_file
from l2t_jax.reference_run import ReferenceRun, require_entry

PyTree = Any

PARAMETER_GROUPS = ("parameters", "BN statistics", "branch", "momentum", "phi", "Adam moments", "losses")


def meta_to_torch(meta: Mapping[str, Any], lambda_type: str) -> dict[str, np.ndarray]:
    """A φ-shaped pytree -> the reference's names, in its parameter order, PyTorch layouts.

    Linear kernels (in, out) become weights (out, in); λ type "const" is `lw.weights`.
    The dict's order is `list(w.parameters()) + list(lw.parameters())`.
    """
    out: dict[str, np.ndarray] = {}
    for i, g in enumerate(meta.get("w") or []):
        out[f"w.{i}.weight"] = np.asarray(g["kernel"]).T
        out[f"w.{i}.bias"] = np.asarray(g["bias"])
    lw = meta.get("lw")
    if lw is not None:
        if lambda_type == "const":
            out["lw.weights"] = np.asarray(lw["weights"])
        else:
            for i, g in enumerate(lw):
                out[f"lw.{i}.weight"] = np.asarray(g["kernel"]).T
                out[f"lw.{i}.bias"] = np.asarray(g["bias"])
    return out


def _branch_to_torch(branch: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for i, b in enumerate(branch):
        out[f"{prefix}{i}.weight"] = np.asarray(b["kernel"]).T[:, :, None, None]
        out[f"{prefix}{i}.bias"] = np.asarray(b["bias"])
    return out


def _adam_state(opt_state: Any) -> Any:
    """The `optax.ScaleByAdamState` inside a (chained) Adam state."""
    import optax

    if isinstance(opt_state, optax.ScaleByAdamState):
        return opt_state
    if isinstance(opt_state, tuple):
        for s in opt_state:
            found = _adam_state(s)
            if found is not None:
                return found
    return None


def parameter_order(run: ReferenceRun) -> list[str]:
    """The reference optimizer's parameter list as state-dict keys (`branch.<key>` for the branch).

    `list(target_model.parameters())` is the target state dict's key order with
    buffers skipped and shared tensors counted once, then the branch's parameters.
    """
    layout = run.torch_layout
    if layout is None:
        raise ValueError("the run was not read from a reference checkpoint: its parameter order is unknown")
    model = [k for k in layout.key_order if k not in layout.aliases and not torch_layout.is_buffer_key(k)]
    return model + [f"branch.{i}.{n}" for i in range(len(run.branch)) for n in ("weight", "bias")]


def state_to_reference(
    state: Any, run: ReferenceRun, lambda_type: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """A `bilevel.TrainState` in the reference's names (see the module docstring).

    Args:
      state: the state (its params, BN statistics, SGD and Adam states).
      run: the reference run it started from (model name, parameter order).
      lambda_type: the λ type (selects `lw.weights` for "const").
    Returns:
      (arrays by name, names of the reference's unused parameters left out).
    """
    import jax

    from l2t_jax import bilevel

    state = jax.device_get(state)
    out: dict[str, np.ndarray] = {}
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    for key, value in torch_layout.variables_to_torch(run.model_name, variables).items():
        out[f"target_model.{key}"] = value
    out.update(_branch_to_torch(state.params["branch"], "target_branch."))

    entries = {e.torch_key: e for e in torch_layout.torch_entries(run.model_name) if e.is_parameter}
    buffers = bilevel.momentum_buffers(state.opt_state)
    branch_buffers = _branch_to_torch(buffers["branch"], "branch.")
    unused = []
    for pos, key in enumerate(parameter_order(run)):
        if key.startswith("branch."):
            out[f"momentum.{pos}"] = branch_buffers[key]
        elif key in entries:
            e = entries[key]
            out[f"momentum.{pos}"] = torch_layout.to_torch_layout(torch_layout.get_path(buffers["model"], e.path), e.layout)
        else:
            unused.append(f"momentum.{pos}")
    unused += [f"target_model.{k}" for k in (run.torch_layout.unused if run.torch_layout else {})]

    out.update(meta_to_torch(state.meta_params, lambda_type))
    adam = _adam_state(state.meta_opt_state)
    if adam is not None and state.meta_params:
        for kind, tree in (("exp_avg", adam.mu), ("exp_avg_sq", adam.nu)):
            for pos, value in enumerate(meta_to_torch(tree, lambda_type).values()):
                out[f"adam.{kind}.{pos}"] = value
    return out, unused


def expected_trajectory(case_dir: str | Path) -> dict[str, np.ndarray]:
    """A trajectory case's `expected.pth` and `expected.npz` under the names of `state_to_reference`.

    Raises:
      FileNotFoundError: a file is missing.
      WeightImportError: `expected.pth` lacks an entry.
    """
    case_dir = Path(case_dir)
    for f in ("expected.pth", "expected.npz"):
        if not (case_dir / f).exists():
            raise FileNotFoundError(f"{case_dir / f} not found: nothing to compare against")
    ck = read_torch_file(case_dir / "expected.pth")
    what = str(case_dir / "expected.pth")
    out: dict[str, np.ndarray] = {}
    for key, value in require_entry(ck, "target_model", what).items():
        out[f"target_model.{key}"] = np.asarray(value)
    for key, value in require_entry(ck, "target_branch", what).items():
        out[f"target_branch.{key}"] = np.asarray(value)
    sgd = require_entry(ck, "target_optimizer", what)
    for pos, entry in require_entry(sgd, "state", what + ": target_optimizer").items():
        if isinstance(entry, Mapping) and entry.get("momentum_buffer") is not None:
            out[f"momentum.{int(pos)}"] = np.asarray(entry["momentum_buffer"])
    for net in ("w", "lw"):
        for key, value in (ck.get(net) or {}).items():
            out[f"{net}.{key}"] = np.asarray(value)
    adam = ck.get("meta_optimizer")
    if adam is not None:
        for pos, entry in require_entry(adam, "state", what + ": meta_optimizer").items():
            for kind in ("exp_avg", "exp_avg_sq"):
                if kind in entry:
                    out[f"adam.{kind}.{int(pos)}"] = np.asarray(entry[kind])
    with np.load(case_dir / "expected.npz", allow_pickle=False) as z:
        for key in ("loss", "outer_loss"):
            if key in z:
                out[f"scalar.{key}"] = np.asarray(z[key])
    return out


def group_of(name: str) -> str:
    """Which of `PARAMETER_GROUPS` a name of `state_to_reference` belongs to."""
    if name.startswith("target_model."):
        return "BN statistics" if torch_layout.is_buffer_key(name) else "parameters"
    if name.startswith("target_branch."):
        return "branch"
    if name.startswith("momentum."):
        return "momentum"
    if name.startswith(("w.", "lw.")):
        return "phi"
    if name.startswith("adam."):
        return "Adam moments"
    if name.startswith("scalar."):
        return "losses"
    raise ValueError(f"unknown entry {name!r}")


def compare_groups(
    result: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], unused: Sequence[str] = ()
) -> tuple[dict[str, tuple[int, float, float]], list[str], list[str]]:
    """Relative L2 error per group of `result` against `expected`.

    Args:
      unused: expected names that may be absent from `result` (the reference's unused layers).
    Returns:
      ({group: (entries compared, |expected| L2, relative L2 error)}, names only in
      `expected` (excluding `unused`), names only in `result`).
    Raises:
      ValueError: an entry's shape differs.
    """
    sums: dict[str, list[float]] = {g: [0, 0.0, 0.0] for g in PARAMETER_GROUPS}
    for name in result:
        if name not in expected:
            continue
        ours = np.asarray(result[name], np.float64)
        ref = np.asarray(expected[name], np.float64)
        if ours.shape != ref.shape:
            raise ValueError(f"{name}: shape {ours.shape} differs from expected {ref.shape}")
        s = sums[group_of(name)]
        s[0] += 1
        s[1] += float(np.sum(ref**2))
        s[2] += float(np.sum((ours - ref) ** 2))
    groups = {}
    for g, (n, ref2, err2) in sums.items():
        if n:
            rel = float(np.sqrt(err2 / ref2)) if ref2 > 0 else (0.0 if err2 == 0 else float("inf"))
            groups[g] = (int(n), float(np.sqrt(ref2)), rel)
    skip = set(unused)
    only_expected = sorted(k for k in expected if k not in result and k not in skip)
    only_result = sorted(k for k in result if k not in expected)
    return groups, only_expected, only_result


def natural_key(name: str) -> list:
    """Sort key that orders `w.10` after `w.9`."""
    return [int(t) if t.isdigit() else t for t in name.split(".")]
