"""Parity of every model with a PyTorch twin of the reference's architecture.

Weights go PyTorch -> state dict -> `variables_from_torch`; logits, every tap and
(in training mode) the updated BN running statistics are compared in float32
and float64 to `TOL[dtype, train]`. Relative error is the max absolute difference over
the max absolute value of the PyTorch tensor.
"""

from __future__ import annotations

import functools
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import require_shared
from l2t_jax.models import available_models, get_model, model_info
from l2t_jax.io.torch_layout import variables_from_torch
from l2t_jax.io.torch_pickle import WeightImportError, read_torch_file
from torch_reference import make_torch_model, perturb_

# Relative error bounds by (dtype, training mode), about 5-10x the worst measured over every case here
# (eval: logits and taps, worst float32 1.7e-6 (resnet34), float64 6e-15; train: also the updated BN
# running statistics, worst float32 1.8e-5 (resnet34), float64 5.6e-13 (resnet50 at 224 px)).
TOL = {(np.float32, False): 1e-5, (np.float32, True): 1e-4, (np.float64, False): 1e-13, (np.float64, True): 5e-12}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

torch.set_num_threads(2)


@functools.lru_cache(maxsize=None)
def jitted_apply(name: str, num_classes: int, conv_impl: str, train: bool):
    """jit of model.apply returning (logits, taps, batch_stats after the call)."""
    model = get_model(name, num_classes, conv_impl=conv_impl)

    def f(variables, x):
        if train:
            (logits, feats), state = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, feats, state["batch_stats"]
        logits, feats = model.apply(variables, x, train=False)
        return logits, feats, variables["batch_stats"]

    return jax.jit(f)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(ours - ref)) / (scale if scale > 0 else 1.0))


def state_dict_numpy(module: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_run(module: torch.nn.Module, x_nchw: np.ndarray, train: bool):
    module.train(train)
    with torch.no_grad():
        logits, feats = module(torch.from_numpy(x_nchw))
    return logits.numpy().copy(), [f.numpy().copy() for f in feats], state_dict_numpy(module)


def check_parity(name, tm, variables, x_nchw, train, tol, conv_impl="auto", num_classes=None):
    """Runs both frameworks on x and asserts logits, taps and BN statistics agree."""
    num_classes = num_classes or int(np.shape(variables["params"]["fc"]["kernel"])[1])
    ref_logits, ref_feats, ref_sd = torch_run(tm, x_nchw, train)
    logits, feats, stats = jitted_apply(name, num_classes, conv_impl, train)(variables, x_nchw.transpose(0, 2, 3, 1))
    assert logits.dtype == x_nchw.dtype
    errors = {"logits": rel_err(logits, ref_logits)}
    assert len(feats) == len(ref_feats) == len(model_info(name).tap_channels)
    for i, (f, r) in enumerate(zip(feats, ref_feats)):
        assert f.shape[-1] == model_info(name).tap_channels[i]
        errors[f"tap{i}"] = rel_err(np.asarray(f).transpose(0, 3, 1, 2), r)
    if train:
        ref_stats = variables_from_torch(name, ref_sd)["batch_stats"]
        flat_ours = jax.tree_util.tree_flatten_with_path(stats)[0]
        flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_stats)[0])
        assert len(flat_ours) == len(flat_ref)
        for path, value in flat_ours:
            key = jax.tree_util.keystr(path)
            if path[-1].key == "num_batches_tracked":
                assert int(value) == int(flat_ref[path]), key
                assert int(value) == int(_get(variables["batch_stats"], path)) + 1, key
            else:
                errors[f"stats{key}"] = rel_err(value, flat_ref[path])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{name} train={train} {x_nchw.dtype}: worst {worst} rel err {errors[worst]:.3g} > {tol}"
    return errors


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def setup_pair(name, dtype, seed, num_classes=10, batch=None):
    info = model_info(name)
    torch.manual_seed(seed)
    tm = perturb_(make_torch_model(name, num_classes), seed)
    if dtype == np.float64:
        tm = tm.double()
    variables = variables_from_torch(name, state_dict_numpy(tm))
    rng = np.random.default_rng(seed)
    batch = batch or (4 if info.image_size <= 64 else 2)
    x = rng.standard_normal((batch, 3, info.image_size, info.image_size)).astype(dtype)
    return tm, variables, x


