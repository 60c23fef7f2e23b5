"""Parity of the optimizers with PyTorch's.

* `pytorch_sgd` / `sgd_apply` / `with_learning_rate` against `torch.optim.SGD`
  (momentum, weight decay, a learning rate that changes between steps, the first
  step's buffer = g), including PyTorch's skipping of parameters whose `.grad` is
  None (`has_grad`), and `momentum_buffers` / `with_momentum_buffers`;
* `grad_mask` against "has a .grad after backward" in PyTorch;
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
    grad_mask,
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
        assert_tree_close(jp, tp, rtol=0, atol=2e-6)


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


# Which parameters have a .grad at each step (the others are None in PyTorch).
SKIP_SCHEDULE = [
    {"conv", "fc"},          # bn never had a gradient yet: no buffer in PyTorch
    {"conv", "bn"},          # bn's first step (buf = g); fc skipped with a buffer
    {"conv", "bn", "fc"},
    {"bn"},
    {"conv", "fc"},
    {"fc"},
]


def test_sgd_skips_parameters_without_grad_like_torch():
    rng = np.random.default_rng(3)
    params = random_tree(rng)
    wd, lr = 1e-4, 0.1
    names = list(SHAPES)  # top-level groups; "bn" holds two leaves

    tp = torch_params(params)
    topt = torch.optim.SGD(jax.tree.leaves(tp), lr=lr, momentum=0.9, weight_decay=wd)
    tx = pytorch_sgd(lr, 0.9, wd, dtype=jnp.float64)
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)
    unmasked_p, unmasked_s = jp, state

    for step, used in enumerate(SKIP_SCHEDULE):
        g = random_tree(rng)
        # PyTorch: the unused parameters get no .grad at all
        topt.zero_grad(set_to_none=True)
        for name in names:
            if name in used:
                for p, gi in zip(jax.tree.leaves(tp[name]), jax.tree.leaves(g[name])):
                    p.grad = torch.tensor(gi)
        before = {n: [p.detach().clone() for p in jax.tree.leaves(tp[n])] for n in names}
        topt.step()
        for name in names:
            if name not in used:  # untouched by torch
                for p, b in zip(jax.tree.leaves(tp[name]), before[name]):
                    assert torch.equal(p.detach(), b)

        # JAX: jax.grad gives zeros for the unused leaves; the mask says which had a gradient
        jg = {n: jax.tree.map(lambda a, keep=(n in used): jnp.asarray(a if keep else np.zeros_like(a)), g[n])
              for n in names}
        mask = {n: jax.tree.map(lambda _, keep=(n in used): keep, g[n]) for n in names}
        prev_p, prev_s = jp, state
        jp, state = sgd_apply(tx, jp, state, jg, has_grad=mask)

        assert_tree_close(jp, tp, rtol=0, atol=1e-13)
        assert_tree_close(momentum_buffers(state), torch_buffers(topt, tp), rtol=0, atol=1e-13)
        for name in names:
            if name not in used:  # exactly untouched: value and buffer
                for a, b in zip(jax.tree.leaves(jp[name]), jax.tree.leaves(prev_p[name])):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(momentum_buffers(state)[name]),
                                jax.tree.leaves(momentum_buffers(prev_s)[name])):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        # Without the mask the zero gradients would still decay and carry momentum.
        unmasked_p, unmasked_s = sgd_apply(tx, unmasked_p, unmasked_s, jg)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(unmasked_p), jax.tree.leaves(jp)))
    assert diff > 1e-3


def test_sgd_all_true_mask_is_a_plain_step():
    rng = np.random.default_rng(4)
    tx = pytorch_sgd(0.1, 0.9, 1e-4, dtype=jnp.float64)
    p = jax.tree.map(jnp.asarray, random_tree(rng))
    g = jax.tree.map(jnp.asarray, random_tree(rng))
    s = tx.init(p)
    a = sgd_apply(tx, p, s, g)
    b = sgd_apply(tx, p, s, g, has_grad=jax.tree.map(lambda _: True, p))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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


# =========================================================================== grad_mask


def _mask_params():
    return {
        "used": jnp.arange(3.0) + 1,
        "ignored": jnp.ones(3),
        "where_branch": jnp.ones(2) * 2,
        "in_jit": jnp.ones(2) * 3,
        "jit_arg_unused": jnp.ones(2),
        "times_zero": jnp.ones(2),
        "dead_relu": jnp.ones(2),
        "aux_only": jnp.ones(2),
        "nested": {"used": jnp.ones((2, 2)), "ignored": jnp.ones(1)},
    }


@jax.jit
def _jitted_sub(a, b):
    del b  # passed in, not used
    return jnp.sum(jnp.tanh(a))


def _jax_loss(p):
    x = jnp.asarray([1.0, -2.0])
    loss = jnp.sum(p["used"] ** 2)
    loss = loss + jnp.sum(jnp.where(x > 0, p["where_branch"], 0.0))
    loss = loss + _jitted_sub(p["in_jit"], p["jit_arg_unused"])
    loss = loss + 0.0 * jnp.sum(p["times_zero"])
    loss = loss + jnp.sum(jax.nn.relu(p["dead_relu"] - 100.0))
    loss = loss + jnp.sum(p["nested"]["used"] @ x)
    return loss, jnp.sum(p["aux_only"])


def _torch_loss(p):
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss = (p["used"] ** 2).sum()
    loss = loss + torch.where(x > 0, p["where_branch"], torch.zeros_like(x)).sum()
    loss = loss + torch.tanh(p["in_jit"]).sum()
    loss = loss + 0.0 * p["times_zero"].sum()
    loss = loss + torch.relu(p["dead_relu"] - 100.0).sum()
    loss = loss + (p["nested"]["used"] @ x).sum()
    return loss, p["aux_only"].sum()


def test_grad_mask_matches_torch_grad_presence():
    params = _mask_params()
    mask = grad_mask(_jax_loss, params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert all(type(m) is bool for m in jax.tree.leaves(mask))
    expected = {
        "used": True, "ignored": False, "where_branch": True, "in_jit": True, "jit_arg_unused": False,
        "times_zero": True, "dead_relu": True, "aux_only": False,
        "nested": {"used": True, "ignored": False},
    }
    assert mask == expected

    tp = torch_params(params)
    _torch_loss(tp)[0].backward()
    torch_has_grad = jax.tree.map(lambda t: t.grad is not None, tp)
    assert mask == torch_has_grad
    # used-but-zero gradients are zeros (not None) in PyTorch, zeros in JAX
    assert not torch.any(tp["times_zero"].grad) and not torch.any(tp["dead_relu"].grad)
    g = jax.grad(lambda q: _jax_loss(q)[0])(params)
    assert not jnp.any(g["times_zero"]) and not jnp.any(g["dead_relu"])


def test_grad_mask_with_scalar_output_and_closure():
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    assert grad_mask(lambda p: jnp.sum(p["a"]), params) == {"a": True, "b": False}
    assert grad_mask(lambda p: jnp.sum(p["a"] * p["b"]), params) == {"a": True, "b": True}
    assert grad_mask(lambda p: jnp.float64(1.0), params) == {"a": False, "b": False}


NON_DIFFERENTIABLE_USES = {
    "stop_gradient": (lambda a: jnp.sum(jax.lax.stop_gradient(a)), lambda a: a.detach().sum()),
    "condition_only": (lambda a: jnp.sum(jnp.where(a > 0, 1.0, 2.0)),
                       lambda a: torch.where(a > 0, 1.0, 2.0).sum()),
}


@pytest.mark.parametrize("use", list(NON_DIFFERENTIABLE_USES))
def test_grad_mask_non_differentiable_use_like_torch(use):
    jax_use, torch_use = NON_DIFFERENTIABLE_USES[use]
    params = {"a": jnp.asarray([1.0, -1.0]), "b": jnp.asarray([2.0])}
    ta, tb = torch.tensor([1.0, -1.0], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    (torch_use(ta) + tb.sum()).backward()
    assert ta.grad is None  # PyTorch: no gradient
    assert grad_mask(lambda p: jax_use(p["a"]) + jnp.sum(p["b"]), params) == {"a": False, "b": True}


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
