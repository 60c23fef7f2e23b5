"""Recompute the reference's meta-gradient from a case folder, and compare.

A case folder (format: ../shared/reference/README.md) holds one meta step of the
authors' PyTorch code: `config.json`, `source.pth`, `checkpoint.pth` (the run
state), `batch.npz` and, for comparison, `expected.npz`.

    python -m l2t_jax.reference hypergrad CASE_DIR --out OUT.npz --dtype float64|float32
    python -m l2t_jax.reference compare CASE_DIR [--dtype float64|float32] [--tol TOL]

`hypergrad` writes the meta-gradient of every meta-parameter under the
reference's names (`w.I.weight`, `w.I.bias`, `lw.I.weight`, `lw.I.bias`, or
`lw.weights` for λ type "const") in PyTorch layout, plus
`scalar.outer_loss_after_lookahead` and `scalar.matching_loss_at_start`.
`compare` prints a per-parameter table of relative errors against
`expected.npz` and exits non-zero above the tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

CASE_FILES = ("config.json", "source.pth", "checkpoint.pth", "batch.npz")


@dataclasses.dataclass
class CaseResult:
    """Meta-gradients in the reference's names and layout, and the two scalars."""

    grads: dict[str, np.ndarray]
    outer_loss: float
    matching_loss_at_start: float

    def as_npz_dict(self) -> dict[str, np.ndarray]:
        out = dict(self.grads)
        out["scalar.outer_loss_after_lookahead"] = np.asarray(self.outer_loss, np.float64)
        out["scalar.matching_loss_at_start"] = np.asarray(self.matching_loss_at_start, np.float64)
        return out


