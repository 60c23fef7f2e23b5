"""Data parallelism: `bilevel.train_step` over every device, on one host or many.

The batch is split along its first axis over a one-dimensional device mesh (axis
"data"); the train state and the source's variables are replicated. The whole
iteration (real step, unrolled meta step, Adam on φ) runs on every device, and
the gradients of every SGD step and the meta-gradient are averaged over devices,
so every device keeps the same θ and φ. Two BatchNorm modes:

* ``bn="sync"`` (default): batch statistics over the *global* batch. The step is
  the single-device program (`jax.jit` of `bilevel.train_step`) with the batch
  laid out as a `NamedSharding` over the mesh; XLA's SPMD partitioner inserts the
  all-reduces (BN moments, gradients, losses). N devices compute what one device
  computes on the same global batch, up to floating-point summation order.
* ``bn="local"``: per-device batch statistics, i.e. the reference's single-GPU
  behaviour at the per-device batch size (B/N). The step runs under
  `jax.shard_map`; `bilevel.train_step(axis_name="data")` averages over devices
  every loss that is differentiated (the real step's L_total, each look-ahead
  step's loss, the look-ahead's CE step, the outer loss), so each SGD step uses the
  mean of the per-device gradients, θ stays replicated (device-invariant, checked
  by shard_map's type system), and the meta-gradient is the exact gradient of the
  device-averaged outer loss through all of it. The BN running statistics, updated
  per device, are averaged over devices at the end of the step (PyTorch's DDP would
  keep rank 0's instead). One device with ``bn="local"`` is `bilevel.train_step`;
  N devices equal one device with "ghost" batch norm over N groups of B/N.

Multi-host: call `initialize_distributed()` first thing (before any other JAX
call), build the mesh with `make_mesh()` (every device of every process), and feed
batches through `shard_batch` (every process passes the same global batch, or its
own rows with ``process_local=True``). The same script and configuration then run
on one host or many.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from l2t_jax import bilevel

PyTree = Any

DATA_AXIS = "data"
BN_MODES = ("sync", "local")


# --------------------------------------------------------------------------- processes


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    local_device_ids: Optional[Sequence[int]] = None,
    coordinator_bind_address: Optional[str] = None,
    cpu_collectives: Optional[str] = None,
    cpu_collectives_host: Optional[str] = None,
    initialization_timeout: int = 300,
    auto_detect: bool = True,
) -> bool:
    """`jax.distributed.initialize` when this is a multi-process run; a no-op otherwise.

    Must be called before any other JAX call (device queries included). Each argument
    left None is read from the environment: JAX_COORDINATOR_ADDRESS ("host:port" of
    process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID (and JAX_LOCAL_DEVICE_IDS,
    JAX_COORDINATOR_BIND_ADDRESS, read by JAX itself). With none of them set, a
    Slurm or Open MPI job of more than one task is detected by JAX (`auto_detect`);
    otherwise (or with one process) nothing is initialised and the run is
    single-process.

    Args:
      cpu_collectives: cross-process collectives of the CPU backend ("gloo" or
        "mpi"); None keeps JAX's default (gloo in jax 0.10). Irrelevant on GPU/TPU.
      cpu_collectives_host: the address gloo's TCP transport binds to (e.g. "127.0.0.1"
        for processes on one machine); None lets gloo resolve this host's name. Uses a
        private JAX hook (re-registering the CPU backend factory).
      initialization_timeout: seconds to wait for every process to connect.

    Returns:
      True if JAX is (now) running distributed, False for a single process.
    """
    if _distributed_is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes == 1:
        return False
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and not (auto_detect and _in_multi_task_job()):
        return False
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if coordinator_bind_address is not None:
        kwargs["coordinator_bind_address"] = coordinator_bind_address
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        **kwargs,
    )
    if cpu_collectives_host is not None:
        _bind_gloo_to(cpu_collectives_host)
    return True


def _bind_gloo_to(host: str) -> None:
    """Makes the CPU backend's gloo collectives listen on `host` (before the backend starts)."""
    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax
    except ImportError as e:  # pragma: no cover - JAX internals moved
        raise RuntimeError(f"cpu_collectives_host is not supported by this JAX version ({e})") from e
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("cpu_collectives_host must be set before any JAX computation")

    def cpu_client():
        collectives = _jax.make_gloo_tcp_collectives(distributed_client=distributed.global_state.client, hostname=host)
        return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory("cpu", cpu_client, priority=0, fail_quietly=False)


