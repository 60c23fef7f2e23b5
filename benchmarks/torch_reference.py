"""The same L2T-ww training iteration in PyTorch, timed: the baseline of `benchmarks.train_step`.

    python -m benchmarks.torch_reference --setting stl10|cub200 [--batch B] [--T T] [--iters N]
        [--mode adjoint|unroll] [--device cpu|cuda] [--pairs ...] [--no_plain] [--threads N]
    python -m benchmarks.torch_reference --crosscheck --setting tiny|stl10|cub200 --batch 2 --T 2 --iters 2

`--crosscheck` does not time anything: it imports the twin's initial state into
l2t_jax, runs both (float64, CPU) side by side and checks that meta-gradients, φ,
θ and the BN statistics agree (both meta-gradient modes; exit 1 beyond 1e-9), so
the timing comparison is between two programs computing the same iteration.

Written from the reference's algorithm (alinlab/L2T-ww `train_l2t_ww.py` and
`train/meta_optimizers.py`; the order of `l2t_jax.bilevel`'s docstring), not copied:

1. real step: `torch.optim.SGD` (lr 0.1, momentum 0.9, wd 1e-4) on CE + L_wfm;
2. look-ahead: T SGD steps on L_wfm, one on CE, each after a snapshot of
   (θ, BN buffers, momentum buffers);
3. outer CE at θ⁺, backward;
4. meta-gradient:
   * `adjoint` (the reference's MetaSGD.meta_backward, default): walking the
     snapshots backwards, restore the state, re-run the step's objective, take
     its gradient with `create_graph=True` and back-propagate the adjoint
     (θ̄, b̄) through SGD with momentum and weight decay: one Hessian-vector
     product per step, accumulated into φ's `.grad`. The walk ends at θ₁, so
     θ is restored (and BN statistics see a second update, as the reference).
     Snapshots are tensor clones (the reference deep-copies state dicts: the
     same copies). Every parameter takes every SGD step, also one the step's
     loss does not touch: as in the reference's loop, where the real step gives
     every parameter a `.grad` and PyTorch 1.0's `zero_grad` keeps it as a zero
     tensor (here `zero_grad(set_to_none=False)`), it moves by weight decay and
     momentum, and its adjoint goes through that update with a zero
     Hessian-vector product;
   * `unroll`: the look-ahead rebuilt functionally (`torch.func.functional_call`)
     with `create_graph=True` gradients, one backward of the outer loss to φ;
     θ and BN buffers are then restored to θ₁;
5. Adam on φ (lr 1e-4, wd 1e-4).

The source runs in eval mode under `no_grad`, recomputed by every objective call
(as the reference does); the networks are the PyTorch twins in
`tests/torch_reference.py` (NCHW, PyTorch's default initialisation), the
matching branch, weight networks g (zero-initialised) and λ networks h (bias 1)
as the reference builds them. The random source's BN running statistics are set
to one batch's statistics (fresh (0, 1) statistics do not normalise, and the
random source's features would blow up); l2t_jax's benchmark does the same.
`torch.set_num_threads` is left at its default unless --threads is given.

Prints ONE JSON line: torch_iter_s_median, torch_iter_s_all, torch_first_iter_s,
torch_iter_user_s_per_call / torch_iter_sys_s_per_call / torch_iter_minor_faults_per_call,
torch_plain_step_s_median, torch_ratio_iter_to_plain, torch_peak_mem_gb (CUDA:
max_memory_allocated; CPU: RSS sampled during the timed iterations),
torch_max_rss_gb, torch_threads, torch_mode, device, setting, batch, T, ...
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

# This process needs jax only for the model registry and pair resolution: keep it off any GPU
# (JAX would otherwise reserve most of the GPU's memory next to PyTorch).
os.environ["JAX_PLATFORMS"] = "cpu"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import gb, log, rounded  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TWINS = REPO / "tests" / "torch_reference.py"

LR, MOMENTUM, WD = 0.1, 0.9, 1e-4
META_LR, META_WD = 1e-4, 1e-4
BETA = 0.5


def load_twins():
    """The PyTorch twins of the zoo (tests/torch_reference.py), loaded by path."""
    if not TWINS.exists():
        raise SystemExit(f"PyTorch model twins not found: {TWINS}")
    spec = importlib.util.spec_from_file_location("l2t_torch_twins", TWINS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class Student(nn.Module):
    """The target network and its matching branch (θ): forward returns a loss.

    `kind`: "total" (CE + L_wfm), "matching" (L_wfm), "ce" (CE).
    """

    def __init__(self, model: nn.Module, pairs, source_channels, target_channels):
        super().__init__()
        self.model = model
        self.pairs = list(pairs)
        self.branch = nn.ModuleList(nn.Conv2d(target_channels[n], source_channels[m], 1) for m, n in self.pairs)

    def forward(self, x, y, kind, src_feats=None, w=None, lam=None):
        logits, feats = self.model(x)
        if kind == "ce":
            return F.cross_entropy(logits, y)
        loss = 0.0
        for i, (m, n) in enumerate(self.pairs):
            s = src_feats[m]
            t = self.branch[i](feats[n])
            if s.size(3) != t.size(3):
                s = F.interpolate(s, scale_factor=t.size(3) / s.size(3), mode="bilinear", align_corners=False)
            d = (s - t).pow(2).mean(3).mean(2)  # (B, C_s)
            loss = loss + BETA * ((d * w[i]).sum(1) * lam[i].squeeze(1)).mean(0)
        if kind == "matching":
            return loss
        return F.cross_entropy(logits, y) + loss


class Meta(nn.Module):
    """φ: weight networks g (Linear C_s->C_s, zero-init) and λ networks h (Linear C_s->1, bias 1), relu6."""

    def __init__(self, pairs, source_channels):
        super().__init__()
        self.pairs = list(pairs)
        self.w = nn.ModuleList()
        self.lw = nn.ModuleList()
        for m, _ in self.pairs:
            c = source_channels[m]
            g = nn.Linear(c, c)
            nn.init.zeros_(g.weight)
            nn.init.zeros_(g.bias)
            self.w.append(g)
            h = nn.Linear(c, 1)
            nn.init.constant_(h.bias, 1.0)
            self.lw.append(h)

    def forward(self, src_feats):
        pooled = [f.mean((2, 3)) for f in src_feats]
        w = [F.softmax(self.w[i](pooled[m]), 1) for i, (m, _) in enumerate(self.pairs)]
        lam = [F.relu6(self.lw[i](pooled[m])) for i, (m, _) in enumerate(self.pairs)]
        return w, lam


class TorchL2T:
    """Source, student (θ), meta-networks (φ), their optimizers, one batch; `iteration()` is one step."""

    def __init__(self, setting: common.Setting, pairs, batch: int, T: int, device: torch.device, mode: str, seed: int = 0):
        from l2t_jax.models import model_info

        twins = load_twins()
        torch.manual_seed(seed)
        self.T, self.mode, self.device = T, mode, device
        src_ch = model_info(setting.source).tap_channels
        tgt_ch = model_info(setting.target).tap_channels
        self.source = twins.make_torch_model(setting.source, setting.source_classes).to(device)
        for p in self.source.parameters():
            p.requires_grad_(False)
        self.student = Student(twins.make_torch_model(setting.target, setting.target_classes), pairs, src_ch, tgt_ch)
        self.student.to(device).train()
        self.meta = Meta(pairs, src_ch).to(device)
        self.params = list(self.student.parameters())
        self.opt = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.meta_opt = torch.optim.Adam(self.meta.parameters(), lr=META_LR, weight_decay=META_WD)
        g = torch.Generator().manual_seed(seed)
        size = setting.image_size
        self.x = torch.randn(batch, 3, size, size, generator=g).to(device)
        self.y = torch.randint(0, setting.target_classes, (batch,), generator=g).to(device)
        self._calibrate_source()

    @torch.no_grad()
    def _calibrate_source(self):
        """Running statistics of the (random) source := one batch's statistics, then eval mode.

        Fresh statistics (0, 1) do not normalise, and a random ResNet's eval-mode
        activations then grow through its stages (huge matching losses, a diverging
        target). With momentum None, PyTorch's first update sets the batch's statistics.
        """
        bns = [m for m in self.source.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        self.source.train()
        self.source(self.x[:16])
        for m in bns:
            m.momentum = 0.1
        self.source.eval()

    # ------------------------------------------------------------------ objectives

    def objective(self, kind: str, params=None):
        """Loss `kind` at the student's current θ (or at `params` through functional_call)."""
        x, y = self.x, self.y
        sf = w = lam = None
        if kind != "ce":
            with torch.no_grad():
                _, sf = self.source(x)
            w, lam = self.meta(sf)
        if params is None:
            return self.student(x, y, kind, sf, w, lam)
        return torch.func.functional_call(self.student, params, (x, y, kind, sf, w, lam))

    # ------------------------------------------------------------------ state snapshots

    def snapshot(self):
        with torch.no_grad():
            return (
                [p.detach().clone() for p in self.params],
                [b.detach().clone() for b in self.student.buffers()],
                {i: self.opt.state[p]["momentum_buffer"].clone()
                 for i, p in enumerate(self.params)
                 if self.opt.state.get(p, {}).get("momentum_buffer") is not None},
            )

    def restore(self, snap):
        params, buffers, momenta = snap
        with torch.no_grad():
            for p, v in zip(self.params, params):
                p.copy_(v)
            for b, v in zip(self.student.buffers(), buffers):
                b.copy_(v)
            for i, v in momenta.items():
                self.opt.state[self.params[i]]["momentum_buffer"].copy_(v)

    def sgd_step(self, kind: str):
        self.opt.zero_grad(set_to_none=False)  # PyTorch 1.0: grads stay as zero tensors, SGD skips none
        self.objective(kind).backward()
        self.opt.step()

    # ------------------------------------------------------------------ one iteration

    def iteration(self):
        # 1. real step on CE + L_wfm
        self.sgd_step("total")
        if self.mode == "adjoint":
            self._meta_step_adjoint()
        else:
            self._meta_step_unroll()
        self.meta_opt.step()

    def _meta_step_adjoint(self):
        # 2. look-ahead, snapshot before each step
        kinds = ["matching"] * self.T + ["ce"]
        saved = []
        for kind in kinds:
            saved.append(self.snapshot())
            self.sgd_step(kind)
        # 3. outer loss at θ⁺
        self.opt.zero_grad(set_to_none=False)
        self.meta_opt.zero_grad()
        self.objective("ce").backward()
        # 4. adjoint through SGD (θ̄ = a0, momentum-buffer adjoint b̄ = a1), newest step first
        a0 = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        a1 = [torch.zeros_like(p) for p in self.params]
        for snap, kind in zip(reversed(saved), reversed(kinds)):
            self.restore(snap)
            grads = torch.autograd.grad(self.objective(kind), self.params, create_graph=True, allow_unused=True)
            v = [b - LR * a for a, b in zip(a0, a1)]  # ∂L/∂(buf_new) seen through θ_new = θ - lr·buf_new
            dot = sum((g * vi).sum() for g, vi in zip(grads, v) if g is not None)
            self.opt.zero_grad(set_to_none=True)
            dot.backward()  # HVP into θ's .grad, and ∂/∂φ accumulated into φ's .grad
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    # a parameter the step's loss does not touch still took the step (zero gradient):
                    # its adjoint goes through weight decay and momentum with a zero HVP
                    hvp = p.grad if p.grad is not None else 0.0
                    a0[i] = a0[i] + WD * v[i] + hvp
                    a1[i] = MOMENTUM * v[i]
        # the walk ended at θ₁ (restored), with BN statistics updated once more, as the reference

    def _meta_step_unroll(self):
        names = [n for n, _ in self.student.named_parameters()]
        start = self.snapshot()
        params = {n: p.detach().clone().requires_grad_(True) for n, p in zip(names, self.params)}
        bufs = {n: self.opt.state[p]["momentum_buffer"].detach().clone() for n, p in zip(names, self.params)}
        for kind in ["matching"] * self.T + ["ce"]:
            loss = self.objective(kind, params=params)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
            new_params = {}
            for (n, p), g in zip(params.items(), grads):
                # the reference's loop: a parameter the loss does not touch has a zero gradient, not none
                d = (g if g is not None else torch.zeros_like(p)) + WD * p
                bufs[n] = MOMENTUM * bufs[n] + d
                new_params[n] = p - LR * bufs[n]
            params = new_params
        outer = self.objective("ce", params=params)
        self.meta_opt.zero_grad()
        outer.backward(inputs=list(self.meta.parameters()))
        self.restore(start)

    def plain_step_fn(self):
        """One plain SGD step of the target network on CE (its own optimizer)."""
        model = self.student.model
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

        def step():
            opt.zero_grad()
            logits, _ = model(self.x)
            F.cross_entropy(logits, self.y).backward()
            opt.step()

        return step


