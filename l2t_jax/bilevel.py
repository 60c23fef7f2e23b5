"""The bilevel scheme: PyTorch-exact SGD, the unrolled look-ahead, the meta-gradient, `train_step`.

One training iteration (`train_step`), in the reference's order (alinlab/L2T-ww `train_l2t_ww.py`):

1. real step (`real_step`): one SGD step on L_total = L_org + L_wfm at θ -> θ₁ (BN in training
   mode; the source in eval mode, as a constant);
2. meta step (`meta_step`) from θ₁: T SGD steps on L_wfm, one SGD step on L_org, the outer loss
   L_org(θ⁺) on the same batch, and its gradient with respect to φ *through the
   unroll* (`jax.grad` of `lookahead_loss`: momentum, weight decay, BN batch
   statistics and every Hessian-vector product included); one Adam step on φ;
   the look-ahead is discarded (θ stays θ₁). Every leaf of θ takes every SGD step
   of the look-ahead, also one the step's loss does not touch (the classifier in a
   matching-only step, the matching convs in the cross-entropy step): its gradient
   is zero, so weight decay and its momentum buffer move it. That is the
   reference's training loop, where the real step gives every parameter a `.grad`
   and PyTorch 1.0's `zero_grad` keeps it as a zero tensor;
3. BN running statistics: updated by the real step's forward and, by default, a
   second time by a training-mode forward at θ₁ (the first look-ahead forward),
   as the reference does.

θ is the pytree {"model": target params, "branch": matching 1x1 convs}; φ is
`transfer.init_meta_params(...)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from l2t_jax import transfer
from l2t_jax.transfer import MatchingConfig

Array = jax.Array
PyTree = Any

SCHEMES = ("proposed", "original", "first_order")
BN_UPDATES = ("reference", "single")
HVP_MODES = ("reverse", "mixed")


# --------------------------------------------------------------------------- SGD with PyTorch semantics


def _sgd_chain(learning_rate: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(weight_decay),  # g <- g + wd * θ
        optax.trace(decay=momentum, nesterov=False),  # buf <- momentum * buf + g (buf starts at 0: buf = g first)
        optax.scale_by_learning_rate(learning_rate),  # θ <- θ - lr * buf
    )


def pytorch_sgd(
    learning_rate: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, dtype: Any = jnp.float32
) -> optax.GradientTransformation:
    """`torch.optim.SGD(lr, momentum, weight_decay)` (no dampening, no Nesterov) as an optax chain.

    g <- ∇ + wd·θ; buf <- momentum·buf + g (the zero-initialised buffer makes the
    first step buf = g, as PyTorch); θ <- θ - lr·buf. The hyperparameters are
    injected (`optax.inject_hyperparams`), so the learning rate can change every
    step without recompiling (`with_learning_rate`).
    """
    return optax.inject_hyperparams(_sgd_chain, hyperparam_dtype=dtype)(
        learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay
    )


def with_learning_rate(opt_state: optax.InjectHyperparamsState, lr: Array | float) -> optax.InjectHyperparamsState:
    """`opt_state` with its injected learning rate replaced by `lr`."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, hp["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hp)


def momentum_buffers(opt_state: optax.InjectHyperparamsState) -> PyTree:
    """The momentum buffers (a pytree like θ) of a `pytorch_sgd` state."""
    return opt_state.inner_state[1].trace


def with_momentum_buffers(opt_state: optax.InjectHyperparamsState, buffers: PyTree) -> optax.InjectHyperparamsState:
    """`opt_state` with its momentum buffers replaced (e.g. imported from a PyTorch run)."""
    inner = list(opt_state.inner_state)
    inner[1] = inner[1]._replace(trace=buffers)
    return opt_state._replace(inner_state=tuple(inner))


def sgd_apply(
    tx: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    grads: PyTree,
) -> tuple[PyTree, PyTree]:
    """One SGD step on every leaf: returns (new params, new optimizer state).

    Every leaf takes the step, also one whose gradient is zero because the loss does
    not touch it (the classifier during a matching-only step): weight decay and its
    momentum buffer still move it. This is the reference's training loop, where
    every parameter has a `.grad` after the real step and PyTorch 1.0's `zero_grad`
    keeps it as a zero tensor, so SGD never skips one.
    """
    updates, new_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state


