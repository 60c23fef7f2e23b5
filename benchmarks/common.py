"""Shared by the benchmark scripts: the settings, timing, memory sampling, JSON output.

Nothing here imports jax or torch, so both the JAX and the PyTorch benchmark use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Setting:
    """One transfer task at its real model sizes (random data, random weights).

    Attributes:
      source, source_classes: the source network (registry name) and its classifier size.
      target, target_classes: the target network and its classifier size.
      image_size: input resolution (square).
      pairs: a named configuration ("all_to_all", ...) or "m-n,..." (transfer.resolve_pairs).
      batch: the paper's batch size for this task.
    """

    source: str
    source_classes: int
    target: str
    target_classes: int
    image_size: int
    pairs: str
    batch: int


SETTINGS: dict[str, Setting] = {
    # STL-10 from TinyImageNet: ResNet32 (200 classes) -> VGG9-bn (10), 32 px, 15 all-to-all pairs.
    "stl10": Setting("resnet32", 200, "vgg9_bn", 10, 32, "all_to_all", 128),
    # CUB200 from ImageNet: ResNet34 (1000 classes) -> ResNet18 (200), 224 px, 16 pairs {1..4}x{1..4}.
    "cub200": Setting("resnet34", 1000, "resnet18", 200, 224, "all_to_all", 64),
    # A small member of the same families, for smoke tests only (not a paper setting).
    "tiny": Setting("resnet8", 10, "vgg_tiny", 10, 32, "all_to_all", 8),
}


def setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise SystemExit(f"unknown setting {name!r}; choose one of {', '.join(SETTINGS)}") from None


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only JSON / tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    """One JSON object on one stdout line."""
    print(json.dumps(record, sort_keys=False, default=_json_default), flush=True)


def _json_default(o: Any):
    try:
        return o.item()  # numpy / jax / torch scalars
    except Exception:  # pragma: no cover
        return str(o)


def write_rows(path: str, benchmark: str, rows: list, **meta: Any) -> None:
    """One JSON document at `path`: the benchmark's name, `meta`, its rows and the host's facts."""
    with open(path, "w") as f:
        json.dump({"benchmark": benchmark, **meta, "rows": rows, **host_info()}, f, indent=1, default=_json_default)


def parse_last_json(text: str) -> dict:
    """The last stdout line that is a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON object in output:\n{text[-2000:]}")


def median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def rounded(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def time_calls(fn: Callable[[], Any], n: int, sync: Callable[[Any], Any] = lambda r: r) -> list[float]:
    """Wall time of `n` calls of `fn` (each synchronised by `sync`)."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
        log(f"  call {i + 1}/{n}: {times[-1]:.3f} s")
    return times


class CpuUsage:
    """This process's CPU time and page faults over a `with` block (getrusage deltas).

    `per_call(n)` divides by the n calls made inside: user_s / sys_s (seconds of CPU,
    all threads; on 2 cores up to twice the wall time) and minor_faults. System time
    with many minor faults is the kernel mapping and zeroing fresh pages: XLA's CPU
    runtime allocates each execution's buffers anew, and glibc serves blocks above its
    mmap threshold (or too large for a thread's arena) with a fresh mmap each time.
    """

    def __enter__(self):
        self._r0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc):
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.user_s = r1.ru_utime - self._r0.ru_utime
        self.sys_s = r1.ru_stime - self._r0.ru_stime
        self.minor_faults = r1.ru_minflt - self._r0.ru_minflt
        return False

    def per_call(self, n: int, prefix: str = "") -> dict:
        n = max(n, 1)
        return {f"{prefix}user_s_per_call": rounded(self.user_s / n), f"{prefix}sys_s_per_call": rounded(self.sys_s / n),
                f"{prefix}minor_faults_per_call": int(round(self.minor_faults / n))}


# --------------------------------------------------------------------------- memory

GB = 1024.0**3
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> Optional[int]:
    """Resident set size of this process now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def max_rss_bytes() -> int:
    """Peak resident set size of this process over its whole life (getrusage)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class RssSampler:
    """Samples this process's RSS in a background thread; `peak` is the highest seen.

    Usage: `with RssSampler() as s: ...; s.peak` (bytes). Falls back to the
    getrusage peak where /proc is unavailable.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self):
        while not self._stop.is_set():
            r = current_rss_bytes()
            if r is None:
                return
            self.peak = max(self.peak, r)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak = current_rss_bytes() or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        r = current_rss_bytes()
        if r is None:
            self.peak = max_rss_bytes()
        else:
            self.peak = max(self.peak, r)
        return False


def gb(nbytes: Optional[float]) -> Optional[float]:
    return None if nbytes is None else round(nbytes / GB, 4)


def host_info() -> dict:
    """Facts about the machine that explain timings (load average: is the CPU shared?)."""
    info = {"host_cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    # the allocator's settings and the kernel's huge-page mode move CPU timings by 10-40 % here
    info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        info["transparent_hugepage"] = mode[mode.index("[") + 1 : mode.index("]")]
    except (OSError, ValueError):  # pragma: no cover
        pass
    return info