def _check_case_dir(case_dir: Path) -> None:
    if not case_dir.is_dir():
        raise FileNotFoundError(f"case folder not found: {case_dir}")
    missing = [f for f in CASE_FILES if not (case_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"case folder {case_dir} lacks {', '.join(missing)} (format: shared/reference/README.md)")


def _enable_dtype(dtype: str):
    import jax
    import jax.numpy as jnp

    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
        return jnp.float64
    return jnp.float32


def _cast(tree: Any, dtype) -> Any:
    import jax
    import jax.numpy as jnp

    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(cast, tree)


def _meta_to_torch(meta_grads: Mapping[str, Any], lambda_type: str) -> dict[str, np.ndarray]:
    """Our φ-shaped pytree -> the reference's names and PyTorch layouts (Linear weight = kernel.T)."""
    out: dict[str, np.ndarray] = {}
    for i, g in enumerate(meta_grads.get("w", [])):
        out[f"w.{i}.weight"] = np.asarray(g["kernel"]).T
        out[f"w.{i}.bias"] = np.asarray(g["bias"])
    lw = meta_grads.get("lw")
    if lw is not None:
        if lambda_type == "const":
            out["lw.weights"] = np.asarray(lw["weights"])
        else:
            for i, g in enumerate(lw):
                out[f"lw.{i}.weight"] = np.asarray(g["kernel"]).T
                out[f"lw.{i}.bias"] = np.asarray(g["bias"])
    return out


def case_meta_gradient(case_dir: str | Path, dtype: str = "float64", conv_impl: str = "auto") -> CaseResult:
    """The meta-gradient of one reference case, recomputed with `bilevel.meta_gradient`.

    The target is put in the checkpoint's state (θ₁, momentum buffers, BN statistics);
    the look-ahead runs with the optimizer's own lr / momentum / weight decay from
    the checkpoint (`param_groups[0]`), T, β and the λ type from `config.json`.

    Args:
      case_dir: the case folder.
      dtype: "float64" (the float32 checkpoint cast up, as the reference's float64
        figures) or "float32".
      conv_impl: convolution lowering of both models.
    Returns:
      A `CaseResult`.
    """
    case_dir = Path(case_dir)
    _check_case_dir(case_dir)
    dt = _enable_dtype(dtype)

    import jax
    import jax.numpy as jnp

    from l2t_jax import bilevel, transfer, weights
    from l2t_jax.models import get_model, model_info

    config = json.loads((case_dir / "config.json").read_text())
    pairs = transfer.parse_pairs(config["pairs"])
    src_name, tgt_name = config["source_model"], config["target_model"]
    src_info, tgt_info = model_info(src_name), model_info(tgt_name)
    transfer.validate_pairs(pairs, len(src_info.tap_channels), len(tgt_info.tap_channels))

    source_vars = weights.load_pretrained(case_dir / "source.pth", src_name)
    source_classes = int(np.shape(source_vars["params"]["fc"]["bias"])[0])
    run = weights.load_reference_run(
        case_dir / "checkpoint.pth",
        target_model=tgt_name,
        num_classes=int(config["num_classes"]),
        pairs=pairs,
        source_tap_channels=src_info.tap_channels,
        target_tap_channels=tgt_info.tap_channels,
    )
    lambda_type = config.get("loss_weight_type", "relu6")
    method = "l2t_ww" if run.meta_params.get("lw") is not None else "l2t_w"
    hyper = run.hyper
    cfg = bilevel.BilevelConfig(
        matching=transfer.MatchingConfig(
            pairs=pairs, method=method, beta=float(config.get("beta", 0.5)), lambda_type=lambda_type
        ),
        T=int(config["T"]),
        momentum=float(hyper["momentum"]),
        weight_decay=float(hyper["weight_decay"]),
    )
    if hyper.get("nesterov"):
        raise NotImplementedError("the case uses Nesterov momentum, which the reference's meta step does not support")

    target = get_model(tgt_name, int(config["num_classes"]), conv_impl=conv_impl)
    source = get_model(src_name, source_classes, conv_impl=conv_impl)
    params = _cast({"model": run.variables["params"], "branch": run.branch}, dt)
    tx = bilevel.pytorch_sgd(float(hyper["lr"]), cfg.momentum, cfg.weight_decay, dt)
    opt_state = bilevel.with_momentum_buffers(tx.init(params), _cast(run.momentum, dt))
    batch_stats = _cast(run.variables["batch_stats"], dt)
    meta = _cast(run.meta_params, dt)

    batch = np.load(case_dir / "batch.npz")
    x = jnp.asarray(np.transpose(batch["x"], (0, 2, 3, 1)), dt)
    y = jnp.asarray(batch["y"], jnp.int32)

    @jax.jit
    def compute(meta, params, opt_state, batch_stats, source_vars, x, y):
        feats = bilevel.source_features(source, source_vars, x)
        return bilevel.meta_gradient(meta, params, opt_state, batch_stats, x, y, feats, model=target, cfg=cfg)

    grads, outer, aux = compute(meta, params, opt_state, batch_stats, _cast(source_vars, dt), x, y)
    return CaseResult(
        grads=_meta_to_torch(jax.device_get(grads), lambda_type),
        outer_loss=float(outer),
        matching_loss_at_start=float(aux.matching_loss_at_start),
    )


@dataclasses.dataclass
class Comparison:
    """Per-parameter and total relative L2 errors of a result against `expected.npz`."""

    rows: list[tuple[str, tuple[int, ...], float, float, float]]  # name, shape, |ref|, rel L2, max abs
    total_rel_l2: float
    scalars: dict[str, tuple[float, float]]  # name -> (ours, expected)

    def table(self) -> str:
        lines = [f"{'parameter':<16} {'shape':<12} {'|ref|':>11} {'rel L2 err':>11} {'max abs err':>11}"]
        for name, shape, ref_norm, rel, max_abs in self.rows:
            lines.append(f"{name:<16} {str(shape):<12} {ref_norm:11.4e} {rel:11.3e} {max_abs:11.3e}")
        for name, (ours, exp) in self.scalars.items():
            lines.append(f"{name:<42} ours {ours:.15g}  expected {exp:.15g}")
        lines.append(f"TOTAL relative L2 error over all meta-parameters: {self.total_rel_l2:.3e}")
        return "\n".join(lines)


def compare(result: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], suffix: str = "") -> Comparison:
    """Relative errors of `result` (reference names) against `expected[name + suffix]`.

    Raises a KeyError naming any parameter present on one side only.
    """
    exp_names = {k[: len(k) - len(suffix)] if suffix else k for k in expected
                 if not k.startswith("scalar.") and (k.endswith(suffix) if suffix else "@" not in k)}
    ours_names = {k for k in result if not k.startswith("scalar.")}
    if exp_names != ours_names:
        raise KeyError(f"parameter names differ: only expected {sorted(exp_names - ours_names)}, "
                       f"only computed {sorted(ours_names - exp_names)}")
    rows, num, den = [], 0.0, 0.0
    for name in sorted(exp_names, key=_natural_key):
        ref = np.asarray(expected[name + suffix], np.float64)
        ours = np.asarray(result[name], np.float64)
        if ref.shape != ours.shape:
            raise ValueError(f"{name}: shape {ours.shape} differs from expected {ref.shape}")
        err = float(np.sum((ours - ref) ** 2))
        ref2 = float(np.sum(ref**2))
        num, den = num + err, den + ref2
        rel = np.sqrt(err / ref2) if ref2 > 0 else (0.0 if err == 0 else float("inf"))
        rows.append((name, ref.shape, float(np.sqrt(ref2)), float(rel), float(np.max(np.abs(ours - ref), initial=0.0))))
    scalars = {}
    for key in ("scalar.outer_loss_after_lookahead", "scalar.matching_loss_at_start"):
        if key in result and key + suffix in expected:
            scalars[key] = (float(result[key]), float(expected[key + suffix]))
    total = float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))
    return Comparison(rows, total, scalars)


