"""Subprocess side of tests/test_parallel.py (not collected by pytest: no test_ prefix).

JAX fixes its device count when it is imported, and the pytest process has already
imported it with one CPU device; so the multi-device checks run here, in a fresh
interpreter whose XLA_FLAGS asks for several host devices, and print one JSON line
(prefix "RESULT ") that the test reads.

Modes:
  devices N OUT                 one process, N CPU devices: single device vs N
                                devices (bn="sync"), bn="local" vs ghost batch norm
                                and vs an explicit per-shard real step.
  process ID NPROC PORT OUT L   one of NPROC processes on 127.0.0.1:PORT with L local
                                CPU devices each: trains STEPS steps (sync and local BN)
                                on the global mesh and writes the final states to OUT (.npz).
  runner N OUT                  one process, N CPU devices: the runner (loop.train) with
                                config.data_parallel "" and "sync" in OUT.
"""

from __future__ import annotations

import dataclasses

import json
import os
import sys

if __name__ == "__main__":  # before jax is imported
    mode = sys.argv[1]
    local = int(sys.argv[2]) if mode in ("devices", "runner") else int(sys.argv[6])
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={local}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from l2t_jax import bilevel, transfer  # noqa: E402
from l2t_jax.models.vgg import VGG  # noqa: E402

F64 = jnp.float64
TARGET = VGG(cfg=(4, "M", 6, "M"), num_classes=3, conv_impl="xla")
SOURCE = VGG(cfg=(3, "M", 5, "M"), num_classes=4, conv_impl="xla")
SRC_CH, TGT_CH = (3, 5), (4, 6)
PAIRS = ((0, 0), (0, 1), (1, 0), (1, 1))
GLOBAL_BATCH = 8
STEPS = 3
LRS = (0.1, 0.05, 0.02)


def _f64(tree):
    return jax.tree.map(lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def setup(T: int = 1):
    """Models, config, a fresh float64 state, source variables and STEPS global batches (numpy)."""
    x0 = jnp.zeros((2, 8, 8, 3), F64)
    tv = _f64(TARGET.init(jax.random.key(1), x0, train=False))
    sv = _f64(SOURCE.init(jax.random.key(2), x0, train=False))
    cfg = bilevel.BilevelConfig(matching=transfer.MatchingConfig(pairs=PAIRS, method="l2t_ww"), T=T)
    models = bilevel.Models(TARGET, SOURCE)
    state = bilevel.create_train_state(jax.random.key(3), models, cfg, tv, source_channels=SRC_CH,
                                       target_channels=TGT_CH)
    # move φ off its zero initialisation so that w is not uniform
    leaves, treedef = jax.tree.flatten(state.meta_params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    phi = jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    state = state.replace(meta_params=phi)
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((GLOBAL_BATCH, 8, 8, 3)), rng.integers(0, 3, GLOBAL_BATCH).astype(np.int32))
               for _ in range(STEPS)]
    return models, cfg, jax.device_get(state), jax.device_get(sv), batches


class GhostBatch:
    """`model` with BN statistics per group of B/`groups` consecutive samples (one device).

    Duck-types the `apply` used by `bilevel` (train=True with mutable batch_stats, or
    eval): the batch is split into `groups` equal groups, the model applied to each
    (vmap, shared parameters and running statistics), outputs concatenated, running
    statistics averaged over groups. This is what bn="local" on `groups` devices
    computes, written without any collective.
    """

    def __init__(self, model, groups: int):
        self.model, self.groups = model, groups

    def apply(self, variables, x, train: bool = False, mutable=False):
        if not train:
            return self.model.apply(variables, x, train=False)
        xs = x.reshape((self.groups, -1) + x.shape[1:])
        one = lambda xg: self.model.apply(variables, xg, train=True, mutable=["batch_stats"])  # noqa: E731
        (logits, feats), new_vars = jax.vmap(one)(xs)
        merge = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
        stats = jax.tree.map(lambda a: a.mean(0) if jnp.issubdtype(a.dtype, jnp.floating) else a[0],
                             new_vars["batch_stats"])
        return (merge(logits), [merge(f) for f in feats]), {"batch_stats": stats}