def device_mean(x: Any, axis_name: Optional[str] = None) -> Any:
    """`lax.pmean(x, axis_name)` (every leaf), or `x` itself when `axis_name` is None.

    Inside `jax.shard_map` a per-device batch mean followed by this is the global
    batch mean (equal shards), and `jax.grad` of it with respect to a replicated
    (device-invariant) θ is the mean of the per-device gradients, still replicated.
    """
    return x if axis_name is None else lax.pmean(x, axis_name)


def pytorch_adam(learning_rate: float = 1e-4, weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """`torch.optim.Adam(lr, weight_decay)`: L2 decay added to the gradient, then Adam (eps 1e-8)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8))


# --------------------------------------------------------------------------- configuration and state


@dataclasses.dataclass(frozen=True)
class BilevelConfig:
    """Static configuration of a training step (hashable).

    Attributes:
      matching: pairs, method, β, λ type, meta kind.
      T: matching steps in the look-ahead (the paper: 2).
      scheme: "proposed" (T steps on L_wfm, one step on L_org, outer L_org);
        "original" (Appendix C.2: T steps on L_total, outer L_org, no adaptation step);
        "first_order" (as proposed, second-order terms dropped: inner gradients are
        taken at stop_gradient(θ)).
      momentum, weight_decay: the target's SGD.
      meta_lr, meta_weight_decay: Adam on φ.
      bn_updates: "reference" (running statistics updated twice per iteration, as the
        reference) or "single" (only by the real step).
      remat: rematerialise each look-ahead step in the backward pass (less memory).
      unroll: trace the T look-ahead steps as straight-line code instead of a
        `lax.scan` loop (only when remat is off and hvp is "reverse"): XLA then
        keeps no stacked per-step buffers and can schedule across steps (faster and
        smaller; the README's "Speed and memory" has the measurements). With remat
        or hvp="mixed" the steps stay a loop: both recompute a step's forward in the
        backward pass, and in straight-line code XLA's CPU compiler (which drops
        optimization barriers before scheduling) merges that recomputation with the
        forward and keeps every step's activations, undoing the saving. Compile
        time grows with T.
      hvp: how the meta-gradient differentiates each step's inner gradient
        (`inner_value_and_grad`): "reverse" (reverse over reverse) or "mixed" (a
        custom VJP computing forward-over-reverse Hessian-vector products, which
        keeps no inner backward residuals, so the look-ahead's memory does not grow
        with T). Equal up to rounding.
      lwf_weight: > 0 adds LwF's distillation term (that weight) through an extra head
        θ["lwf_head"] predicting the source's classes (0: off).
      lwf_temperature: LwF's softmax temperature τ.
      at_pairs: (source_tap, target_tap) pairs of attention transfer (AT; empty: off).
      at_beta: AT's β (the term is β/2 · Σ_pairs mean (Q_s - Q_t)²).

    AT and LwF are baselines: their terms join L_total (the real step, and the
    look-ahead of the "original" scheme), never the matching-only look-ahead steps.
    """

    matching: MatchingConfig = dataclasses.field(default_factory=lambda: MatchingConfig(method="scratch"))
    T: int = 2
    scheme: str = "proposed"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    meta_lr: float = 1e-4
    meta_weight_decay: float = 1e-4
    bn_updates: str = "reference"
    remat: bool = False
    unroll: bool = True
    hvp: str = "reverse"
    lwf_weight: float = 0.0
    lwf_temperature: float = 2.0
    at_pairs: tuple[tuple[int, int], ...] = ()
    at_beta: float = 1000.0

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; expected one of {SCHEMES}")
        if self.hvp not in HVP_MODES:
            raise ValueError(f"unknown hvp {self.hvp!r}; expected one of {HVP_MODES}")
        if self.bn_updates not in BN_UPDATES:
            raise ValueError(f"unknown bn_updates {self.bn_updates!r}; expected one of {BN_UPDATES}")
        if self.T < 1:
            raise ValueError(f"T must be >= 1, got {self.T}")
        if self.lwf_weight < 0 or self.lwf_temperature <= 0 or self.at_beta < 0:
            raise ValueError("lwf_weight and at_beta must be >= 0 and lwf_temperature > 0")

    @property
    def unrolled(self) -> bool:
        """Whether the look-ahead steps are traced without a loop (`unroll`, remat off, hvp "reverse")."""
        return self.unroll and not self.remat and self.hvp == "reverse"

    @property
    def uses_source(self) -> bool:
        """Whether a step needs the source network's outputs."""
        return bool(self.matching.pairs) or self.lwf_weight > 0 or bool(self.at_pairs)

    @property
    def has_meta_step(self) -> bool:
        return self.matching.has_meta_params


@struct.dataclass
class TrainState:
    """Everything one iteration reads and writes.

    Attributes:
      step: iterations done (int32 scalar).
      params: θ = {"model": target params, "branch": list of 1x1 convs}.
      batch_stats: the target's BN running statistics.
      opt_state: `pytorch_sgd` state of θ (momentum buffers, injected lr).
      meta_params: φ (may be {}).
      meta_opt_state: Adam state of φ.
    """

    step: Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    meta_params: PyTree
    meta_opt_state: PyTree


class Models(NamedTuple):
    """The networks (static Flax modules).

    `source` is one module, or a tuple of modules for multi-source transfer (then
    `source_variables` is a tuple of their variables, and the source taps are the
    sources' taps concatenated in order: pair indices count across all of them).
    """

    target: nn.Module
    source: Optional[nn.Module | tuple[nn.Module, ...]]


def create_train_state(
    key: Array,
    models: Models,
    cfg: BilevelConfig,
    target_variables: PyTree,
    *,
    source_channels: tuple[int, ...],
    target_channels: tuple[int, ...],
    learning_rate: float = 0.1,
    lambda_init: Optional[float] = 1.0,
    lwf_classes: int = 0,
) -> TrainState:
    """A fresh state: given target variables, a new branch and φ, zero momentum, fresh Adam.

    Args:
      source_channels / target_channels: channels of every source / target tap.
      lwf_classes: the source's number of classes (needed when `cfg.lwf_weight` > 0:
        θ then holds "lwf_head", Linear(target_channels[-1] -> lwf_classes)).
    """
    kb, km = jax.random.split(key)
    m = cfg.matching
    dtype = jax.tree.leaves(target_variables["params"])[0].dtype
    branch = transfer.init_branch(kb, m.pairs, source_channels, target_channels, dtype)
    params = {"model": target_variables["params"], "branch": branch}
    if cfg.lwf_weight > 0:
        if lwf_classes < 1:
            raise ValueError("LwF (cfg.lwf_weight > 0) needs lwf_classes, the source's number of classes")
        params["lwf_head"] = transfer.init_lwf_head(jax.random.fold_in(key, 2), target_channels[-1], lwf_classes, dtype)
    meta = transfer.init_meta_params(
        km, m.pairs, source_channels, method=m.method, lambda_type=m.lambda_type,
        lambda_init=lambda_init, meta_kind=m.meta_kind, dtype=dtype,
    )
    tx = pytorch_sgd(learning_rate, cfg.momentum, cfg.weight_decay, dtype)
    meta_tx = pytorch_adam(cfg.meta_lr, cfg.meta_weight_decay)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=target_variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        meta_params=meta,
        meta_opt_state=meta_tx.init(meta),
    )


