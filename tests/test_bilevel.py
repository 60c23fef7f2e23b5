"""Exactness of the meta-gradient and the semantics of one training iteration.

Small networks in float64: central finite differences of the outer loss along
random directions of φ; an independent hand-written unroll (plain arrays,
PyTorch's SGD rule written out, every parameter updated in every look-ahead step
as the reference's loop does: shared/reference/README.md); the first-order
scheme against its stop-gradient definition; and `train_step`'s bookkeeping
(look-ahead discarded, BN statistics updated twice at the right θ, one Adam step
on φ that lowers the outer loss).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2t_jax import bilevel, transfer
from l2t_jax.models.vgg import VGG

F64 = jnp.float64
TARGET = VGG(cfg=(4, "M", 6, "M"), num_classes=3, conv_impl="xla")
SOURCE = VGG(cfg=(3, "M", 5, "M"), num_classes=4, conv_impl="xla")
SRC_CH, TGT_CH = (3, 5), (4, 6)
PAIRS = ((0, 0), (0, 1), (1, 0), (1, 1))  # includes 2x down- and up-scaling


def _f64(tree):
    return jax.tree.map(lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _random_like(key, tree, scale=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def _setup(method="l2t_ww", lambda_type="relu6", T=2, momentum=0.9, scheme="proposed", pairs=PAIRS, meta_kind="network"):
    """A mid-training state: non-zero momentum buffers, BN statistics and meta-network weights."""
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3), F64)
    y = jnp.array([0, 1, 2, 1, 0, 2])
    tv = _f64(TARGET.init(jax.random.key(1), x, train=False))
    sv = _f64(SOURCE.init(jax.random.key(2), x, train=False))
    cfg = bilevel.BilevelConfig(
        matching=transfer.MatchingConfig(pairs=pairs, method=method, lambda_type=lambda_type, meta_kind=meta_kind),
        T=T, momentum=momentum, scheme=scheme,
    )
    models = bilevel.Models(TARGET, SOURCE)
    state = bilevel.create_train_state(jax.random.key(3), models, cfg, tv, source_channels=SRC_CH, target_channels=TGT_CH)
    buffers = _random_like(jax.random.key(5), state.params, 0.05)
    stats = jax.tree.map(lambda a: jnp.abs(a) + 0.5 if a.dtype == F64 else a + 7,
                         _random_like(jax.random.key(6), _floats_only(state.batch_stats)))
    state = state.replace(
        opt_state=bilevel.with_momentum_buffers(bilevel.with_learning_rate(state.opt_state, 0.1), buffers),
        batch_stats=_merge_counts(stats, state.batch_stats),
        meta_params=jax.tree.map(lambda a, r: a + r, state.meta_params,
                                 _random_like(jax.random.key(4), state.meta_params, 0.3)),
    )
    return cfg, state, sv, x, y


def _floats_only(stats):
    return jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros((), F64), stats)


def _merge_counts(random_stats, stats):
    return jax.tree.map(lambda r, a: r if jnp.issubdtype(a.dtype, jnp.floating) else a, random_stats, stats)


@functools.partial(jax.jit, static_argnames="cfg")
def _outer_value_and_grad(phi, params, opt_state, bs, x, y, sv, *, cfg):
    feats = bilevel.source_features(SOURCE, sv, x)
    loss = lambda p: bilevel.lookahead_loss(p, params, opt_state, bs, x, y, feats, model=TARGET, cfg=cfg)[0]  # noqa: E731
    return jax.value_and_grad(loss)(phi)


def _outer_fn(cfg, state, sv, x, y):
    """φ -> (outer loss, ∇_φ), one compiled function; the state passed as arguments."""
    return lambda phi: _outer_value_and_grad(phi, state.params, state.opt_state, state.batch_stats, x, y, sv, cfg=cfg)


CASES = {
    "proposed_T2": {},
    "T1_momentum0": {"T": 1, "momentum": 0.0},
    "T3_const_sparse": {"T": 3, "lambda_type": "const", "pairs": ((1, 0), (0, 1))},
    "lambda_relu_avg": {"lambda_type": "relu-avg"},
    "l2t_w": {"method": "l2t_w"},
    "original_scheme": {"scheme": "original"},
    "meta_weights": {"meta_kind": "weights"},
}


def _norm(tree):
    return jnp.sqrt(_vdot(tree, tree))


@pytest.mark.parametrize("name", sorted(CASES))
def test_meta_gradient_matches_central_finite_differences(name):
    """Directional derivatives along the gradient itself (strict relative error) and along
    random directions (error relative to |g||v|), step 1e-6, float64."""
    cfg, state, sv, x, y = _setup(**CASES[name])
    f = _outer_fn(cfg, state, sv, x, y)
    phi = state.meta_params
    _, grad = f(phi)
    gnorm = float(_norm(grad))
    assert gnorm > 1e-6, "vanishing meta-gradient: the test would not test anything"
    directions = [jax.tree.map(lambda g: g / gnorm, grad)]
    directions += [_random_like(jax.random.key(100 + k), phi) for k in range(2)]
    eps = 1e-6
    for k, v in enumerate(directions):
        plus = f(jax.tree.map(lambda p, d: p + eps * d, phi, v))[0]
        minus = f(jax.tree.map(lambda p, d: p - eps * d, phi, v))[0]
        fd = (plus - minus) / (2 * eps)
        an = _vdot(grad, v)
        scale = abs(an) if k == 0 else gnorm * float(_norm(v))
        assert abs(fd - an) <= 1e-6 * scale, (name, k, float(fd), float(an))


def _hand_unrolled_outer(phi, cfg, state, sv, x, y, first_order=False):
    """The look-ahead written out independently from the reference's description
    (shared/reference/README.md): plain pytrees, PyTorch's SGD rule by hand, and every
    parameter updated in every step — one the step's loss does not touch (the
    classifier in a matching step, the branch in the CE step) has a zero gradient, so
    it still moves by weight decay and momentum. `first_order`: each step's gradient
    is taken at stop_gradient(θ) (its own definition: no second-order term)."""
    lr = state.opt_state.hyperparams["learning_rate"]
    mom, wd = cfg.momentum, cfg.weight_decay
    feats = bilevel.source_features(SOURCE, sv, x)
    pooled = [f.mean(axis=(1, 2)) for f in feats]
    theta = state.params
    buf = bilevel.momentum_buffers(state.opt_state)
    bs = state.batch_stats

    def forward(th):
        (logits, tf), _ = TARGET.apply({"params": th["model"], "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
        return logits, tf

    def wfm(th):
        _, tf = forward(th)
        total = 0.0
        for i, (m, n) in enumerate(cfg.matching.pairs):
            s = feats[m]
            if s.shape[1] != tf[n].shape[1]:
                s = transfer.resize_bilinear(s, tf[n].shape[2] / s.shape[2])
            r = tf[n] @ th["branch"][i]["kernel"] + th["branch"][i]["bias"]
            d = ((s - r) ** 2).mean(axis=(1, 2))
            w = jax.nn.softmax(pooled[m] @ phi["w"][i]["kernel"] + phi["w"][i]["bias"], axis=-1)
            lam = jnp.clip(pooled[m] @ phi["lw"][i]["kernel"] + phi["lw"][i]["bias"], 0, 6)[:, 0]
            total = total + cfg.matching.beta * jnp.mean((d * w).sum(1) * lam)
        return total

    def ce(th):
        logits, _ = forward(th)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])

    def step(th, b, loss):
        g = jax.grad(loss)(jax.lax.stop_gradient(th) if first_order else th)
        nb = jax.tree.map(lambda bb, gg, p: mom * bb + gg + wd * p, b, g, th)  # buf <- m·buf + (∇ + wd·θ)
        return jax.tree.map(lambda p, bb: p - lr * bb, th, nb), nb

    for _ in range(cfg.T):
        theta, buf = step(theta, buf, wfm)
    theta, buf = step(theta, buf, ce)
    return ce(theta)


def test_lookahead_equals_hand_written_unroll():
    cfg, state, sv, x, y = _setup()
    value, g = _outer_fn(cfg, state, sv, x, y)(state.meta_params)
    hv, gh = jax.jit(jax.value_and_grad(lambda p: _hand_unrolled_outer(p, cfg, state, sv, x, y)))(state.meta_params)
    np.testing.assert_allclose(value, hv, rtol=1e-13)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gh)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def _frozen_step_outer(cfg, state, sv, x, y, frozen_in_matching):
    """The look-ahead's outer loss when the leaves `frozen_in_matching(path)` are skipped
    (value and momentum kept) in the matching-only steps: the artefact of a fresh
    optimizer, where the classifier had no `.grad` yet."""
    feats = bilevel.source_features(SOURCE, sv, x)
    w, lam = transfer.meta_outputs(state.meta_params, transfer.pool(feats), cfg.matching)
    tx = bilevel.pytorch_sgd(0.0, 0.0, 0.0, F64)
    p, s = state.params, state.opt_state

    def keep(new, old):
        return jax.tree_util.tree_map_with_path(lambda path, a, b: b if frozen_in_matching(jax.tree_util.keystr(path)) else a,
                                                new, old)

    for _ in range(cfg.T):
        g = jax.grad(lambda q: bilevel.loss_terms(TARGET, q, state.batch_stats, x, y, feats, w, lam, cfg.matching).wfm)(p)
        p1, s1 = bilevel.sgd_apply(tx, p, s, g)
        p = keep(p1, p)
        s = bilevel.with_momentum_buffers(s1, keep(bilevel.momentum_buffers(s1), bilevel.momentum_buffers(s)))
    g = jax.grad(lambda q: bilevel.loss_terms(TARGET, q, state.batch_stats, x, y, feats, w, lam, cfg.matching).ce)(p)
    p, s = bilevel.sgd_apply(tx, p, s, g)
    return bilevel.loss_terms(TARGET, p, state.batch_stats, x, y, feats, w, lam, cfg.matching).ce


def test_classifier_moves_during_matching_steps_and_that_matters():
    """The reference's loop updates every parameter in every look-ahead step. A look-ahead
    that froze the classifier in the matching-only steps gives another outer loss, and
    `lookahead_loss` must equal the unfrozen one."""
    cfg, state, sv, x, y = _setup()
    outer = float(_outer_fn(cfg, state, sv, x, y)(state.meta_params)[0])
    every_leaf = float(_frozen_step_outer(cfg, state, sv, x, y, lambda path: False))
    frozen_fc = float(_frozen_step_outer(cfg, state, sv, x, y, lambda path: "'fc'" in path))
    assert outer == pytest.approx(every_leaf, rel=1e-13)
    assert abs(frozen_fc - every_leaf) > 1e-6 * abs(every_leaf), "freezing the classifier must change the outer loss"


def test_first_order_is_the_stop_gradient_unroll():
    """scheme="first_order" against its own definition: the hand-written unroll with each
    inner gradient taken at stop_gradient(θ); and it differs from the exact meta-gradient."""
    cfg, state, sv, x, y = _setup()
    exact = _outer_fn(cfg, state, sv, x, y)(state.meta_params)[1]
    fo_cfg = dataclasses.replace(cfg, scheme="first_order")
    fo = _outer_fn(fo_cfg, state, sv, x, y)(state.meta_params)[1]
    hand = jax.jit(jax.grad(lambda p: _hand_unrolled_outer(p, cfg, state, sv, x, y, first_order=True)))(state.meta_params)
    for a, b in zip(jax.tree.leaves(fo), jax.tree.leaves(hand)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    num = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(fo)))
    den = sum(jnp.sum(a**2) for a in jax.tree.leaves(exact))
    assert float(jnp.sqrt(num / den)) > 1e-3


def test_remat_gives_the_same_meta_gradient():
    cfg, state, sv, x, y = _setup()
    g1 = _outer_fn(cfg, state, sv, x, y)(state.meta_params)[1]
    g2 = _outer_fn(dataclasses.replace(cfg, remat=True), state, sv, x, y)(state.meta_params)[1]
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("bn_updates,method,expected", [("reference", "l2t_ww", 2), ("single", "l2t_ww", 1),
                                                         ("reference", "fm", 1)])
def test_train_step_bookkeeping(bn_updates, method, expected):
    cfg, state, sv, x, y = _setup()
    cfg = dataclasses.replace(cfg, bn_updates=bn_updates,
                              matching=dataclasses.replace(cfg.matching, method=method))
    if method == "fm":
        state = state.replace(meta_params={}, meta_opt_state=bilevel.pytorch_adam().init({}))
    step = bilevel.make_train_step(bilevel.Models(TARGET, SOURCE), cfg, donate=False)
    new, metrics = step(state, sv, x, y, 0.05)
    count = lambda s: int(s["bn0"]["num_batches_tracked"])  # noqa: E731
    assert count(new.batch_stats) - count(state.batch_stats) == expected
    assert int(new.step) == int(state.step) + 1
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())

    # θ is the real step's θ₁ (the look-ahead is discarded), at this iteration's lr
    feats = bilevel.source_features(SOURCE, sv, x)
    w, lam = transfer.meta_outputs(state.meta_params, transfer.pool(feats), cfg.matching)

    def total(q):
        t = bilevel.loss_terms(TARGET, q, state.batch_stats, x, y, feats, w, lam, cfg.matching)
        return t.ce + t.wfm, t

    grads, terms = jax.grad(total, has_aux=True)(state.params)
    tx = bilevel.pytorch_sgd(0.05, cfg.momentum, cfg.weight_decay, F64)
    theta1, opt1 = bilevel.sgd_apply(tx, state.params, bilevel.with_learning_rate(state.opt_state, 0.05), grads)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(theta1)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(jax.tree.leaves(bilevel.momentum_buffers(new.opt_state)), jax.tree.leaves(bilevel.momentum_buffers(opt1))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    # BN running statistics: the real step's forward at θ updates them; L2T-ww's reverse pass
    # (bn_updates="reference") updates them once more by a training-mode forward at θ₁.
    want_stats = terms.batch_stats
    if method != "fm" and bn_updates == "reference":
        want_stats = bilevel.target_forward(TARGET, theta1, terms.batch_stats, x)[2]
    for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    if method == "fm":
        assert new.meta_params == {}
        return
    # φ moved by exactly one PyTorch-Adam step on the meta-gradient at θ₁
    g, outer, _ = bilevel.meta_gradient(state.meta_params, theta1, opt1, terms.batch_stats, x, y, feats,
                                        model=TARGET, cfg=cfg)
    np.testing.assert_allclose(metrics["outer_loss"], outer, rtol=1e-12)
    adam = bilevel.pytorch_adam(cfg.meta_lr, cfg.meta_weight_decay)
    upd, _ = adam.update(g, state.meta_opt_state, state.meta_params)
    expected_phi = optax.apply_updates(state.meta_params, upd)
    for a, b in zip(jax.tree.leaves(new.meta_params), jax.tree.leaves(expected_phi)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_meta_step_descends_the_outer_loss():
    """φ moves against the meta-gradient (one PyTorch-Adam step from a fresh state:
    about -lr·sign(g + wd·φ) per entry), and the outer loss at the same θ₁ drops."""
    cfg, state, sv, x, y = _setup()
    step = bilevel.make_train_step(bilevel.Models(TARGET, SOURCE), cfg, donate=False)
    new, metrics = step(state, sv, x, y, 0.1)
    f = _outer_fn(cfg, new, sv, x, y)  # the look-ahead from θ₁ (training-mode BN: running statistics unused)
    before, g = f(state.meta_params)
    after, _ = f(new.meta_params)
    np.testing.assert_allclose(before, metrics["outer_loss"], rtol=1e-12)
    delta = jax.tree.map(lambda a, b: a - b, new.meta_params, state.meta_params)
    assert float(_vdot(delta, g)) < 0
    for d, gg, p in zip(jax.tree.leaves(delta), jax.tree.leaves(g), jax.tree.leaves(state.meta_params)):
        g_eff = gg + cfg.meta_weight_decay * p  # PyTorch's Adam: L2 decay added to the gradient
        # first step: m̂ = g, v̂ = g², so Δφ = -lr·g/(|g| + eps), eps = 1e-8
        np.testing.assert_allclose(d, -cfg.meta_lr * g_eff / (np.abs(g_eff) + 1e-8), rtol=1e-9, atol=1e-18)
    assert float(after) < float(before)


def test_config_errors():
    with pytest.raises(ValueError, match="scheme"):
        bilevel.BilevelConfig(scheme="magic")
    with pytest.raises(ValueError, match="T must be"):
        bilevel.BilevelConfig(T=0)
    with pytest.raises(ValueError, match="bn_updates"):
        bilevel.BilevelConfig(bn_updates="double")
    with pytest.raises(ValueError, match="hvp"):
        bilevel.BilevelConfig(hvp="forward")


@pytest.mark.parametrize("scheme", ["proposed", "original"])
def test_unrolled_lookahead_gives_the_same_meta_gradient(scheme):
    """`unroll` (the default) traces the T steps without a loop; the meta-gradient is the loop's."""
    cfg, state, sv, x, y = _setup(T=3, scheme=scheme)
    assert cfg.unroll
    rolled = dataclasses.replace(cfg, unroll=False)
    g1 = _outer_fn(cfg, state, sv, x, y)(state.meta_params)
    g2 = _outer_fn(rolled, state, sv, x, y)(state.meta_params)
    np.testing.assert_allclose(g1[0], g2[0], rtol=1e-13)
    for a, b in zip(jax.tree.leaves(g1[1]), jax.tree.leaves(g2[1])):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-16)

    def has_loop(c):
        src_feats = bilevel.source_features(SOURCE, sv, x)
        jaxpr = jax.make_jaxpr(
            lambda phi: bilevel.lookahead_loss(phi, state.params, state.opt_state, state.batch_stats, x, y, src_feats,
                                               model=TARGET, cfg=c)[0]
        )(state.meta_params)
        return any(e.primitive.name in ("scan", "while") for e in jaxpr.jaxpr.eqns)

    assert not has_loop(cfg)
    assert has_loop(rolled)
    assert has_loop(dataclasses.replace(cfg, remat=True))  # remat keeps the loop (its memory saving)
    assert has_loop(dataclasses.replace(cfg, hvp="mixed"))  # so does mixed mode (ditto)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_mode_hvp_gives_the_same_meta_gradient(name):
    """hvp="mixed" (forward-over-reverse Hessian-vector products in a custom VJP) equals
    reverse over reverse to 1e-12 on every case (both schemes, T 1-3, momentum 0, every λ
    type, meta-weights), and with remat and the scan loop."""
    cfg, state, sv, x, y = _setup(**CASES[name])
    v1, g1 = _outer_fn(cfg, state, sv, x, y)(state.meta_params)
    variants = [dataclasses.replace(cfg, hvp="mixed")]
    if name == "proposed_T2":
        variants += [dataclasses.replace(cfg, hvp="mixed", remat=True),
                     dataclasses.replace(cfg, hvp="mixed", unroll=False),
                     dataclasses.replace(cfg, hvp="mixed", scheme="first_order")]
    for c in variants:
        ref = (v1, g1) if c.scheme == cfg.scheme else _outer_fn(dataclasses.replace(c, hvp="reverse"), state, sv, x, y)(
            state.meta_params)
        v2, g2 = _outer_fn(c, state, sv, x, y)(state.meta_params)
        np.testing.assert_allclose(v2, ref[0], rtol=1e-13)
        num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(ref[1])))
        den = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(ref[1]))
        assert np.sqrt(num / den) <= 1e-12, (name, c)


