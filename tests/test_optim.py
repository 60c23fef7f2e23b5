"""Parity of the optimizers with PyTorch's.

* `pytorch_sgd` / `sgd_apply` / `with_learning_rate` against `torch.optim.SGD`
  (momentum, weight decay, a learning rate that changes between steps, the first
  step's buffer = g), including parameters a step's loss does not touch (a zero
  `.grad` tensor, as in the reference's loop: they still decay and carry
  momentum), and `momentum_buffers` / `with_momentum_buffers`;
* `pytorch_adam` against `torch.optim.Adam(lr, weight_decay)`.

Gradients are given (random, identical on both sides); everything is float64
unless stated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from l2t_jax.bilevel import (
    momentum_buffers,
    pytorch_adam,
    pytorch_sgd,
    sgd_apply,
    with_learning_rate,
    with_momentum_buffers,
)

torch.set_num_threads(2)

SHAPES = {"conv": (3, 2, 4), "bn": {"scale": (5,), "bias": (5,)}, "fc": (4, 3)}
LRS = [0.1, 0.05, 0.2, 0.01, 0.07]


def random_tree(rng, scale=1.0, dtype=np.float64):
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(dtype), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def torch_params(tree):
    return jax.tree.map(lambda a: torch.tensor(np.array(a), requires_grad=True), tree)


def assert_tree_close(jax_tree, torch_tree, **tol):
    jl, tl = jax.tree.leaves(jax_tree), jax.tree.leaves(torch_tree)
    assert len(jl) == len(tl)
    for a, b in zip(jl, tl):
        b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
        np.testing.assert_allclose(np.asarray(a), b, **tol)


def torch_buffers(opt, tparams):
    """The momentum buffer of each parameter (zeros where PyTorch has none yet)."""
    def buf(p):
        b = opt.state[p].get("momentum_buffer") if p in opt.state else None
        return torch.zeros_like(p) if b is None else b

    return jax.tree.map(buf, tparams)


# =========================================================================== SGD


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_pytorch_sgd_matches_torch(momentum):
    rng = np.random.default_rng(0)
    params = random_tree(rng)
    grads = [random_tree(rng) for _ in LRS]
    wd = 1e-4

    tp = torch_params(params)
    topt = torch.optim.SGD(jax.tree.leaves(tp), lr=LRS[0], momentum=momentum, weight_decay=wd)

    tx = pytorch_sgd(LRS[0], momentum, wd, dtype=jnp.float64)
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)
    assert not np.any(np.concatenate([np.ravel(b) for b in jax.tree.leaves(momentum_buffers(state))]))

    for step, (lr, g) in enumerate(zip(LRS, grads)):
        for group in topt.param_groups:
            group["lr"] = lr
        for p, gi in zip(jax.tree.leaves(tp), jax.tree.leaves(g)):
            p.grad = torch.tensor(gi)
        topt.step()

        state = with_learning_rate(state, lr)
        assert float(state.hyperparams["learning_rate"]) == lr
        prev = jp
        jp, state = sgd_apply(tx, jp, state, jax.tree.map(jnp.asarray, g))

        assert_tree_close(jp, tp, rtol=0, atol=1e-13)
        if momentum:
            assert_tree_close(momentum_buffers(state), torch_buffers(topt, tp), rtol=0, atol=1e-13)
        if step == 0:  # the very first buffer is g + wd * θ, not (1 - momentum) * ... or 0.9 * 0 + ...
            expected = jax.tree.map(lambda gi, p: gi + wd * np.asarray(p), g, prev)
            if momentum:
                assert_tree_close(momentum_buffers(state), expected, rtol=0, atol=1e-15)
            assert_tree_close(jp, jax.tree.map(lambda p, b: np.asarray(p) - lr * b, prev, expected),
                              rtol=0, atol=1e-15)


def test_pytorch_sgd_float32():
    rng = np.random.default_rng(1)
    params = random_tree(rng, dtype=np.float32)
    tp = torch_params(params)
    topt = torch.optim.SGD(jax.tree.leaves(tp), lr=0.1, momentum=0.9, weight_decay=1e-4)
    tx = pytorch_sgd(0.1, 0.9, 1e-4)  # float32 hyperparameters by default
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)
    for lr in LRS[:3]:
        g = random_tree(rng, dtype=np.float32)
        for group in topt.param_groups:
            group["lr"] = lr
        for p, gi in zip(jax.tree.leaves(tp), jax.tree.leaves(g)):
            p.grad = torch.tensor(gi)
        topt.step()
        jp, state = sgd_apply(tx, jp, with_learning_rate(state, lr), jax.tree.map(jnp.asarray, g))
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(jp))
        assert_tree_close(jp, tp, rtol=0, atol=5e-7)  # 2 float32 ulps of |θ| < 4 (measured: 1 ulp)


def test_learning_rate_changes_without_recompiling():
    traces = []

    @jax.jit
    def step(params, state, grads, lr):
        traces.append(None)
        return sgd_apply(tx, params, with_learning_rate(state, lr), grads)

    tx = pytorch_sgd(0.1, 0.9, 1e-4, dtype=jnp.float64)
    rng = np.random.default_rng(2)
    params = jax.tree.map(jnp.asarray, random_tree(rng))
    state = tx.init(params)
    ref_params, ref_state = params, state
    for lr in LRS[:3]:
        g = jax.tree.map(jnp.asarray, random_tree(rng))
        params, state = step(params, state, g, jnp.asarray(lr, jnp.float64))
        ref_params, ref_state = sgd_apply(tx, ref_params, with_learning_rate(ref_state, lr), g)
    assert len(traces) == 1
    assert_tree_close(params, ref_params, rtol=0, atol=1e-15)


# Which parameters the loss touches at each step. The reference's loop gives every parameter
# a `.grad` in its first (real) step and PyTorch 1.0's zero_grad keeps it as a zero tensor,
# so an untouched parameter still steps: weight decay and momentum on a zero gradient.
TOUCH_SCHEDULE = [
    {"conv", "bn", "fc"},    # the real step: every parameter gets a .grad (first step: buf = g)
    {"conv", "bn"},          # a matching-only step: the classifier's gradient is a zero tensor
    {"conv", "bn"},
    {"conv", "fc"},          # a cross-entropy step
    {"bn"},
]


def test_sgd_steps_untouched_parameters_like_torch_zero_grads():
    rng = np.random.default_rng(3)
    params = random_tree(rng)
    wd, lr = 1e-4, 0.1
    names = list(SHAPES)  # top-level groups; "bn" holds two leaves

    tp = torch_params(params)
    topt = torch.optim.SGD(jax.tree.leaves(tp), lr=lr, momentum=0.9, weight_decay=wd)
    tx = pytorch_sgd(lr, 0.9, wd, dtype=jnp.float64)
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)

    for used in TOUCH_SCHEDULE:
        g = random_tree(rng)
        topt.zero_grad(set_to_none=False)  # PyTorch 1.0 semantics: .grad stays, as zeros
        for name in names:
            for p, gi in zip(jax.tree.leaves(tp[name]), jax.tree.leaves(g[name])):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if name in used:
                    p.grad.copy_(torch.tensor(gi))
        before = {n: [p.detach().clone() for p in jax.tree.leaves(tp[n])] for n in names}
        topt.step()
        for name in names:  # torch moved every parameter, touched or not
            for p, b in zip(jax.tree.leaves(tp[name]), before[name]):
                assert not torch.equal(p.detach(), b), name

        # JAX: jax.grad gives zeros for the untouched leaves; sgd_apply steps every leaf
        jg = {n: jax.tree.map(lambda a, keep=(n in used): jnp.asarray(a if keep else np.zeros_like(a)), g[n])
              for n in names}
        jp, state = sgd_apply(tx, jp, state, jg)
        assert_tree_close(jp, tp, rtol=0, atol=1e-13)
        assert_tree_close(momentum_buffers(state), torch_buffers(topt, tp), rtol=0, atol=1e-13)


def test_momentum_buffers_imported_from_torch():
    """Continue a PyTorch run in JAX: import θ and the momentum buffers after 2 steps."""
    rng = np.random.default_rng(5)
    params = random_tree(rng)
    grads = [random_tree(rng) for _ in LRS]
    tp = torch_params(params)
    topt = torch.optim.SGD(jax.tree.leaves(tp), lr=0.1, momentum=0.9, weight_decay=1e-4)
    tx = pytorch_sgd(0.1, 0.9, 1e-4, dtype=jnp.float64)
    for i, (lr, g) in enumerate(zip(LRS, grads)):
        if i == 2:
            jp = jax.tree.map(lambda t: jnp.asarray(t.detach().numpy().copy()), tp)
            bufs = jax.tree.map(lambda t: jnp.asarray(t.detach().numpy().copy()), torch_buffers(topt, tp))
            state = with_momentum_buffers(tx.init(jp), bufs)
            assert_tree_close(momentum_buffers(state), bufs, rtol=0, atol=0)
        for group in topt.param_groups:
            group["lr"] = lr
        for p, gi in zip(jax.tree.leaves(tp), jax.tree.leaves(g)):
            p.grad = torch.tensor(gi)
        topt.step()
        if i >= 2:
            jp, state = sgd_apply(tx, jp, with_learning_rate(state, lr), jax.tree.map(jnp.asarray, g))
            assert_tree_close(jp, tp, rtol=0, atol=1e-13)
            assert_tree_close(momentum_buffers(state), torch_buffers(topt, tp), rtol=0, atol=1e-13)


# =========================================================================== Adam


def _adam_moments(state):
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


def test_pytorch_adam_matches_torch():
    rng = np.random.default_rng(6)
    params = random_tree(rng)
    # gradients of very different scales per step (Adam's normalisation matters)
    grads = [random_tree(rng, scale=s) for s in (1.0, 1e-3, 10.0, 0.1, 1.0, 1e-6)]

    tp = torch_params(params)
    topt = torch.optim.Adam(jax.tree.leaves(tp), lr=1e-4, weight_decay=1e-4)
    tx = pytorch_adam(learning_rate=1e-4, weight_decay=1e-4)
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)
    for g in grads:
        for p, gi in zip(jax.tree.leaves(tp), jax.tree.leaves(g)):
            p.grad = torch.tensor(gi)
        topt.step()
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, jp)
        jp = optax.apply_updates(jp, updates)
        assert_tree_close(jp, tp, rtol=0, atol=1e-12)
        moments = _adam_moments(state)
        tleaves = jax.tree.leaves(tp)
        for mu, nu, p in zip(jax.tree.leaves(moments.mu), jax.tree.leaves(moments.nu), tleaves):
            np.testing.assert_allclose(np.asarray(mu), topt.state[p]["exp_avg"].numpy(), rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(np.asarray(nu), topt.state[p]["exp_avg_sq"].numpy(), rtol=1e-12, atol=1e-18)
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(jp))
    # the parameters moved by about lr per step
    moved = max(float(jnp.max(jnp.abs(a - np.asarray(b)))) for a, b in zip(jax.tree.leaves(jp), jax.tree.leaves(params)))
    assert 1e-4 < moved < 1e-3


def test_pytorch_adam_weight_decay_is_l2_not_decoupled():
    """With a zero gradient, PyTorch's Adam still moves θ by lr·sign(θ) (L2 gradient wd·θ,
    normalised); AdamW would move it by lr·wd·θ."""
    tx = pytorch_adam(1e-4, 1e-4)
    p = {"a": jnp.asarray([2.0, -3.0])}
    updates, _ = tx.update({"a": jnp.zeros(2)}, tx.init(p), p)
    tp = torch.tensor([2.0, -3.0], dtype=torch.float64, requires_grad=True)
    topt = torch.optim.Adam([tp], lr=1e-4, weight_decay=1e-4)
    tp.grad = torch.zeros(2, dtype=torch.float64)
    topt.step()
    np.testing.assert_allclose(np.asarray(p["a"] + updates["a"]), tp.detach().numpy(), rtol=0, atol=1e-12)
    # |update| = lr · |wd θ| / (|wd θ| + eps) ≈ lr (eps = 1e-8 costs a relative 5e-5 here)
    np.testing.assert_allclose(np.asarray(updates["a"]), [-1e-4 * 2e-4 / (2e-4 + 1e-8), 1e-4 * 3e-4 / (3e-4 + 1e-8)],
                               rtol=1e-12)
