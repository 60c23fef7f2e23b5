"""Recompute the reference's meta-gradient from a case folder, and compare.

A case folder (format: ../shared/reference/README.md) holds one meta step of the
authors' PyTorch code: `config.json`, `source.pth`, `checkpoint.pth` (the run
state), `batch.npz` and, for comparison, `expected.npz`.

    python -m l2t_jax.reference hypergrad CASE_DIR --out OUT.npz [--dtype float64|float32]
    python -m l2t_jax.reference trajectory TRAJ_DIR --out OUT.npz [--dtype float64|float32]
    python -m l2t_jax.reference compare CASE_OR_TRAJ_DIR [--dtype float64|float32] [--tol TOL]
    python -m l2t_jax.reference precision --config=CONFIG.py [--config.KEY=VALUE] [--batches=N] [--workdir=RUN]

`hypergrad` writes the meta-gradient of every meta-parameter under the
reference's names (`w.I.weight`, `w.I.bias`, `lw.I.weight`, `lw.I.bias`, or
`lw.weights` for λ type "const") in PyTorch layout, plus
`scalar.outer_loss_after_lookahead` and `scalar.matching_loss_at_start`.
`trajectory` runs the K whole training iterations of a trajectory folder
(`batches.npz`, `expected.pth`) and writes the end state in the reference's names
and PyTorch layouts (`l2t_jax.reference_io`). `compare` prints, for a case, a
per-parameter table of relative errors against `expected.npz`; for a trajectory,
the relative error per group (parameters, BN statistics, branch, momentum, φ, Adam
moments, losses) against `expected.pth` / `expected.npz`. It exits 1 above the
tolerance, 2 on a bad folder (before computing anything). `precision` compares
the float32 meta-gradient with the float64 one on a config's own data and state
(`l2t_jax.precision`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from l2t_jax import reference_io

CASE_FILES = ("config.json", "source.pth", "checkpoint.pth", "batch.npz")
TRAJECTORY_FILES = ("config.json", "source.pth", "checkpoint.pth", "batches.npz")


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


def _check_case_dir(case_dir: Path, files: tuple[str, ...] = CASE_FILES) -> None:
    if not case_dir.is_dir():
        raise FileNotFoundError(f"case folder not found: {case_dir}")
    missing = [f for f in files if not (case_dir / f).exists()]
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


@dataclasses.dataclass
class CaseSetup:
    """A case folder's models, configuration and start state, ready to run.

    Attributes:
      config: `config.json`.
      cfg: the step's `BilevelConfig` (pairs, method, β, λ type, T, SGD and Adam settings).
      target, source: the Flax modules.
      state: the `bilevel.TrainState` of `checkpoint.pth` (θ, momentum, BN statistics,
        φ, a fresh Adam state), cast to the dtype.
      source_variables: the source's variables, cast.
      run: the checkpoint as read (names, parameter order, unused layers).
      lr: the target's SGD learning rate.
      lambda_type: the λ type.
      dtype: the computing dtype.
    """

    config: dict
    cfg: Any
    target: Any
    source: Any
    state: Any
    source_variables: Any
    run: Any
    lr: float
    lambda_type: str
    dtype: Any


def load_case(case_dir: str | Path, dtype: str = "float64", conv_impl: str = "auto",
              hvp: str = "reverse") -> CaseSetup:
    """Reads a case or trajectory folder into a `CaseSetup`.

    The target is put in the checkpoint's state (θ₁, momentum buffers, BN statistics).
    SGD's momentum and weight decay come from the checkpoint's optimizer
    (`param_groups[0]`); its learning rate from `config.json`'s `lr` (the run's
    fixed rate), else the optimizer's. T, β and the λ type come from `config.json`,
    Adam's settings from `meta_lr` / `meta_wd` (default 1e-4 each, as the reference).

    Args:
      case_dir: the folder.
      dtype: "float64" (the float32 checkpoint cast up, as the reference's float64
        figures) or "float32".
      conv_impl: convolution lowering of both models ("auto": as `experiments.run`
        picks it, `layers.conv_impl_for`).
      hvp: how the meta-gradient differentiates the inner gradients ("reverse" | "mixed").
    """
    case_dir = Path(case_dir)
    _check_case_dir(case_dir, TRAJECTORY_FILES if is_trajectory(case_dir) else CASE_FILES)
    dt = _enable_dtype(dtype)

    from l2t_jax import bilevel, transfer
    from l2t_jax.io.torch_layout import load_pretrained
    from l2t_jax.models import get_model, model_info
    from l2t_jax.models.layers import conv_impl_for
    from l2t_jax.reference_run import load_reference_run

    config = json.loads((case_dir / "config.json").read_text())
    for key in ("source_model", "target_model", "num_classes", "pairs", "T"):
        if key not in config:
            raise KeyError(f"{case_dir / 'config.json'} lacks {key!r}")
    pairs = transfer.parse_pairs(config["pairs"])
    src_name, tgt_name = config["source_model"], config["target_model"]
    src_info, tgt_info = model_info(src_name), model_info(tgt_name)
    transfer.validate_pairs(pairs, len(src_info.tap_channels), len(tgt_info.tap_channels))

    source_vars = load_pretrained(case_dir / "source.pth", src_name)
    source_classes = int(np.shape(source_vars["params"]["fc"]["bias"])[0])
    run = load_reference_run(
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
    if hyper.get("nesterov"):
        raise NotImplementedError("the case uses Nesterov momentum, which the reference's meta step does not support")
    cfg = bilevel.BilevelConfig(
        matching=transfer.MatchingConfig(
            pairs=pairs, method=method, beta=float(config.get("beta", 0.5)), lambda_type=lambda_type
        ),
        T=int(config["T"]),
        momentum=float(hyper["momentum"]),
        weight_decay=float(hyper["weight_decay"]),
        meta_lr=float(config.get("meta_lr", 1e-4)),
        meta_weight_decay=float(config.get("meta_wd", 1e-4)),
        hvp=hvp,
    )
    lr = float(config.get("lr", hyper["lr"]))

    conv_impl = conv_impl_for(conv_impl, hvp)  # as the runner: "auto" in mixed mode is the tap loop on CPU
    target = get_model(tgt_name, int(config["num_classes"]), conv_impl=conv_impl)
    source = get_model(src_name, source_classes, conv_impl=conv_impl)
    params = _cast({"model": run.variables["params"], "branch": run.branch}, dt)
    tx = bilevel.pytorch_sgd(lr, cfg.momentum, cfg.weight_decay, dt)
    meta = _cast(run.meta_params, dt)
    state = bilevel.TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=_cast(run.variables["batch_stats"], dt),
        opt_state=bilevel.with_momentum_buffers(tx.init(params), _cast(run.momentum, dt)),
        meta_params=meta,
        meta_opt_state=bilevel.pytorch_adam(cfg.meta_lr, cfg.meta_weight_decay).init(meta),
    )
    return CaseSetup(config, cfg, target, source, state, _cast(source_vars, dt), run, lr, lambda_type, dt)


def _images(x: np.ndarray, dt) -> Any:
    """(..., N, 3, H, W) normalised images -> (..., N, H, W, 3) in `dt`."""
    import jax.numpy as jnp

    return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1), dt)


def case_meta_gradient(case_dir: str | Path, dtype: str = "float64", conv_impl: str = "auto",
                       hvp: str = "reverse") -> CaseResult:
    """The meta-gradient of one reference case, recomputed with `bilevel.meta_gradient`.

    The look-ahead starts from the checkpoint's state (see `load_case`) and, as the
    reference's training loop, updates every parameter in each of its SGD steps.

    Args:
      case_dir: the case folder.
      dtype: "float64" or "float32".
      conv_impl: convolution lowering of both models.
      hvp: "reverse" | "mixed" (`bilevel.inner_value_and_grad`).
    Returns:
      A `CaseResult`.
    """
    import jax
    import jax.numpy as jnp

    from l2t_jax import bilevel

    case = load_case(case_dir, dtype, conv_impl, hvp)
    batch = np.load(Path(case_dir) / "batch.npz", allow_pickle=False)
    x, y = _images(batch["x"], case.dtype), jnp.asarray(batch["y"], jnp.int32)
    target, source, cfg = case.target, case.source, case.cfg
    s = case.state

    @jax.jit
    def compute(meta, params, opt_state, batch_stats, source_vars, x, y):
        feats = bilevel.source_features(source, source_vars, x)
        return bilevel.meta_gradient(meta, params, opt_state, batch_stats, x, y, feats, model=target, cfg=cfg)

    opt_state = bilevel.with_learning_rate(s.opt_state, case.lr)
    grads, outer, aux = compute(s.meta_params, s.params, opt_state, s.batch_stats, case.source_variables, x, y)
    return CaseResult(
        grads=reference_io.meta_to_torch(jax.device_get(grads), case.lambda_type),
        outer_loss=float(outer),
        matching_loss_at_start=float(aux.matching_loss_at_start),
    )


@dataclasses.dataclass
class TrajectoryResult:
    """The end state of K iterations in the reference's names (`reference_io`), and what was left out."""

    arrays: dict[str, np.ndarray]
    unused: list[str]


