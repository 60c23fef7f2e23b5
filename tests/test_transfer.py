"""Parity of the transfer primitives with PyTorch and with the reference's semantics.

* `resize_bilinear` against `F.interpolate(scale_factor=s, mode="bilinear")`
  (align_corners=False, no anti-aliasing);
* the pair helpers against the reference's `--pairs` flags and the named
  configurations (`transfer.named_pairs`);
* `meta_outputs` + `matching_loss` (loss and gradients) against a PyTorch
  re-implementation, written here, of the reference's FeatureMatching,
  WeightNetwork and LossWeightNetwork forwards;
* initialisation of φ and of the matching branch, `MatchingConfig` validation.

Layouts: our maps are NHWC, PyTorch's NCHW; our branch kernel (C_t, C_s) is the
PyTorch conv weight (C_s, C_t, 1, 1)[:, :, 0, 0].T; our Linear kernel (in, out)
is the PyTorch weight.T.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from l2t_jax import transfer as T
from l2t_jax.transfer import MatchingConfig

torch.set_num_threads(2)

RESNET32_VGG9_ALL = ",".join(f"{m}-{n}" for m in (4, 9, 14) for n in range(5))
# The reference's default `--pairs` (ResNet34 -> ResNet18), in its order.
RESNET34_RESNET18_FLAG = "4-4,4-3,4-2,4-1,3-4,3-3,3-2,3-1,2-4,2-3,2-2,2-1,1-4,1-3,1-2,1-1"


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def nhwc_to_nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


# =========================================================================== resize


RESIZE_CASES = [
    # (H_in, W_in, scale)
    (32, 32, 1 / 2),
    (32, 32, 1 / 4),
    (32, 32, 1 / 8),
    (16, 16, 1 / 2),
    (56, 56, 1 / 8),
    (28, 28, 1 / 4),
    (14, 14, 1 / 2),
    (8, 8, 2.0),
    (8, 8, 4.0),
    (7, 7, 2.0),
    (4, 4, 4.0),
    (12, 8, 1 / 2),  # non-square: the same factor on both axes
    (6, 10, 2.0),
]


# float64: a few ulps of |x| < 4 (measured 4.4e-16); float32: 4 ulps (measured 1)
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float64, 4e-15)], ids=["f32", "f64"])
@pytest.mark.parametrize("h,w,scale", RESIZE_CASES, ids=[f"{h}x{w}@{s:g}" for h, w, s in RESIZE_CASES])
def test_resize_bilinear_matches_torch_interpolate(h, w, scale, dtype, tol):
    rng = np.random.default_rng(h * 100 + w + int(scale * 1000))
    x = rng.standard_normal((2, 3, h, w)).astype(dtype)  # NCHW
    ref = F.interpolate(torch.from_numpy(x), scale_factor=scale, mode="bilinear", align_corners=False)
    got = T.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), scale)
    assert got.dtype == dtype
    expected = nchw_to_nhwc(ref)
    assert got.shape == expected.shape == (2, math.floor(h * scale), math.floor(w * scale), 3)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=tol)


NON_DYADIC = [(12, 8 / 12), (9, 1.5), (10, 0.3), (7, 3 / 7), (5, 2.6)]


@pytest.mark.parametrize("dtype,tol", [(np.float32, 5e-6), (np.float64, 2e-14)], ids=["f32", "f64"])  # measured 1.2e-6, 4.4e-15
@pytest.mark.parametrize("size,scale", NON_DYADIC, ids=[f"{h}@{s:.3g}" for h, s in NON_DYADIC])
def test_resize_bilinear_non_dyadic_scales(size, scale, dtype, tol):
    """Also right for scales the zoo never needs. In float32 PyTorch computes the source
    coordinates in float32 (we use exact float64 weights), hence the looser tolerance."""
    x = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(dtype)
    ref = F.interpolate(torch.from_numpy(x), scale_factor=scale, mode="bilinear")
    got = T.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), scale)
    expected = nchw_to_nhwc(ref)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("src,dst", [(32, 16), (32, 8), (8, 32), (7, 14), (56, 7), (16, 4), (4, 16)])
def test_resize_with_the_references_scale_expression(src, dst):
    """The reference passes scale_factor=tw/sw; the output must land exactly on dst."""
    rng = np.random.default_rng(src * 1000 + dst)
    x = rng.standard_normal((1, 2, src, src))
    scale = dst / src
    ref = F.interpolate(torch.from_numpy(x), scale_factor=scale, mode="bilinear")
    got = T.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), scale)
    assert got.shape == (1, dst, dst, 2)
    np.testing.assert_allclose(np.asarray(got), nchw_to_nhwc(ref), rtol=0, atol=4e-15)  # float64, |x| < 4


def test_resize_downscale_is_not_antialiased():
    """2x down = 2x2 average; 4x down = average of the two middle pixels of each span
    (2x2 middle block in 2-D); jax.image.resize (antialiased) gives something else."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 1))
    xj = jnp.asarray(x)

    half = np.asarray(T.resize_bilinear(xj, 0.5))
    blocks2 = x.reshape(1, 4, 2, 4, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(half, blocks2, atol=1e-14)

    quarter = np.asarray(T.resize_bilinear(xj, 0.25))
    blocks4 = x.reshape(1, 2, 4, 2, 4, 1)[:, :, 1:3, :, 1:3, :].mean(axis=(2, 4))
    np.testing.assert_allclose(quarter, blocks4, atol=1e-14)

    antialiased = np.asarray(jax.image.resize(xj, (1, 2, 2, 1), method="bilinear"))
    assert np.max(np.abs(antialiased - quarter)) > 1e-3
    # ... and the antialiased result is not what PyTorch computes either.
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), scale_factor=0.25, mode="bilinear")
    np.testing.assert_allclose(quarter, nchw_to_nhwc(ref), atol=1e-14)