def crosscheck(setting_name: str, batch: int, T: int, iters: int, pairs_spec=None, tol: float = 1e-9) -> dict:
    """Runs this twin and `l2t_jax.bilevel.train_step` from the same state in float64, side by side.

    The twin's weights, branch and φ are imported into l2t_jax
    (`l2t_jax.io.torch_layout.variables_from_torch` and the layouts of the branch and
    the meta-networks); after each of `iters` iterations the
    meta-gradient norms are compared, and at the end φ and θ. A benchmark of two programs
    that compute the same iteration.
    """
    import numpy as np
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from l2t_jax import bilevel, transfer
    from l2t_jax.io.torch_layout import variables_from_torch, variables_to_torch
    from l2t_jax.models import get_model, model_info

    torch.set_default_dtype(torch.float64)
    s = common.setting(setting_name)
    pairs = transfer.resolve_pairs(pairs_spec or s.pairs, s.source, s.target, s.image_size)
    tb = TorchL2T(s, pairs, batch, T, torch.device("cpu"), "adjoint", seed=0)
    tu = TorchL2T(s, pairs, batch, T, torch.device("cpu"), "unroll", seed=0)  # same seed: same initial state

    def arr(t):
        return np.asarray(t.detach().cpu().numpy(), np.float64)

    def f64(tree):
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)
                            else jnp.asarray(a), tree)

    tv = f64(variables_from_torch(s.target, tb.student.model.state_dict(), s.target_classes))
    sv = f64(variables_from_torch(s.source, tb.source.state_dict(), s.source_classes))
    branch = [{"kernel": jnp.asarray(arr(c.weight)[:, :, 0, 0].T), "bias": jnp.asarray(arr(c.bias))}
              for c in tb.student.branch]
    meta = {k: [{"kernel": jnp.asarray(arr(lin.weight).T), "bias": jnp.asarray(arr(lin.bias))} for lin in mods]
            for k, mods in (("w", tb.meta.w), ("lw", tb.meta.lw))}
    target = get_model(s.target, s.target_classes, conv_impl="xla")
    source = get_model(s.source, s.source_classes, conv_impl="xla")
    cfg = bilevel.BilevelConfig(matching=transfer.MatchingConfig(pairs=pairs, method="l2t_ww"), T=T)
    models = bilevel.Models(target, source)
    state = bilevel.create_train_state(jax.random.key(0), models, cfg, tv,
                                       source_channels=model_info(s.source).tap_channels,
                                       target_channels=model_info(s.target).tap_channels)
    params = {"model": tv["params"], "branch": branch}
    state = state.replace(
        params=params,
        opt_state=bilevel.pytorch_sgd(LR, MOMENTUM, WD, jnp.float64).init(params),
        meta_params=meta,
        meta_opt_state=bilevel.pytorch_adam(META_LR, META_WD).init(meta),
    )
    x = jnp.asarray(arr(tb.x).transpose(0, 2, 3, 1))
    y = jnp.asarray(tb.y.cpu().numpy())
    step = bilevel.make_train_step(models, cfg)
    rel_norm = {"adjoint": [], "unroll": []}
    for _ in range(iters):
        state, m = step(state, sv, x, y, jnp.asarray(LR))
        for twin in (tb, tu):
            twin.sgd_step("total")
            twin._meta_step_adjoint() if twin.mode == "adjoint" else twin._meta_step_unroll()
            norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in twin.meta.parameters())))
            rel_norm[twin.mode].append(abs(float(m["meta_grad_norm"]) - norm) / max(norm, 1e-300))
            twin.meta_opt.step()

    def max_rel(ours, theirs):
        pairs_ = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(ours, theirs)]
        return max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) for a, b in pairs_)

    jax_phi = [np.asarray(lin["kernel"]) for k in ("w", "lw") for lin in state.meta_params[k]]
    jax_theta = variables_to_torch(s.target, {"params": state.params["model"], "batch_stats": state.batch_stats})
    out = {"benchmark": "torch_reference_crosscheck", "setting": setting_name, "batch": batch, "T": T, "iters": iters,
           "dtype": "float64", "tolerance": tol}
    worst = 0.0
    for twin in (tb, tu):
        phi = max_rel(jax_phi, [arr(lin.weight).T for mods in (twin.meta.w, twin.meta.lw) for lin in mods])
        # θ and the BN running statistics (the reference updates them twice per iteration)
        torch_theta = {k: v.detach().cpu().numpy() for k, v in twin.student.model.state_dict().items()}
        keys = [k for k in torch_theta if k in jax_theta]  # counters included (exact integers)
        if twin.mode == "unroll":  # this mode restores the statistics of θ₁ (a single update)
            keys = [k for k in keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        theta = max_rel([np.asarray(jax_theta[k]) for k in keys], [torch_theta[k] for k in keys])
        worst = max(worst, max(rel_norm[twin.mode]), phi, theta)
        out[twin.mode] = {
            "meta_grad_norm_rel_diff": [float(f"{r:.3g}") for r in rel_norm[twin.mode]],
            "phi_max_rel_diff": float(f"{phi:.3g}"),
            "theta_max_rel_diff": float(f"{theta:.3g}"),
        }
    out["max_rel_diff"] = float(f"{worst:.3g}")
    out["ok"] = bool(worst <= tol)
    return out


def count_flops(bench: "TorchL2T") -> dict:
    """GFLOP of one iteration and of one plain step, as torch's FlopCounterMode counts them.

    It counts matrix multiplications and convolutions (forward and backward), not
    elementwise work; XLA's cost analysis (`benchmarks.meta_phases`' "flops") counts both,
    which for these networks adds 2-3 % (a ResNet18 forward at 224 px: 238.8 GFLOP by
    XLA against 2 x 1.82 GMAC x 64 = 233 GFLOP of convolutions and matmuls).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name, fn in (("iter", bench.iteration), ("plain", bench.plain_step_fn())):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts[name] = counter.get_total_flops() / 1e9
    return {"torch_iter_gflop": rounded(counts["iter"], 3), "torch_plain_gflop": rounded(counts["plain"], 3),
            "torch_flop_ratio": rounded(counts["iter"] / counts["plain"], 2)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="stl10", choices=sorted(common.SETTINGS))
    p.add_argument("--batch", type=int, default=None, help="default: the setting's (stl10 128, cub200 64)")
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed iterations after one warm-up iteration")
    p.add_argument("--mode", default="adjoint", choices=("adjoint", "unroll"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--pairs", default=None, help="default: the setting's (all_to_all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_plain", action="store_true")
    p.add_argument("--crosscheck", action="store_true",
                   help="instead of timing: run this twin and l2t_jax's train_step from the same state in "
                        "float64 on CPU and compare meta-gradients, φ and θ (exit 1 beyond 1e-9)")
    p.add_argument("--flops", action="store_true",
                   help="instead of timing: count one iteration's and one plain step's arithmetic "
                        "(torch.utils.flop_counter: matmuls and convolutions, forward and backward)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: left at torch's default; on a shared, "
                        "oversubscribed CPU, OpenMP's spinning threads can make tiny runs 10-50x slower)")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = common.setting(args.setting).batch
    if args.batch < 1 or args.T < 1 or args.iters < 1:
        p.error("--batch, --T and --iters must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from l2t_jax import heap, transfer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crosscheck:
        out = crosscheck(args.setting, args.batch, args.T, args.iters, args.pairs)
        common.emit(out)
        if not out["ok"]:
            sys.exit(1)
        return out
    s = common.setting(args.setting)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the reference
    pairs = transfer.resolve_pairs(args.pairs or s.pairs, s.source, s.target, s.image_size)
    log(f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); setting {args.setting}, "
        f"batch {args.batch}, T {args.T}, mode {args.mode}, {len(pairs)} pairs")
    bench = TorchL2T(s, pairs, args.batch, args.T, device, args.mode, args.seed)
    if args.flops:
        out = count_flops(bench)
        out.update(benchmark="torch_reference", setting=args.setting, batch=args.batch, T=args.T,
                   torch_mode=args.mode, num_pairs=len(pairs), torch=torch.__version__)
        common.emit(out)
        return out
    sync = (lambda r: torch.cuda.synchronize()) if cuda else (lambda r: r)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    baseline = common.current_rss_bytes()
    t0 = time.perf_counter()
    sync(bench.iteration())
    first = time.perf_counter() - t0
    log(f"warm-up iteration {first:.2f} s; timing {args.iters} iterations")
    heap.release_free_memory()  # after the warm-up, as the JAX side releases after compiling
    with common.RssSampler() as sampler, common.CpuUsage() as cpu:
        times = common.time_calls(bench.iteration, args.iters, sync)
    peak = torch.cuda.max_memory_allocated(device) if cuda else sampler.peak
    out = {
        "benchmark": "torch_reference",
        "setting": args.setting,
        "source": s.source,
        "target": s.target,
        "num_pairs": len(pairs),
        "batch": args.batch,
        "T": args.T,
        "iters": args.iters,
        "torch_mode": args.mode,
        "torch_iter_s_median": rounded(common.median(times)),
        "torch_iter_s_all": [rounded(t) for t in times],
        "torch_first_iter_s": rounded(first, 3),
        **cpu.per_call(args.iters, prefix="torch_iter_"),
        "torch_peak_mem_gb": gb(peak),
        "torch_peak_mem_source": "cuda max_memory_allocated" if cuda else "sampled process RSS during timed iterations",
        "torch_baseline_rss_gb": gb(baseline),
    }
    if not args.no_plain:
        plain = bench.plain_step_fn()
        sync(plain())
        ptimes = common.time_calls(plain, max(args.iters, 3), sync)
        out["torch_plain_step_s_median"] = rounded(common.median(ptimes))
        out["torch_ratio_iter_to_plain"] = rounded(common.median(times) / common.median(ptimes), 2)
    else:
        out["torch_plain_step_s_median"] = None
        out["torch_ratio_iter_to_plain"] = None
    out.update(
        # lifetime peak; when spawned by a large process, Linux counts the parent's RSS at fork in it
        torch_max_rss_gb=gb(common.max_rss_bytes()),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=f"cuda:{torch.cuda.get_device_name(device)}" if cuda else "cpu",
        **common.host_info(),
    )
    common.emit(out)
    return out


if __name__ == "__main__":
    main()
