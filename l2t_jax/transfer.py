"""What and where to transfer: pairs, resizing, the matching branch, meta-networks, losses.

All maps are NHWC. For a pair (m, n), S = source tap m (B, H_s, W_s, C_s) and
T = target tap n (B, H, W, C_t):

* r(T) = T @ kernel + bias, a 1x1 conv C_t -> C_s (part of the target's θ);
* S is resized to H x W with PyTorch's bilinear `interpolate(scale_factor=W/W_s)`;
* d_c = mean_{i,j} (S - r(T))^2, per sample;
* w = softmax(g(φ; pooled S)), λ = act(h(φ; pooled S)) per sample;
* L_pair = Σ_c w_c d_c and L_wfm = Σ_pairs β · mean_batch(λ · L_pair).

Meta-parameters φ are a pytree {"w": [...], "lw": [...]}; their PyTorch
names are `w.I.weight/bias` and `lw.I.weight/bias` (Linear weight = kernel.T).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from l2t_jax.models import model_info
from l2t_jax.models.layers import torch_linear_uniform

Array = jax.Array
Pair = tuple[int, int]
PyTree = Any

LAMBDA_TYPES = ("relu6", "relu", "relu-avg", "const")
#: The matching methods of `MatchingConfig.method` (a run's method names are `run_config.METHODS`).
MATCHING_METHODS = ("scratch", "fm", "l2t_w", "l2t_ww")
META_KINDS = ("network", "weights")


# --------------------------------------------------------------------------- pairs


def parse_pairs(spec: str | Sequence[Sequence[int]]) -> tuple[Pair, ...]:
    """Parses "m-n,m-n,..." (the reference's `--pairs` flag) or a sequence of (m, n).

    Returns:
      A tuple of (source_tap, target_tap) pairs, in the given order.
    """
    if isinstance(spec, str):
        pairs = []
        for item in spec.replace(" ", "").split(","):
            if not item:
                continue
            parts = item.split("-")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(f"bad pair {item!r} in {spec!r}: expected 'm-n' with non-negative integers")
            pairs.append((int(parts[0]), int(parts[1])))
    else:
        pairs = [(int(m), int(n)) for m, n in spec]
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"duplicate pair in {spec!r}")
    return tuple(pairs)


def format_pairs(pairs: Sequence[Pair]) -> str:
    """The inverse of `parse_pairs`: "m-n,m-n,..."."""
    return ",".join(f"{m}-{n}" for m, n in pairs)


def validate_pairs(pairs: Sequence[Pair], num_source_taps: int, num_target_taps: int) -> None:
    """Raises a ValueError naming every pair whose index is outside the models' taps."""
    bad = [
        f"{m}-{n}"
        for m, n in pairs
        if not (0 <= m < num_source_taps) or not (0 <= n < num_target_taps)
    ]
    if bad:
        raise ValueError(
            f"pair index out of range: {', '.join(bad)} (source has taps 0..{num_source_taps - 1}, "
            f"target has taps 0..{num_target_taps - 1})"
        )


def tap_sizes(model_name: str, image_size: int) -> tuple[int, ...]:
    """Spatial size (height) of each tap of `model_name` for a square input (shape inference only)."""
    from l2t_jax.models import get_model

    model = get_model(model_name, num_classes=2, conv_impl="xla")
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda v: model.init_with_output(jax.random.key(0), v, train=False)[0], x)
    return tuple(int(f.shape[1]) for f in shapes[1])


