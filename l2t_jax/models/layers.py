"""Layers with PyTorch semantics, in NHWC.

Every layer here computes what its PyTorch namesake computes, so that weights
imported from the reference produce the same numbers:

* `Conv2d`: explicit symmetric padding (never Flax's "SAME", which pads
  stride-2 convolutions asymmetrically); two lowerings, XLA's convolution or an
  im2col matmul (pad + k*k shifted slices + matmuls), numerically the same
  convolution. The matmul lowering is the faster one on XLA's CPU backend for
  small maps and for second-order differentiation (`python -m
  benchmarks.conv_accuracy --impls xla,im2col` times both). It splits the
  k*k*C_in contraction into groups of taps of at most `IM2COL_MAX_CONTRACTION`
  and sums the group products: XLA's CPU float32 dot loses accuracy on long
  contractions (see `im2col_conv`). A third, `im2col_loop_conv`, is the same
  forward with a reverse-mode derivative that loops over the kernel's rows (fewer
  temporaries; what mixed mode gets on CPU, `conv_impl_for`).
* `BatchNorm`: batch statistics in training mode, biased variance for the
  normalisation, *unbiased* variance for the running estimate, momentum 0.1 in
  PyTorch's convention, eps 1e-5.
* `Linear`: PyTorch's default initialisation unless told otherwise.

Every matmul asks for `Precision.HIGHEST`, so float32 stays true float32 on GPU
(no TF32); XLA's CPU backend ignores the setting.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]

#: Convolution lowerings: "xla" (lax.conv_general_dilated), "im2col" (matmuls over
#: groups of taps), "auto" (im2col on CPU, XLA's convolution elsewhere), and
#: "im2col_single" (one matmul over the whole k*k*C_in patch: the former "im2col",
#: faster on CPU but less accurate in float32, see the README's "Speed and memory";
#: kept for benchmarks/conv_accuracy.py), "im2col_loop" ("im2col" with a reverse-mode
#: derivative that loops over the kernel's rows: `im2col_loop_conv`; "auto" in mixed mode on CPU).
CONV_IMPLS = ("auto", "xla", "im2col", "im2col_single", "im2col_loop")

#: Longest contraction (taps x C_in) one matmul of the "im2col" lowering accumulates,
#: unless a single tap is longer. XLA's CPU float32 dot loses accuracy as its
#: contraction grows past a few hundred terms. 512 rather than 256: fewer, larger
#: matmuls (faster) for a float32 meta-gradient as close to float64 (README, "Proof of
#: exactness"; benchmarks/conv_accuracy.py measures both).
IM2COL_MAX_CONTRACTION = 512

_HIGHEST = lax.Precision.HIGHEST


def conv_kaiming_normal_fan_out(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """N(0, sqrt(2 / (kh * kw * C_out))) for an HWIO kernel (the reference's conv init)."""
    kh, kw, _, cout = shape
    std = math.sqrt(2.0 / (kh * kw * cout))
    return std * jax.random.normal(key, shape, dtype)


def torch_linear_uniform(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def resolve_conv_impl(impl: str) -> str:
    """Maps "auto" to the lowering that is fast on the default backend."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


def im2col_taps(x: Array, kh: int, kw: int, stride: int, padding: int) -> tuple[list[Array], int, int]:
    """The kh*kw shifted, strided views ("taps") of the zero-padded input that im2col multiplies.

    Args:
      x: (B, H, W, C).
    Returns:
      (taps, H_out, W_out): taps in row-major kernel order (i, then j), each
      (B, H_out, W_out, C), with H_out = (H + 2p - kh) // stride + 1.
    """
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, hp, wp, _ = x.shape
    ho = (hp - kh) // stride + 1
    wo = (wp - kw) // stride + 1
    taps = [
        x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return taps, ho, wo


def im2col_conv(
    x: Array, kernel: Array, stride: int, padding: int, max_contraction: int | None = IM2COL_MAX_CONTRACTION
) -> Array:
    """Convolution as pad + shifted slices ("taps") + matmuls over groups of taps.

    The kh*kw taps are split into consecutive groups of nearly equal size, as few
    as keep each group's contraction (taps in the group x C_in) at most
    `max_contraction` (a group holds one tap at least). Each group is one matmul of
    its concatenated slices with its rows of the kernel; the group products are
    summed. In exact arithmetic this is the one-matmul im2col; in float32 on XLA's
    CPU backend its output is closer to float64 once 9*C_in is large, because
    that backend's dot accumulates a long contraction with an error that grows
    with its length, and the meta-gradient (second order, through T steps)
    amplifies it (figures in the README's "Proof of exactness"). Plain jax ops
    only, so every order of forward and reverse differentiation works; each derivative is
    again a sum of short matmuls (the weight gradient of a group contracts over
    B*H_out*W_out, which XLA blocks itself).

    Args:
      x: (B, H, W, C_in).
      kernel: (kh, kw, C_in, C_out), HWIO.
      stride: spatial stride.
      padding: symmetric zero padding on each side.
      max_contraction: longest contraction per matmul; None: one matmul over all
        kh*kw*C_in (the "im2col_single" lowering).

    Returns:
      (B, H_out, W_out, C_out) with H_out = (H + 2p - kh) // stride + 1.
    """
    kh, kw, cin, cout = kernel.shape
    taps, ho, wo = im2col_taps(x, kh, kw, stride, padding)
    b = x.shape[0]
    n = len(taps)
    groups = 1 if max_contraction is None else min(n, max(1, -(-n * cin // max_contraction)))
    bounds = [round(g * n / groups) for g in range(groups + 1)]
    sizes = [(hi - lo) * cin for lo, hi in zip(bounds[:-1], bounds[1:])]
    # lax.split (not slicing): its transpose is one concatenate, not a zero-pad per group.
    kernel_rows = lax.split(kernel.reshape(n * cin, cout), sizes) if groups > 1 else [kernel.reshape(n * cin, cout)]
    out = None
    for lo, hi, w in zip(bounds[:-1], bounds[1:], kernel_rows):
        patches = taps[lo] if hi - lo == 1 else jnp.concatenate(taps[lo:hi], axis=-1)
        y = jnp.matmul(patches.reshape(-1, (hi - lo) * cin), w, precision=_HIGHEST)
        out = y if out is None else out + y
    return out.reshape(b, ho, wo, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def im2col_loop_conv(
    x: Array, kernel: Array, stride: int, padding: int, max_contraction: int | None = IM2COL_MAX_CONTRACTION
) -> Array:
    """`im2col_conv`, whose reverse-mode derivative adds the taps in a loop over the kernel's rows.

    The same forward values. Autodiff of `im2col_conv` builds the input's gradient as
    kh*kw tap cotangents, each padded to the input's size, alive at once before they
    are summed (nine (B, H+2p, W+2p, C_in) buffers for a 3x3 kernel). This derivative
    keeps only x and the kernel and runs a `fori_loop` over the kernel's rows. Per
    row, each tap's slice of the padded input gives its kernel gradient (contracting
    over B*H_out*W_out, as autodiff does), and the row's taps' input gradients (dy
    times each tap's kernel, shifted by its column) are summed into one buffer, which
    is added into the padded input gradient: kh read-modify-writes of that gradient
    rather than kh*kw (results/benchmarks/README.md, "The tap loop by kernel rows").
    Equal to autodiff's up to the order of the sum.

    For mixed mode (`BilevelConfig.hvp="mixed"`), whose forward-over-reverse products
    differentiate this derivative once more in forward mode only: it lowers XLA's
    temporaries (`conv_impl_for`). Under reverse-over-reverse the outer pass keeps the
    loop's carry for every iteration, which costs more than it saves (results/benchmarks/
    README.md, "Compilation"), so "auto" never picks it there. Shapes as `im2col_conv`.
    """
    return im2col_conv(x, kernel, stride, padding, max_contraction)


def _im2col_loop_fwd(x, kernel, stride, padding, max_contraction):
    return im2col_conv(x, kernel, stride, padding, max_contraction), (x, kernel)


def _im2col_loop_bwd(stride, padding, max_contraction, residuals, dy):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    ho, wo = dy.shape[1], dy.shape[2]
    span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1  # a tap's extent in the padded input
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy_rows = dy.reshape(-1, cout)
    zero = jnp.zeros((), dy.dtype)

    def one_kernel_row(i, carry):
        dxp, dkernel = carry
        w_row = lax.dynamic_index_in_dim(kernel, i, 0, keepdims=False)  # (kw, C_in, C_out)
        dk_row, row = [], None
        for j in range(kw):
            tap = lax.dynamic_slice(xp, (0, i, j, 0), (b, span_h, span_w, cin))[:, ::stride, ::stride, :].reshape(-1, cin)
            dk_row.append(lax.dot_general(tap, dy_rows, (((0,), (0,)), ((), ())), precision=_HIGHEST))  # (C_in, C_out)
            dtap = jnp.matmul(dy_rows, w_row[j].T, precision=_HIGHEST).reshape(b, ho, wo, cin)
            # the tap's gradient at its strided positions, shifted right by its column j
            piece = lax.pad(dtap, zero, ((0, 0, 0), (0, 0, stride - 1), (j, kw - 1 - j, stride - 1), (0, 0, 0)))
            row = piece if row is None else row + piece
        dkernel = lax.dynamic_update_index_in_dim(dkernel, jnp.stack(dk_row), i, 0)
        window = lax.dynamic_slice(dxp, (0, i, 0, 0), row.shape)
        return lax.dynamic_update_slice(dxp, window + row, (0, i, 0, 0)), dkernel

    dxp, dkernel = lax.fori_loop(0, kh, one_kernel_row, (jnp.zeros_like(xp), jnp.zeros_like(kernel)))
    return dxp[:, padding : padding + h, padding : padding + w, :], dkernel


im2col_loop_conv.defvjp(_im2col_loop_fwd, _im2col_loop_bwd)


def conv_impl_for(impl: str, hvp: str) -> str:
    """The lowering a model gets for a meta-gradient mode: "auto" becomes "im2col_loop" in mixed mode on CPU.

    Measured there (stl10, T = 2, depth-first scheduling): XLA's temporaries 1.64 to 1.37
    GB at batch 128 (results/benchmarks/README.md, "The tap loop"). Any other choice
    is kept.
    """
    if impl == "auto" and hvp == "mixed" and jax.default_backend() == "cpu":
        return "im2col_loop"
    return impl


def xla_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """The same convolution through `lax.conv_general_dilated` (shapes as `im2col_conv`)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_HIGHEST,
    )


class Conv2d(nn.Module):
    """`torch.nn.Conv2d` in NHWC with an HWIO kernel ("kernel") and optional "bias"."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False
    impl: str = "auto"
    kernel_init: Initializer = conv_kaiming_normal_fan_out
    bias_init: Initializer | None = None  # default: zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        impl = resolve_conv_impl(self.impl)
        kernel = kernel.astype(x.dtype)
        if impl == "xla":
            y = xla_conv(x, kernel, self.stride, self.padding)
        else:
            max_contraction = None if impl == "im2col_single" else IM2COL_MAX_CONTRACTION
            conv = im2col_loop_conv if impl == "im2col_loop" else im2col_conv
            y = conv(x, kernel, self.stride, self.padding, max_contraction)
        if self.use_bias:
            bias = self.param("bias", self.bias_init or nn.initializers.zeros, (self.features,))
            y = y + bias.astype(y.dtype)
        return y


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` (or 1d over the last axis) with PyTorch's exact semantics.

    Params: "scale" (gamma, init 1), "bias" (beta, init 0). Collection
    "batch_stats": "mean", "var" (running estimates, init 0 / 1) and
    "num_batches_tracked" (int32 counter, as PyTorch keeps it).
    """

    momentum: float = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * lax.stop_gradient(mean).astype(ra_mean.value.dtype)
                ra_var.value = (1 - m) * ra_var.value + m * lax.stop_gradient(unbiased).astype(ra_var.value.dtype)
                count.value = count.value + 1
        else:
            mean = ra_mean.value.astype(x.dtype)
            var = ra_var.value.astype(x.dtype)
        inv = lax.rsqrt(var + self.epsilon) * scale.astype(x.dtype)
        return (x - mean) * inv + bias.astype(x.dtype)


class Linear(nn.Module):
    """`torch.nn.Linear` with "kernel" (in, out) and "bias"; PyTorch's default init unless given."""

    features: int
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        default = torch_linear_uniform(fan_in)
        kernel = self.param("kernel", self.kernel_init or default, (fan_in, self.features))
        bias = self.param("bias", self.bias_init or default, (self.features,))
        return jnp.matmul(x, kernel.astype(x.dtype), precision=_HIGHEST) + bias.astype(x.dtype)


def _first_max(a: Array, b: Array) -> Array:
    """max(a, b) as PyTorch's max-pool scan takes it: b wins only when greater (or NaN)."""
    return jnp.where((b > a) | jnp.isnan(b), b, a)


def max_pool_2x2(x: Array) -> Array:
    """`nn.MaxPool2d(2, 2)` as elementwise selects between the window's elements.

    Each row of the window is reduced first ((0,0) vs (0,1), (1,0) vs (1,1)), then
    the rows; a later element wins only when strictly greater, so a tie goes to the
    first maximum in PyTorch's scan order and the whole gradient flows to that one
    element, as in PyTorch (a reduce_max would split it between tied elements); a
    NaN propagates. Its derivative is a chain of selects on comparison results, not
    the equality test `x == max(x)` that differentiating a reduce_max builds: XLA's
    algebraic simplifier can rewrite the two sides of that test differently, which
    moved the float64 meta-gradient of an unrolled look-ahead by 2-8 %
    (tests/test_bilevel.py). Plain elementwise ops, which XLA's CPU backend fuses
    (its reduce_window is slow here); the backward is also faster than a reduce_max's.

    Args:
      x: (B, H, W, C); odd trailing rows/columns are dropped as PyTorch does.
    Returns:
      (B, H // 2, W // 2, C).
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
    rows = _first_max(x[:, :, :, :, 0, :], x[:, :, :, :, 1, :])  # (B, H/2, 2, W/2, C)
    return _first_max(rows[:, :, 0], rows[:, :, 1])


def max_pool_3x3_s2_p1(x: Array) -> Array:
    """`nn.MaxPool2d(kernel_size=3, stride=2, padding=1)` (padding never wins: -inf).

    XLA's select-and-scatter sends each window's gradient to its first maximum, as
    PyTorch does (tests/test_models.py checks ties and overlapping windows). Nine strided
    slices reduced by elementwise selects were tried instead: a faster pool alone, but a
    slower meta-iteration at 224 px (results/benchmarks/README.md).
    """
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        window_dimensions=(1, 3, 3, 1),
        window_strides=(1, 2, 2, 1),
        padding=((0, 0), (1, 1), (1, 1), (0, 0)),
    )
