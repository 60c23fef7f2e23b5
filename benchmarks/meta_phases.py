"""Where a meta-iteration's time goes: its phases, each compiled and timed on its own.

    python -m benchmarks.meta_phases --setting stl10|cub200 [--batch B] [--T 2] [--hvp mixed|reverse]
        [--conv_impl auto|...] [--cpu_scheduler auto|...] [--iters 3] [--phases a,b,...] [--out FILE.json]

`benchmarks.train_step` gives one figure, the iteration's time over a plain step's. This
splits it. Each phase below is a separate `jax.jit` of the library's own functions
(`l2t_jax.bilevel`), built by `benchmarks.train_step.build` (random data, real model
sizes), compiled ahead of time, warmed up once and timed `--iters` times:

* forward: the target's forward pass in training mode (F, the unit below);
* grad: ∇θ of the cross-entropy (a forward and its backward pass, about 3F);
* wfm_grad: ∇θ of the matching loss L_wfm (a look-ahead step's gradient: the forward,
  the 1x1 convolutions and distances of every pair, their backward pass);
* hvp: one Hessian-vector product of that cross-entropy through
  `bilevel.inner_value_and_grad` in this --hvp mode (its backward pass, as the
  look-ahead's backward pass runs it once per step), in a random direction;
* cross: the same with `theta_differentiated=False`, the look-ahead's first step
  ("mixed" mode forms only the cross product there; "reverse" ignores the flag);
* plain: one plain SGD step (`benchmarks.train_step.make_plain_step`), the
  denominator of `train_step`'s ratio;
* source: the source's forward pass (`bilevel.source_outputs`);
* real_step: `bilevel.real_step` (∇θ L_total and its SGD update);
* lookahead: `bilevel.lookahead_loss` evaluated (the look-ahead's forward only);
* meta_gradient: `bilevel.meta_gradient` (look-ahead forward and backward);
* iteration: the whole `bilevel.train_step`, as `benchmarks.train_step` times it
  (nothing donated here, so each call starts from the same state);
* flops (compiled, never run; with --compare_torch also the PyTorch twin's count): the arithmetic of the iteration against the plain
  step's, from XLA's cost analysis. That analysis counts a loop's body once, whatever
  its trip count, so both programs are compiled loop-free for it: the "im2col"
  lowering (the tap loop does the same matmuls) and the look-ahead traced as
  straight-line code (`BilevelConfig.unrolled` forced on; the same steps as the loop).
  flop_ratio = iteration_gflop / plain_gflop is the time ratio the iteration would
  have if it ran its arithmetic as fast as the plain step runs its own.

Per timed phase: s_median, s_per_forward (÷ forward), s_per_plain (÷ plain), compile_s,
gflop (XLA's count; null for a program with a loop, whose count would be short). And
meta_backward_s = meta_gradient − lookahead. With F a forward, a gradient costs about 3F
of matmuls and a forward-over-reverse Hessian-vector product about 9F (a forward, its
tangent, the backward pass and its tangent); results/benchmarks/README.md ("How much
arithmetic an iteration does") has the measurements.

stdout: one JSON line (progress on stderr); --out also writes it. Idle machine only
(wall-clock times). cub200 at batch 64 takes about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.common import log, rounded

PHASES = ("forward", "grad", "wfm_grad", "hvp", "cross", "plain", "source", "real_step", "lookahead", "meta_gradient", "iteration",
          "flops")


def parse_args(argv=None) -> argparse.Namespace:
    from l2t_jax import xla_flags
    from l2t_jax.models.layers import CONV_IMPLS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=None, help="default: the setting's (stl10 128, cub200 64)")
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--hvp", default="mixed", choices=("reverse", "mixed"))
    p.add_argument("--conv_impl", default="auto", choices=CONV_IMPLS)
    p.add_argument("--cpu_scheduler", default="auto", choices=xla_flags.CPU_SCHEDULERS)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare_torch", action="store_true",
                   help='with the "flops" phase: also count the PyTorch twin\'s (benchmarks.torch_reference --flops)')
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = common.setting(args.setting).batch
    if args.batch < 1 or args.T < 1 or args.iters < 1:
        p.error("--batch, --T and --iters must be >= 1")
    args.phase_list = [s for s in args.phases.split(",") if s]
    bad = [s for s in args.phase_list if s not in PHASES]
    if bad or not args.phase_list:
        p.error(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    if args.compare_torch and "flops" not in args.phase_list:
        p.error('--compare_torch counts the twin\'s arithmetic in the "flops" phase: add flops to --phases')
    if args.compare_torch and importlib.util.find_spec("torch") is None:
        p.error("--compare_torch needs torch: pip install torch==2.13.0 (the [dev] extra has it)")
    # what benchmarks.train_step.build reads
    args.remat, args.no_unroll, args.dtype, args.pairs = False, False, "float32", None
    return args


def _timed(name: str, fn, operands: tuple, iters: int) -> dict:
    """Compile `fn` for `operands` ahead of time, then `_time_compiled` it."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*operands).compile()
    return _time_compiled(name, lambda: compiled(*operands), compiled, time.perf_counter() - t0, iters)