def test_mixed_mode_train_step_equals_reverse():
    """A whole iteration (real step, meta step, Adam, BN statistics) is the same in both modes."""
    cfg, state, sv, x, y = _setup()
    a, ma = bilevel.make_train_step(bilevel.Models(TARGET, SOURCE), cfg, donate=False)(state, sv, x, y, 0.1)
    b, mb = bilevel.make_train_step(bilevel.Models(TARGET, SOURCE), dataclasses.replace(cfg, hvp="mixed"),
                                    donate=False)(state, sv, x, y, 0.1)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ma["meta_grad_norm"], mb["meta_grad_norm"], rtol=1e-12)


def test_mixed_mode_with_the_tap_loop_convolution_equals_reverse():
    """Mixed mode on models whose convolutions take the tap-loop derivative (what "auto" gives it on CPU)
    computes the iteration of reverse mode on the plain im2col lowering (float64, 1e-12)."""
    cfg, state, sv, x, y = _setup()
    loop_models = bilevel.Models(TARGET.clone(conv_impl="im2col_loop"), SOURCE.clone(conv_impl="im2col_loop"))
    plain_models = bilevel.Models(TARGET.clone(conv_impl="im2col"), SOURCE.clone(conv_impl="im2col"))
    a, ma = bilevel.make_train_step(plain_models, cfg, donate=False)(state, sv, x, y, 0.1)
    b, mb = bilevel.make_train_step(loop_models, dataclasses.replace(cfg, hvp="mixed"), donate=False)(state, sv, x, y, 0.1)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ma["meta_grad_norm"], mb["meta_grad_norm"], rtol=1e-12)