def _distributed_is_initialized() -> bool:
    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())
    from jax._src import distributed  # pragma: no cover - older JAX

    return distributed.global_state.client is not None


def _in_multi_task_job() -> bool:
    env = os.environ
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


# --------------------------------------------------------------------------- mesh and arrays


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-dimensional mesh over `devices` (default: every device of every process).

    Devices are ordered by (process, id), so each process holds a contiguous block of
    the global batch (process p: rows [p·B/P, (p+1)·B/P) with P equal processes).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices, dtype=object), (axis_name,))


def _axis(mesh: Mesh, axis_name: str) -> int:
    if axis_name not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis_name!r} (axes: {tuple(mesh.shape)})")
    return mesh.shape[axis_name]


def check_batch_size(mesh: Mesh, batch_size: int, axis_name: str = DATA_AXIS) -> int:
    """The per-device batch size; a ValueError unless `batch_size` splits evenly over the mesh."""
    n = _axis(mesh, axis_name)
    if batch_size % n:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the number of devices {n} "
            f"(mesh axis {axis_name!r}); use a multiple of {n}, e.g. {(batch_size // n + 1) * n}"
        )
    return batch_size // n


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """First axis split over the mesh, the others whole."""
    return NamedSharding(mesh, P(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, global_batch_size: int, axis_name: str = DATA_AXIS) -> slice:
    """The rows of a global batch that this process's devices hold (for loaders that read only those)."""
    per_device = check_batch_size(mesh, global_batch_size, axis_name)
    devices = list(mesh.devices.flat)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError("this process's devices are not a contiguous block of the mesh (use make_mesh)")
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def shard_batch(mesh: Mesh, *arrays: Any, process_local: bool = False, axis_name: str = DATA_AXIS) -> tuple:
    """Host arrays -> global arrays split along their first axis over the mesh.

    Args:
      arrays: e.g. (x, y). By default each is the whole global batch, the same on
        every process (each process copies only the rows its devices hold).
      process_local: each array holds only this process's rows (`process_rows`), in
        order; the global batch is their concatenation over processes
        (`jax.make_array_from_process_local_data`).

    Returns:
      A tuple of `jax.Array`s, one per input, sharded `P(axis_name)`.
    """
    sharding = batch_sharding(mesh, axis_name)
    out = []
    for a in arrays:
        if isinstance(a, jax.Array) and not process_local and _has_sharding(a, sharding):
            check_batch_size(mesh, a.shape[0], axis_name)
            out.append(a)
            continue
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            check_batch_size(mesh, a.shape[0], axis_name)
            out.append(jax.device_put(a, sharding))
            continue
        host = np.asarray(a)
        if host.ndim == 0:
            raise ValueError("shard_batch: arrays need a leading batch axis")
        if process_local:
            global_rows = host.shape[0] * jax.process_count()
            check_batch_size(mesh, global_rows, axis_name)
            out.append(jax.make_array_from_process_local_data(sharding, host, (global_rows,) + host.shape[1:]))
        else:
            check_batch_size(mesh, host.shape[0], axis_name)
            out.append(jax.make_array_from_callback(host.shape, sharding, functools.partial(_index, host)))
    return tuple(out)


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Every leaf as a global array with a full copy on each device of the mesh.

    Leaves must hold the same values on every process (e.g. built from the same seed
    or checkpoint); leaves already replicated over `mesh` are returned as they are.
    """
    sharding = replicated(mesh)

    def put(a):
        if isinstance(a, jax.Array):
            if _has_sharding(a, sharding):
                return a
            if not a.is_fully_addressable:
                return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, functools.partial(_index, host))

    return jax.tree.map(put, tree)


def fetch_replicated(tree: PyTree) -> PyTree:
    """Host (numpy) copies of replicated arrays, read from this process's first copy.

    Works on every process of a multi-host run (where `jax.device_get` of a global
    array fails): use it for checkpoints, logging and evaluation on the host.
    """

    def get(a):
        if isinstance(a, jax.Array):
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(get, tree)


def _index(host: np.ndarray, index) -> np.ndarray:
    return host[index]


def _has_sharding(a: jax.Array, sharding: NamedSharding) -> bool:
    try:
        return a.sharding.is_equivalent_to(sharding, a.ndim)
    except Exception:  # noqa: BLE001 - different kinds of sharding
        return False


# --------------------------------------------------------------------------- the step


def make_parallel_train_step(
    models: bilevel.Models,
    cfg: bilevel.BilevelConfig,
    mesh: Mesh,
    *,
    bn: str = "sync",
    donate: bool = True,
    axis_name: str = DATA_AXIS,
) -> Callable:
    """`bilevel.train_step`, data-parallel over `mesh`, jit-compiled.

    Args:
      models, cfg: as `bilevel.make_train_step`.
      mesh: a mesh with axis `axis_name` (`make_mesh()`).
      bn: "sync" (BN statistics over the global batch; N devices == one device on the
        same batch) or "local" (per-device statistics; gradients, losses and the
        meta-gradient averaged over devices, BN running statistics averaged at the end).
      donate: donate the state's buffers.

    Returns:
      f(state, source_variables, x, y, lr) -> (state, metrics), the contract of
      `bilevel.make_train_step`; x, y hold the *global* batch (its size a multiple of
      the number of devices), as host arrays or as `shard_batch` output (required on
      several processes unless every process passes the same global batch). The state
      and metrics come back replicated over the mesh (`fetch_replicated` reads them
      on the host). Host inputs and non-replicated state are laid out on the mesh
      first (`shard_batch`, `replicate`); `f.jitted` is the compiled function itself
      (inputs already laid out), and `f.lower(...)` lowers it for f's arguments, as a
      jitted function's `lower` does (`heap.compile_then_release` compiles through it).
    """
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn mode {bn!r}; expected one of {BN_MODES}")
    n = _axis(mesh, axis_name)
    repl, data = replicated(mesh), batch_sharding(mesh, axis_name)
    if bn == "sync":
        fn = functools.partial(bilevel.train_step, models=models, cfg=cfg)
    else:
        inner = functools.partial(bilevel.train_step, models=models, cfg=cfg, axis_name=axis_name)

        def local_step(state, source_variables, x, y, lr):
            new_state, metrics = inner(state, source_variables, x, y, lr)
            stats = jax.tree.map(functools.partial(_device_mean_stat, axis_name=axis_name), new_state.batch_stats)
            return new_state.replace(batch_stats=stats), metrics

        fn = jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(), P(), P(axis_name), P(axis_name), P()),
            out_specs=(P(), P()),
        )
    jitted = jax.jit(
        fn,
        in_shardings=(repl, repl, data, data, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,) if donate else (),
    )

    def laid_out(state, source_variables, x, y, lr):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        check_batch_size(mesh, x.shape[0], axis_name)
        state, source_variables, lr = replicate(mesh, (state, source_variables, lr))
        x, y = shard_batch(mesh, x, y, axis_name=axis_name)
        return state, source_variables, x, y, lr

    def step(state, source_variables, x, y, lr):
        return jitted(*laid_out(state, source_variables, x, y, lr))

    step.lower = lambda *args: jitted.lower(*laid_out(*args))
    step.jitted = jitted
    step.mesh = mesh
    step.bn = bn
    step.num_devices = n
    return step


def _device_mean_stat(a: jax.Array, *, axis_name: str) -> jax.Array:
    """A BN running statistic averaged over devices (counters, equal everywhere, kept)."""
    vma = getattr(jax.typeof(a), "vma", None)
    if vma is not None and axis_name not in vma:
        return a  # already the same on every device
    if jnp.issubdtype(a.dtype, jnp.floating):
        return lax.pmean(a, axis_name)
    return lax.pmax(a, axis_name)