def _time_compiled(name: str, call, compiled, compile_s: float, iters: int) -> dict:
    """Warm `call` (which runs `compiled`) up once, time `iters` calls, count its arithmetic."""
    import jax

    jax.block_until_ready(call())
    log(f"{name}: compiled in {compile_s:.1f} s; timing {iters} calls")
    times = common.time_calls(call, iters, jax.block_until_ready)
    return {"s_median": common.median(times), "s_all": [rounded(t) for t in times], "compile_s": rounded(compile_s, 2),
            "gflop": _flops(compiled)}


def _flops(compiled) -> float | None:
    """XLA's cost analysis of the compiled program, GFLOP.

    None where the backend has none, and for a program with a loop: XLA counts a
    loop's body once, whatever its trip count.
    """
    if " while(" in compiled.as_text():
        return None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return rounded(cost["flops"] / 1e9, 3)
    except Exception:  # pragma: no cover - backend without cost analysis
        return None


def phase_functions(cfg, models, state, source_vars, x, y, lr) -> dict:
    """phase name -> (function, operands); each function is pure and returns arrays."""
    import jax
    import jax.numpy as jnp

    from l2t_jax import bilevel, transfer

    target, source = models.target, models.source
    params, bs = state.params, state.batch_stats
    src_logits, src_feats = jax.jit(functools.partial(bilevel.source_outputs, source))(source_vars, x)

    def forward(p, b, xb):
        return bilevel.target_forward(target, p, b, xb)[0]

    def ce(p, meta_out, c):
        b, xb, yb = c
        logits, _, new_b = bilevel.target_forward(target, p, b, xb)
        return transfer.cross_entropy(logits, yb), new_b

    def grad(p, b, xb, yb):
        return jax.grad(lambda q: ce(q, (), (b, xb, yb))[0])(p)

    w, lam = transfer.meta_outputs(state.meta_params, transfer.pool(src_feats), cfg.matching)

    def wfm_grad(p, b, xb, yb, sf, w, lam):
        return jax.grad(lambda q: bilevel.loss_terms(target, q, b, xb, yb, sf, w, lam, cfg.matching).wfm)(p)

    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
    # A stand-in φ' that the loss reads: a scale on the logits, so "cross" has a product to form.
    scale = jnp.ones((), jnp.float32)

    def scaled_ce(p, meta_out, c):
        b, xb, yb = c
        logits, _, new_b = bilevel.target_forward(target, p, b, xb)
        return transfer.cross_entropy(logits * meta_out, yb), new_b

    def hvp(p, s, b, xb, yb, tangent, theta_differentiated):
        def g_dot_v(q, m):
            _, g = bilevel.inner_value_and_grad(scaled_ce, q, m, (b, xb, yb), hvp=cfg.hvp,
                                                theta_differentiated=theta_differentiated)
            return sum(jnp.vdot(gi, ti) for gi, ti in zip(jax.tree.leaves(g), jax.tree.leaves(tangent)))

        return jax.grad(g_dot_v, argnums=(0, 1))(p, s)

    def real_step(st, sf, sl, xb, yb, r):
        params, opt_state, _, metrics = bilevel.real_step(st, xb, yb, r, sf, model=target, cfg=cfg, src_logits=sl)
        return (params, opt_state), metrics["loss"]

    look = functools.partial(bilevel.lookahead_loss, model=target, cfg=cfg)
    meta = functools.partial(bilevel.meta_gradient, model=target, cfg=cfg)
    step = functools.partial(bilevel.train_step, models=models, cfg=cfg)
    return {
        "forward": (forward, (params, bs, x)),
        "grad": (grad, (params, bs, x, y)),
        "wfm_grad": (wfm_grad, (params, bs, x, y, src_feats, w, lam)),
        "hvp": (functools.partial(hvp, theta_differentiated=True), (params, scale, bs, x, y, v)),
        "cross": (functools.partial(hvp, theta_differentiated=False), (params, scale, bs, x, y, v)),
        "source": (functools.partial(bilevel.source_outputs, source), (source_vars, x)),
        "real_step": (real_step, (state, src_feats, src_logits, x, y, lr)),
        "lookahead": (lambda *a: look(*a)[0],
                      (state.meta_params, params, state.opt_state, bs, x, y, src_feats)),
        "meta_gradient": (lambda *a: meta(*a)[:2],
                          (state.meta_params, params, state.opt_state, bs, x, y, src_feats)),
        "iteration": (step, (state, source_vars, x, y, lr)),
    }