def _meta_grad_temp_bytes(cfg, state, sv, x, y) -> int:
    """XLA's temporaries for the compiled meta-gradient (compiled, never run)."""
    src_feats = bilevel.source_features(SOURCE, sv, x)
    fn = jax.jit(jax.grad(lambda phi: bilevel.lookahead_loss(
        phi, state.params, state.opt_state, state.batch_stats, x, y, src_feats, model=TARGET, cfg=cfg)[0]))
    return fn.lower(state.meta_params).compile().memory_analysis().temp_size_in_bytes


def test_mixed_mode_memory_does_not_grow_with_T():
    """Mixed mode's point: the look-ahead keeps no per-step activations, so the meta-
    gradient's temporaries at T = 8 stay at T = 2's, while reverse over reverse (the
    control: it must grow, or this test could not see a regression) keeps every step's.
    A batch of 32 at 16x16 makes activations dominate the parameters. T = 2 is the
    base, not T = 1: XLA inlines a one-step loop, and then merges the recomputed
    forward with the look-ahead's (fewer temporaries, not a property of the mode)."""
    base = _setup(T=1)[0]
    _, state, sv, _, _ = _setup()
    x = jax.random.normal(jax.random.key(7), (32, 16, 16, 3), F64)
    y = jnp.arange(32) % 3
    temp = {(hvp, T): _meta_grad_temp_bytes(dataclasses.replace(base, T=T, hvp=hvp), state, sv, x, y)
            for hvp, Ts in (("reverse", (2, 4)), ("mixed", (2, 8))) for T in Ts}
    assert temp["reverse", 4] > 1.8 * temp["reverse", 2], temp
    assert temp["mixed", 8] < 1.1 * temp["mixed", 2], temp
    assert temp["mixed", 8] < 0.5 * temp["reverse", 4], temp