def test_resize_1d_quarter_weights():
    """A single row 0..15 down-scaled 4x: outputs 1.5, 5.5, 9.5, 13.5 (middle pairs)."""
    x = jnp.tile(jnp.arange(16.0, dtype=jnp.float64)[None, :], (4, 1))[None, :, :, None]
    out = T.resize_bilinear(x, 0.25)
    np.testing.assert_allclose(np.asarray(out)[0, 0, :, 0], [1.5, 5.5, 9.5, 13.5], atol=1e-14)


# =========================================================================== pairs


def test_parse_and_format_reference_flags():
    pairs = T.parse_pairs(RESNET32_VGG9_ALL)
    assert len(pairs) == 15
    assert pairs[:6] == ((4, 0), (4, 1), (4, 2), (4, 3), (4, 4), (9, 0))
    assert pairs[-1] == (14, 4)
    assert T.format_pairs(pairs) == RESNET32_VGG9_ALL
    assert RESNET32_VGG9_ALL.startswith("4-0,4-1,4-2,4-3,4-4,9-0,") and RESNET32_VGG9_ALL.endswith("14-4")

    ref = T.parse_pairs(RESNET34_RESNET18_FLAG)
    assert len(ref) == 16
    assert set(ref) == {(m, n) for m in (1, 2, 3, 4) for n in (1, 2, 3, 4)}
    assert ref[0] == (4, 4) and ref[-1] == (1, 1)  # order kept
    assert T.format_pairs(ref) == RESNET34_RESNET18_FLAG


def test_parse_pairs_forms():
    assert T.parse_pairs("14-2") == ((14, 2),)
    assert T.parse_pairs(" 4-0, 9-1 ,14-2 ") == ((4, 0), (9, 1), (14, 2))
    assert T.parse_pairs([(4, 0), [9, 1], (np.int64(14), 2)]) == ((4, 0), (9, 1), (14, 2))
    assert all(type(v) is int for p in T.parse_pairs([(np.int64(3), np.int32(1))]) for v in p)
    assert T.format_pairs(T.parse_pairs("4-0,9-1,14-2")) == "4-0,9-1,14-2"
    assert T.format_pairs([]) == ""


@pytest.mark.parametrize("bad", ["4", "4-", "-4", "4-0-1", "a-b", "4:0", "4-0;9-1", "4--1", "-1-2", "4.0-1", "4-x"])
def test_parse_pairs_malformed(bad):
    with pytest.raises(ValueError, match="m-n"):
        T.parse_pairs(bad)


@pytest.mark.parametrize("spec", ["4-0,9-1,4-0", [(4, 0), (4, 0)]])
def test_parse_pairs_duplicates(spec):
    with pytest.raises(ValueError, match="duplicate"):
        T.parse_pairs(spec)