CASES = [
    (name, dtype, train)
    for name in ("resnet20", "resnet32", "vgg9_bn", "resnet18", "resnet34")
    for dtype in (np.float32, np.float64)
    for train in (False, True)
] + [("resnet50", np.float64, True), ("resnet50", np.float32, False)]  # bottleneck: few 224 px compiles
# (resnet50 float32 *train* mode sits at the float32 floor: PyTorch float32 itself is 7.8e-5 from float64 at layer4.)
# The registry's small members (quickstart / runner tests), when registered.
CASES += [
    (name, dtype, train)
    for name in ("resnet8", "vgg_tiny")
    if name in available_models()
    for dtype, train in ((np.float32, False), (np.float64, True))
]


@pytest.mark.parametrize(
    "name,dtype,train", CASES, ids=[f"{n}-{d.__name__}-{'train' if t else 'eval'}" for n, d, t in CASES]
)
def test_parity_with_pytorch(name, dtype, train):
    tm, variables, x = setup_pair(name, dtype, seed=zlib.crc32(name.encode()) % 1000)
    check_parity(name, tm, variables, x, train, TOL[dtype, train])


@pytest.mark.parametrize("name", ["resnet20", "vgg9_bn"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_conv_impls_match_pytorch_and_each_other(name, dtype):
    tm, variables, x = setup_pair(name, dtype, seed=7)
    check_parity(name, tm, variables, x, True, TOL[dtype, True], conv_impl="xla")
    # Fresh copy of the PyTorch model's state: the previous call updated its running stats.
    tm, variables, x = setup_pair(name, dtype, seed=7)
    check_parity(name, tm, variables, x, True, TOL[dtype, True], conv_impl="im2col")
    a = jitted_apply(name, 10, "xla", True)(variables, x.transpose(0, 2, 3, 1))
    b = jitted_apply(name, 10, "im2col", True)(variables, x.transpose(0, 2, 3, 1))
    tol = 1e-5 if dtype == np.float32 else 1e-13  # measured 6.8e-6, 1.2e-14
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        if np.issubdtype(np.asarray(u).dtype, np.floating):
            assert rel_err(u, v) <= tol


def _conv_problem(seed, b, h, cin, cout, k, dtype):
    """Post-ReLU-like (non-negative) input, He-scaled HWIO kernel, random output cotangent."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((b, h, h, cin)), 0).astype(dtype)
    w = (rng.standard_normal((k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cin))).astype(dtype)
    g = rng.standard_normal((b, h, h, cout)).astype(dtype)
    return x, w, g


def _l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("cin,cout", [(256, 256), (128, 64), (3, 64)])
def test_im2col_conv_float32_forward_and_gradients_near_float64(cin, cout):
    """The grouped-tap im2col (<= IM2COL_MAX_CONTRACTION per matmul) keeps float32 within
    3.5e-7 (relative L2) of float64 in the output and both gradients. The one-matmul form
    contracts over 9 * C_in at once: its output was 5.2e-7 (C_in 256) and 4.1e-7 (128) off
    on XLA's CPU backend; grouped, 2.7e-7 and 2.5e-7 (the gradients, 1.5e-7 to 2.9e-7, do not
    change: their contractions run over C_out and B*H*W either way)."""
    from l2t_jax.models.layers import im2col_conv

    def value_and_grads(x, w, g):
        y, vjp = jax.vjp(lambda x, w: im2col_conv(x, w, 1, 1), x, w)
        return (y, *vjp(g))

    f = jax.jit(value_and_grads)  # arrays as arguments: no constant folding at compile time
    x, w, g = _conv_problem(0, 4, 8, cin, cout, 3, np.float32)
    ours = f(x, w, g)
    exact = f(x.astype(np.float64), w.astype(np.float64), g.astype(np.float64))
    for name, a, b in zip(("y", "dx", "dw"), ours, exact):
        assert a.dtype == np.float32
        assert _l2(a, b) <= 3.5e-7, (name, _l2(a, b))


CONV_SHAPES = [(3, 1, 1, 100), (3, 2, 1, 64), (7, 2, 3, 3), (1, 2, 0, 300)]  # (k, stride, padding, C_in)


def _second_order_against_xla_conv(conv, k, stride, padding, cin, with_vjp):
    """`conv(x, w)` against XLA's convolution in float64 (relative L2 <= 1e-14): the value, both
    gradients of sum(tanh(conv) * g), a jvp of that gradient (the meta-gradient's Hessian-vector
    pattern in mixed mode) and, if `with_vjp`, a vjp of it (reverse over reverse)."""
    from l2t_jax.models.layers import xla_conv

    x, w, _ = _conv_problem(1, 2, 9, cin, 8, k, np.float64)
    tx, tw, _ = _conv_problem(2, 2, 9, cin, 8, k, np.float64)
    g = np.random.default_rng(3).standard_normal(xla_conv(x, w, stride, padding).shape)

    def derivatives(conv, x, w, g, tx, tw):
        def loss(x, w):
            return jnp.sum(jnp.tanh(conv(x, w)) * g)

        grad = jax.grad(loss, argnums=(0, 1))
        out = (conv(x, w), *grad(x, w), *jax.jvp(grad, (x, w), (tx, tw))[1])
        return out + (tuple(jax.vjp(grad, x, w)[1]((tx, tw))) if with_vjp else ())

    def at(conv):
        return jax.jit(functools.partial(derivatives, conv))(x, w, g, tx, tw)

    ours = at(conv)
    ref = at(lambda x, w: xla_conv(x, w, stride, padding))
    assert len(ours) == (7 if with_vjp else 5)
    for name, a, b in zip(("y", "dx", "dw", "jvp_x", "jvp_w", "vjp_x", "vjp_w"), ours, ref):
        assert a.shape == b.shape and a.dtype == np.float64, name
        assert _l2(a, b) <= 1e-14, (name, _l2(a, b))  # measured <= 1.1e-15


@pytest.mark.parametrize("k,stride,padding,cin", CONV_SHAPES)
@pytest.mark.parametrize("max_contraction", [None, 1, 150, 256])
def test_im2col_conv_groupings_equal_xla_conv_to_second_order(k, stride, padding, cin, max_contraction):
    """Every tap grouping is the same convolution, to second order."""
    from l2t_jax.models.layers import im2col_conv

    conv = functools.partial(im2col_conv, stride=stride, padding=padding, max_contraction=max_contraction)
    _second_order_against_xla_conv(conv, k, stride, padding, cin, with_vjp=False)


@pytest.mark.parametrize("k,stride,padding,cin", CONV_SHAPES)
def test_im2col_loop_conv_equals_xla_conv_to_second_order(k, stride, padding, cin):
    """The tap-loop derivative is the same convolution's, to second order in both modes."""
    from l2t_jax.models.layers import im2col_loop_conv

    _second_order_against_xla_conv(lambda x, w: im2col_loop_conv(x, w, stride, padding), k, stride, padding, cin,
                                   with_vjp=True)


def test_im2col_loop_conv_float32_gradients_near_float64():
    """In float32 the tap loop's gradients stay as close to float64 as autodiff's (3.5e-7, relative L2)."""
    from l2t_jax.models.layers import im2col_loop_conv

    def value_and_grads(x, w, g):
        y, vjp = jax.vjp(lambda x, w: im2col_loop_conv(x, w, 1, 1), x, w)
        return (y, *vjp(g))

    f = jax.jit(value_and_grads)
    x, w, g = _conv_problem(0, 4, 8, 256, 256, 3, np.float32)
    ours = f(x, w, g)
    exact = f(x.astype(np.float64), w.astype(np.float64), g.astype(np.float64))
    for name, a, b in zip(("y", "dx", "dw"), ours, exact):
        assert a.dtype == np.float32
        assert _l2(a, b) <= 3.5e-7, (name, _l2(a, b))


def test_auto_lowering_is_the_tap_loop_in_mixed_mode_on_cpu_only():
    from l2t_jax.models.layers import conv_impl_for

    on_cpu = jax.default_backend() == "cpu"
    assert conv_impl_for("auto", "mixed") == ("im2col_loop" if on_cpu else "auto")
    assert conv_impl_for("auto", "reverse") == "auto"
    assert conv_impl_for("im2col", "mixed") == "im2col" and conv_impl_for("xla", "mixed") == "xla"


def structured_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) images: smooth colour gradients, blobs and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        img = np.zeros((size, size, 3))
        for c in range(3):
            a, b, ph = rng.uniform(-1, 1, 3)
            img[..., c] = 0.5 + 0.3 * np.sin(2 * np.pi * (a * xx + b * yy) + 3 * ph)
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.3 * r) ** 2
        img[blob] = rng.uniform(0, 1, 3)
        img += 0.05 * rng.standard_normal(img.shape)
        out.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    return np.stack(out)


