"""The target's learning-rate schedule (the reference's `CosineAnnealingLR`, stepped per epoch).

The reference builds `CosineAnnealingLR(optimizer, T_max=epochs)` and calls
`scheduler.step()` at the *start* of every epoch, so epoch e (0-based) trains
with the cosine value of e + 1:

    lr(e) = lr0 · (1 + cos(π · (e + 1) / E)) / 2,

ending at exactly 0 in the last epoch (the last epoch trains with lr 0: only the
BN statistics and the meta-parameters still move). The learning rate is constant
within an epoch.
"""

from __future__ import annotations

import math


def cosine_epoch_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of 0-based `epoch` out of `epochs` (the reference's schedule).

    Args:
      base_lr: lr0, the initial learning rate.
      epoch: 0-based epoch index, 0 <= epoch < epochs.
      epochs: E, the total number of epochs (the cosine's period is 2E).

    Returns:
      lr0 · (1 + cos(π (epoch + 1) / E)) / 2 as a Python float.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} outside [0, {epochs})")
    return base_lr * (1.0 + math.cos(math.pi * (epoch + 1) / epochs)) / 2.0