def test_validate_pairs():
    T.validate_pairs(T.parse_pairs(RESNET32_VGG9_ALL), 15, 5)
    with pytest.raises(ValueError) as e:
        T.validate_pairs([(4, 0), (15, 1), (3, 5)], 15, 5)
    msg = str(e.value)
    assert "15-1" in msg and "3-5" in msg and "4-0" not in msg
    assert "0..14" in msg and "0..4" in msg
    with pytest.raises(ValueError, match="-1-0"):
        T.validate_pairs([(-1, 0)], 15, 5)


def test_named_pairs_resnet32_vgg9():
    all_to_all = T.named_pairs("all_to_all", "resnet32", "vgg9_bn")
    assert T.format_pairs(all_to_all) == RESNET32_VGG9_ALL
    assert len(all_to_all) == 15
    assert T.named_pairs("single", "resnet32", "vgg9_bn") == ((14, 2),)
    assert T.named_pairs("one_to_one", "resnet32", "vgg9_bn") == ((4, 0), (9, 1), (14, 2))


def test_named_pairs_resnet34_resnet18():
    all_to_all = T.named_pairs("all_to_all", "resnet34", "resnet18")
    assert len(all_to_all) == 16
    assert set(all_to_all) == set(T.parse_pairs(RESNET34_RESNET18_FLAG))
    assert T.named_pairs("single", "resnet34", "resnet18") == ((4, 4),)
    assert T.named_pairs("one_to_one", "resnet34", "resnet18") == ((1, 1), (2, 2), (3, 3), (4, 4))


def test_resolve_pairs():
    assert T.resolve_pairs("all_to_all", "resnet32", "vgg9_bn") == T.parse_pairs(RESNET32_VGG9_ALL)
    assert T.resolve_pairs(RESNET32_VGG9_ALL, "resnet32", "vgg9_bn") == T.parse_pairs(RESNET32_VGG9_ALL)
    assert T.resolve_pairs("single", "resnet32", "vgg9_bn") == ((14, 2),)
    assert T.resolve_pairs("one_to_one", "resnet32", "vgg9_bn") == ((4, 0), (9, 1), (14, 2))
    assert T.resolve_pairs(RESNET34_RESNET18_FLAG, "resnet34", "resnet18") == T.parse_pairs(RESNET34_RESNET18_FLAG)
    assert T.resolve_pairs("single", "resnet34", "resnet18") == ((4, 4),)
    # out of range for the models: the pair and the valid ranges are named
    with pytest.raises(ValueError) as e:
        T.resolve_pairs("14-5", "resnet32", "vgg9_bn")
    assert "14-5" in str(e.value) and "0..4" in str(e.value)
    with pytest.raises(ValueError) as e:
        T.resolve_pairs("15-0", "resnet32", "vgg9_bn")
    assert "15-0" in str(e.value) and "0..14" in str(e.value)
    with pytest.raises(ValueError, match="5-1"):
        T.resolve_pairs("5-1", "resnet34", "resnet18")
    with pytest.raises(ValueError, match="duplicate"):
        T.resolve_pairs("4-0,4-0", "resnet32", "vgg9_bn")


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown pair configuration 'all-to-all'") as e:
        T.named_pairs("all-to-all", "resnet32", "vgg9_bn")
    assert "all_to_all" in str(e.value) and "one_to_one" in str(e.value)
    with pytest.raises(ValueError, match="'bogus'"):
        T.resolve_pairs("bogus", "resnet32", "vgg9_bn")
    with pytest.raises(ValueError, match="unknown model 'resnet33'"):
        T.named_pairs("all_to_all", "resnet33", "vgg9_bn")
    with pytest.raises(ValueError, match="unknown model 'vgg10'"):
        T.resolve_pairs("4-0", "resnet32", "vgg10")


# =========================================================================== PyTorch reference of the loss