def run_trajectory(case_dir: str | Path, dtype: str = "float64", conv_impl: str = "auto",
                   progress: bool = False, hvp: str = "reverse") -> TrajectoryResult:
    """K whole training iterations of `bilevel.train_step` from a trajectory folder.

    Each iteration is the reference's: the real SGD step on L_total, T matching
    steps and one cross-entropy step (every parameter updated in each), the outer
    loss, the exact meta-gradient, one Adam step on φ, the look-ahead discarded and
    BN statistics updated a second time at θ₁. Batch k of `batches.npz` feeds
    iteration k, at the folder's fixed learning rate.

    Args:
      case_dir: the trajectory folder (format: the reference's README, "trajectories").
      dtype: "float64" or "float32".
      conv_impl: convolution lowering of both models.
      progress: print one line per iteration to stderr.
      hvp: "reverse" | "mixed" (`bilevel.inner_value_and_grad`).
    Returns:
      A `TrajectoryResult`: the end state, `scalar.loss` and `scalar.outer_loss` (K,).
    """
    import jax.numpy as jnp

    from l2t_jax import bilevel

    case = load_case(case_dir, dtype, conv_impl, hvp)
    batches = np.load(Path(case_dir) / "batches.npz", allow_pickle=False)
    xs, ys = batches["x"], batches["y"]
    k = int(case.config.get("iterations", xs.shape[0]))
    if xs.ndim != 5 or ys.ndim != 2 or xs.shape[0] < k or ys.shape[0] < k:
        raise ValueError(f"{Path(case_dir) / 'batches.npz'}: expected x (K,N,3,H,W) and y (K,N) with K >= {k}, "
                         f"got x {xs.shape}, y {ys.shape}")
    step = bilevel.make_train_step(bilevel.Models(case.target, case.source), case.cfg, donate=False)
    state, losses, outer = case.state, [], []
    lr = jnp.asarray(case.lr, case.dtype)
    for i in range(k):
        state, metrics = step(state, case.source_variables, _images(xs[i], case.dtype),
                              jnp.asarray(ys[i], jnp.int32), lr)
        losses.append(float(metrics["loss"]))
        outer.append(float(metrics["outer_loss"]))
        if progress:
            print(f"iteration {i + 1}/{k}: loss {losses[-1]:.12g}  outer loss {outer[-1]:.12g}", file=sys.stderr)
    arrays, unused = reference_io.state_to_reference(state, case.run, case.lambda_type)
    arrays["scalar.loss"] = np.asarray(losses, np.float64)
    arrays["scalar.outer_loss"] = np.asarray(outer, np.float64)
    return TrajectoryResult(arrays, unused)


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
    for name in sorted(exp_names, key=reference_io.natural_key):
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