def test_mixed_mode_without_theta_forms_only_the_cross_product():
    """theta_differentiated=False (the look-ahead's first step, whose θ₁ does not depend
    on φ) returns φ''s cotangent as reverse over reverse does and a zero θ cotangent, with
    the flag known when traced or a traced boolean (the look-ahead's loop), and it
    skips the tangent backward pass: the cross product is a forward pass and its
    tangent, about a third of a full Hessian-vector product's work (FLOP counts of
    XLA's cost analysis; the bound is 1/2)."""
    keys = jax.random.split(jax.random.key(3), 5)
    theta = {"w1": jax.random.normal(keys[0], (8, 16), F64), "w2": jax.random.normal(keys[1], (16, 4), F64)}
    meta = jnp.abs(jax.random.normal(keys[2], (4,), F64))
    xb = jax.random.normal(keys[3], (32, 8), F64)
    v = _random_like(keys[4], theta)

    def objective(t, m, c):
        out = jnp.tanh(jnp.tanh(c @ t["w1"]) @ t["w2"])
        return jnp.sum(m * jnp.mean(out**2, axis=0)), ()

    def outer(hvp, flag):  # vᵀ g(θ, φ') + L / 2: its gradient is (∂²L/∂θ² v + ∇_θ L / 2, ∂²L/∂φ'∂θ v + ∇_φ' L / 2)
        def f(t, m):
            (loss, _), grads = bilevel.inner_value_and_grad(objective, t, m, xb, hvp=hvp, theta_differentiated=flag)
            return _vdot(grads, v) + loss / 2
        return f

    want_t, want_m = jax.grad(outer("reverse", True), argnums=(0, 1))(theta, meta)
    traced = jax.jit(lambda flag, t, m: jax.grad(outer("mixed", flag), argnums=(0, 1))(t, m))
    for flag in (True, False):
        for got_t, got_m in (jax.grad(outer("mixed", flag), argnums=(0, 1))(theta, meta),
                             traced(jnp.asarray(flag), theta, meta)):
            np.testing.assert_allclose(got_m, want_m, rtol=1e-12)
            for a, b in zip(jax.tree.leaves(got_t), jax.tree.leaves(want_t)):
                np.testing.assert_allclose(a, b if flag else np.zeros_like(b), rtol=1e-12, atol=0)

    def flops(flag):
        fn = jax.jit(jax.grad(outer("mixed", flag), argnums=(0, 1)))
        return fn.lower(theta, meta).compile().cost_analysis()["flops"]

    assert flops(False) < 0.5 * flops(True), (flops(False), flops(True))
