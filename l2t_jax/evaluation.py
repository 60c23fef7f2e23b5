"""Evaluation of a network on a dataset: one jitted step for every caller, padded to one batch shape.

    metrics = evaluate_batches(model, variables, batches, batch_size)   # {"acc", "loss", "correct", "n"}

`eval_step` is the only evaluation computation of the library: the training loop's
validation and test passes (`loop.evaluate`) and `experiments.evaluate` both go
through it. Every batch is padded to `batch_size` with a validity mask, so the last,
partial batch needs no second compilation (eval-mode BN treats samples independently,
so padding changes no real row).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax import heap

PyTree = Any


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model, variables: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Eval-mode forward of one padded batch.

    Args:
      model: a flax module whose apply(variables, x, train=False) returns (logits, taps).
      variables: {"params", "batch_stats"}.
      x: (B, H, W, 3) normalised images; y: (B,) integer labels.
      mask: (B,) 1.0 for real rows, 0.0 for padding.

    Returns:
      {"correct": Σ top-1 hits, "loss_sum": Σ cross-entropy (float32)} over the real rows.
    """
    logits, _ = model.apply(variables, x, train=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), -1)[:, 0]
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {"correct": jnp.sum(hit * mask), "loss_sum": jnp.sum(nll * mask)}


#: `eval_step` for `evaluate_batches`: each new (model, shapes) compiled, then the compiler's freed memory released
_eval_step_released = heap.compile_then_release(eval_step)


def pad_batch(x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y) padded with zeros to `batch_size` rows, and the validity mask."""
    n = len(y)
    mask = np.zeros(batch_size, np.float32)
    mask[:n] = 1.0
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros(batch_size - n, y.dtype)])
    return x, y, mask


def evaluate_batches(model, variables: PyTree, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     batch_size: int) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over `batches` of at most `batch_size` images.

    Returns:
      {"acc": %, "loss": mean CE, "correct": hits, "n": images}.
    """
    outs, n = [], 0
    for x, y in batches:
        n += len(y)
        outs.append(_eval_step_released(model, variables, *pad_batch(x, y, batch_size)))
    outs = jax.device_get(outs)
    correct = sum(int(round(float(o["correct"]))) for o in outs)
    loss = sum(float(o["loss_sum"]) for o in outs)
    return {"acc": 100.0 * correct / n, "loss": loss / n, "correct": correct, "n": n}
