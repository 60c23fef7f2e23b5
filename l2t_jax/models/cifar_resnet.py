"""CIFAR-style ResNet-(6n+2) as in the reference's `CResNet` (resnet20/32/56/110).

Layout (NHWC): conv3x3 3->16 (with bias) + BN + ReLU, then three stages of
n BasicBlocks with 16, 32 and 64 channels; the first block of stages 2 and 3
has stride 2 and a 1x1 stride-2 conv (no bias) + BN shortcut; global average
pool over the final 8x8 map; Linear 64->num_classes.

Taps: the output of every residual block, 3n maps (resnet32: 15, stage ends
at 4, 9, 14), exactly the reference's `forward_with_features`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from l2t_jax.models.layers import BatchNorm, Conv2d, Linear

Array = jax.Array


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; identity shortcut or 1x1 conv + BN when the shape changes."""

    features: int
    stride: int = 1
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = Conv2d(self.features, 3, self.stride, 1, impl=self.conv_impl, name="conv1")(x)
        out = nn.relu(BatchNorm(name="bn1")(out, train))
        out = Conv2d(self.features, 3, 1, 1, impl=self.conv_impl, name="conv2")(out)
        out = BatchNorm(name="bn2")(out, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = Conv2d(self.features, 1, self.stride, 0, impl=self.conv_impl, name="down_conv")(x)
            x = BatchNorm(name="down_bn")(x, train)
        return nn.relu(out + x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. `__call__` returns (logits, features).

    Attributes:
      depth: 6n+2 (20, 32, 56, 110, ...).
      num_classes: size of the classifier.
      conv_impl: "auto" | "xla" | "im2col" (see `layers.Conv2d`).
    """

    depth: int = 32
    num_classes: int = 10
    conv_impl: str = "auto"

    @property
    def blocks_per_stage(self) -> int:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {self.depth}")
        return (self.depth - 2) // 6

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, list[Array]]:
        """Args: x (B, 32, 32, 3). Returns: logits (B, num_classes), 3n maps (B, H, W, C)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB input (B, H, W, 3), got shape {x.shape}")
        if x.shape[1] != 32 or x.shape[2] != 32:
            raise ValueError(
                f"CIFAR ResNet takes 32x32 images (its AvgPool2d(8) needs an 8x8 final map), got {x.shape[1]}x{x.shape[2]}"
            )
        n = self.blocks_per_stage
        h = Conv2d(16, 3, 1, 1, use_bias=True, impl=self.conv_impl, name="conv1")(x)
        h = nn.relu(BatchNorm(name="bn1")(h, train))
        features = []
        index = 0
        for stage, width in enumerate((16, 32, 64)):
            for j in range(n):
                stride = 2 if (stage > 0 and j == 0) else 1
                h = BasicBlock(width, stride, self.conv_impl, name=f"block{index}")(h, train)
                features.append(h)
                index += 1
        pooled = jnp.mean(h, axis=(1, 2))
        logits = Linear(self.num_classes, name="fc")(pooled)
        return logits, features