# A trajectory's expected state is the reference's float64 run: float64 must match it to
# 1e-9 per group. float32 has no bar by default (the reference recorded no float32
# trajectory; over iterations float32 rounding in the meta-gradient moves φ through Adam's
# normalised steps); --tol sets one.
TRAJECTORY_TOL = {"float64": 1e-9, "float32": None}


def is_trajectory(case_dir: Path) -> bool:
    """Whether a folder is a trajectory case (K iterations, `batches.npz`) rather than a single step."""
    return (Path(case_dir) / "batches.npz").exists()


def _compare_trajectory(args) -> int:
    """`compare` on a trajectory folder: relative L2 error per group, exit 1 above the tolerance."""
    _check_case_dir(args.case_dir, TRAJECTORY_FILES)
    expected = reference_io.expected_trajectory(args.case_dir)  # before computing: a missing file fails at once
    result = run_trajectory(args.case_dir, args.dtype, args.conv_impl, progress=True, **_hvp(args))
    groups, only_expected, only_result = reference_io.compare_groups(result.arrays, expected, result.unused)
    tol = args.tol if args.tol is not None else TRAJECTORY_TOL[args.dtype]
    report_only = tol is None
    print(f"{'group':<15} {'entries':>7} {'|expected|':>12} {'rel L2 err':>11}")
    for g, (n, norm, rel) in groups.items():
        print(f"{g:<15} {n:>7} {norm:12.5e} {rel:11.3e}")
    for key in ("scalar.loss", "scalar.outer_loss"):
        if key in expected:
            ours = " ".join(f"{v:.15g}" for v in result.arrays[key])
            print(f"{key:<18} ours     {ours}\n{'':<18} expected {' '.join(f'{v:.15g}' for v in expected[key])}")
    skipped = [k for k in result.unused if k in expected]
    if skipped:
        print(f"not compared: {len(skipped)} entries of parameters the reference's model registers but never uses "
              f"({', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''})")
    problems = []
    if only_expected:
        problems.append(f"missing from our end state: {', '.join(only_expected[:8])}")
    if only_result:
        problems.append(f"not in expected.pth: {', '.join(only_result[:8])}")
    missing_groups = [g for g in reference_io.PARAMETER_GROUPS if g not in groups]
    if missing_groups:
        problems.append(f"groups with nothing compared: {', '.join(missing_groups)}")
    worst = max(rel for _, _, rel in groups.values())
    for p in problems:
        print(f"FAIL: {p}")
    if report_only:
        print(f"{'REPORT' if not problems else 'FAIL'}: {args.dtype} largest relative L2 error per group {worst:.3e} "
              f"(no default bar in {args.dtype}; pass --tol to set one)")
        return 1 if problems else 0
    ok = not problems and worst <= tol
    print(f"{'PASS' if ok else 'FAIL'}: {args.dtype} largest relative L2 error per group {worst:.3e} "
          f"{'<=' if worst <= tol else '>'} tolerance {tol:.3e}")
    return 0 if ok else 1


