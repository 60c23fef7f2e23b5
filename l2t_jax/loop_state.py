"""The training loop's progress beside the `TrainState`: where the run is, its metric sums, its history.

`LoopState` is what a checkpoint stores next to the arrays (as its JSON record) and
what a resume reads back: the position (epoch, step in the epoch, steps done), the
running metric sums of the epoch and of the current log window, every finished
epoch's record, the best-validation epoch, how many bytes of metrics.jsonl belong to
the checkpoint, and the wall time spent so far. Its JSON form keeps the keys of the
records written before this class existed, so older checkpoints resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

#: Scalar training metrics summed per epoch and per log window, weighted by batch size;
#: "lambda" (one value per pair) is summed per step beside them.
SCALAR_METRICS = ("loss", "ce", "wfm", "at", "lwf", "accuracy", "outer_loss", "matching_loss_at_start",
                  "meta_grad_norm")


@dataclasses.dataclass
class MetricSums:
    """Running sums of fetched step metrics, in step order, in float64.

    Attributes:
      n: images summed over; steps: steps summed over.
      sums: {metric: Σ value × batch size} for `SCALAR_METRICS` present in the steps.
      lam: per-pair Σ λ over the steps (None before the first step).
    """

    n: int = 0
    steps: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    lam: Optional[list[float]] = None

    def add(self, metrics: Mapping[str, Any], n: int) -> None:
        """Adds one step's fetched metrics, of a batch of `n` images."""
        self.n += n
        self.steps += 1
        for k in SCALAR_METRICS:
            if k in metrics:
                self.sums[k] = self.sums.get(k, 0.0) + float(metrics[k]) * n
        lam = [float(v) for v in np.asarray(metrics["lambda"]).reshape(-1)]
        self.lam = lam if self.lam is None else [a + b for a, b in zip(self.lam, lam)]

    def means(self) -> dict[str, Any]:
        """Image-weighted means ("accuracy" in %), the mean λ per pair and over pairs; {} when empty."""
        if self.n == 0:
            return {}
        out: dict[str, Any] = {k: v / self.n for k, v in self.sums.items()}
        if "accuracy" in out:
            out["accuracy"] *= 100.0
        if self.lam:
            lam = [v / self.steps for v in self.lam]
            out["lambda"] = lam
            out["lambda_mean"] = float(np.mean(lam))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "steps": self.steps, "sums": dict(self.sums), "lambda": self.lam}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MetricSums:
        lam = d["lambda"]
        return cls(int(d["n"]), int(d["steps"]), dict(d["sums"]), None if lam is None else list(lam))


# The JSON record's keys (those of the records written before `LoopState` existed).
_RECORD_KEYS = ("config", "epoch", "step_in_epoch", "global_step", "seed", "steps_per_epoch", "epoch_acc", "window",
                "best", "history", "metrics_bytes", "wall_time")


@dataclasses.dataclass
class LoopState:
    """Where a run is and what it has measured, beside its `TrainState`.

    Attributes:
      config: the run's record (`RunSpec.record`), to refuse resuming with another config.
      epoch: epochs finished (0-based index of the current one); step_in_epoch: its steps done.
      global_step: steps done over the run; steps_per_epoch: what the data gave when it started.
      seed: the run's seed.
      epoch_sums, window: the current epoch's and log window's metric sums.
      best: {"epoch", "val_acc", "test_acc"} of the best-validation epoch (None before one).
      history: one record per finished epoch ({"epoch", "lr", "train", "val_acc", ...}).
      metrics_bytes: the length of metrics.jsonl when this state was saved (a resume cuts
        what was written after it).
      wall_time: seconds of training over all sessions up to the last save.
    """

    config: dict
    epoch: int
    step_in_epoch: int
    global_step: int
    seed: int
    steps_per_epoch: int
    epoch_sums: MetricSums
    window: MetricSums
    best: Optional[dict]
    history: list[dict]
    metrics_bytes: int
    wall_time: float

    @classmethod
    def fresh(cls, config: dict, seed: int, steps_per_epoch: int) -> LoopState:
        """The state of a run that has not started."""
        return cls(config, 0, 0, 0, seed, steps_per_epoch, MetricSums(), MetricSums(), None, [], 0, 0.0)

    def next_epoch(self) -> None:
        """Moves to the start of the next epoch, with empty metric sums."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums = MetricSums()
        self.window = MetricSums()

    def to_json(self) -> dict[str, Any]:
        """The checkpoint's JSON record."""
        return {
            "config": self.config, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch,
            "epoch_acc": self.epoch_sums.to_json(), "window": self.window.to_json(), "best": self.best,
            "history": self.history, "metrics_bytes": self.metrics_bytes, "wall_time": self.wall_time,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoopState:
        """Reads a checkpoint's record; ValueError if a key is missing (a damaged record, not a resumable one)."""
        missing = [k for k in _RECORD_KEYS if k not in d]
        if missing:
            raise ValueError(f"the progress record lacks {', '.join(missing)}")
        return cls(
            config=d["config"], epoch=int(d["epoch"]), step_in_epoch=int(d["step_in_epoch"]),
            global_step=int(d["global_step"]), seed=int(d["seed"]), steps_per_epoch=int(d["steps_per_epoch"]),
            epoch_sums=MetricSums.from_json(d["epoch_acc"]), window=MetricSums.from_json(d["window"]),
            best=d["best"], history=list(d["history"]), metrics_bytes=int(d["metrics_bytes"]),
            wall_time=float(d["wall_time"]),
        )