def flop_count(args) -> dict:
    """The iteration's and the plain step's GFLOP, both compiled loop-free (see "flops" above)."""
    import copy

    import jax
    import jax.numpy as jnp

    from benchmarks import train_step
    from l2t_jax import bilevel

    class Unrolled(bilevel.BilevelConfig):  # straight-line look-ahead in every mode, for counting only
        @property
        def unrolled(self) -> bool:
            return True

    loop_free = copy.copy(args)
    loop_free.conv_impl = "im2col"
    s, cfg, models, state, source_vars, x, y, target_vars, _ = train_step.build(loop_free)
    cfg = Unrolled(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    step = functools.partial(bilevel.train_step, models=models, cfg=cfg)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, source_vars, x, y, jnp.asarray(0.1, jnp.float32)).compile()
    log(f"flops: the loop-free iteration compiled in {time.perf_counter() - t0:.1f} s")
    iteration = _flops(compiled)
    del compiled
    one_plain, _ = train_step.compiled_plain_step(models.target, jnp.float32, target_vars(), x, y)
    plain = _flops(one_plain.compiled)
    ratio = rounded(iteration / plain, 2) if iteration and plain else None
    out = {"iteration_gflop": iteration, "plain_gflop": plain, "flop_ratio": ratio, "conv_impl": "im2col",
           "unrolled": True}
    if args.compare_torch:
        cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--flops", "--setting", args.setting,
               "--batch", str(args.batch), "--T", str(args.T), "--seed", str(args.seed), "--device", "cpu"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch_reference --flops failed:\n{proc.stderr[-3000:]}")
        theirs = common.parse_last_json(proc.stdout)
        out.update({k: theirs[k] for k in ("torch_iter_gflop", "torch_plain_gflop", "torch_flop_ratio")})
        if iteration:
            # the speed-up over the twin if both ran their arithmetic equally fast
            out["torch_over_ours_iter_gflop"] = rounded(theirs["torch_iter_gflop"] / iteration, 2)
    return out


def run(args) -> dict:
    from l2t_jax import xla_flags

    scheduler = xla_flags.choose_cpu_scheduler(args.hvp, args.cpu_scheduler)  # before JAX starts
    import jax
    import jax.numpy as jnp

    from benchmarks import train_step
    from l2t_jax.models.layers import conv_impl_for

    s, cfg, models, state, source_vars, x, y, target_vars, pairs = train_step.build(args)
    lr = jnp.asarray(0.1, jnp.float32)
    fns = phase_functions(cfg, models, state, source_vars, x, y, lr)
    phases = {}
    flops = None
    for name in args.phase_list:
        if name == "flops":
            flops = flop_count(args)
        elif name == "plain":
            # its state is donated and updated in place by each call, so it is timed as it is
            one_plain, compile_s = train_step.compiled_plain_step(models.target, jnp.float32, target_vars(), x, y)
            phases[name] = _time_compiled(name, one_plain, one_plain.compiled, compile_s, args.iters)
        else:
            fn, operands = fns[name]
            phases[name] = _timed(name, fn, operands, args.iters)
    for unit, key in (("forward", "s_per_forward"), ("plain", "s_per_plain")):
        if unit in phases:
            for rec in phases.values():
                rec[key] = rounded(rec["s_median"] / phases[unit]["s_median"], 2)
    for rec in phases.values():
        rec["s_median"] = rounded(rec["s_median"])
    out = {
        "benchmark": "meta_phases",
        "setting": args.setting, "source": s.source, "target": s.target, "image_size": s.image_size,
        "num_pairs": len(pairs), "batch": args.batch, "T": args.T, "hvp": args.hvp,
        "conv_impl": args.conv_impl, "conv_impl_used": conv_impl_for(args.conv_impl, args.hvp),
        "cpu_scheduler": scheduler, "iters": args.iters, "phases": phases,
    }
    if flops is not None:
        out["flops"] = flops
    if "meta_gradient" in phases and "lookahead" in phases:
        out["meta_backward_s"] = rounded(phases["meta_gradient"]["s_median"] - phases["lookahead"]["s_median"])
    dev = jax.devices()[0]
    out.update(device=f"{dev.platform}:{dev.device_kind}", jax=jax.__version__, **common.host_info())
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out = run(args)
    common.emit(out)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=common._json_default)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
