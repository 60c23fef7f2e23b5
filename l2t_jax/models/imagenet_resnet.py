"""ResNet18/34/50 in torchvision's layout (the reference's `resnet_ilsvrc`).

7x7/2 conv (padding 3, no bias) + BN + ReLU, 3x3/2 max-pool (padding 1), four
stages (layer1..layer4), AvgPool2d(7) over the final 7x7 map, fc. Taps:
[stem ReLU output (before the max-pool), layer1, layer2, layer3, layer4].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from l2t_jax.models.layers import BatchNorm, Conv2d, Linear, max_pool_3x3_s2_p1

Array = jax.Array


class Block(nn.Module):
    """BasicBlock (expansion 1) or Bottleneck (expansion 4, stride on the 3x3 conv, torchvision v1.5)."""

    planes: int
    stride: int = 1
    bottleneck: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        impl = self.conv_impl
        if self.bottleneck:
            out_ch = self.planes * 4
            out = nn.relu(BatchNorm(name="bn1")(Conv2d(self.planes, 1, impl=impl, name="conv1")(x), train))
            out = Conv2d(self.planes, 3, self.stride, 1, impl=impl, name="conv2")(out)
            out = nn.relu(BatchNorm(name="bn2")(out, train))
            out = BatchNorm(name="bn3")(Conv2d(out_ch, 1, impl=impl, name="conv3")(out), train)
        else:
            out_ch = self.planes
            out = Conv2d(self.planes, 3, self.stride, 1, impl=impl, name="conv1")(x)
            out = nn.relu(BatchNorm(name="bn1")(out, train))
            out = BatchNorm(name="bn2")(Conv2d(self.planes, 3, 1, 1, impl=impl, name="conv2")(out), train)
        if self.stride != 1 or x.shape[-1] != out_ch:
            x = Conv2d(out_ch, 1, self.stride, 0, impl=impl, name="down_conv")(x)
            x = BatchNorm(name="down_bn")(x, train)
        return nn.relu(out + x)


class ImageNetResNet(nn.Module):
    """torchvision-layout ResNet. `__call__` returns (logits, features).

    Attributes:
      layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet18, (3, 4, 6, 3) for ResNet34/50.
      bottleneck: Bottleneck blocks (ResNet50) instead of BasicBlocks.
    """

    layers: tuple = (2, 2, 2, 2)
    bottleneck: bool = False
    num_classes: int = 1000
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, list[Array]]:
        """Args: x (B, H, W, 3) with a 7x7 final map (H, W in 193..224). Returns logits, 5 maps."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB input (B, H, W, 3), got shape {x.shape}")
        final = [s for s in x.shape[1:3]]
        for _ in range(5):  # conv/2, pool/2, three stride-2 stages
            final = [(s + 1) // 2 for s in final]
        if final != [7, 7]:
            raise ValueError(
                f"torchvision-layout ResNet ends in AvgPool2d(7) and needs a 7x7 final map "
                f"(e.g. 224x224 input), got {x.shape[1]}x{x.shape[2]} -> {final[0]}x{final[1]}"
            )
        impl = self.conv_impl
        h = Conv2d(64, 7, 2, 3, impl=impl, name="conv1")(x)
        stem = nn.relu(BatchNorm(name="bn1")(h, train))
        h = max_pool_3x3_s2_p1(stem)
        features = [stem]
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
            for j in range(blocks):
                stride = 2 if (stage > 0 and j == 0) else 1
                h = Block(planes, stride, self.bottleneck, impl, name=f"layer{stage + 1}_{j}")(h, train)
            features.append(h)
        pooled = jnp.mean(h, axis=(1, 2))
        logits = Linear(self.num_classes, name="fc")(pooled)
        return logits, features
