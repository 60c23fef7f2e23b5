"""Where compiled XLA programs are kept between processes (jax's persistent compilation cache).

Compiling the meta-iteration is the most expensive thing a run does once: on the
project's 2-core CPU the stl10 iteration (ResNet32 -> VGG9, T = 2) takes 40-60 s to
compile and the compiler holds 1.5 GB more than the training itself while it runs
(results/benchmarks/README.md, "Compilation"). A rerun, a resumed run or the next seed
of a sweep compiles the same programs again unless they are cached, so the runner
caches them by default in one folder per user:

* `"auto"`: `$L2T_JAX_COMPILATION_CACHE` when set and not empty (a folder, or "none"), else
  `$XDG_CACHE_HOME/l2t_jax/xla`, else `~/.cache/l2t_jax/xla`;
* `"none"` (or ""): no persistent cache;
* any other value: that folder.

jax keys every entry by the program, the compile options, the jax/jaxlib version and
the device, so runs, configs and versions share one folder safely; entries are a few
MB, and the folder is kept under `DEFAULT_MAX_BYTES` by evicting the least recently
used ones. Deleting it only costs the next run its compile. `cache_dir` imports nothing heavy
(the sweep driver reads the flag with it); `enable` imports jax.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger(__name__)

ENV_VAR = "L2T_JAX_COMPILATION_CACHE"
DISABLED = ("", "none")
#: Size the cache folder is kept under (least recently used entries go first).
DEFAULT_MAX_BYTES = 4 << 30
#: Programs that compile faster than this are not worth a file.
MIN_COMPILE_SECONDS = 1.0


def cache_dir(value: str, environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """The cache folder that `value` ("auto", "none", "" or a path) names; None: no cache.

    Args:
      value: the `--compilation_cache` value.
      environ: the environment "auto" reads (`ENV_VAR`, `XDG_CACHE_HOME`, `HOME`).
    """
    value = value.strip()
    if value.lower() == "auto":
        chosen = environ.get(ENV_VAR, "").strip()
        if chosen and chosen.lower() != "auto":
            return cache_dir(chosen, {})
        base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
        return Path(base) / "l2t_jax" / "xla"
    if value.lower() in DISABLED:
        return None
    return Path(value).expanduser()


def enable(path: Optional[Path], max_bytes: int = DEFAULT_MAX_BYTES) -> Optional[Path]:
    """Makes jax keep compiled programs in `path` (created if absent) from now on in this process.

    Args:
      path: the folder (`cache_dir`'s answer); None: nothing changes.
      max_bytes: the folder's size limit (least recently used entries are evicted).

    Returns:
      The folder, absolute; None for None.

    Raises:
      ConfigError: `path` cannot be a writable folder (a file is there, or no permission).
    """
    if path is None:
        return None
    import jax

    from l2t_jax.run_config import ConfigError

    path = path.resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"the compilation cache {path} cannot be created ({e.strerror or e}): pass --compilation_cache=DIR "
            f"with a writable folder, or --compilation_cache=none"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"the compilation cache {path} is not writable: pass --compilation_cache=DIR with a writable folder, "
            f"or --compilation_cache=none"
        )
    jax.config.update("jax_compilation_cache_dir", str(path))
    # jax's own environment variables, where the user set them, win over these defaults.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        try:
            import filelock  # noqa: F401  (jax needs it to evict)

            jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
        except ImportError:  # pragma: no cover - filelock is an install requirement
            log.info("filelock is not installed: the compilation cache %s is not size-limited", path)
    return path
