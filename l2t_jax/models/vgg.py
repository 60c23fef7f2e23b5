"""VGG9-bn, the reference's `VGG_small` with configuration "B".

64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M: each number a conv3x3
(padding 1, with bias) + BN + ReLU, each M a 2x2 max-pool. Global average pool,
one Linear 512->num_classes. Taps: the input of each max-pool (5 maps: 64, 128,
256, 512, 512 channels at 32, 16, 8, 4, 2 px for a 32 px input).

Initialisation as the reference: convs Kaiming-normal (fan_out), bias 0; BN 1/0;
Linear N(0, 0.01), bias 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from l2t_jax.models.layers import BatchNorm, Conv2d, Linear, max_pool_2x2

Array = jax.Array

VGG9_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with BN for small images. `__call__` returns (logits, features)."""

    cfg: tuple = VGG9_CFG
    num_classes: int = 10
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, list[Array]]:
        """Args: x (B, H, W, 3), H and W multiples of 2**(number of pools).

        Returns: logits (B, num_classes) and one map per max-pool input.
        """
        pools = sum(1 for v in self.cfg if v == "M")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB input (B, H, W, 3), got shape {x.shape}")
        if x.shape[1] % 2**pools or x.shape[2] % 2**pools or x.shape[1] == 0:
            raise ValueError(
                f"VGG with {pools} max-pools needs H and W divisible by {2**pools}, got {x.shape[1]}x{x.shape[2]}"
            )
        features = []
        conv_index = 0
        h = x
        for v in self.cfg:
            if v == "M":
                features.append(h)
                h = max_pool_2x2(h)
            else:
                h = Conv2d(v, 3, 1, 1, use_bias=True, impl=self.conv_impl, name=f"conv{conv_index}")(h)
                h = nn.relu(BatchNorm(name=f"bn{conv_index}")(h, train))
                conv_index += 1
        pooled = jnp.mean(h, axis=(1, 2))
        logits = Linear(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            name="fc",
        )(pooled)
        return logits, features