def run(step_fn, state, sv, batches):
    """STEPS steps; returns (final state on the host, metrics of each step)."""
    history = []
    for (x, y), lr in zip(batches, LRS):
        state, metrics = step_fn(state, sv, x, y, lr)
        history.append(metrics)
    from l2t_jax import parallel

    return parallel.fetch_replicated(state), [parallel.fetch_replicated(m) for m in history]


def comparable(state) -> dict:
    """The parts of a state that must agree: θ, BN statistics, momentum, φ, Adam's state."""
    return {"params": state.params, "batch_stats": state.batch_stats,
            "momentum": bilevel.momentum_buffers(state.opt_state),
            "meta_params": state.meta_params, "meta_opt_state": state.meta_opt_state}


def rel_err(a, b, floor: float = 1e-3) -> float:
    """Largest leaf-wise max|a - b| / max(max|b|, floor · max over the tree of |b|).

    The floor keeps leaves that are zero up to rounding (conv biases before BN get a
    zero gradient up to rounding) from dividing noise by noise.
    """
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), (len(la), len(lb))
    la = [np.asarray(u, np.float64) for u in la]
    lb = [np.asarray(v, np.float64) for v in lb]
    big = max([float(np.max(np.abs(v))) for v in lb if v.size] + [1e-300])
    worst = 0.0
    for u, v in zip(la, lb):
        assert u.shape == v.shape, (u.shape, v.shape)
        if v.size:
            worst = max(worst, float(np.max(np.abs(u - v))) / max(float(np.max(np.abs(v))), floor * big))
    return worst


def state_err(a, b) -> float:
    """`rel_err` of each part of `comparable` (each part its own scale); the largest."""
    ca, cb = (x if isinstance(x, dict) and "params" in x and "momentum" in x else comparable(x) for x in (a, b))
    return max(rel_err(ca[k], cb[k]) for k in cb)


def flat(tree, prefix="") -> dict:
    """{path: numpy array} for np.savez."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def replicas_identical(state) -> bool:
    """Every device's copy of every leaf is bitwise the same."""
    for leaf in jax.tree.leaves(state):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        if any(not np.array_equal(shards[0], s) for s in shards[1:]):
            return False
    return True


# --------------------------------------------------------------------------- modes


