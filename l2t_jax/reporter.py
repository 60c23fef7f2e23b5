"""Where a run's measurements go: metrics.jsonl (the record), TensorBoard (a view of it), the progress bar, the log.

    reporter = Reporter(workdir, steps_per_epoch, has_meta, progress_bar=True)
    reporter.open(keep_bytes)             # fresh (0) or resumed: cut the record, rebuild TensorBoard
    bar = reporter.epoch_bar(epoch, epochs, start_step)
    reporter.train_window(record, bar)    # every `log_every` steps
    reporter.epoch_end(record, ...)       # every epoch
    reporter.close()

metrics.jsonl holds one JSON object per line: "train" records (one per log window:
epoch, step, lr and the window's mean metrics) and "epoch" records (lr, the epoch's
mean training metrics as train_*, validation and test accuracy and loss, the best
epoch so far). TensorBoard gets the same scalars through `tb_scalars`, the one mapping
from a record to TensorBoard, used while training and when the events are rebuilt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

# Fields of a "train" record that are not scalars of the window.
_TRAIN_NON_SCALARS = frozenset({"kind", "epoch", "step", "lr", "lambda"})


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl (none if it is absent); an unreadable line is skipped with a warning."""
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not JSON; TensorBoard will lack it", path, i + 1)
    return out


def tb_scalars(line: dict, steps_per_epoch: int, has_meta: bool) -> list[tuple[str, float, int]]:
    """The TensorBoard scalars (tag, value, global step) of one metrics.jsonl record.

    An epoch record's step is the step count at its end (epoch x steps per epoch).
    """
    if line.get("kind") == "train":
        step = int(line["step"])
        return [(f"train/{k}", v, step) for k, v in line.items() if k not in _TRAIN_NON_SCALARS and v is not None]
    if line.get("kind") != "epoch":
        return []
    step = int(line["epoch"]) * steps_per_epoch
    out = [("epoch/lr", line["lr"], step)]
    out += [(f"epoch/{k}", v, step) for k, v in line.items() if k.startswith("train_") and k != "train_lambda"]
    for split in ("val", "test"):
        for what in ("acc", "loss"):
            if line.get(f"{split}_{what}") is not None:
                out.append((f"epoch/{split}_{what}", line[f"{split}_{what}"], step))
    if has_meta and line.get("train_lambda"):
        out += [(f"lambda/pair{i}", v, step) for i, v in enumerate(line["train_lambda"])]
    return out


def open_tensorboard(tb_dir: Path, lines: list[dict], steps_per_epoch: int, has_meta: bool):
    """A TensorBoard writer on a fresh events file that already holds the scalars of `lines`.

    metrics.jsonl is the record and TensorBoard a view of it: the old event files
    (which lack whatever was buffered when a run was killed, and hold steps beyond the
    checkpoint resumed from) are replaced by one rebuilt from the record, so every
    logged step is there exactly once.
    """
    from tensorboardX import SummaryWriter

    tb_dir.mkdir(parents=True, exist_ok=True)
    for old in tb_dir.glob("events.out.tfevents.*"):
        old.unlink()
    tb = SummaryWriter(str(tb_dir))
    for line in lines:
        for tag, value, step in tb_scalars(line, steps_per_epoch, has_meta):
            tb.add_scalar(tag, value, step)
    tb.flush()
    return tb


def fmt(v: Optional[float]) -> str:
    """An accuracy for a log line ("n/a" when there is none)."""
    return "n/a" if v is None else f"{v:.2f}"


def log_summary(headline: str, summary: dict) -> None:
    """One log line with a run summary's accuracies and wall time."""
    log.info(
        "%s: best val %s (epoch %s), test there %s, last test %s, %.0f s",
        headline, fmt(summary.get("best_val_acc")), summary.get("best_epoch"),
        fmt(summary.get("test_acc_at_best_val")), fmt(summary.get("last_test_acc")), summary.get("wall_time_s", 0.0),
    )


class Reporter:
    """Owns a run's outputs of measurements: metrics.jsonl, TensorBoard, the progress bar and the log lines.

    Adding a metric to the record, the board and the bar happens here (`train_window`,
    `epoch_end`); the loop only hands over the records.
    """

    def __init__(self, workdir: Path, steps_per_epoch: int, has_meta: bool, *, progress_bar: bool):
        self.metrics_path = workdir / "metrics.jsonl"
        self.tb_dir = workdir / "tb"
        self.steps_per_epoch = steps_per_epoch
        self.has_meta = has_meta
        self.progress_bar = progress_bar
        self._tb = None

    def open(self, keep_bytes: int) -> None:
        """Starts writing: metrics.jsonl cut to its first `keep_bytes` bytes (0: a fresh run), TensorBoard rebuilt."""
        with open(self.metrics_path, "a+b") as f:  # drop lines written after the checkpoint resumed from
            f.truncate(keep_bytes)
        self._tb = open_tensorboard(self.tb_dir, read_metrics(self.metrics_path), self.steps_per_epoch, self.has_meta)

    @property
    def metrics_bytes(self) -> int:
        """The length of metrics.jsonl now (what a checkpoint saved now keeps)."""
        return self.metrics_path.stat().st_size

    def write(self, record: dict) -> None:
        """Appends a record to metrics.jsonl and its scalars to TensorBoard."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        for tag, value, step in tb_scalars(record, self.steps_per_epoch, self.has_meta):
            self._tb.add_scalar(tag, value, step)

    def epoch_bar(self, epoch: int, epochs: int, start_step: int):
        """A progress bar over the epoch's steps (with tqdm's rate and ETA), starting at `start_step`."""
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}",
                    disable=not self.progress_bar, dynamic_ncols=True, leave=False)

    def train_window(self, epoch: int, step: int, lr: float, means: dict[str, Any], bar) -> None:
        """A log window's mean training metrics: a "train" record and the bar's postfix."""
        if not means:
            return
        self.write({"kind": "train", "epoch": epoch + 1, "step": step, "lr": lr, **means})
        post = {"loss": f"{means['loss']:.3f}", "acc": f"{means['accuracy']:.1f}"}
        if self.has_meta and "lambda_mean" in means:
            post["λ"] = f"{means['lambda_mean']:.2f}"
        bar.set_postfix(post, refresh=False)

    def epoch_end(self, record: dict, train_means: dict[str, Any], best: Optional[dict], epochs: int) -> None:
        """A finished epoch: its "epoch" record and one log line."""
        self.write({"kind": "epoch", **{k: v for k, v in record.items() if k != "train"},
                    **{f"train_{k}": v for k, v in train_means.items()}, "best": best})
        lam = f" λ {train_means['lambda_mean']:.2f}" if self.has_meta and "lambda_mean" in train_means else ""
        log.info(
            "epoch %d/%d lr %.4g | train loss %.4f acc %.2f%s | val %s | test %s | best val %s (epoch %s)",
            record["epoch"], epochs, record["lr"], train_means.get("loss", float("nan")),
            train_means.get("accuracy", float("nan")), lam, fmt(record["val_acc"]), fmt(record["test_acc"]),
            fmt((best or {}).get("val_acc")), (best or {}).get("epoch"),
        )

    def close(self) -> None:
        """Flushes and closes TensorBoard (idempotent)."""
        if self._tb is not None:
            self._tb.close()