def _compare_case(args) -> int:
    """`compare` on a single-step case folder: per meta-parameter table, total relative L2 error."""
    _check_case_dir(args.case_dir, CASE_FILES)
    expected_path = args.case_dir / "expected.npz"
    if not expected_path.exists():  # before computing
        raise FileNotFoundError(f"{expected_path} not found: nothing to compare against")
    expected = dict(np.load(expected_path, allow_pickle=False))
    result = case_meta_gradient(args.case_dir, args.dtype, args.conv_impl, **_hvp(args))
    tol = args.tol
    if tol is None:
        ref_err = reference_float32_error(expected) if args.dtype == "float32" else None
        tol = 1e-6 if args.dtype == "float64" else max(5 * ref_err, 1e-3) if ref_err else 1e-2
    # float32 results are compared with the float64 truth (the reference's own float32
    # error is measured the same way).
    comparison = compare(result.as_npz_dict(), expected)
    print(comparison.table())
    ok = comparison.total_rel_l2 <= tol
    print(f"{'PASS' if ok else 'FAIL'}: {args.dtype} total relative L2 error {comparison.total_rel_l2:.3e} "
          f"{'<=' if ok else '>'} tolerance {tol:.3e}")
    return 0 if ok else 1


def _hvp(args) -> dict:
    """The `hvp` keyword for the computing functions (omitted at its default)."""
    return {} if args.hvp == "reverse" else {"hvp": args.hvp}


def _run(args) -> int:
    if args.command == "hypergrad":
        result = case_meta_gradient(args.case_dir, args.dtype, args.conv_impl, **_hvp(args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, **result.as_npz_dict())
        print(f"wrote {len(result.grads)} meta-gradients to {args.out}")
        return 0
    if args.command == "trajectory":
        result = run_trajectory(args.case_dir, args.dtype, args.conv_impl, progress=True, **_hvp(args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, **result.arrays)
        print(f"wrote the end state after {len(result.arrays['scalar.loss'])} iterations "
              f"({len(result.arrays)} arrays) to {args.out}")
        return 0
    if args.case_dir.is_dir() and is_trajectory(args.case_dir):
        return _compare_trajectory(args)
    return _compare_case(args)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["precision"]:  # absl / ml_collections flags (--config=FILE --config.KEY=VALUE)
        from l2t_jax import precision

        return precision.run_cli(["python -m l2t_jax.reference precision"] + argv[1:])
    parser = argparse.ArgumentParser(prog="python -m l2t_jax.reference", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("precision", help="float32 vs float64 meta-gradient on a config's data and state "
                                     "(--config=FILE [--config.KEY=V] [--batches=N] [--workdir=RUN] [--json=OUT])")

    from l2t_jax.models.layers import CONV_IMPLS

    def add_common(p, out: bool = False):
        p.add_argument("case_dir", type=Path)
        if out:
            p.add_argument("--out", type=Path, required=True)
        p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
        p.add_argument("--conv_impl", default="auto", choices=CONV_IMPLS)
        p.add_argument("--hvp", choices=("reverse", "mixed"), default="reverse",
                       help="meta-gradient mode: reverse over reverse, or mixed (forward-over-reverse HVPs)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")

    add_common(sub.add_parser("hypergrad", help="write the meta-gradient of a case to an .npz"), out=True)
    add_common(sub.add_parser("trajectory", help="run a trajectory case's K iterations, write the end state"),
               out=True)
    cp = sub.add_parser("compare", help="recompute a case or trajectory folder and compare with its expected files")
    add_common(cp)
    cp.add_argument("--tol", type=float, default=None,
                    help="single step: max total relative L2 error (default 1e-6 in float64; in float32 the larger "
                         "of 5x the reference's own float32 error and 1e-3); trajectory: max relative L2 error per "
                         "group (default 1e-9 in float64; float32: no bar, report only)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError) as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