def devices_mode(n: int, out: str) -> dict:
    """One process, n devices. Writes the reference end states (plain step, ghost BN) to `out`."""
    from l2t_jax import parallel

    assert jax.device_count() == n, jax.devices()
    models, cfg, state0, sv, batches = setup()
    res: dict = {"device_count": jax.device_count()}
    mesh = parallel.make_mesh()
    assert mesh.size == n

    # one device: the plain `bilevel.make_train_step`
    ref, ref_metrics = run(bilevel.make_train_step(models, cfg, donate=False), state0, sv, batches)

    # bn="sync" on n devices == one device
    sync_step = parallel.make_parallel_train_step(models, cfg, mesh, bn="sync")
    sn, sn_metrics = run(sync_step, state0, sv, batches)
    res["sync_vs_one_device"] = state_err(sn, ref)
    res["sync_metrics_vs_one_device"] = max(rel_err(a, b) for a, b in zip(sn_metrics, ref_metrics))
    res["sync_num_batches_tracked"] = int(sn.batch_stats["bn0"]["num_batches_tracked"])
    # the mixed-mode meta-gradient (a custom VJP) under shard_map: the same iteration
    mixed = parallel.make_parallel_train_step(models, dataclasses.replace(cfg, hvp="mixed"), mesh, bn="sync")
    mn, _ = run(mixed, state0, sv, batches)
    res["sync_mixed_hvp_vs_one_device"] = state_err(mn, ref)

    # bn="local" on n devices == ghost batch norm over n groups on one device
    local_step = parallel.make_parallel_train_step(models, cfg, mesh, bn="local")
    ln, ln_metrics = run(local_step, state0, sv, batches)
    ghost = bilevel.make_train_step(bilevel.Models(GhostBatch(TARGET, n), SOURCE), cfg, donate=False)
    gh, gh_metrics = run(ghost, state0, sv, batches)
    res["local_vs_ghost"] = state_err(ln, gh)
    res["local_metrics_vs_ghost"] = max(rel_err(a, b) for a, b in zip(ln_metrics, gh_metrics))
    res["local_vs_sync"] = state_err(ln, sn)  # must NOT be small: the two modes differ
    res["local_num_batches_tracked"] = int(ln.batch_stats["bn0"]["num_batches_tracked"])

    # every device holds bitwise the same state after a step (compiled functions reused)
    x, y = parallel.shard_batch(mesh, *batches[0])
    svr, lr = parallel.replicate(mesh, sv), parallel.replicate(mesh, 0.1)
    out_sync, _ = sync_step.jitted(parallel.replicate(mesh, state0), svr, x, y, lr)
    out_local, _ = local_step.jitted(parallel.replicate(mesh, state0), svr, x, y, lr)
    res["sync_replicas_identical"] = replicas_identical(out_sync)
    res["local_replicas_identical"] = replicas_identical(out_local)

    # bn="local", the real step written out: θ₁ = SGD(mean over shards of each shard's ∇L_total)
    @jax.jit
    def per_shard_real_step(s0, xb, yb):
        mcfg, b = cfg.matching, xb.shape[0] // n
        grads = []
        for i in range(n):
            xs, ys = xb[i * b:(i + 1) * b], yb[i * b:(i + 1) * b]
            feats = bilevel.source_features(SOURCE, sv, xs)
            w, lam = transfer.meta_outputs(s0.meta_params, transfer.pool(feats), mcfg)

            def total(q):
                t = bilevel.loss_terms(TARGET, q, s0.batch_stats, xs, ys, feats, w, lam, mcfg)
                return t.ce + t.wfm

            grads.append(jax.grad(total)(s0.params))
        mean_grad = jax.tree.map(lambda *g: sum(g) / n, *grads)
        opt = bilevel.with_learning_rate(s0.opt_state, 0.1)
        return bilevel.sgd_apply(bilevel.pytorch_sgd(0.1, cfg.momentum, cfg.weight_decay, F64), s0.params, opt,
                                 mean_grad)

    theta1, opt1 = per_shard_real_step(state0, *batches[0])
    got_local, got_sync = parallel.fetch_replicated(out_local), parallel.fetch_replicated(out_sync)
    res["local_real_step_vs_per_shard_mean"] = max(
        rel_err(got_local.params, theta1),
        rel_err(bilevel.momentum_buffers(got_local.opt_state), bilevel.momentum_buffers(opt1)))
    res["sync_real_step_vs_per_shard_mean"] = rel_err(got_sync.params, theta1)  # must NOT be small

    # errors
    try:
        sync_step(state0, sv, batches[0][0][:n + 2], batches[0][1][:n + 2], 0.1)
        res["indivisible_error"] = None
    except ValueError as e:
        res["indivisible_error"] = str(e)

    np.savez(out, **flat(comparable(ref), "plain"), **flat(comparable(gh), "ghost"),
             **flat(ref_metrics[-1], "plain_metrics"), **flat(gh_metrics[-1], "ghost_metrics"))
    return res


