"""Speed and float32 accuracy of the convolution lowerings, side by side.

    python -m benchmarks.conv_accuracy [--model vgg9_bn] [--batch 32] [--size 32]
        [--impls im2col_single,im2col] [--reps 5] [--rounds 3] [--reference_impl im2col_single]
        [--seed 0] [--accuracy_seeds 5]

For each lowering (`layers.CONV_IMPLS`; default: "im2col_single", the former
one-matmul im2col, against "im2col", the matmuls over groups of taps) the model
(random initialisation, random images, training mode: BN batch statistics) is
differentiated two ways, in float32, jitted:

* fwd_bwd: `jax.grad` of the mean cross-entropy with respect to the parameters;
* hvp: `jax.jvp` of that gradient along a fixed random tangent (a Hessian-vector
  product, the second-order pattern of the meta-gradient).

Timing: every function is compiled and called once first; then `--rounds` rounds,
each timing `--reps` calls of every lowering in turn (interleaved, so load on a
shared machine hits all alike). Reported: the fastest call (`*_s_min`) and the
median of all calls (`*_s_median`) per lowering, and each lowering's ratio to the
first one (min over min).

Accuracy: relative L2 error (over all parameters together) of each lowering's
float32 gradient and Hessian-vector product against the same computation in
float64 (`--reference_impl`, from the float32 parameters, images and tangent cast
up), and the median over parameters of the per-parameter relative L2 error
(leaving out the conv biases in front of BN, whose gradient is zero up to
rounding). The total is lumpy: where two inputs of a 2x2 max-pool window are
within float32 rounding of each other, a float32 run may pick another one than
float64 does, and the gradient of everything below that pool then moves by
~1e-3 (a property of float32, not of the lowering). Hence the errors are
measured on --accuracy_seeds problems (data, initialisation and tangent from
seeds --seed, --seed + 1, ...) and reported per seed, with their median.

Prints ONE JSON line on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import common
from benchmarks.common import log, rounded


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg9_bn", help="registry name (l2t_jax.models)")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="image size (square)")
    p.add_argument("--impls", default="im2col_single,im2col", help="comma-separated conv lowerings to compare")
    p.add_argument("--reference_impl", default="im2col_single", help="lowering of the float64 reference")
    p.add_argument("--reps", type=int, default=5, help="timed calls per lowering and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="first seed (data, init, tangent); timing uses it")
    p.add_argument("--accuracy_seeds", type=int, default=5, help="problems the errors are measured on")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]

    import jax

    jax.config.update("jax_enable_x64", True)  # for the float64 reference; the timed code is float32
    import jax.numpy as jnp
    import numpy as np
    import optax

    from l2t_jax.models import get_model
    from l2t_jax.models.layers import CONV_IMPLS

    for impl in impls + [args.reference_impl]:
        if impl not in CONV_IMPLS:
            raise SystemExit(f"unknown conv impl {impl!r}; choose from {CONV_IMPLS}")

    def problem(seed: int):
        """float32 (params, batch_stats, x, y, tangent) from `seed`."""
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, 3)), jnp.float32)
        y = jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32)
        variables = get_model(args.model, args.num_classes, conv_impl=impls[0]).init(
            jax.random.PRNGKey(seed), x, train=False
        )
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables["params"])
        stats = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables["batch_stats"])
        leaves, treedef = jax.tree_util.tree_flatten(params)
        tangent = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) * 1e-2 for a in leaves]
        )
        return params, stats, x, y, tangent

    def functions(impl: str):
        """Jitted fwd_bwd(params, stats, x) and hvp(params, tangent, stats, x). Every array
        is an argument: a closed-over one would be a constant, and XLA would fold (compute
        at compile time) whatever depends on it alone, such as the first convolution."""
        model = get_model(args.model, args.num_classes, conv_impl=impl)

        def loss(params, stats, x, y):
            (logits, _), _ = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def fwd_bwd(params, stats, x, y):
            return jax.grad(loss)(params, stats, x, y)

        def hvp(params, tangent, stats, x, y):
            return jax.jvp(lambda p: jax.grad(loss)(p, stats, x, y), (params,), (tangent,))[1]

        return jax.jit(fwd_bwd), jax.jit(hvp)

    def cast64(tree):
        return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), tree)

    def rel_l2(got, want) -> float:
        g = np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree_util.tree_leaves(got)])
        w = np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree_util.tree_leaves(want)])
        return float(np.linalg.norm(g - w) / np.linalg.norm(w))

    def median_leaf_rel_l2(got, want) -> float:
        """Median over parameters (those whose reference is not zero up to rounding)."""
        pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
                 for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))]
        top = max(np.linalg.norm(b) for _, b in pairs)
        return float(np.median([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in pairs
                                if np.linalg.norm(b) > 1e-8 * top]))

    seeds = [args.seed + i for i in range(args.accuracy_seeds)]
    fb64, hvp64 = functions(args.reference_impl)
    compiled = {impl: functions(impl) for impl in impls}
    errs = {impl: {k: [] for k in ("fwd_bwd", "hvp", "fwd_bwd_median", "hvp_median")} for impl in impls}
    for seed in seeds:
        log(f"accuracy, seed {seed}: float64 reference ({args.reference_impl}), then float32")
        params, stats, x, y, tangent = problem(seed)
        p64, s64, x64, t64 = cast64(params), cast64(stats), x.astype(jnp.float64), cast64(tangent)
        ref_g, ref_h = jax.device_get(fb64(p64, s64, x64, y)), jax.device_get(hvp64(p64, t64, s64, x64, y))
        for impl in impls:
            fb, hv = compiled[impl]
            g, h = fb(params, stats, x, y), hv(params, tangent, stats, x, y)
            errs[impl]["fwd_bwd"].append(rel_l2(g, ref_g))
            errs[impl]["hvp"].append(rel_l2(h, ref_h))
            errs[impl]["fwd_bwd_median"].append(median_leaf_rel_l2(g, ref_g))
            errs[impl]["hvp_median"].append(median_leaf_rel_l2(h, ref_h))

    params32, stats32, x32, y, tangent32 = problem(args.seed)
    calls, record = {}, {}
    for impl in impls:
        log(f"compile + first call: {impl}")
        fb, hv = functions(impl)
        fb_args, hv_args = (params32, stats32, x32, y), (params32, tangent32, stats32, x32, y)
        t0 = time.perf_counter()
        fb = fb.lower(*fb_args).compile()
        hv = hv.lower(*hv_args).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready((fb(*fb_args), hv(*hv_args)))
        calls[impl] = {"fwd_bwd": lambda fb=fb: fb(*fb_args), "hvp": lambda hv=hv: hv(*hv_args)}
        e = errs[impl]
        record[impl] = {
            "compile_s": rounded(compile_s, 2),
            "fwd_bwd_rel_l2_vs_float64_median_over_seeds": float(np.median(e["fwd_bwd"])),
            "hvp_rel_l2_vs_float64_median_over_seeds": float(np.median(e["hvp"])),
            "fwd_bwd_rel_l2_vs_float64_per_seed": e["fwd_bwd"],
            "hvp_rel_l2_vs_float64_per_seed": e["hvp"],
            "fwd_bwd_median_param_rel_l2_per_seed": e["fwd_bwd_median"],
            "hvp_median_param_rel_l2_per_seed": e["hvp_median"],
        }

    times = {impl: {"fwd_bwd": [], "hvp": []} for impl in impls}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for impl in impls:
            for kind in ("fwd_bwd", "hvp"):
                times[impl][kind] += common.time_calls(calls[impl][kind], args.reps, jax.block_until_ready)

    first = impls[0]
    for impl in impls:
        for kind in ("fwd_bwd", "hvp"):
            ts = times[impl][kind]
            record[impl][f"{kind}_s_min"] = rounded(min(ts))
            record[impl][f"{kind}_s_median"] = rounded(statistics.median(ts))
            record[impl][f"{kind}_ratio_to_{first}"] = rounded(min(ts) / min(times[first][kind]), 3)

    common.emit(
        {
            "benchmark": "conv_accuracy",
            "model": args.model,
            "batch": args.batch,
            "image_size": args.size,
            "dtype": "float32",
            "reference": f"float64 {args.reference_impl}",
            "accuracy_seeds": seeds,
            "reps": args.reps,
            "rounds": args.rounds,
            "impls": record,
            "device": str(jax.devices()[0]),
            "jax": jax.__version__,
            **common.host_info(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