# --------------------------------------------------------------------------- forward passes and losses


def source_outputs(model, variables: PyTree, x: Array) -> tuple[Array, list[Array]]:
    """The source's logits and taps in eval mode, as constants.

    Args:
      model: a Flax module, or a tuple of modules (multi-source; `variables` then a
        tuple too): the taps are concatenated in order, the logits are the first source's.
      x: (B, H, W, 3).
    Returns:
      (logits (B, K_source), list of (B, H_i, W_i, C_i)).
    """
    if isinstance(model, (tuple, list)):
        outs = [source_outputs(m, v, x) for m, v in zip(model, variables)]
        return outs[0][0], [f for _, feats in outs for f in feats]
    logits, feats = model.apply(variables, x, train=False)
    return lax.stop_gradient(logits), [lax.stop_gradient(f) for f in feats]


def source_features(model, variables: PyTree, x: Array) -> list[Array]:
    """The source's taps in eval mode, as constants. x: (B, H, W, 3) -> list of (B, H_i, W_i, C_i)."""
    return source_outputs(model, variables, x)[1]


def target_forward(model: nn.Module, params: PyTree, batch_stats: PyTree, x: Array) -> tuple[Array, list[Array], PyTree]:
    """Training-mode forward: (logits (B, K), taps, updated batch_stats)."""
    (logits, feats), new_vars = model.apply(
        {"params": params["model"], "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return logits, feats, new_vars["batch_stats"]


class LossTerms(NamedTuple):
    """Terms of one forward: CE, L_wfm, per-pair L_wfm (P,), logits, updated BN statistics,
    and the baselines' terms (AT, weighted LwF distillation; 0 when off)."""

    ce: Array
    wfm: Array
    per_pair: Array
    logits: Array
    batch_stats: PyTree
    at: Any = 0.0
    lwf: Any = 0.0

    @property
    def total(self) -> Array:
        """L_total = CE + L_wfm + AT + LwF."""
        return self.ce + self.wfm + self.at + self.lwf


def loss_terms(model: nn.Module, params: PyTree, batch_stats: PyTree, x: Array, y: Array,
               src_feats: list[Array], w, lam, mcfg: MatchingConfig, *,
               cfg: Optional[BilevelConfig] = None, src_logits: Optional[Array] = None) -> LossTerms:
    """One training-mode forward of the target and its losses.

    Args:
      cfg: the step's configuration, for the AT / LwF terms (None: neither).
      src_logits: (B, K_source) source logits (needed for LwF).
    """
    logits, feats, new_bs = target_forward(model, params, batch_stats, x)
    ce = transfer.cross_entropy(logits, y)
    if mcfg.pairs:
        wfm, per_pair = transfer.matching_loss(params["branch"], src_feats, feats, w, lam, mcfg)
    else:
        wfm, per_pair = jnp.zeros((), ce.dtype), jnp.zeros((0,), ce.dtype)
    at = lwf = jnp.zeros((), ce.dtype)
    if cfg is not None and cfg.at_pairs:
        at = transfer.attention_loss(src_feats, feats, cfg.at_pairs, cfg.at_beta)[0].astype(ce.dtype)
    if cfg is not None and cfg.lwf_weight > 0:
        if src_logits is None:
            raise ValueError("LwF needs the source logits (src_logits)")
        student = transfer.lwf_head_logits(params["lwf_head"], feats[-1])
        lwf = cfg.lwf_weight * transfer.distillation_loss(student, src_logits, cfg.lwf_temperature)
    return LossTerms(ce, wfm, per_pair, logits, new_bs, at, lwf)


# --------------------------------------------------------------------------- the look-ahead and its gradient


def inner_value_and_grad(
    objective: Callable[[PyTree, PyTree, PyTree], tuple[Array, PyTree]],
    theta: PyTree,
    meta_out: PyTree,
    consts: PyTree,
    *,
    hvp: str = "reverse",
    theta_differentiated: bool | Array = True,
) -> tuple[tuple[Array, PyTree], PyTree]:
    """((loss, aux), ∇_θ loss) of one look-ahead step's objective, differentiable twice.

    The meta-gradient back-propagates through this gradient g(θ, φ') = ∇_θ L(θ, φ'),
    which needs, for the cotangent v of g, vᵀ∂g/∂θ = ∂²L/∂θ² v and vᵀ∂g/∂φ' =
    ∂²L/∂φ'∂θ v. Two ways to get them, equal up to rounding:

    * "reverse": `jax.value_and_grad`, differentiated again by reverse mode (reverse
      over reverse). The outer backward pass keeps every residual of this inner
      backward pass, for every look-ahead step.
    * "mixed": a custom VJP whose forward keeps only (θ, φ', consts), and whose
      backward recomputes both products at once as one forward-over-reverse
      Hessian-vector product, the `jax.jvp` of ∇_(θ, φ') L in direction (v, 0)
      (the Hessian is symmetric). The look-ahead then holds no inner backward
      residuals (MixFlow-MG, Kemaev et al., ICML 2025).

    Where θ does not depend on what the caller differentiates (the look-ahead's first
    step: θ₁ does not depend on φ), only ∂²L/∂φ'∂θ v is needed. That is a forward-mode
    derivative of the losses φ' weights, so "mixed" mode then skips the tangent
    backward pass through the network, most of a Hessian-vector product's cost.

    Args:
      objective: f(θ, φ', consts) -> (scalar loss, aux); it must close over static
        values only (the arrays it reads come in through `consts`).
      theta: θ, the parameters differentiated.
      meta_out: φ' (e.g. the weight networks' outputs), differentiated through.
      consts: arrays the loss reads but that are not differentiated (batch, BN statistics).
      hvp: "reverse" | "mixed".
      theta_differentiated: "mixed" mode only: False (a Python bool, or a traced
        boolean scalar inside a loop) promises that θ's cotangent is discarded, and
        the backward pass returns zeros for it instead of ∂²L/∂θ² v.
    Returns:
      ((loss, aux), grads like θ). `aux` is not differentiable in "mixed" mode.
    """
    if hvp == "reverse":
        return jax.value_and_grad(objective, has_aux=True)(theta, meta_out, consts)
    if hvp != "mixed":
        raise ValueError(f"unknown hvp {hvp!r}; expected one of {HVP_MODES}")

    def loss_only(t, m, c):
        return objective(t, m, c)[0]

    @jax.custom_vjp
    def value_and_grad(t, m, c, flag):
        return jax.value_and_grad(objective, has_aux=True)(t, m, c)

    def fwd(t, m, c, flag):
        return value_and_grad(t, m, c, flag), (t, m, c, flag)

    def bwd(res, cotangent):
        # One barrier over the residuals and the cotangent: the forward recomputation
        # below then cannot be merged with `fwd`'s identical forward by common-
        # subexpression elimination, nor be scheduled before this step's cotangent
        # exists; either would keep activations alive from the look-ahead's forward to
        # its backward. The look-ahead is a loop in this mode (`BilevelConfig.unrolled`),
        # which bounds memory by itself; the barrier saves a little more on XLA's CPU
        # backend (XLA temporaries with and without it: cub200 batch 64 T = 2, 12.72 and 13.25
        # GB; stl10 batch 128, 2.18 and 2.19 GB at T = 1, 2.07 and 2.08 at T = 2, 2.28
        # and 2.29 at T = 8). On a toy network at T = 1 it costs instead (4.98 against
        # 2.62 MB in tests/test_bilevel.py's memory test, which therefore starts at T = 2).
        (t, m, c, flag), cotangent = lax.optimization_barrier((res, cotangent))
        (loss_bar, _), v = cotangent  # aux (BN statistics) carries no gradient
        grad_fn = jax.grad(loss_only, argnums=(0, 1))
        zeros_m = jax.tree.map(jnp.zeros_like, m)

        def products(with_theta: bool):
            (g_t, g_m), (h_t, h_m) = jax.jvp(lambda a, b: grad_fn(a, b, c), (t, m), (v, zeros_m))
            m_bar = jax.tree.map(lambda h, g: h + loss_bar * g, h_m, g_m)
            if not with_theta:  # h_t and g_t unused: XLA removes the tangent backward pass
                return jax.tree.map(jnp.zeros_like, t), m_bar
            return jax.tree.map(lambda h, g: h + loss_bar * g, h_t, g_t), m_bar

        if isinstance(theta_differentiated, bool):  # known when traced: no branch
            t_bar, m_bar = products(theta_differentiated)
        else:
            t_bar, m_bar = lax.cond(flag, lambda: products(True), lambda: products(False))
        return t_bar, m_bar, None, None

    value_and_grad.defvjp(fwd, bwd)
    return value_and_grad(theta, meta_out, consts, jnp.asarray(theta_differentiated))


class LookaheadAux(NamedTuple):
    """By-products of `lookahead_loss`.

    Attributes:
      matching_loss_at_start: L_wfm at θ₁ (the first look-ahead forward).
      inner_losses: (T,) loss of each look-ahead SGD step.
      batch_stats: BN statistics after the first look-ahead forward (at θ₁).
    """

    matching_loss_at_start: Array
    inner_losses: Array
    batch_stats: PyTree


def lookahead_loss(
    meta_params: PyTree,
    params: PyTree,
    opt_state: PyTree,
    batch_stats: PyTree,
    x: Array,
    y: Array,
    src_feats: list[Array],
    *,
    model: nn.Module,
    cfg: BilevelConfig,
    axis_name: Optional[str] = None,
    src_logits: Optional[Array] = None,
) -> tuple[Array, LookaheadAux]:
    """The outer objective as a function of φ: L_org(θ⁺(φ) | x, y).

    θ⁺ comes from θ₁ = `params` (with `opt_state`'s momentum and learning rate) by
    T SGD steps on L_wfm (or L_total for the "original" scheme) and, for the
    "proposed" and "first_order" schemes, one SGD step on L_org. Each step updates
    every leaf of θ (a leaf the step's loss does not touch moves by weight decay
    and momentum, as in the reference's loop). BN is in training mode in every
    forward. `jax.grad` of this function is the exact meta-gradient.

    Args:
      meta_params: φ.
      params, opt_state, batch_stats: the target after the real step, constants here
        (under `lax.stop_gradient`: this is a function of φ alone, so the first
        step's θ₁ is never differentiated, which "mixed" mode exploits).
      x: (B, H, W, 3) batch; y: (B,) labels; src_feats: the source's taps on x.
      axis_name: inside `jax.shard_map` over the batch (per-device BN statistics), the
        mapped axis: every loss (each look-ahead step's, the outer one) is averaged over
        devices before it is differentiated, so each SGD step uses the mean of the
        per-device gradients and θ stays replicated. None: one device (the default).
      src_logits: the source's logits (only for LwF under the "original" scheme).
    Returns:
      (outer loss, LookaheadAux).
    """
    mcfg = cfg.matching
    params, opt_state, batch_stats = lax.stop_gradient((params, opt_state, batch_stats))
    tx = _sgd_like(opt_state)
    w, lam = transfer.meta_outputs(meta_params, transfer.pool(src_feats), mcfg)
    first_order = cfg.scheme == "first_order"
    consts = (batch_stats, x, y, src_feats, src_logits)

    # The step objectives take φ's outputs (w, λ) and the batch explicitly, so that
    # `inner_value_and_grad` can differentiate them in either mode.
    def matching_objective(q, meta_out, c):
        bs, xb, yb, feats, logits_s = c
        if cfg.scheme == "original":
            t = loss_terms(model, q, bs, xb, yb, feats, *meta_out, mcfg, cfg=cfg, src_logits=logits_s)
            return device_mean(t.total, axis_name), t.batch_stats
        t = loss_terms(model, q, bs, xb, yb, feats, *meta_out, mcfg)
        return device_mean(t.wfm, axis_name), t.batch_stats

    def ce_objective(q, meta_out, c):
        bs, xb, yb = c[:3]
        logits, _, new_bs = target_forward(model, q, bs, xb)
        return device_mean(transfer.cross_entropy(logits, yb), axis_name), new_bs

    step_grad = functools.partial(inner_value_and_grad, hvp=cfg.hvp)

    def inner_step(carry, i):
        # Step i's θ depends on φ from the second step on (and never under first_order).
        p, s = carry
        at = lax.stop_gradient(p) if first_order else p
        (loss, new_bs), grads = step_grad(matching_objective, at, (w, lam), consts,
                                          theta_differentiated=False if first_order else i > 0)
        p, s = sgd_apply(tx, p, s, grads)
        return (p, s), (loss, new_bs)

    if cfg.remat:
        inner_step = jax.checkpoint(inner_step)
    if cfg.unrolled:
        # A Python loop: the same program as lax.scan(unroll=True) would give, traced directly.
        carry, outs = (params, opt_state), []
        for i in range(cfg.T):
            carry, out = inner_step(carry, i)
            outs.append(out)
        (p, s) = carry
        inner_losses, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:
        (p, s), (inner_losses, stats) = lax.scan(inner_step, (params, opt_state), jnp.arange(cfg.T))
    first_bs = jax.tree.map(lambda a: a[0], stats)
    if cfg.scheme != "original":

        at = lax.stop_gradient(p) if first_order else p
        p, s = sgd_apply(tx, p, s, step_grad(ce_objective, at, (), consts, theta_differentiated=not first_order)[1])
    logits, _, _ = target_forward(model, p, batch_stats, x)
    outer = device_mean(transfer.cross_entropy(logits, y), axis_name)
    return outer, LookaheadAux(inner_losses[0], inner_losses, first_bs)


def meta_gradient(
    meta_params: PyTree,
    params: PyTree,
    opt_state: PyTree,
    batch_stats: PyTree,
    x: Array,
    y: Array,
    src_feats: list[Array],
    *,
    model: nn.Module,
    cfg: BilevelConfig,
    axis_name: Optional[str] = None,
    src_logits: Optional[Array] = None,
) -> tuple[PyTree, Array, LookaheadAux]:
    """∇_φ of `lookahead_loss` (exact, through every step). Returns (grads like φ, outer loss, aux)."""
    (outer, aux), grads = jax.value_and_grad(lookahead_loss, has_aux=True)(
        meta_params, params, opt_state, batch_stats, x, y, src_feats, model=model, cfg=cfg, axis_name=axis_name,
        src_logits=src_logits,
    )
    return grads, outer, aux


def _sgd_like(opt_state: optax.InjectHyperparamsState) -> optax.GradientTransformation:
    """The `pytorch_sgd` transformation whose state `opt_state` is (hyperparameters live in the state)."""
    dtype = opt_state.hyperparams["learning_rate"].dtype
    return pytorch_sgd(0.0, 0.0, 0.0, dtype)
# --------------------------------------------------------------------------- one training iteration


def real_step(
    state: TrainState,
    x: Array,
    y: Array,
    lr: Array,
    src_feats: list[Array],
    *,
    model: nn.Module,
    cfg: BilevelConfig,
    axis_name: Optional[str] = None,
    src_logits: Optional[Array] = None,
) -> tuple[PyTree, PyTree, PyTree, dict[str, Array]]:
    """The iteration's real step: one SGD step of θ on L_total at learning rate `lr`.

    φ is read (its weights w and λ) but not differentiated. BN is in training mode, so
    the step also returns the batch's updated running statistics.

    Args:
      state: the `TrainState` (θ, its SGD state, BN statistics, φ).
      x: (B, H, W, 3) normalised images; y: (B,) int labels.
      lr: this iteration's learning rate of θ (scalar).
      src_feats: the source's taps on x (empty for "scratch").
      model: the target module; cfg: the static configuration.
      axis_name: as `train_step`'s.
      src_logits: the source's logits (only for LwF).
    Returns:
      (θ₁, its SGD state, BN statistics after the forward at θ, metrics): "loss"
      (L_total), "ce", "wfm", "accuracy" (top-1 of this forward, in [0, 1]), "lambda"
      (P,) batch-mean λ per pair, "at" / "lwf" when those terms are on.
    """
    mcfg = cfg.matching
    w, lam = transfer.meta_outputs(lax.stop_gradient(state.meta_params), transfer.pool(src_feats), mcfg)

    def total(q):
        t = loss_terms(model, q, state.batch_stats, x, y, src_feats, w, lam, mcfg, cfg=cfg, src_logits=src_logits)
        return device_mean(t.total, axis_name), t

    (loss, terms), grads = jax.value_and_grad(total, has_aux=True)(state.params)
    opt_state = with_learning_rate(state.opt_state, lr)
    params, opt_state = sgd_apply(_sgd_like(opt_state), state.params, opt_state, grads)
    metrics = {
        "loss": loss,
        **device_mean({
            "ce": terms.ce,
            "wfm": terms.wfm,
            "accuracy": jnp.mean((jnp.argmax(terms.logits, -1) == y).astype(jnp.float32)),
            "lambda": (jnp.stack([jnp.mean(l) for l in lam]) if lam else jnp.ones((len(mcfg.pairs),), loss.dtype)),
            **({"at": terms.at} if cfg.at_pairs else {}),
            **({"lwf": terms.lwf} if cfg.lwf_weight > 0 else {}),
        }, axis_name),
    }
    return params, opt_state, terms.batch_stats, metrics


def meta_step(
    meta_params: PyTree,
    meta_opt_state: PyTree,
    params: PyTree,
    opt_state: PyTree,
    batch_stats: PyTree,
    x: Array,
    y: Array,
    src_feats: list[Array],
    *,
    model: nn.Module,
    cfg: BilevelConfig,
    axis_name: Optional[str] = None,
    src_logits: Optional[Array] = None,
) -> tuple[PyTree, PyTree, LookaheadAux, dict[str, Array]]:
    """The iteration's meta step: one PyTorch-Adam step of φ on `meta_gradient` at θ₁.

    Args:
      meta_params, meta_opt_state: φ and its Adam state.
      params, opt_state, batch_stats: the target after the real step (θ₁), as
        `lookahead_loss` takes them.
      x, y, src_feats, model, cfg, axis_name, src_logits: as `lookahead_loss`'s.
    Returns:
      (new φ, its Adam state, the look-ahead's `LookaheadAux`, metrics): "outer_loss",
      "matching_loss_at_start", "meta_grad_norm".
    """
    meta_grads, outer, aux = meta_gradient(
        meta_params, params, opt_state, batch_stats, x, y, src_feats, model=model, cfg=cfg,
        axis_name=axis_name, src_logits=src_logits,
    )
    meta_tx = pytorch_adam(cfg.meta_lr, cfg.meta_weight_decay)
    updates, meta_opt_state = meta_tx.update(meta_grads, meta_opt_state, meta_params)
    metrics = {
        "outer_loss": outer,
        "matching_loss_at_start": aux.matching_loss_at_start,
        "meta_grad_norm": optax.tree.norm(meta_grads),
    }
    return optax.apply_updates(meta_params, updates), meta_opt_state, aux, metrics


def train_step(
    state: TrainState,
    source_variables: PyTree,
    x: Array,
    y: Array,
    lr: Array,
    *,
    models: Models,
    cfg: BilevelConfig,
    axis_name: Optional[str] = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One iteration: the source's forward, `real_step` on θ, `meta_step` on φ (if the method has one).

    Args:
      state: the `TrainState`.
      source_variables: the source's {"params", "batch_stats"} (unused for "scratch").
      x: (B, H, W, 3) normalised images; y: (B,) int labels.
      lr: this iteration's learning rate of θ (scalar).
      models: target and source modules; cfg: the static configuration.
      axis_name: inside `jax.shard_map` over the batch (per-device BN statistics; see
        `l2t_jax.parallel`), the mapped axis: every differentiated loss and every metric
        is averaged over devices (the returned BN statistics stay per-device). None: one
        device (the default).

    Returns:
      (new state, metrics): `real_step`'s, and with a meta step `meta_step`'s.
    """
    src_logits, src_feats = source_outputs(models.source, source_variables, x) if cfg.uses_source else (None, [])
    params, opt_state, batch_stats, metrics = real_step(
        state, x, y, lr, src_feats, model=models.target, cfg=cfg, axis_name=axis_name, src_logits=src_logits)
    meta_params, meta_opt_state = state.meta_params, state.meta_opt_state
    if cfg.has_meta_step:
        meta_params, meta_opt_state, aux, meta_metrics = meta_step(
            meta_params, meta_opt_state, params, opt_state, batch_stats, x, y, src_feats, model=models.target,
            cfg=cfg, axis_name=axis_name, src_logits=src_logits)
        if cfg.bn_updates == "reference":  # L2T-ww's reverse pass updates BN at θ₁ once more
            batch_stats = aux.batch_stats
        metrics.update(meta_metrics)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        meta_params=meta_params,
        meta_opt_state=meta_opt_state,
    )
    return new_state, metrics


def make_train_step(models: Models, cfg: BilevelConfig, *, donate: bool = True) -> Callable:
    """`train_step` jit-compiled for these models and config, the state's buffers donated.

    Returns:
      f(state, source_variables, x, y, lr) -> (state, metrics).
    """
    fn = functools.partial(train_step, models=models, cfg=cfg)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


def target_variables(state: TrainState) -> PyTree:
    """The target network's {"params", "batch_stats"} (the branch is not needed at test time)."""
    return {"params": state.params["model"], "batch_stats": state.batch_stats}