def process_mode(pid: int, nproc: int, port: int, out: str, local: int) -> dict:
    """Process `pid` of `nproc` on 127.0.0.1:`port`; writes its end states (both BN modes) to `out`."""
    from l2t_jax import parallel

    ok = parallel.initialize_distributed(
        f"127.0.0.1:{port}", nproc, pid, coordinator_bind_address=f"127.0.0.1:{port}",
        cpu_collectives="gloo", cpu_collectives_host="127.0.0.1", initialization_timeout=60,
    )
    assert ok and jax.process_count() == nproc and jax.local_device_count() == local
    mesh = parallel.make_mesh()
    models, cfg, state0, sv, batches = setup()
    arrays = {}
    for bn in ("sync", "local"):
        step = parallel.make_parallel_train_step(models, cfg, mesh, bn=bn)
        state = parallel.replicate(mesh, state0)
        svr = parallel.replicate(mesh, sv)
        for i, ((x, y), lr) in enumerate(zip(batches, LRS)):
            if i % 2:  # feed this process's rows only; otherwise the whole global batch
                rows = parallel.process_rows(mesh, x.shape[0])
                xs, ys = parallel.shard_batch(mesh, x[rows], y[rows], process_local=True)
            else:
                xs, ys = parallel.shard_batch(mesh, x, y)
            state, metrics = step(state, svr, xs, ys, lr)
        arrays.update(flat(comparable(parallel.fetch_replicated(state)), bn))
        arrays.update(flat(parallel.fetch_replicated(metrics), bn + "_metrics"))
    np.savez(out, **arrays)
    return {"process": pid, "process_count": jax.process_count(), "global_devices": jax.device_count(),
            "local_devices": jax.local_device_count()}


def runner_mode(out: str) -> dict:
    """The runner (`loop.train`, L2T-ww on 8 px digits) with config.data_parallel "" (one
    device) and "sync" (every device): the logged training metrics of every step, and
    the ConfigError of a batch that does not divide among the devices."""
    import pathlib

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import tiny_config, write_digits_npz
    from l2t_jax import loop, run_config
    from l2t_jax.io.msgpack import save_variables
    from l2t_jax.models import get_model, init_model

    root = pathlib.Path(out)
    root.mkdir(parents=True, exist_ok=True)
    npz = write_digits_npz(root / "digits.npz", 4)
    src = root / "source.msgpack"
    save_variables(src, jax.device_get(init_model(get_model("vgg_tiny", 7), jax.random.key(7), 8)))
    result = {"devices": jax.device_count()}
    for dp in ("", "sync"):
        c = tiny_config(f"npz:{npz}", method="l2t_ww", source_weights=str(src), pairs="1-1,2-2", T=1,
                        log_every=1, eval_batch_size=32, data_parallel=dp)
        seen = []  # the devices the runner's step function spans (`parallel` sets num_devices)
        summary = loop.train(c, root / f"run_{dp or 'single'}",
                             step_fn_wrapper=lambda f: seen.append(getattr(f, "num_devices", 1)) or f)
        lines = [json.loads(line) for line in (root / f"run_{dp or 'single'}" / "metrics.jsonl").read_text().splitlines()]
        result[dp or "single"] = {
            "train": [{k: line[k] for k in ("step", "loss", "ce", "wfm", "outer_loss")} for line in lines
                      if line["kind"] == "train"],
            "last_test_acc": summary["last_test_acc"],
            "step_devices": seen,
        }
    try:
        loop.train(tiny_config(f"npz:{npz}", batch_size=6, data_parallel="sync"), root / "run_bad")
        result["error"] = None
    except run_config.ConfigError as e:
        result["error"] = str(e)
    return result


if __name__ == "__main__":
    if mode != "runner":
        jax.config.update("jax_enable_x64", True)
    if os.environ.get("L2T_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["L2T_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if mode == "devices":
        result = devices_mode(int(sys.argv[2]), sys.argv[3])
    elif mode == "runner":
        result = runner_mode(sys.argv[3])
    elif mode == "process":
        result = process_mode(*(int(a) for a in sys.argv[2:4]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("RESULT " + json.dumps(result), flush=True)
    if mode == "process":
        jax.distributed.shutdown()
