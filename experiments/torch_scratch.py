"""PyTorch twin of a `method=scratch` run: the authors' VGG/ResNet trained in PyTorch on our exact batches.

    python -m experiments.torch_scratch --config=experiments/configs/cifar10_limited.py \\
        --config.dataset=npz:data/cifar10_pool500.npz --config.data_dir=. --config.n_per_class=25 \\
        --config.method=scratch --config.lr=0.1 --config.seed=0 --config.eval_every_epochs=4 \\
        --config.test_eval=at_end --workdir=runs/torch-scratch-s0 --threads=1

It takes the same config file and `--config.KEY=VALUE` overrides as `experiments.run`, so
one command line, with `experiments.run` swapped for `experiments.torch_scratch`, trains the
same setting in both frameworks. What is shared and what is PyTorch's:

* data: `l2t_jax.loop.load_run_data(spec.data)` (the same train / validation / test splits)
  and `l2t_jax.data.batch_iterator` with the JAX loop's arguments (seed, epoch,
  drop_last, resize_to), so batch k of epoch e holds exactly the JAX run's pixels and
  labels (NHWC float32 transposed to NCHW); evaluation uses the same eval transform;
* model: the PyTorch twin of `config.target_model` (tests/torch_reference.py, the
  reference's architecture and state-dict names), with the reference's initialisation
  (convs Kaiming-normal fan_out/relu, conv bias 0; BN 1/0; Linear N(0, 0.01), bias 0),
  seeded by `torch.manual_seed(config.seed)`; `--init=jax` starts from the JAX run's
  initial weights instead (the same key as `l2t_jax.loop.build`), for a paired comparison;
* optimisation: `torch.optim.SGD(lr, momentum, weight_decay=wd)`, cross-entropy, float32;
  epoch e (0-based) of E uses lr0·(1+cos(π(e+1)/E))/2 (the reference steps its
  CosineAnnealingLR at the start of each epoch);
* protocol: eval-mode BN on the validation split every `eval_every_epochs` epochs and
  after the last; the best epoch is the first with the strictly highest validation
  accuracy; the test split as `config.test_eval` says (the JAX loop's rule: "at_end"
  tests the final weights and the best-validation weights once, at the end).

Work directory:
  metrics.jsonl        one JSON line per epoch (the JAX run's "epoch" record fields)
  checkpoint.pt        model, optimizer, best weights, history: every --checkpoint_every
                       epochs, written atomically; rerunning the same command resumes from
                       it (metrics.jsonl is cut back to it); removed once the run finished
  final_weights.pt / best_weights.pt   PyTorch state dicts (reference names)
  summary.json         best_val_acc, best_epoch, test_acc_at_best_val, last_test_acc, history,
                       wall_time_s, "framework": "pytorch", the command line (written atomically)

A killed run loses at most the epochs since its last checkpoint; every file is
replaced atomically, so nothing is left half-written. Rerunning a finished run
only reports its summary. A progress line per epoch goes to stderr.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from l2t_jax import data as data_lib, run_config
from l2t_jax.io.atomic import write_atomic, write_json_atomic
from l2t_jax.schedule import cosine_epoch_lr

REPO = Path(__file__).resolve().parents[1]
TWINS = REPO / "tests" / "torch_reference.py"
CHECKPOINT = "checkpoint.pt"
FRAMEWORK = "pytorch"
INITS = ("torch", "jax")


class NonFiniteLossError(FloatingPointError):
    """A training or evaluation loss became NaN/inf (the run stops; the checkpoint is left as it was)."""


def load_twins():
    """The PyTorch twins of the model zoo (tests/torch_reference.py), loaded by path."""
    name = "l2t_torch_twins"
    if name in sys.modules:
        return sys.modules[name]
    if not TWINS.exists():
        raise FileNotFoundError(f"PyTorch model twins not found: {TWINS}")
    spec = importlib.util.spec_from_file_location(name, TWINS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- model


@torch.no_grad()
def reference_init_(model: nn.Module) -> nn.Module:
    """The reference's `_initialize_weights`: Conv Kaiming-normal (fan_out, relu), bias 0; BN 1/0; Linear N(0, 0.01), 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def jax_initial_state_dict(config, num_classes: int) -> dict[str, torch.Tensor]:
    """The JAX run's initial target weights (`l2t_jax.loop.build`'s key) as a PyTorch state dict."""
    import jax

    from l2t_jax.io.torch_layout import variables_to_torch
    from l2t_jax.models import get_model, init_model

    target = get_model(config.target_model, num_classes, conv_impl=config.conv_impl)
    key_init, _ = jax.random.split(jax.random.key(config.seed))
    variables = jax.device_get(init_model(target, key_init, config.image_size))
    sd = variables_to_torch(config.target_model, variables)
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def build_model(config, num_classes: int, init: str = "torch") -> nn.Module:
    """The twin of `config.target_model`, float32, initialised as the reference (or from the JAX init)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    torch.manual_seed(int(config.seed))
    model = load_twins().make_torch_model(config.target_model, num_classes)
    reference_init_(model)
    if init == "jax":
        sd = jax_initial_state_dict(config, num_classes)
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    return model.float()


def make_optimizer(model: nn.Module, config) -> torch.optim.SGD:
    """`torch.optim.SGD(lr, momentum, weight_decay)`: the reference's optimizer (lr set per epoch)."""
    return torch.optim.SGD(model.parameters(), lr=float(config.lr), momentum=float(config.momentum),
                           weight_decay=float(config.wd))