def reference_float32_error(expected: Mapping[str, np.ndarray]) -> Optional[float]:
    """The reference's own float32-vs-float64 relative L2 error, if `expected` holds both."""
    names = [k for k in expected if not k.startswith("scalar.") and "@" not in k]
    if not names or not all(k + "@f32" in expected for k in names):
        return None
    return compare({k: expected[k + "@f32"] for k in names}, expected).total_rel_l2


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2t_jax.reference", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    hg = sub.add_parser("hypergrad", help="write the meta-gradient of a case to an .npz")
    hg.add_argument("case_dir", type=Path)
    hg.add_argument("--out", type=Path, required=True)
    hg.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    hg.add_argument("--conv_impl", default="auto", choices=("auto", "xla", "im2col"))
    cp = sub.add_parser("compare", help="recompute and compare against expected.npz")
    cp.add_argument("case_dir", type=Path)
    cp.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    cp.add_argument("--conv_impl", default="auto", choices=("auto", "xla", "im2col"))
    cp.add_argument("--tol", type=float, default=None,
                    help="max total relative L2 error (default: 1e-6 for float64; for float32 5x the "
                         "reference's own float32 error recorded in expected.npz, else 1e-2)")
    args = parser.parse_args(argv)
    try:
        result = case_meta_gradient(args.case_dir, args.dtype, args.conv_impl)
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "hypergrad":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, **result.as_npz_dict())
        print(f"wrote {len(result.grads)} meta-gradients to {args.out}")
        return 0
    expected_path = args.case_dir / "expected.npz"
    if not expected_path.exists():
        print(f"error: {expected_path} not found: nothing to compare against", file=sys.stderr)
        return 2
    expected = dict(np.load(expected_path))
    tol = args.tol
    if tol is None:
        ref_err = reference_float32_error(expected) if args.dtype == "float32" else None
        tol = 1e-6 if args.dtype == "float64" else (5 * ref_err if ref_err else 1e-2)
    # float32 results are compared with the float64 truth (the reference's own float32
    # error is measured the same way).
    comparison = compare(result.as_npz_dict(), expected)
    print(comparison.table())
    ok = comparison.total_rel_l2 <= tol
    print(f"{'PASS' if ok else 'FAIL'}: {args.dtype} total relative L2 error {comparison.total_rel_l2:.3e} "
          f"{'<=' if ok else '>'} tolerance {tol:.3e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