def torch_pool(f: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(f, f.size(2)).view(-1, f.size(1))


def torch_weights(src, pairs, w_params):
    """The reference's WeightNetwork: softmax(Linear(pooled S)) per pair."""
    return [F.softmax(F.linear(torch_pool(src[m]), p["weight"], p["bias"]), 1) for (m, _), p in zip(pairs, w_params)]


def torch_loss_weights(src, pairs, lw_params, kind):
    """The reference's LossWeightNetwork: (B, 1) per pair, or (1, 1) for "const"."""
    if kind == "const":
        return [v.view(1, 1) for v in F.softplus(lw_params.mul(10))]
    out = []
    for (m, _), p in zip(pairs, lw_params):
        f = torch_pool(src[m])
        if kind == "relu":
            out.append(F.relu(F.linear(f, p["weight"], p["bias"])))
        elif kind == "relu-avg":
            out.append(F.relu(F.linear(f.div(f.size(1)), p["weight"], p["bias"])))
        elif kind == "relu6":
            out.append(F.relu6(F.linear(f, p["weight"], p["bias"])))
        else:
            raise AssertionError(kind)
    return out


def torch_matching(src, tgt, pairs, branch, weight, beta, loss_weight):
    """The reference's FeatureMatching forward (NCHW)."""
    total = 0.0
    for i, (m, n) in enumerate(pairs):
        s, t = src[m], tgt[n]
        r = F.conv2d(t, branch[i]["weight"], branch[i]["bias"])
        if s.size(3) != t.size(3):
            s = F.interpolate(s, scale_factor=t.size(3) / s.size(3), mode="bilinear")
        d = (s - r).pow(2).mean(3).mean(2)
        if loss_weight is None and weight is None:
            term = d.mean(1).mean(0) * beta
        elif loss_weight is None:
            term = (d * weight[i]).sum(1).mean(0) * beta
        elif weight is None:
            term = (d.sum(1) * loss_weight[i].squeeze()).mean(0) * beta
        else:
            term = ((d * weight[i]).sum(1) * loss_weight[i].squeeze()).mean(0) * beta
        total = total + term
    return total


# Source taps (C, H): sizes 8, 4, 16; target taps (C, H): 8, 2, 16, 32.
SRC_SHAPES = [(6, 8), (5, 4), (4, 16)]
TGT_SHAPES = [(3, 8), (7, 2), (2, 16), (4, 32)]
# scales: 1 (8->8), 1/2 (16->8), 1/4 (8->2), 1/8 (16->2), 2 (16->32), 4 (4->16); source 0 and 2
# and target 0 and 1 are used twice.
PAIRS = ((0, 0), (2, 0), (0, 1), (2, 1), (2, 3), (1, 2))
BATCH = 6


def make_problem(seed: int, lambda_type: str, dtype=np.float64):
    """Random maps and parameters in our layout (numpy), shared by both sides."""
    rng = np.random.default_rng(seed)
    src = [(rng.standard_normal((BATCH, h, h, c)) + rng.standard_normal(c)).astype(dtype) for c, h in SRC_SHAPES]
    tgt = [rng.standard_normal((BATCH, h, h, c)).astype(dtype) for c, h in TGT_SHAPES]
    branch, w, lw = [], [], []
    for m, n in PAIRS:
        cs, ct = SRC_SHAPES[m][0], TGT_SHAPES[n][0]
        branch.append({"kernel": rng.uniform(-1, 1, (ct, cs)).astype(dtype), "bias": rng.uniform(-1, 1, cs).astype(dtype)})
        w.append({"kernel": rng.standard_normal((cs, cs)).astype(dtype), "bias": rng.standard_normal(cs).astype(dtype)})
        # spread the λ pre-activations so that relu6 clips on both sides for some samples
        scale = cs if lambda_type == "relu-avg" else 1.0
        lw.append({"kernel": (3.0 * scale * rng.standard_normal((cs, 1))).astype(dtype),
                   "bias": rng.uniform(-1, 5, 1).astype(dtype)})
    if lambda_type == "const":
        lw = {"weights": rng.uniform(-0.3, 0.3, len(PAIRS)).astype(dtype)}
    return src, tgt, branch, {"w": w, "lw": lw}


def to_torch_params(branch, meta, lambda_type):
    tb = [{"weight": torch.tensor(b["kernel"].T[:, :, None, None].copy(), requires_grad=True),
           "bias": torch.tensor(b["bias"], requires_grad=True)} for b in branch]
    tw = [{"weight": torch.tensor(p["kernel"].T.copy(), requires_grad=True),
           "bias": torch.tensor(p["bias"], requires_grad=True)} for p in meta["w"]]
    if lambda_type == "const":
        tlw = torch.tensor(meta["lw"]["weights"], requires_grad=True)
    else:
        tlw = [{"weight": torch.tensor(p["kernel"].T.copy(), requires_grad=True),
                "bias": torch.tensor(p["bias"], requires_grad=True)} for p in meta["lw"]]
    return tb, tw, tlw


# mode -> (method of the config, w used, λ used)
MODES = {
    "l2t_ww": ("l2t_ww", True, True),
    "l2t_w": ("l2t_w", True, False),
    "fm": ("fm", False, False),
    "lambda_without_w": ("l2t_ww", False, True),  # the reference's quirk: channels summed
}
LOSS_CASES = [
    ("l2t_ww", "relu6"), ("l2t_ww", "relu"), ("l2t_ww", "relu-avg"), ("l2t_ww", "const"),
    ("l2t_w", "relu6"), ("fm", "relu6"),
    ("lambda_without_w", "relu6"), ("lambda_without_w", "const"),
]


def jax_loss_fn(cfg, use_w, use_lam, grad=False):
    """(branch, target maps, φ, source maps) -> (loss, per-pair); with `grad`, its
    value_and_grad with respect to the first three. Run eagerly: cheaper here than
    compiling one program per case."""

    def loss(branch, tgt, meta, src):
        w, lam = T.meta_outputs(meta, T.pool(src), cfg)
        return T.matching_loss(branch, src, tgt, w if use_w else None, lam if use_lam else None, cfg)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True) if grad else loss


