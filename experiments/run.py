"""Train one run (or the offline quickstart) from a config file.

    python -m experiments.run --config=experiments/configs/stl10.py \\
        --config.method=fm --config.pairs=one_to_one --workdir=runs/stl10-fm

    python -m experiments.run --config=experiments/configs/quickstart.py --workdir=/tmp/qs

`--config.KEY=VALUE` overrides a key of the config (an unknown key is an error).
Rerunning the same command resumes from the newest checkpoint in `--workdir`; a
different config on an existing run directory is refused, naming the differing keys.
SIGINT/SIGTERM save a checkpoint and exit with status 128+signal. Errors in the
config, data or weights are reported (exit status 2) before any training.
See `l2t_jax/run_config.py` for every key.
"""

from __future__ import annotations

import logging
import shlex
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, summary, weights)")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto",
    "persistent XLA compilation cache folder: reruns, resumed runs and the next seed skip the compile. "
    "'auto': $L2T_JAX_COMPILATION_CACHE, else ~/.cache/l2t_jax/xla; 'none': no cache",
)
flags.mark_flags_as_required(["config", "workdir"])


def _setup_logging() -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _command_line() -> str:
    """This process's command line as typed (`python -m experiments.run --config=... --workdir=...`)."""
    return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup_logging()
    from l2t_jax import compile_cache, loop, run_config, weights

    config = _CONFIG.value
    try:
        _choose_cpu_scheduler(config)
        cache = compile_cache.enable(compile_cache.cache_dir(_CACHE.value))
        if cache is not None:
            logging.info("compiled programs are cached in %s (--compilation_cache=none: no cache)", cache)
        compose = _composition(config)
        if compose is not None:
            compose(config, _WORKDIR.value)  # several ordinary runs, each through loop.train
        else:
            loop.train(run_config.resolve(config), _WORKDIR.value)
    except loop.TrainingInterrupted as e:
        print(f"\n{e.rerun_hint(_command_line())}", file=sys.stderr)
        return 128 + (e.signum or 2)
    except loop.NonFiniteMetricError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (run_config.ConfigError, FileNotFoundError, weights.WeightImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. bad data (too few images per class): where, then the message
        traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _choose_cpu_scheduler(config) -> None:
    """XLA CPU's instruction order for this process (`l2t_jax.xla_flags`), set before JAX starts a backend.

    A composition's config (no `hvp` key) keeps XLA's default. Run in a process where
    JAX already runs (a notebook, a test calling `main`), the flags can no longer
    change: that is logged and the run goes on, as the order changes no numbers.
    """
    from l2t_jax import xla_flags
    from l2t_jax.run_config import ConfigError

    choice = config.get("cpu_scheduler", "auto")
    try:
        scheduler = xla_flags.choose_cpu_scheduler(config.get("hvp", "reverse"), choice)
    except ValueError:
        raise ConfigError(f"config.cpu_scheduler={choice!r} is not one of {', '.join(xla_flags.CPU_SCHEDULERS)}") from None
    except RuntimeError as e:
        logging.warning("%s; XLA's flags stay as they are", e)
        return
    logging.info("XLA CPU scheduler: %s", scheduler)


def _composition(config):
    """The driver of a config that composes several runs (its `experiment` key), or None for one run.

    A composition's config has its own shape (e.g. the quickstart's `source` and
    `target` run configs); its driver resolves every run to a `RunSpec` before any trains.
    """
    kind = config.get("experiment")
    if kind is None:
        return None
    if kind == "quickstart":
        from experiments import quickstart

        return quickstart.run_quickstart
    from l2t_jax.run_config import ConfigError

    raise ConfigError(f"config.experiment={kind!r} is not a known composition (known: 'quickstart'); "
                      f"a config of one run has no 'experiment' key")


def run_cli() -> None:
    """`app.run(main)` with the config file's and keys' errors as one line (`l2t_jax.cli.run_absl`)."""
    from l2t_jax.cli import run_absl

    sys.exit(run_absl(main))


if __name__ == "__main__":
    run_cli()
