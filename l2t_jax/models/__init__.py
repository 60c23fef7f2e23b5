"""Model zoo and registry.

Every model is a Flax module whose `__call__(x, train)` takes NHWC images and
returns `(logits, features)`; `features` is the list of tapped maps, in the
order the reference uses, so a pair index means the same thing here and there.

    model = get_model("vgg9_bn", num_classes=10)
    variables = init_model(model, jax.random.key(0), image_size=32)
    (logits, feats), new_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from l2t_jax.models.cifar_resnet import CifarResNet
from l2t_jax.models.imagenet_resnet import ImageNetResNet
from l2t_jax.models.vgg import VGG, VGG9_CFG

__all__ = [
    "ModelInfo",
    "get_model",
    "model_info",
    "available_models",
    "init_model",
    "register_model",
    "CifarResNet",
    "ImageNetResNet",
    "VGG",
]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the rest of the library needs to know about an architecture.

    Attributes:
      name: registry name.
      family: "cifar_resnet" | "vgg" | "imagenet_resnet" (selects the weight mapping).
      build: `build(num_classes, conv_impl) -> nn.Module`.
      tap_channels: channels of each tapped map.
      stage_end_taps: taps that end a stage (the candidates of the all-to-all configuration).
      image_size: the input resolution the architecture is meant for.
    """

    name: str
    family: str
    build: Callable[[int, str], nn.Module]
    tap_channels: tuple[int, ...]
    stage_end_taps: tuple[int, ...]
    image_size: int


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Adds an architecture to the registry (name must be new)."""
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def _cifar_resnet(depth: int) -> ModelInfo:
    n = (depth - 2) // 6
    return ModelInfo(
        name=f"resnet{depth}",
        family="cifar_resnet",
        build=lambda num_classes, conv_impl: CifarResNet(depth, num_classes, conv_impl),
        tap_channels=(16,) * n + (32,) * n + (64,) * n,
        stage_end_taps=(n - 1, 2 * n - 1, 3 * n - 1),
        image_size=32,
    )


def _imagenet_resnet(name: str, layers: tuple, bottleneck: bool) -> ModelInfo:
    e = 4 if bottleneck else 1
    return ModelInfo(
        name=name,
        family="imagenet_resnet",
        build=lambda num_classes, conv_impl: ImageNetResNet(layers, bottleneck, num_classes, conv_impl),
        tap_channels=(64, 64 * e, 128 * e, 256 * e, 512 * e),
        stage_end_taps=(1, 2, 3, 4),
        image_size=224,
    )


for _depth in (20, 32, 44, 56, 110):
    register_model(_cifar_resnet(_depth))
register_model(
    ModelInfo(
        name="vgg9_bn",
        family="vgg",
        build=lambda num_classes, conv_impl: VGG(VGG9_CFG, num_classes, conv_impl),
        tap_channels=(64, 128, 256, 512, 512),
        stage_end_taps=(0, 1, 2, 3, 4),
        image_size=32,
    )
)
register_model(_imagenet_resnet("resnet18", (2, 2, 2, 2), False))
register_model(_imagenet_resnet("resnet34", (3, 4, 6, 3), False))
register_model(_imagenet_resnet("resnet50", (3, 4, 6, 3), True))


def available_models() -> list[str]:
    """Names accepted by `get_model`."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Registry entry of `name`; a clear error listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def get_model(name: str, num_classes: int, *, conv_impl: str = "auto") -> nn.Module:
    """Builds the Flax module `name` with `num_classes` outputs."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return model_info(name).build(num_classes, conv_impl)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, image_size: int) -> Any:
    return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def init_model(model: nn.Module, key: jax.Array, image_size: int) -> dict:
    """Randomly initialised variables {"params", "batch_stats"} (jit-compiled once per shape)."""
    return _init(model, key, image_size)


# --------------------------------------------------------------------------- tiny models (quickstart, tests)
# Small members of the same families, cheap enough for a 2-core CPU: the offline
# quickstart (digits) and the runner's tests use them.
register_model(_cifar_resnet(8))  # CIFAR ResNet with one block per stage: taps (16, 32, 64) at 32, 16, 8 px
VGG_TINY_CFG = (16, "M", 32, "M", 64, "M")
register_model(
    ModelInfo(
        name="vgg_tiny",
        family="vgg",
        build=lambda num_classes, conv_impl: VGG(VGG_TINY_CFG, num_classes, conv_impl),
        tap_channels=(16, 32, 64),
        stage_end_taps=(0, 1, 2),
        image_size=16,
    )
)