def normalise(x_uint8: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize(ImageNet mean/std), NHWC float32."""
    return (x_uint8.astype(np.float32) / np.float32(255.0) - MEAN) / STD


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_tinyimagenet_resnet32_matches_pytorch(dtype):
    path = require_shared("reference/tinyimagenet-resnet32.pth.tar")
    ck = read_torch_file(path)
    assert ck["num_classes"] == 200
    variables = variables_from_torch("resnet32", ck["state_dict"], 200)
    tm = make_torch_model("resnet32", 200)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ck["state_dict"].items()}, strict=True)
    if dtype == np.float64:
        tm = tm.double()
        variables = jax.tree_util.tree_map(lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, variables)
    x = normalise(structured_images(4, 32, seed=0)).astype(dtype).transpose(0, 3, 1, 2)
    errors = check_parity("resnet32", tm, variables, np.ascontiguousarray(x), False, TOL[dtype, False], num_classes=200)
    assert len([k for k in errors if k.startswith("tap")]) == 15


def test_stl10_case_vgg_target_imports_and_matches_pytorch():
    case = require_shared("reference/cases/stl10_vgg9")
    config = json.loads((case / "config.json").read_text())
    ck = read_torch_file(case / "checkpoint.pth")
    sd = ck["target_model"]
    assert any(k.startswith("new_bn.") for k in sd) and "alphas.0" in sd  # unused keys are there
    variables = variables_from_torch(config["target_model"], sd, config["num_classes"])
    tm = make_torch_model("vgg9_bn", config["num_classes"], extras=True)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    batch = np.load(case / "batch.npz")
    x = np.ascontiguousarray(batch["x"])
    check_parity("vgg9_bn", tm, variables, x, False, TOL[np.float32, False])
    check_parity("vgg9_bn", tm, variables, x, True, TOL[np.float32, True])


def test_import_errors_name_the_key():
    tm = make_torch_model("resnet20", 10)
    sd = state_dict_numpy(tm)
    broken = dict(sd)
    del broken["block3.downsample.0.weight"]
    broken["blocks4.1.bn2.running_var"] = np.ones(7, np.float32)
    with pytest.raises(WeightImportError) as e:
        variables_from_torch("resnet20", broken)
    msg = str(e.value)
    assert "block3.downsample.0.weight" in msg and "(32, 16, 1, 1)" in msg
    assert "blocks4.1.bn2.running_var" in msg and "(7,)" in msg and "(32,)" in msg


def test_max_pool_2x2_ties_and_nan_as_pytorch():
    """Ties (many, from small integers): the same values as `F.max_pool2d(2)`, and the whole
    gradient goes to the first maximum in PyTorch's scan order; odd sizes drop the last
    row/column; a NaN in a window propagates."""
    from l2t_jax.models.layers import max_pool_2x2

    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (3, 7, 6, 4)).astype(np.float64)  # H odd: its last row is dropped
    g = rng.standard_normal((3, 3, 3, 4))
    got, vjp = jax.vjp(max_pool_2x2, jnp.asarray(x))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    want = torch.nn.functional.max_pool2d(tx, 2)
    want.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(got, want.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], tx.grad.numpy().transpose(0, 2, 3, 1))
    hits = np.sum(x[:, :6] == np.repeat(np.repeat(np.asarray(got), 2, 1), 2, 2))
    assert hits - got.size > 50  # windows with tied maxima: the test tests the tie rule

    x[0, 1, 0, 0] = np.nan
    assert np.isnan(max_pool_2x2(jnp.asarray(x))[0, 0, 0, 0])


@pytest.mark.parametrize("hw", [(9, 8), (6, 7)])
def test_max_pool_3x3_s2_p1_ties_overlaps_and_nan_as_pytorch(hw):
    """torchvision's stem pool: values as `F.max_pool2d(3, 2, 1)`; with many ties (small
    integers) and overlapping windows, the gradient of each window goes to its first maximum in
    PyTorch's scan order and overlapping windows add up; odd and even sizes; NaN propagates."""
    from l2t_jax.models.layers import max_pool_3x3_s2_p1

    rng = np.random.default_rng(1)
    x = rng.integers(-2, 2, (2, *hw, 3)).astype(np.float64)
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    want = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
    g = rng.standard_normal(want.shape)
    want.backward(torch.tensor(g))
    got, vjp = jax.vjp(max_pool_3x3_s2_p1, jnp.asarray(x))
    np.testing.assert_array_equal(got, want.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))[0], tx.grad.numpy().transpose(0, 2, 3, 1))
    # the test tests the tie rule: many windows hold their maximum more than once
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    m = np.asarray(got)
    count = sum(xp[:, i : i + 2 * m.shape[1] - 1 : 2, j : j + 2 * m.shape[2] - 1 : 2] == m
                for i in range(3) for j in range(3))
    assert np.mean(count > 1) > 0.3

    x[0, 0, 0, 0] = np.nan
    assert np.isnan(max_pool_3x3_s2_p1(jnp.asarray(x))[0, 0, 0, 0])