# --------------------------------------------------------------------------- data


def _to_torch(x: np.ndarray, y: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC float32 numpy -> NCHW torch (dtype); labels -> int64."""
    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(dtype)
    return xt, torch.from_numpy(np.asarray(y, np.int64))


def train_batches(ds: data_lib.ImageDataset, config, epoch: int,
                  dtype: torch.dtype = torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch `epoch`'s training batches, exactly the JAX loop's (`loop._run_epochs`' batch_iterator call)."""
    it = data_lib.batch_iterator(
        ds, int(config.batch_size), train=True, image_size=config.image_size, seed=config.seed, epoch=epoch,
        start_step=0, drop_remainder=config.drop_last, num_workers=config.num_workers,
        resize_to=config.resize_to or None,
    )
    try:
        for x, y in it:
            yield _to_torch(x, y, dtype)
    finally:
        it.close()


def eval_batches(ds: data_lib.ImageDataset, config, batch_size: int,
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The eval transform in dataset order (`loop.evaluate`'s batch_iterator call)."""
    it = data_lib.batch_iterator(
        ds, batch_size, train=False, image_size=config.image_size, seed=config.seed, epoch=0,
        num_workers=config.num_workers, resize_to=config.resize_to or None,
    )
    try:
        for x, y in it:
            yield _to_torch(x, y, dtype)
    finally:
        it.close()


# --------------------------------------------------------------------------- training and evaluation


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One SGD step on the cross-entropy (BN in training mode): (batch-mean loss, correct top-1)."""
    model.train()
    opt.zero_grad()
    logits, _ = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    return float(loss.detach()), int((logits.detach().argmax(-1) == y).sum())


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, ds: data_lib.ImageDataset, config, epoch: int,
                lr: float, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """One epoch at learning rate `lr`: {"loss" (batch-size weighted mean), "accuracy" (%), "n", "steps"}."""
    set_lr(opt, lr)
    loss_sum, correct, n, steps = 0.0, 0, 0, 0
    for x, y in train_batches(ds, config, epoch, dtype):
        loss, hits = train_step(model, opt, x, y)
        steps += 1
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss {loss} at epoch {epoch + 1}, step {steps} (lr {lr:g})")
        loss_sum += loss * len(y)
        correct += hits
        n += len(y)
    return {"loss": loss_sum / max(n, 1), "accuracy": 100.0 * correct / max(n, 1), "n": n, "steps": steps}


@torch.no_grad()
def evaluate(model: nn.Module, ds: data_lib.ImageDataset, config, batch_size: int,
             dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `ds` (eval transform, eval-mode BN)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for x, y in eval_batches(ds, config, batch_size, dtype):
            logits, _ = model(x)
            loss_sum += float(F.cross_entropy(logits.to(torch.float64), y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    n = len(ds)
    return {"acc": 100.0 * correct / n, "loss": loss_sum / n, "correct": correct, "n": n}


# --------------------------------------------------------------------------- files


def _torch_save(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _finished(workdir: Path, plain: dict) -> Optional[dict]:
    """The summary of a finished run of this config in `workdir` (else None; ConfigError for another config)."""
    path = workdir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("framework") != FRAMEWORK:
        raise run_config.ConfigError(f"{path} is not a summary of {__name__}; use another --workdir")
    diff = run_config.config_differences(summary.get("config", {}), plain)
    if diff:
        raise run_config.ConfigError(f"{workdir} holds a finished run with another config; differing keys:\n  "
                                     + "\n  ".join(diff) + "\nuse another --workdir")
    return summary


# --------------------------------------------------------------------------- the run


def run(config, workdir: str | os.PathLike, *, threads: int = 1, checkpoint_every: int = 10, init: str = "torch",
        command: str = "", log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Trains (or resumes, or reports) the PyTorch twin of the scratch run `config` in `workdir`.

    Returns the summary (also written to `workdir/summary.json`). Raises run_config.ConfigError for a
    config this twin does not run (not scratch, target_weights) or a workdir holding another config.
    """
    if threads < 1 or checkpoint_every < 1:
        raise ValueError(f"threads and checkpoint_every must be >= 1, got {threads}, {checkpoint_every}")
    if init not in INITS:
        raise run_config.ConfigError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    torch.set_num_threads(threads)
    if config.method != "scratch":
        raise run_config.ConfigError(f"{__name__} trains method=scratch only (config.method={config.method!r})")
    spec = run_config.resolve(config)
    if config.target_weights:
        raise run_config.ConfigError(f"{__name__} trains from the reference initialisation; "
                                     f"config.target_weights={config.target_weights!r} is not supported")
    from l2t_jax import loop  # the JAX loop's data splits (imported late: it pulls in JAX and orbax)

    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    plain = spec.record
    done = _finished(workdir, plain)
    if done is not None:
        log(f"{workdir} is already finished: best val {_fmt(done['best_val_acc'])} (epoch {done['best_epoch']}), "
            f"test there {_fmt(done['test_acc_at_best_val'])}, last test {_fmt(done['last_test_acc'])}")
        return done

    ckpt_path, metrics_path = workdir / CHECKPOINT, workdir / "metrics.jsonl"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    if ckpt is not None:
        diff = run_config.config_differences(ckpt["config"], plain)
        if ckpt.get("init", "torch") != init:
            diff.append(f"--init: {ckpt.get('init', 'torch')!r} -> {init!r}")
        if diff:
            raise run_config.ConfigError(f"{ckpt_path} holds a run with another config; differing keys:\n  "
                                         + "\n  ".join(diff) + "\nuse another --workdir, or rerun with the saved config")

    data = loop.load_run_data(spec.data)
    E = int(config.epochs)
    spe = data_lib.steps_per_epoch(len(data.train), int(config.batch_size), config.drop_last)
    if spe < 1:
        raise ValueError(f"{len(data.train)} training images give no batch of {config.batch_size}")
    sizes = [len(d) for d in (data.val, data.test) if d is not None]
    eval_bs = min(int(config.eval_batch_size), max(sizes)) if sizes else int(config.eval_batch_size)
    model = build_model(config, data.num_classes, init)
    opt = make_optimizer(model, config)

    if ckpt is None:
        st = {"epoch": 0, "global_step": 0, "history": [], "best": None, "best_state": None, "wall_time": 0.0}
        metrics_path.write_bytes(b"")
        log(f"fresh start ({FRAMEWORK} {torch.__version__}, {threads} thread(s), init {init}): "
            f"{len(data.train)} training, {len(data.val) if data.val else 0} validation, "
            f"{len(data.test) if data.test else 0} test images, {data.num_classes} classes, {spe} steps/epoch")
    else:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        st = {k: ckpt[k] for k in ("epoch", "global_step", "history", "best", "best_state", "wall_time")}
        with open(metrics_path, "a+b") as f:  # drop lines written after the checkpoint
            f.truncate(ckpt["metrics_bytes"])
        log(f"resuming from {ckpt_path} at epoch {st['epoch'] + 1}/{E}")
    del ckpt

    def save_checkpoint() -> None:
        _torch_save(ckpt_path, {
            "config": plain, "init": init, "model": model.state_dict(), "optimizer": opt.state_dict(),
            **st, "wall_time": st["wall_time"] + (time.time() - session_start),
            "metrics_bytes": metrics_path.stat().st_size,
        })

    session_start = time.time()
    while st["epoch"] < E:
        epoch = st["epoch"]
        t0 = time.time()
        lr = cosine_epoch_lr(float(config.lr), epoch, E)
        tr = train_epoch(model, opt, data.train, config, epoch, lr)
        st["global_step"] += tr["steps"]
        t_train = time.time() - t0
        last = epoch + 1 == E
        evaluating = last or (epoch + 1) % int(config.eval_every_epochs) == 0
        best = st["best"]
        ev_val = evaluate(model, data.val, config, eval_bs) if evaluating and data.val is not None else None
        improved = evaluating and (best is None or ev_val is None or ev_val["acc"] > best["val_acc"])
        test_now = {"each_eval": evaluating, "on_improvement": improved or last, "at_end": last}[config.test_eval]
        ev_test = evaluate(model, data.test, config, eval_bs) if test_now and data.test is not None else None
        for split, ev in (("val", ev_val), ("test", ev_test)):
            if ev is not None and not math.isfinite(ev["loss"]):
                raise NonFiniteLossError(f"non-finite {split} loss {ev['loss']} after epoch {epoch + 1}")
        record = {
            "epoch": epoch + 1, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["accuracy"],
            "val_acc": ev_val["acc"] if ev_val else None, "val_loss": ev_val["loss"] if ev_val else None,
            "test_acc": ev_test["acc"] if ev_test else None, "test_loss": ev_test["loss"] if ev_test else None,
            "train_time_s": t_train, "epoch_time_s": None,
        }
        if improved:
            st["best"] = {"epoch": epoch + 1, "val_acc": record["val_acc"], "test_acc": record["test_acc"]}
            st["best_state"] = _clone_state(model)
        elif last and config.test_eval == "at_end" and data.test is not None:
            # the best-validation epoch's weights, kept when it happened, tested once now
            best_model = copy.deepcopy(model)
            best_model.load_state_dict(st["best_state"])
            st["best"]["test_acc"] = evaluate(best_model, data.test, config, eval_bs)["acc"]
            del best_model
        record["epoch_time_s"] = time.time() - t0
        st["history"].append(record)
        line = {"kind": "epoch", "epoch": record["epoch"], "lr": lr, "train_loss": tr["loss"],
                "train_accuracy": tr["accuracy"], "val_acc": record["val_acc"], "val_loss": record["val_loss"],
                "test_acc": record["test_acc"], "test_loss": record["test_loss"], "best": st["best"],
                "train_time_s": t_train, "epoch_time_s": record["epoch_time_s"]}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        b = st["best"] or {}
        log(f"epoch {epoch + 1}/{E} lr {lr:.4g} | train loss {tr['loss']:.4f} acc {tr['accuracy']:.2f} | "
            f"val {_fmt(record['val_acc'])} | test {_fmt(record['test_acc'])} | best val {_fmt(b.get('val_acc'))} "
            f"(epoch {b.get('epoch')}) | {record['epoch_time_s']:.1f} s (train {t_train:.1f} s)")
        st["epoch"] += 1
        if st["epoch"] % checkpoint_every == 0 and st["epoch"] < E:
            save_checkpoint()

    wall = st["wall_time"] + (time.time() - session_start)
    _torch_save(workdir / "final_weights.pt", model.state_dict())
    if st["best_state"] is not None:
        _torch_save(workdir / "best_weights.pt", st["best_state"])
    hist = st["history"]
    best = st["best"] or {}
    train_times = [r["train_time_s"] for r in hist]
    summary = {
        "framework": FRAMEWORK,
        "torch_version": torch.__version__,
        "command": command,
        "threads": threads,
        "init": init,
        "method": config.method,
        "seed": config.seed,
        "dataset": config.dataset,
        "target_model": config.target_model,
        "num_classes": data.num_classes,
        "epochs": E,
        "steps": st["global_step"],
        "best_val_acc": best.get("val_acc"),
        "best_epoch": best.get("epoch"),
        "test_acc_at_best_val": best.get("test_acc"),
        "last_val_acc": hist[-1]["val_acc"] if hist else None,
        "last_test_acc": hist[-1]["test_acc"] if hist else None,
        "wall_time_s": wall,
        "median_train_epoch_s": float(np.median(train_times)) if train_times else None,
        "final_weights": str(workdir / "final_weights.pt"),
        "best_weights": str(workdir / "best_weights.pt") if st["best_state"] is not None else None,
        "history": hist,
        "config": plain,
    }
    write_json_atomic(workdir / "summary.json", summary, sort_keys=False)
    if ckpt_path.exists():
        ckpt_path.unlink()  # the summary and the weights files hold everything now
    log(f"done: best val {_fmt(summary['best_val_acc'])} (epoch {summary['best_epoch']}), test there "
        f"{_fmt(summary['test_acc_at_best_val'])}, last test {_fmt(summary['last_test_acc'])}, {wall:.0f} s")
    return summary


# --------------------------------------------------------------------------- command line


def _command_line() -> str:
    return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def cli() -> None:
    """`python -m experiments.torch_scratch --config=FILE [--config.KEY=VALUE ...] --workdir=DIR [--threads=1]`."""
    from absl import app, flags
    from ml_collections import config_flags

    from l2t_jax.cli import run_absl

    config_flag = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/configs/*.py)")
    workdir_flag = flags.DEFINE_string("workdir", None, "run directory (metrics, checkpoint, summary, weights)")
    threads_flag = flags.DEFINE_integer("threads", 1, "torch.set_num_threads (1: leave the other cores alone)")
    every_flag = flags.DEFINE_integer("checkpoint_every", 10, "write the resume checkpoint every this many epochs")
    init_flag = flags.DEFINE_enum("init", "torch", list(INITS),
                                  "initial weights: the reference's init seeded by config.seed (torch), or the "
                                  "JAX run's initial weights (jax)")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv: list[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            run(config_flag.value, workdir_flag.value, threads=threads_flag.value, checkpoint_every=every_flag.value,
                init=init_flag.value, command=_command_line())
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        except (run_config.ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\ninterrupted; rerun the same command to resume from {Path(workdir_flag.value) / CHECKPOINT} "
                  f"(written every {every_flag.value} epochs):\n  {_command_line()}", file=sys.stderr)
            return 130
        return 0

    sys.exit(run_absl(main))  # config file / key errors: one line, exit 2


if __name__ == "__main__":
    cli()