@pytest.mark.parametrize("mode,lambda_type", LOSS_CASES, ids=[f"{m}-{k}" for m, k in LOSS_CASES])
def test_matching_loss_and_gradients_match_torch(mode, lambda_type):
    method, use_w, use_lam = MODES[mode]
    beta = 0.3
    cfg = MatchingConfig(pairs=PAIRS, method=method, beta=beta, lambda_type=lambda_type)
    src, tgt, branch, full_meta = make_problem(zlib.crc32(f"{mode}/{lambda_type}".encode()), lambda_type)
    meta = {"l2t_ww": full_meta, "l2t_w": {"w": full_meta["w"]}, "fm": {}}[method]

    # ---- PyTorch
    t_src = [nhwc_to_nchw(s) for s in src]
    t_tgt = [nhwc_to_nchw(t).requires_grad_(True) for t in tgt]
    tb, tw, tlw = to_torch_params(branch, full_meta, lambda_type)
    weight = torch_weights(t_src, PAIRS, tw) if use_w else None
    loss_weight = torch_loss_weights(t_src, PAIRS, tlw, lambda_type) if use_lam else None
    t_loss = torch_matching(t_src, t_tgt, PAIRS, tb, weight, beta, loss_weight)
    t_loss.backward()

    # ---- JAX
    j = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    (loss, per_pair), grads = jax_loss_fn(cfg, use_w, use_lam, grad=True)(j(branch), j(tgt), j(meta), j(src))
    g_branch, g_tgt, g_meta = grads

    assert loss.dtype == jnp.float64
    assert per_pair.shape == (len(PAIRS),)
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(jnp.sum(per_pair)), float(loss), rtol=1e-13)

    tol = dict(rtol=1e-10, atol=1e-12)
    for i in range(len(PAIRS)):
        np.testing.assert_allclose(np.asarray(g_branch[i]["kernel"]), tb[i]["weight"].grad[:, :, 0, 0].numpy().T, **tol)
        np.testing.assert_allclose(np.asarray(g_branch[i]["bias"]), tb[i]["bias"].grad.numpy(), **tol)
    for n in range(len(TGT_SHAPES)):
        np.testing.assert_allclose(np.asarray(g_tgt[n]), nchw_to_nhwc(t_tgt[n].grad), **tol)

    if use_w:
        for i in range(len(PAIRS)):
            np.testing.assert_allclose(np.asarray(g_meta["w"][i]["kernel"]), tw[i]["weight"].grad.numpy().T, **tol)
            np.testing.assert_allclose(np.asarray(g_meta["w"][i]["bias"]), tw[i]["bias"].grad.numpy(), **tol)
    elif "w" in g_meta:
        assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_meta["w"]))
    if use_lam:
        if lambda_type == "const":
            np.testing.assert_allclose(np.asarray(g_meta["lw"]["weights"]), tlw.grad.numpy(), **tol)
        else:
            for i in range(len(PAIRS)):
                np.testing.assert_allclose(np.asarray(g_meta["lw"][i]["kernel"]), tlw[i]["weight"].grad.numpy().T, **tol)
                np.testing.assert_allclose(np.asarray(g_meta["lw"][i]["bias"]), tlw[i]["bias"].grad.numpy(), **tol)