def named_pairs(kind: str, source_model: str, target_model: str, image_size: Optional[int] = None) -> tuple[Pair, ...]:
    """The paper's matching configurations for any two zoo models.

    Args:
      kind: "single" (last source tap -> the target tap of the same size),
        "one_to_one" (each source stage end -> the target stage end of the same size),
        "all_to_all" (every source stage end x every target stage end).
      source_model, target_model: registry names.
      image_size: input resolution (default: the source's).

    Returns:
      Pairs in the reference's order (source-major).
    """
    src, tgt = model_info(source_model), model_info(target_model)
    if kind == "all_to_all":
        return tuple((m, n) for m in src.stage_end_taps for n in tgt.stage_end_taps)
    size = image_size or src.image_size
    s_sizes, t_sizes = tap_sizes(source_model, size), tap_sizes(target_model, size)

    def same_size_target(m: int) -> Optional[int]:
        candidates = [n for n in tgt.stage_end_taps if t_sizes[n] == s_sizes[m]]
        return candidates[-1] if candidates else None

    if kind == "single":
        m = len(src.tap_channels) - 1
        n = same_size_target(m)
        if n is None:
            raise ValueError(f"no target tap of {target_model} has the size of {source_model}'s last tap")
        return ((m, n),)
    if kind == "one_to_one":
        pairs = []
        for m in src.stage_end_taps:
            n = same_size_target(m)
            if n is not None:
                pairs.append((m, n))
        return tuple(pairs)
    raise ValueError(f"unknown pair configuration {kind!r}; expected single, one_to_one or all_to_all")


def resolve_pairs(spec: str, source_model: str, target_model: str, image_size: Optional[int] = None) -> tuple[Pair, ...]:
    """A named configuration or an explicit "m-n,..." list, validated against both models."""
    if spec in ("single", "one_to_one", "all_to_all"):
        pairs = named_pairs(spec, source_model, target_model, image_size)
    else:
        pairs = parse_pairs(spec)
    validate_pairs(pairs, len(model_info(source_model).tap_channels), len(model_info(target_model).tap_channels))
    return pairs


# --------------------------------------------------------------------------- resize


