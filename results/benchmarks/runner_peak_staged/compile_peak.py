"""Compile only: the peak RSS while compiling the stl10 iteration as one program ("fused") or as two
(source + real step, then the meta step: "staged", `bilevel.make_staged_train_step`'s split), each in a fresh process.

    PYTHONPATH=. python results/benchmarks/runner_peak_staged/compile_peak.py fused|staged BATCH [mixed|reverse]

One JSON line: base_gb (RSS after building, heap released, high-water mark reset), peak_gb (the
high-water mark after compiling), temp_gb (XLA temporaries per program). Run on 429dcc2 (it calls
`bilevel.real_step` and `bilevel.meta_step`); outputs in compile_peak.jsonl. RSS does not depend on load.
"""
import sys, functools, json, time
mode, batch = sys.argv[1], sys.argv[2]
hvp = sys.argv[3] if len(sys.argv) > 3 else "mixed"
from l2t_jax import xla_flags
xla_flags.choose_cpu_scheduler(hvp, "auto")
import jax, jax.numpy as jnp
from benchmarks import meta_phases, train_step
from l2t_jax import bilevel, heap
args = meta_phases.parse_args(["--setting", "stl10", "--hvp", hvp, "--batch", batch])
s, cfg, models, state, sv, x, y, _, _ = train_step.build(args)
lr = jnp.asarray(0.1, jnp.float32)
def rss(): return open("/proc/self/status").read().split("VmRSS:")[1].split()[0]
def hwm(): return open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
heap.release_free_memory()
# reset the high-water mark so only what follows counts
open("/proc/self/clear_refs", "w").write("5")
base = int(rss())
out = {"hvp": hvp, "mode": mode, "batch": int(batch), "base_gb": base / 1e6}
t0 = time.perf_counter()
if mode == "fused":
    c = jax.jit(functools.partial(bilevel.train_step, models=models, cfg=cfg)).lower(state, sv, x, y, lr).compile()
    out["temp_gb"] = c.memory_analysis().temp_size_in_bytes / 1e9
else:
    def first(state, sv, x, y, lr):
        sl, sf = bilevel.source_outputs(models.source, sv, x)
        return bilevel.real_step(state, x, y, lr, sf, model=models.target, cfg=cfg, src_logits=sl), sf
    c1 = jax.jit(first).lower(state, sv, x, y, lr).compile()
    (p, o, bs, m), sf = jax.eval_shape(first, state, sv, x, y, lr)
    out["real_peak_gb"] = int(hwm()) / 1e6
    heap.release_free_memory()
    meta = functools.partial(bilevel.meta_step, model=models.target, cfg=cfg)
    c2 = jax.jit(meta).lower(state.meta_params, state.meta_opt_state, p, o, bs, x, y, sf).compile()
    out["temp_gb"] = [c1.memory_analysis().temp_size_in_bytes / 1e9, c2.memory_analysis().temp_size_in_bytes / 1e9]
out["compile_s"] = time.perf_counter() - t0
out["peak_gb"] = int(hwm()) / 1e6
out["after_gb"] = int(rss()) / 1e6
print(json.dumps(out))