@pytest.mark.parametrize("lambda_type", ["relu6", "relu", "relu-avg", "const"])
def test_meta_outputs_match_torch(lambda_type):
    cfg = MatchingConfig(pairs=PAIRS, method="l2t_ww", lambda_type=lambda_type)
    src, _, _, meta = make_problem(7, lambda_type)
    t_src = [nhwc_to_nchw(s) for s in src]
    _, tw, tlw = to_torch_params([], meta, lambda_type)
    w, lam = T.meta_outputs(jax.tree.map(jnp.asarray, meta), T.pool([jnp.asarray(s) for s in src]), cfg)
    tws = torch_weights(t_src, PAIRS, tw)
    tl = torch_loss_weights(t_src, PAIRS, tlw, lambda_type)
    assert len(w) == len(lam) == len(PAIRS)
    for i, (m, _) in enumerate(PAIRS):
        assert w[i].shape == (BATCH, SRC_SHAPES[m][0]) and lam[i].shape == (BATCH,)
        np.testing.assert_allclose(np.asarray(w[i]), tws[i].detach().numpy(), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(np.asarray(jnp.sum(w[i], -1)), 1.0, atol=1e-14)
        expected = np.broadcast_to(tl[i].detach().numpy().reshape(-1), (BATCH,))
        np.testing.assert_allclose(np.asarray(lam[i]), expected, rtol=1e-13, atol=1e-15)
    if lambda_type == "relu6":  # the problem exercises both clips and the linear part
        all_lam = np.concatenate([np.asarray(l) for l in lam])
        assert (all_lam == 0).any() and (all_lam == 6).any() and ((all_lam > 0) & (all_lam < 6)).any()


def test_meta_outputs_without_meta_params():
    for method in ("fm", "scratch"):
        pairs = PAIRS if method == "fm" else ()
        assert T.meta_outputs({}, [], MatchingConfig(pairs=pairs, method=method)) == (None, None)
    src, _, _, meta = make_problem(3, "relu6")
    w, lam = T.meta_outputs({"w": jax.tree.map(jnp.asarray, meta["w"])}, T.pool([jnp.asarray(s) for s in src]),
                            MatchingConfig(pairs=PAIRS, method="l2t_w"))
    assert lam is None and len(w) == len(PAIRS)


def test_matching_loss_float32_stays_float32():
    pairs = ((2, 0), (0, 1))  # 1/2 and 1/4 down-scaling
    cfg = MatchingConfig(pairs=pairs, method="l2t_ww", lambda_type="relu6")
    src, tgt, branch, meta = make_problem(11, "relu6")
    idx = [PAIRS.index(p) for p in pairs]
    branch = [branch[i] for i in idx]
    meta = {k: [v[i] for i in idx] for k, v in meta.items()}
    f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)  # noqa: E731
    loss32, _ = jax_loss_fn(cfg, True, True)(f32(branch), f32(tgt), f32(meta), f32(src))
    loss64, _ = jax_loss_fn(cfg, True, True)(*(jax.tree.map(jnp.asarray, t) for t in (branch, tgt, meta, src)))
    assert loss32.dtype == jnp.float32 and loss64.dtype == jnp.float64
    np.testing.assert_allclose(float(loss32), float(loss64), rtol=2e-6)  # float32 sums' rounding: measured 5e-7


def test_matching_loss_source_is_a_constant():
    """The source maps are taken as constants (the reference computes them under no_grad)."""
    cfg = MatchingConfig(pairs=PAIRS, method="fm")
    src, tgt, branch, _ = make_problem(5, "relu6")
    g = jax.grad(lambda s: T.matching_loss(jax.tree.map(jnp.asarray, branch), s, [jnp.asarray(t) for t in tgt],
                                           None, None, cfg)[0])([jnp.asarray(s) for s in src])
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)


