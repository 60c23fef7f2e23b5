"""Time and memory of one full L2T-ww training iteration, against a plain SGD step.

    python -m benchmarks.train_step --setting stl10|cub200 [--batch B] [--T T] [--iters N]
        [--remat] [--no_unroll] [--hvp reverse|mixed] [--conv_impl auto|xla|im2col] [--dtype float32|bfloat16]
        [--pairs all_to_all|m-n,...] [--no_plain] [--memory_only] [--seed S] [--compilation_cache DIR]
        [--heap release|keep]
        [--compare_torch [--torch_mode adjoint|unroll] [--torch_threads N] [--torch_device D]]

Settings (benchmarks/common.py): stl10 = ResNet32 (200 classes) -> VGG9-bn (10), 32 px,
the 15 all-to-all pairs, batch 128; cub200 = ResNet34 (1000) -> ResNet18 (200), 224 px,
the 16 pairs {1..4}x{1..4}, batch 64; tiny = ResNet8 -> a 3-conv VGG (smoke tests only).

One iteration is one call of `bilevel.make_train_step` (real SGD step on L_total,
T matching steps + one CE step look-ahead, outer CE, exact meta-gradient, Adam on
φ), jitted, its state donated, `block_until_ready`. The plain step is one jitted
SGD step of the target on cross-entropy only, same batch. Random data and random
initialisation at the real model sizes.

--heap: "release" (default) does what `experiments.run` does (`l2t_jax.heap`): the
heap's free memory is returned to the OS after building and after compiling, before
the first execution; "keep" never returns it (plain `jax.jit`, the runner before
that change).

Prints ONE JSON line on stdout (progress on stderr):
  iter_s_median, iter_s_all, plain_step_s_median, ratio_iter_to_plain,
  compile_s (lower + XLA compile of the iteration; lower_s the tracing and lowering
  alone), first_call_s (compile + the
  first, warm-up execution; excluded from the median), plain_compile_s,
  peak_mem_gb (GPU: the device's peak_bytes_in_use; CPU: the highest RSS sampled
  every 5 ms during the timed iterations: runtime + code + arrays + temporaries, and
  with --heap keep what the compiler freed),
  max_rss_gb (CPU: the process's lifetime peak RSS, compilation included),
  baseline_rss_gb (RSS before compiling), rss_after_compile_gb (right after the
  compile, before any release), rss_before_iters_gb (when the timed iterations
  start, after the warm-up call), xla_temp_gb / xla_argument_gb /
  xla_output_gb (XLA's own memory analysis of the compiled iteration). With
  --memory_only: compile_s, lower_s, the xla_* sizes, baseline_rss_gb,
  rss_lowered_gb, rss_after_compile_gb and max_rss_gb (the compiler's peak), xla_flags.
  heap: the --heap setting.
  device, platform, setting, models, pairs, batch, T, remat, conv_impl, dtype,
  iters, iter_user_s_per_call / iter_sys_s_per_call / iter_minor_faults_per_call (CPU
  time and page faults per timed iteration: system time is mostly the kernel faulting in
  and zeroing each execution's fresh buffers, see benchmarks.plain_step's allocators),
  jax / jaxlib / flax versions, host facts (cpus, load average, GLIBC_TUNABLES, THP mode).
With --compare_torch also the PyTorch twin (benchmarks/torch_reference.py, run in
a child process just before the JAX measurement, on the same kind of device): torch_iter_s_median,
torch_plain_step_s_median, torch_peak_mem_gb, ..., and speedup_vs_torch =
torch_iter_s_median / iter_s_median.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import gb, log, rounded

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    from l2t_jax import xla_flags
    from l2t_jax.models.layers import CONV_IMPLS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=None, help="default: the setting's (stl10 128, cub200 64)")
    p.add_argument("--T", type=int, default=2, help="matching steps in the look-ahead (paper: 2)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations after the warm-up call")
    p.add_argument("--remat", action="store_true", help="BilevelConfig(remat=True)")
    p.add_argument("--no_unroll", action="store_true",
                   help="BilevelConfig(unroll=False): the look-ahead steps as a loop (default: unrolled)")
    p.add_argument("--hvp", default="reverse", choices=("reverse", "mixed"),
                   help="BilevelConfig(hvp=...): reverse over reverse, or mixed (forward-over-reverse HVPs)")
    p.add_argument("--conv_impl", default="auto", choices=CONV_IMPLS,
                   help="convolution lowering (l2t_jax.models.layers; auto: im2col on CPU, im2col_loop there in mixed mode)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameters and activations (BN running statistics stay float32)")
    p.add_argument("--pairs", default=None, help="default: the setting's (all_to_all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compilation_cache", default=None,
                   help="persistent XLA compilation cache directory (tests; makes compile_s meaningless)")
    p.add_argument("--heap", default="release", choices=("release", "keep"),
                   help="return the heap's free memory to the OS after building and compiling, as experiments.run "
                        "does (release), or never (keep)")
    p.add_argument("--cpu_scheduler", default="auto", choices=xla_flags.CPU_SCHEDULERS,
                   help="XLA CPU's instruction order, set in XLA_FLAGS before JAX starts (l2t_jax.xla_flags; auto: "
                        "depth-first 'memory' in mixed mode, XLA's breadth-first 'concurrency' otherwise)")
    p.add_argument("--no_plain", action="store_true", help="skip the plain-step measurement")
    p.add_argument("--memory_only", action="store_true",
                   help="compile only and print XLA's memory analysis (no execution, no timing: valid on a busy machine)")
    p.add_argument("--compare_torch", action="store_true", help="also time the PyTorch twin (child process)")
    p.add_argument("--torch_mode", default="adjoint", choices=("adjoint", "unroll"),
                   help="PyTorch meta-gradient: the reference's MetaSGD adjoint, or an unrolled create_graph look-ahead")
    p.add_argument("--torch_device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads in the child (default: untouched)")
    p.add_argument("--torch_timeout", type=float, default=None, help="seconds before the PyTorch child is killed")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = common.setting(args.setting).batch
    if args.batch < 1 or args.T < 1 or args.iters < 1:
        p.error("--batch, --T and --iters must be >= 1")
    return args


def _device_memory_peak(dev) -> int | None:
    try:
        stats = dev.memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def build(args):
    """Models, configuration, state, source variables and batch for `args`."""
    import jax
    import jax.numpy as jnp

    from l2t_jax import bilevel, transfer
    from l2t_jax.models import get_model, model_info
    from l2t_jax.models.layers import conv_impl_for

    s = common.setting(args.setting)
    dtype = jnp.dtype(args.dtype)
    conv_impl = conv_impl_for(args.conv_impl, args.hvp)  # as experiments.run: "auto" is the tap loop in mixed mode on CPU
    target = get_model(s.target, s.target_classes, conv_impl=conv_impl)
    source = get_model(s.source, s.source_classes, conv_impl=conv_impl)
    pairs = transfer.resolve_pairs(args.pairs or s.pairs, s.source, s.target, s.image_size)
    cfg = bilevel.BilevelConfig(matching=transfer.MatchingConfig(pairs=pairs, method="l2t_ww"), T=args.T, remat=args.remat,
                                 unroll=not args.no_unroll, hvp=args.hvp)
    models = bilevel.Models(target, source)
    src_ch, tgt_ch = model_info(s.source).tap_channels, model_info(s.target).tap_channels
    shape = (args.batch, s.image_size, s.image_size, 3)

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    def init_target(key):
        v = target.init(key, jnp.zeros((1,) + shape[1:], jnp.float32), train=False)
        return {"params": cast(v["params"]), "batch_stats": v["batch_stats"]}

    def init_all(key):
        # one jitted program instead of hundreds of eager ops (each compiled on its own)
        kt, ks, kst, kx, ky = jax.random.split(key, 5)
        x = jax.random.normal(kx, shape, jnp.float32)
        y = jax.random.randint(ky, (args.batch,), 0, s.target_classes, jnp.int32)
        sv = source.init(ks, jnp.zeros((1,) + shape[1:], jnp.float32), train=False)
        sv = {"params": sv["params"], "batch_stats": calibrated_stats(sv, x[:16])}
        source_vars = {"params": cast(sv["params"]), "batch_stats": sv["batch_stats"]}
        state = bilevel.create_train_state(
            kst, models, cfg, init_target(kt), source_channels=src_ch, target_channels=tgt_ch
        )
        return state, source_vars, x.astype(dtype), y

    def calibrated_stats(sv, xs):
        # A random source in eval mode with fresh running statistics (0, 1) does not normalise:
        # its activations grow through the residual stages (matching losses ~1e4, a diverging
        # target). Give it the statistics of a batch instead: one training-mode forward moves
        # each running value r to 0.9 r + 0.1 b (layers.BatchNorm, PyTorch momentum 0.1), so
        # b = (r' - 0.9 r) / 0.1.
        _, upd = source.apply(sv, xs, train=True, mutable=["batch_stats"])

        def fix(path, old, new):
            name = getattr(path[-1], "key", None)
            return (new - 0.9 * old) / 0.1 if name in ("mean", "var") else old

        return jax.tree_util.tree_map_with_path(fix, sv["batch_stats"], upd["batch_stats"])

    # "rbg" keys: XLA compiles RngBitGenerator far faster than threefry on CPU (values are irrelevant here)
    key = jax.random.key(args.seed, impl="rbg")
    state, source_vars, x, y = jax.jit(init_all)(key)
    init_target_jit = jax.jit(init_target)

    def target_vars():  # fresh buffers each call (the train state's are donated)
        return init_target_jit(jax.random.split(key, 5)[0])

    return s, cfg, models, state, source_vars, x, y, target_vars, pairs


def make_plain_step(model, dtype):
    """One jitted SGD step of `model` on cross-entropy (PyTorch SGD semantics), state donated."""
    import jax
    import optax

    from l2t_jax import bilevel, transfer

    tx = bilevel.pytorch_sgd(0.1, 0.9, 1e-4, dtype)

    def step(params, batch_stats, opt_state, x, y):
        def loss(p):
            (logits, _), new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
            return transfer.cross_entropy(logits, y), new["batch_stats"]

        (l, bs), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), bs, opt_state, l

    return tx, jax.jit(step, donate_argnums=(0, 1, 2))


def random_target_and_batch(model, s: common.Setting, batch: int, seed: int):
    """(variables, x, y): `model` randomly initialised (params, batch_stats) and a random batch of
    setting `s` (images N(0, 1), labels uniform), all from `seed` in one jitted program."""
    import jax
    import jax.numpy as jnp

    shape = (batch, s.image_size, s.image_size, 3)

    def init(key):
        kx, ky, kp = jax.random.split(key, 3)
        x = jax.random.normal(kx, shape, jnp.float32)
        y = jax.random.randint(ky, (batch,), 0, s.target_classes, jnp.int32)
        v = model.init(kp, jnp.zeros((1,) + shape[1:], jnp.float32), train=False)
        return {"params": v["params"], "batch_stats": v["batch_stats"]}, x, y

    return jax.jit(init)(jax.random.key(seed, impl="rbg"))


def compiled_plain_step(model, dtype, variables, x, y):
    """(call, compile seconds): `call()` runs one plain SGD step from the state it holds, returns the loss.

    The step is `make_plain_step`'s, compiled ahead of time for `variables` (params,
    batch_stats) and the batch (x, y); each call donates and replaces the held state.
    """
    tx, step = make_plain_step(model, dtype)
    state = {"p": variables["params"], "bs": variables["batch_stats"], "opt": tx.init(variables["params"])}
    t0 = time.perf_counter()
    compiled = step.lower(state["p"], state["bs"], state["opt"], x, y).compile()
    compile_s = time.perf_counter() - t0

    def call():
        state["p"], state["bs"], state["opt"], loss = compiled(state["p"], state["bs"], state["opt"], x, y)
        return loss

    call.compiled = compiled  # for XLA's cost and memory analyses
    return call, compile_s


def run_jax(args) -> dict:
    from l2t_jax import xla_flags

    scheduler = xla_flags.choose_cpu_scheduler(args.hvp, args.cpu_scheduler)  # before JAX starts: XLA reads its flags once
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib

    from l2t_jax import bilevel, heap
    from l2t_jax.models.layers import conv_impl_for

    release = heap.release_free_memory if args.heap == "release" else (lambda: False)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.compilation_cache).resolve()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    conv_impl_used = conv_impl_for(args.conv_impl, args.hvp)
    log(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}); setting {args.setting}, batch {args.batch}, "
        f"T {args.T}, remat {args.remat}, conv_impl {args.conv_impl}, dtype {args.dtype}")
    s, cfg, models, state, source_vars, x, y, target_vars, pairs = build(args)
    lr = jnp.asarray(0.1, jnp.float32)
    release()
    baseline_rss = common.current_rss_bytes()

    # --- the full iteration: compile (AOT), warm-up call, timed calls
    step = bilevel.make_train_step(models, cfg)
    t0 = time.perf_counter()
    lowered = step.lower(state, source_vars, x, y, lr)
    lower_s, rss_lowered = time.perf_counter() - t0, common.current_rss_bytes()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    del lowered
    rss_after_compile = common.current_rss_bytes()
    log(f"iteration compiled in {compile_s:.1f} s")
    mem = {}
    try:
        ma = compiled.memory_analysis()
        if ma is not None:
            mem = {
                "xla_temp_gb": gb(ma.temp_size_in_bytes),
                "xla_argument_gb": gb(ma.argument_size_in_bytes),
                "xla_output_gb": gb(ma.output_size_in_bytes),
            }
    except Exception as e:  # pragma: no cover - backend without memory analysis
        log(f"no memory analysis: {e}")
    if args.memory_only:
        return {"benchmark": "train_step", "memory_only": True, "setting": args.setting, "batch": args.batch,
                "T": args.T, "remat": bool(args.remat), "unroll": cfg.unrolled, "hvp": args.hvp,
                "conv_impl": args.conv_impl, "conv_impl_used": conv_impl_used,
                "dtype": args.dtype, "num_pairs": len(pairs),
                "compile_s": rounded(compile_s, 2), "lower_s": rounded(lower_s, 2), **mem,
                "baseline_rss_gb": gb(baseline_rss), "rss_lowered_gb": gb(rss_lowered),
                "rss_after_compile_gb": gb(rss_after_compile), "max_rss_gb": gb(common.max_rss_bytes()),
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "compilation_cache": args.compilation_cache, "heap": args.heap,
                "cpu_scheduler": scheduler,
                "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__}

    release()  # what the compiler freed, before the first execution (heap.compile_then_release)
    holder = {"state": state}
    del state

    def one_iteration():
        holder["state"], holder["metrics"] = compiled(holder["state"], source_vars, x, y, lr)
        return holder["state"], holder["metrics"]

    t0 = time.perf_counter()
    jax.block_until_ready(one_iteration())
    warm_s = time.perf_counter() - t0
    log(f"warm-up iteration {warm_s:.2f} s; timing {args.iters} iterations")
    with common.RssSampler() as sampler, common.CpuUsage() as cpu:
        rss_before_iters = sampler.peak
        times = common.time_calls(one_iteration, args.iters, jax.block_until_ready)
    iter_peak = sampler.peak
    dev_peak = _device_memory_peak(dev)
    life_peak = common.max_rss_bytes()
    last = jax.device_get(holder["metrics"])
    holder.clear()

    out = {
        "benchmark": "train_step",
        "setting": args.setting,
        "source": s.source,
        "target": s.target,
        "image_size": s.image_size,
        "num_pairs": len(pairs),
        "batch": args.batch,
        "T": args.T,
        "remat": bool(args.remat),
        "unroll": cfg.unrolled,
        "hvp": args.hvp,
        "conv_impl": args.conv_impl,
        "conv_impl_used": conv_impl_used,
        "dtype": args.dtype,
        "iters": args.iters,
        "compilation_cache": args.compilation_cache,
        "heap": args.heap,
        "cpu_scheduler": scheduler,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "iter_s_median": rounded(common.median(times)),
        "iter_s_all": [rounded(t) for t in times],
        **cpu.per_call(args.iters, prefix="iter_"),
        # sanity: the last iteration's losses (random data: only finiteness matters)
        "last_outer_loss": rounded(float(last["outer_loss"]), 5),
        "last_loss": rounded(float(last["loss"]), 5),
    }

    # --- the plain step
    if not args.no_plain:
        one_plain, plain_compile_s = compiled_plain_step(models.target, jnp.dtype(args.dtype), target_vars(), x, y)
        jax.block_until_ready(one_plain())
        log(f"plain step compiled in {plain_compile_s:.1f} s; timing {max(args.iters, 3)} plain steps")
        ptimes = common.time_calls(one_plain, max(args.iters, 3), jax.block_until_ready)
        plain_med = common.median(ptimes)
        out.update(
            plain_step_s_median=rounded(plain_med),
            ratio_iter_to_plain=rounded(common.median(times) / plain_med, 2),
            plain_compile_s=rounded(plain_compile_s, 2),
        )
    else:
        out.update(plain_step_s_median=None, ratio_iter_to_plain=None, plain_compile_s=None)

    out.update(
        compile_s=rounded(compile_s, 2),
        lower_s=rounded(lower_s, 2),
        first_call_s=rounded(compile_s + warm_s, 2),
        peak_mem_gb=gb(dev_peak) if (dev_peak is not None and not on_cpu) else gb(iter_peak),
        peak_mem_source="device peak_bytes_in_use" if (dev_peak is not None and not on_cpu) else "sampled process RSS during timed iterations",
        max_rss_gb=gb(life_peak),
        baseline_rss_gb=gb(baseline_rss),
        rss_after_compile_gb=gb(rss_after_compile),
        rss_before_iters_gb=gb(rss_before_iters),
        **mem,
        device=f"{dev.platform}:{dev.device_kind}",
        platform=dev.platform,
        num_devices=jax.device_count(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        flax=flax.__version__,
        **common.host_info(),
    )
    return out


def run_torch_child(args) -> dict:
    """benchmarks.torch_reference with the same setting, in a child process (its own memory)."""
    cmd = [
        sys.executable, "-m", "benchmarks.torch_reference",
        "--setting", args.setting, "--batch", str(args.batch), "--T", str(args.T),
        "--iters", str(args.iters), "--mode", args.torch_mode, "--seed", str(args.seed),
    ]
    if args.pairs:
        cmd += ["--pairs", args.pairs]
    if args.torch_device:
        cmd += ["--device", args.torch_device]
    if args.no_plain:
        cmd += ["--no_plain"]
    if args.torch_threads:
        cmd += ["--threads", str(args.torch_threads)]
    log("PyTorch twin: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, cwd=str(REPO), stdout=subprocess.PIPE, text=True, timeout=args.torch_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"PyTorch benchmark failed (exit {proc.returncode}); its stderr is above")
    return common.parse_last_json(proc.stdout)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t = None
    if args.compare_torch and not args.memory_only:
        # PyTorch first, while this process has not started JAX's backend: on a GPU, JAX
        # reserves most of the memory for its lifetime, which would starve the child.
        if args.dtype != "float32":
            log("note: the PyTorch twin runs in float32")
        t = run_torch_child(args)
    out = run_jax(args)
    if t is not None:
        for k, v in t.items():
            # torch_max_rss_gb is left out: Linux carries this (large) parent's RSS at fork into the child's.
            if k.startswith("torch_") and k != "torch_max_rss_gb":
                out[k] = v
        out["torch_device"] = t.get("device")
        if out["iter_s_median"] and t.get("torch_iter_s_median"):
            out["speedup_vs_torch"] = rounded(t["torch_iter_s_median"] / out["iter_s_median"], 3)
        if out.get("plain_step_s_median") and t.get("torch_plain_step_s_median"):
            out["plain_speedup_vs_torch"] = rounded(t["torch_plain_step_s_median"] / out["plain_step_s_median"], 3)
    common.emit(out)
    return out


if __name__ == "__main__":
    main()
