"""One jitted iteration against the same work as three jitted programs (source, real step, meta step), taken in turn.

    PYTHONPATH=. python results/benchmarks/meta_phases/staged_vs_fused.py stl10 mixed 128 \
        > results/benchmarks/meta_phases/staged_vs_fused_stl10_b128_T2_mixed.json

A one-off experiment (results/benchmarks/README.md, "How much arithmetic an iteration does");
arguments: setting, hvp mode, batch. Prints per round: first call (compile) and the median of
3 timed calls, with CPU time and page faults per call.
"""
import sys, time, functools, json
from l2t_jax import xla_flags
hvp = sys.argv[2] if len(sys.argv) > 2 else "mixed"
xla_flags.choose_cpu_scheduler(hvp, "auto")
import jax, jax.numpy as jnp
from benchmarks import meta_phases, train_step, common
from l2t_jax import bilevel
setting, batch = sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 else None
args = meta_phases.parse_args(["--setting", setting, "--hvp", hvp] + (["--batch", str(batch)] if batch else []))
s, cfg, models, state, source_vars, x, y, _, _ = train_step.build(args)
lr = jnp.asarray(0.1, jnp.float32)
fused = jax.jit(functools.partial(bilevel.train_step, models=models, cfg=cfg))
src_fn = jax.jit(functools.partial(bilevel.source_outputs, models.source))

def real(state, src_logits, src_feats, x, y, lr):
    params, opt_state, batch_stats, metrics = bilevel.real_step(state, x, y, lr, src_feats, model=models.target,
                                                                cfg=cfg, src_logits=src_logits)
    return params, opt_state, batch_stats, metrics["loss"]

def meta(state, params, opt_state, batch_stats, x, y, src_feats):
    phi, mos, aux, metrics = bilevel.meta_step(state.meta_params, state.meta_opt_state, params, opt_state, batch_stats,
                                               x, y, src_feats, model=models.target, cfg=cfg)
    return phi, mos, aux.batch_stats, metrics["outer_loss"]

real_j, meta_j = jax.jit(real), jax.jit(meta)
def staged():
    sl, sf = src_fn(source_vars, x)
    p, o, bs, loss = real_j(state, sl, sf, x, y, lr)
    return meta_j(state, p, o, bs, x, y, sf)
def fused_call():
    return fused(state, source_vars, x, y, lr)
res = {}
for name, fn in (("staged", staged), ("fused", fused_call), ("staged2", staged), ("fused2", fused_call)):
    t0 = time.perf_counter(); jax.block_until_ready(fn()); c = time.perf_counter() - t0
    with common.CpuUsage() as cpu:
        ts = common.time_calls(fn, 3, jax.block_until_ready)
    res[name] = dict(first=round(c, 2), med=round(common.median(ts), 3), **cpu.per_call(3))
print(json.dumps(res))