@functools.lru_cache(maxsize=None)
def _interp_matrix(in_size: int, scale: float) -> np.ndarray:
    """(out, in) weights of PyTorch's 1-D linear interpolation, align_corners=False.

    With an explicit scale factor PyTorch maps output index i to the source
    coordinate (i + 0.5) / scale - 0.5, clamped at 0; out = floor(in * scale).
    """
    out_size = int(math.floor(in_size * scale))
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = max((i + 0.5) / scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m


def resize_bilinear(x: Array, scale: float) -> Array:
    """`F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)` in NHWC.

    No anti-aliasing (unlike `jax.image.resize`): a 2x down-scale is a 2x2 average,
    a 4x down-scale averages the two middle pixels of each 4-pixel span.

    Args:
      x: (B, H, W, C).
      scale: the same factor for both axes (the reference passes W_t / W_s).
    Returns:
      (B, floor(H * scale), floor(W * scale), C).
    """
    mh = jnp.asarray(_interp_matrix(x.shape[1], scale), x.dtype)
    mw = jnp.asarray(_interp_matrix(x.shape[2], scale), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=lax.Precision.HIGHEST)


# --------------------------------------------------------------------------- parameters


def init_branch(key: Array, pairs: Sequence[Pair], source_channels: Sequence[int], target_channels: Sequence[int], dtype: Any = jnp.float32) -> list[dict]:
    """The matching branch: one 1x1 conv C_t -> C_s with bias per pair (PyTorch's default init).

    Returns:
      A list of {"kernel": (C_t, C_s), "bias": (C_s,)}, one per pair.
    """
    branch = []
    for key_i, (m, n) in zip(jax.random.split(key, max(len(pairs), 1)), pairs):
        cs, ct = source_channels[m], target_channels[n]
        kk, kb = jax.random.split(key_i)
        init = torch_linear_uniform(ct)
        branch.append({"kernel": init(kk, (ct, cs), dtype), "bias": init(kb, (cs,), dtype)})
    return branch


def init_meta_params(
    key: Array,
    pairs: Sequence[Pair],
    source_channels: Sequence[int],
    *,
    method: str = "l2t_ww",
    lambda_type: str = "relu6",
    lambda_init: Optional[float] = 1.0,
    meta_kind: str = "network",
    dtype: Any = jnp.float32,
) -> dict:
    """φ: the weight networks g ("w") and λ networks h ("lw").

    * "network" (the paper): g_i = Linear(C_s, C_s) initialised to zero (uniform
      w at start); h_i = Linear(C_s, 1), PyTorch default weight, bias `lambda_init`.
      For λ type "const": "lw" = {"weights": zeros (P,)} (λ = softplus(10 a)).
    * "weights" (Appendix C.1): constants instead of networks:
      "w" = [{"logits": zeros (C_s,)}], "lw" = [{"value": full (), lambda_init}].

    Returns:
      {"w": ..., "lw": ...}; "lw" is absent for "l2t_w"; {} for "fm"/"scratch".
    """
    _check_choice("method", method, MATCHING_METHODS)
    _check_choice("lambda_type", lambda_type, LAMBDA_TYPES)
    _check_choice("meta_kind", meta_kind, META_KINDS)
    if method in ("fm", "scratch"):
        return {}
    keys = jax.random.split(key, max(len(pairs), 1))
    phi: dict = {}
    if meta_kind == "weights":
        phi["w"] = [{"logits": jnp.zeros((source_channels[m],), dtype)} for m, _ in pairs]
        if method == "l2t_ww":
            v = 1.0 if lambda_init is None else lambda_init
            phi["lw"] = [{"value": jnp.full((), v, dtype)} for _ in pairs]
        return phi
    phi["w"] = [
        {"kernel": jnp.zeros((source_channels[m],) * 2, dtype), "bias": jnp.zeros((source_channels[m],), dtype)}
        for m, _ in pairs
    ]
    if method == "l2t_ww":
        if lambda_type == "const":
            phi["lw"] = {"weights": jnp.zeros((len(pairs),), dtype)}
        else:
            lw = []
            for k, (m, _) in zip(keys, pairs):
                cs = source_channels[m]
                kk, kb = jax.random.split(k)
                init = torch_linear_uniform(cs)
                bias = init(kb, (1,), dtype) if lambda_init is None else jnp.full((1,), lambda_init, dtype)
                lw.append({"kernel": init(kk, (cs, 1), dtype), "bias": bias})
            phi["lw"] = lw
    return phi


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


# --------------------------------------------------------------------------- meta-networks and loss


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
    """Static description of the transfer (hashable; safe as a jit static argument).

    Attributes:
      pairs: (source_tap, target_tap) pairs.
      method: "scratch" | "fm" (uniform w, λ = 1) | "l2t_w" (learned w, λ = 1) | "l2t_ww".
      beta: β, the weight of every pair's loss.
      lambda_type: "relu6" | "relu" | "relu-avg" | "const".
      meta_kind: "network" (meta-networks) | "weights" (constants, Appendix C.1).
    """

    pairs: tuple[Pair, ...] = ()
    method: str = "l2t_ww"
    beta: float = 0.5
    lambda_type: str = "relu6"
    meta_kind: str = "network"

    def __post_init__(self):
        _check_choice("method", self.method, MATCHING_METHODS)
        _check_choice("lambda_type", self.lambda_type, LAMBDA_TYPES)
        _check_choice("meta_kind", self.meta_kind, META_KINDS)
        if self.method == "scratch" and self.pairs:
            raise ValueError("method 'scratch' takes no pairs")
        if self.method != "scratch" and not self.pairs:
            raise ValueError(f"method {self.method!r} needs at least one pair")

    @property
    def has_meta_params(self) -> bool:
        return self.method in ("l2t_w", "l2t_ww")


def pool(features: Sequence[Array]) -> list[Array]:
    """Global average over space: (B, H, W, C) -> (B, C), per map."""
    return [jnp.mean(f, axis=(1, 2)) for f in features]


def meta_outputs(meta_params: PyTree, pooled_source: Sequence[Array], cfg: MatchingConfig) -> tuple[Optional[list[Array]], Optional[list[Array]]]:
    """Channel weights w and pair weights λ from the pooled source maps.

    Args:
      meta_params: φ from `init_meta_params`.
      pooled_source: per source tap, (B, C_s).
      cfg: the matching configuration.

    Returns:
      (w, lam): w a list of (B, C_s) softmax weights (None: uniform), lam a list of
      (B,) pair weights (None: λ = 1).
    """
    if not cfg.has_meta_params:
        return None, None
    w, lam = [], []
    for i, (m, _) in enumerate(cfg.pairs):
        f = pooled_source[m]
        if cfg.meta_kind == "weights":
            logits = jnp.broadcast_to(meta_params["w"][i]["logits"].astype(f.dtype), f.shape)
        else:
            g = meta_params["w"][i]
            logits = f @ g["kernel"].astype(f.dtype) + g["bias"].astype(f.dtype)
        w.append(jax.nn.softmax(logits, axis=-1))
    if cfg.method != "l2t_ww":
        return w, None
    for i, (m, _) in enumerate(cfg.pairs):
        f = pooled_source[m]
        if cfg.meta_kind == "weights":
            raw = jnp.broadcast_to(meta_params["lw"][i]["value"].astype(f.dtype), f.shape[:1])
            lam.append(_lambda_activation(raw, cfg.lambda_type))
        elif cfg.lambda_type == "const":
            a = meta_params["lw"]["weights"][i].astype(f.dtype)
            lam.append(jnp.broadcast_to(_lambda_activation(a, "const"), f.shape[:1]))
        else:
            h = meta_params["lw"][i]
            inp = f / f.shape[-1] if cfg.lambda_type == "relu-avg" else f
            raw = (inp @ h["kernel"].astype(f.dtype) + h["bias"].astype(f.dtype))[:, 0]
            lam.append(_lambda_activation(raw, cfg.lambda_type))
    return w, lam


def _lambda_activation(x: Array, kind: str) -> Array:
    """relu6 / relu ("relu-avg" divides the input, not the output) / const: softplus(10 x)."""
    if kind == "relu6":
        return jnp.clip(x, 0.0, 6.0)
    if kind == "const":
        return jax.nn.softplus(10.0 * x)
    return jax.nn.relu(x)


def pair_distances(branch_i: dict, source_map: Array, target_map: Array) -> Array:
    """d_c = mean over space of (S_resized - r(T))^2.

    Args:
      branch_i: {"kernel": (C_t, C_s), "bias": (C_s,)}.
      source_map: (B, H_s, W_s, C_s), treated as a constant.
      target_map: (B, H, W, C_t).
    Returns:
      (B, C_s).
    """
    s = lax.stop_gradient(source_map).astype(target_map.dtype)
    if s.shape[2] != target_map.shape[2]:
        s = resize_bilinear(s, target_map.shape[2] / s.shape[2])
    if s.shape[1:3] != target_map.shape[1:3]:
        raise ValueError(f"source map {source_map.shape} cannot be resized onto target map {target_map.shape}")
    r = jnp.einsum("bhwt,ts->bhws", target_map, branch_i["kernel"].astype(target_map.dtype), precision=lax.Precision.HIGHEST)
    r = r + branch_i["bias"].astype(target_map.dtype)
    return jnp.mean(jnp.square(s - r), axis=(1, 2))


def matching_loss(
    branch: Sequence[dict],
    source_features: Sequence[Array],
    target_features: Sequence[Array],
    w: Optional[Sequence[Array]],
    lam: Optional[Sequence[Array]],
    cfg: MatchingConfig,
) -> tuple[Array, Array]:
    """L_wfm = Σ_pairs β · mean_batch(λ · Σ_c w_c d_c), as the reference computes it.

    Without w the channels are averaged (FM); the reference sums them instead when
    λ is given but w is not, which is reproduced here.

    Returns:
      (loss scalar, per-pair losses (P,)).
    """
    per_pair = []
    for i, (m, n) in enumerate(cfg.pairs):
        d = pair_distances(branch[i], source_features[m], target_features[n])
        if w is None:
            per_sample = jnp.sum(d, axis=1) if lam is not None else jnp.mean(d, axis=1)
        else:
            per_sample = jnp.sum(d * w[i], axis=1)
        if lam is not None:
            per_sample = per_sample * lam[i]
        per_pair.append(cfg.beta * jnp.mean(per_sample))
    if not per_pair:
        zero = jnp.zeros((), target_features[0].dtype if target_features else jnp.float32)
        return zero, jnp.zeros((0,), zero.dtype)
    stacked = jnp.stack(per_pair)
    return jnp.sum(stacked), stacked


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy, labels (B,) ints."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


# --------------------------------------------------------------------------- baselines: AT and LwF


def attention_map(feature: Array, eps: float = 1e-12) -> Array:
    """Zagoruyko & Komodakis' spatial attention: the channel mean of the squared map, L2-normalised.

    Args:
      feature: (B, H, W, C).
    Returns:
      (B, H·W): q / max(‖q‖₂, eps) with q = mean_c feature², flattened row-major.
    """
    q = jnp.mean(jnp.square(feature), axis=-1).reshape(feature.shape[0], -1)
    norm = jnp.sqrt(jnp.sum(jnp.square(q), axis=-1, keepdims=True))
    return q / jnp.maximum(norm, eps)


def attention_loss(
    source_features: Sequence[Array], target_features: Sequence[Array], pairs: Sequence[Pair], beta: float = 1000.0
) -> tuple[Array, Array]:
    """Attention transfer (AT, ICLR 2017) on `pairs`: Σ_pairs β/2 · mean_{b,i} (Q_s - Q_t)².

    A source map of another spatial size is first resized onto the target's
    (bilinear, as for matching). The source is a constant.

    Args:
      source_features, target_features: the taps, (B, H, W, C) each.
      pairs: (source_tap, target_tap) pairs.
      beta: the AT weight (the AT paper's β = 1000).
    Returns:
      (loss scalar, per-pair losses (P,)).
    """
    per_pair = []
    for m, n in pairs:
        t = target_features[n]
        s = lax.stop_gradient(source_features[m]).astype(t.dtype)
        if s.shape[2] != t.shape[2]:
            s = resize_bilinear(s, t.shape[2] / s.shape[2])
        if s.shape[1:3] != t.shape[1:3]:
            raise ValueError(f"AT pair {m}-{n}: source map {source_features[m].shape} cannot be resized onto {t.shape}")
        per_pair.append(0.5 * beta * jnp.mean(jnp.square(attention_map(s) - attention_map(t))))
    if not per_pair:
        return jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32)
    stacked = jnp.stack(per_pair)
    return jnp.sum(stacked), stacked