def test_matching_loss_incompatible_sizes():
    cfg = MatchingConfig(pairs=((0, 0),), method="fm")
    branch = [{"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}]
    src = [jnp.ones((1, 8, 8, 3))]
    tgt = [jnp.ones((1, 8, 6, 2))]  # width 6: resizing 8 -> 6 gives height 6 != 8
    with pytest.raises(ValueError, match="cannot be resized"):
        T.matching_loss(branch, src, tgt, None, None, cfg)


def test_meta_weights_kind():
    """Appendix C.1: w = softmax(constant logits), λ = act(constant)."""
    pairs = ((0, 0), (1, 1))
    cfg = MatchingConfig(pairs=pairs, method="l2t_ww", lambda_type="relu6", meta_kind="weights")
    meta = {"w": [{"logits": jnp.asarray([0.0, 1.0, 2.0])}, {"logits": jnp.asarray([1.0, -1.0])}],
            "lw": [{"value": jnp.asarray(7.5)}, {"value": jnp.asarray(0.25)}]}
    pooled = [jnp.ones((4, 3)), jnp.ones((4, 2))]
    w, lam = T.meta_outputs(meta, pooled, cfg)
    np.testing.assert_allclose(np.asarray(w[0]), np.tile(np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum(), (4, 1)), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(lam[0]), [6.0] * 4)
    np.testing.assert_allclose(np.asarray(lam[1]), [0.25] * 4)


# =========================================================================== initialisation


SRC_CH = (16, 16, 32, 64, 64)
TGT_CH = (8, 24, 32, 48)
INIT_PAIRS = ((0, 0), (2, 1), (3, 3), (4, 2))


def test_init_meta_params_network():
    phi = T.init_meta_params(jax.random.key(0), INIT_PAIRS, SRC_CH, dtype=jnp.float64)
    assert set(phi) == {"w", "lw"} and len(phi["w"]) == len(phi["lw"]) == len(INIT_PAIRS)
    for (m, _), g, h in zip(INIT_PAIRS, phi["w"], phi["lw"]):
        cs = SRC_CH[m]
        assert g["kernel"].shape == (cs, cs) and g["bias"].shape == (cs,)
        assert not np.any(np.asarray(g["kernel"])) and not np.any(np.asarray(g["bias"]))
        assert h["kernel"].shape == (cs, 1) and h["bias"].shape == (1,)
        assert h["kernel"].dtype == jnp.float64 and g["kernel"].dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(h["bias"]), [1.0])
        k = np.asarray(h["kernel"])
        bound = 1 / math.sqrt(cs)  # PyTorch's default Linear(C_s, 1) init
        assert np.all(np.abs(k) <= bound) and k.min() < -bound / 4 and k.max() > bound / 4
    # different pairs get different λ weights
    assert not np.array_equal(np.asarray(phi["lw"][1]["kernel"]), np.asarray(phi["lw"][2]["kernel"])[:32])
    # zero weight networks: uniform channel weights at the start; λ = relu6(h(pooled))
    cfg = MatchingConfig(pairs=INIT_PAIRS, method="l2t_ww")
    rng = np.random.default_rng(0)
    pooled = [jnp.asarray(rng.standard_normal((3, c))) for c in SRC_CH]
    w, lam = T.meta_outputs(phi, pooled, cfg)
    for (m, _), wi, li, h in zip(INIT_PAIRS, w, lam, phi["lw"]):
        np.testing.assert_allclose(np.asarray(wi), 1.0 / SRC_CH[m], rtol=1e-14)
        expected = np.clip(np.asarray(pooled[m]) @ np.asarray(h["kernel"])[:, 0] + 1.0, 0, 6)
        np.testing.assert_allclose(np.asarray(li), expected, rtol=1e-14)
    # float32: shapes and dtypes only (no compilation)
    phi32 = jax.eval_shape(lambda k: T.init_meta_params(k, INIT_PAIRS, SRC_CH, dtype=jnp.float32), jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, phi32) == jax.tree.map(lambda a: a.shape, phi)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(phi32))