def init_lwf_head(key: Array, in_features: int, num_source_classes: int, dtype: Any = jnp.float32) -> dict:
    """LwF's extra head: Linear(C_last -> K_source) on the target's pooled last tap (PyTorch default init).

    Returns:
      {"kernel": (C_last, K_source), "bias": (K_source,)}.
    """
    kk, kb = jax.random.split(key)
    init = torch_linear_uniform(in_features)
    return {"kernel": init(kk, (in_features, num_source_classes), dtype), "bias": init(kb, (num_source_classes,), dtype)}


def lwf_head_logits(head: dict, last_target_map: Array) -> Array:
    """(B, H, W, C_last) -> (B, K_source): the extra head on the globally average-pooled map."""
    pooled = jnp.mean(last_target_map, axis=(1, 2))
    return pooled @ head["kernel"].astype(pooled.dtype) + head["bias"].astype(pooled.dtype)


def distillation_loss(student_logits: Array, teacher_logits: Array, temperature: float = 2.0) -> Array:
    """Knowledge distillation (LwF): τ² · mean_batch KL(softmax(teacher/τ) ‖ softmax(student/τ)).

    Args:
      student_logits, teacher_logits: (B, K); the teacher is a constant.
      temperature: τ (LwF: 2).
    Returns:
      A scalar; 0 when the two agree.
    """
    t = lax.stop_gradient(teacher_logits).astype(student_logits.dtype) / temperature
    log_p = jax.nn.log_softmax(t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return temperature**2 * jnp.mean(kl)