def test_init_meta_params_variants():
    key = jax.random.key(1)
    none_init = T.init_meta_params(key, INIT_PAIRS, SRC_CH, lambda_init=None)
    for (m, _), h in zip(INIT_PAIRS, none_init["lw"]):
        b = float(h["bias"][0])
        assert abs(b) <= 1 / math.sqrt(SRC_CH[m]) and b != 1.0
    other = T.init_meta_params(key, INIT_PAIRS, SRC_CH, lambda_init=0.5)
    assert all(float(h["bias"][0]) == 0.5 for h in other["lw"])

    const = T.init_meta_params(key, INIT_PAIRS, SRC_CH, lambda_type="const")
    assert const["lw"]["weights"].shape == (len(INIT_PAIRS),)
    assert not np.any(np.asarray(const["lw"]["weights"]))
    # softplus(10 * 0) = log 2
    cfg = MatchingConfig(pairs=INIT_PAIRS, method="l2t_ww", lambda_type="const")
    _, lam = T.meta_outputs(const, [jnp.ones((2, c)) for c in SRC_CH], cfg)
    np.testing.assert_allclose(np.asarray(lam[0]), [math.log(2)] * 2, rtol=1e-15)  # float64: exact up to rounding

    l2t_w = T.init_meta_params(key, INIT_PAIRS, SRC_CH, method="l2t_w")
    assert set(l2t_w) == {"w"}
    assert T.init_meta_params(key, INIT_PAIRS, SRC_CH, method="fm") == {}
    assert T.init_meta_params(key, (), SRC_CH, method="scratch") == {}

    weights = T.init_meta_params(key, INIT_PAIRS, SRC_CH, meta_kind="weights", dtype=jnp.float64)
    assert [w["logits"].shape for w in weights["w"]] == [(SRC_CH[m],) for m, _ in INIT_PAIRS]
    assert all(not np.any(np.asarray(w["logits"])) for w in weights["w"])
    assert [v["value"].shape for v in weights["lw"]] == [()] * len(INIT_PAIRS)
    assert all(float(v["value"]) == 1.0 and v["value"].dtype == jnp.float64 for v in weights["lw"])
    weights_w = T.init_meta_params(key, INIT_PAIRS, SRC_CH, method="l2t_w", meta_kind="weights")
    assert set(weights_w) == {"w"}

    for kw, word in [({"method": "l2t"}, "method"), ({"lambda_type": "relu5"}, "lambda_type"),
                     ({"meta_kind": "nets"}, "meta_kind")]:
        with pytest.raises(ValueError, match=f"unknown {word}"):
            T.init_meta_params(key, INIT_PAIRS, SRC_CH, **kw)


def test_init_branch():
    branch = T.init_branch(jax.random.key(2), INIT_PAIRS, SRC_CH, TGT_CH, jnp.float64)
    assert len(branch) == len(INIT_PAIRS)
    for (m, n), b in zip(INIT_PAIRS, branch):
        ct, cs = TGT_CH[n], SRC_CH[m]
        assert b["kernel"].shape == (ct, cs) and b["bias"].shape == (cs,)
        assert b["kernel"].dtype == jnp.float64 and b["bias"].dtype == jnp.float64
        bound = 1 / math.sqrt(ct)  # PyTorch's Conv2d(C_t, C_s, 1) default: fan_in = C_t
        k, bias = np.asarray(b["kernel"]), np.asarray(b["bias"])
        assert np.all(np.abs(k) <= bound) and np.all(np.abs(bias) <= bound)
        assert k.min() < -bound / 2 and k.max() > bound / 2
    assert not np.array_equal(np.asarray(branch[1]["kernel"]), np.asarray(branch[3]["kernel"])[:24, :32])
    assert T.init_branch(jax.random.key(0), (), SRC_CH, TGT_CH) == []
    b32 = jax.eval_shape(lambda k: T.init_branch(k, INIT_PAIRS, SRC_CH, TGT_CH), jax.random.key(2))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(b32))  # the default dtype


# =========================================================================== MatchingConfig


def test_matching_config():
    cfg = MatchingConfig(pairs=((4, 0),), method="l2t_ww")
    assert cfg.beta == 0.5 and cfg.lambda_type == "relu6" and cfg.meta_kind == "network"
    assert hash(cfg) == hash(MatchingConfig(pairs=((4, 0),), method="l2t_ww"))
    assert cfg.has_meta_params and MatchingConfig(pairs=((4, 0),), method="l2t_w").has_meta_params
    assert not MatchingConfig(pairs=((4, 0),), method="fm").has_meta_params
    assert not MatchingConfig(method="scratch").has_meta_params

    with pytest.raises(ValueError, match="unknown method 'l2t'.*scratch, fm, l2t_w, l2t_ww"):
        MatchingConfig(pairs=((4, 0),), method="l2t")
    with pytest.raises(ValueError, match="unknown lambda_type 'sigmoid'"):
        MatchingConfig(pairs=((4, 0),), lambda_type="sigmoid")
    with pytest.raises(ValueError, match="unknown meta_kind 'net'"):
        MatchingConfig(pairs=((4, 0),), meta_kind="net")
    with pytest.raises(ValueError, match="scratch.*no pairs"):
        MatchingConfig(pairs=((4, 0),), method="scratch")
    for method in ("fm", "l2t_w", "l2t_ww"):
        with pytest.raises(ValueError, match="at least one pair"):
            MatchingConfig(method=method)
