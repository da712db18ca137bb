"""Devices, meshes and batch placement: the same code on 1 CPU, 8 GPUs or many hosts.

Params are replicated and the batch is split along the ``data`` axis of a 1-D mesh; ``jax.jit`` with
these shardings lets XLA insert the cross-device reductions (batch-norm statistics, gradient means),
so results do not depend on the device count beyond float reduction order. Each host feeds only its
own rows of the global batch.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
T = TypeVar("T")

# Launchers whose environment says "one of several processes": jax.distributed.initialize() finds
# the coordinator, count and id itself there (Slurm, Open MPI, Cloud TPU pod slices).
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


class DistributedSetupError(ValueError):
  """An incomplete multi-process launch (a coordinator without a process count, ...)."""


def _launched_by_cluster() -> bool:
  for var in _CLUSTER_SIZE_VARS:
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           mode: str = "auto") -> bool:
  """Joins JAX's distributed runtime when this process is one of several; True if it did.

  The address, count and id come from the arguments, else from ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, and are passed to ``jax.distributed.initialize``
  explicitly (JAX reads only the address from the environment). Without any of them, ``mode``
  ``'auto'`` lets JAX detect a cluster launch (Slurm or Open MPI with more than one task, a TPU pod
  slice) and otherwise stays single-process; ``'on'`` always asks JAX to detect; ``'off'`` never
  initializes. Must run before anything touches a device.
  """
  if mode not in ("auto", "on", "off"):
    raise DistributedSetupError(f"distributed mode '{mode}' is not one of auto, on, off")
  if mode == "off":
    return False
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  count, pid = num_processes, process_id
  for name, value in (("JAX_NUM_PROCESSES", count), ("JAX_PROCESS_ID", pid)):
    if value is None and os.environ.get(name, "") != "":
      try:
        value = int(os.environ[name])
      except ValueError:
        raise DistributedSetupError(f"{name}={os.environ[name]!r} is not an integer") from None
      count, pid = (value, pid) if name == "JAX_NUM_PROCESSES" else (count, value)
  given = {"coordinator address (--coordinator_address or JAX_COORDINATOR_ADDRESS)": address,
           "process count (--num_processes or JAX_NUM_PROCESSES)": count,
           "process id (--process_id or JAX_PROCESS_ID)": pid}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise DistributedSetupError(f"a multi-process launch needs all three of coordinator address, "
                                  f"process count and process id; missing the {missing[0]}")
    if count < 1 or not 0 <= pid < count:
      raise DistributedSetupError(f"process id {pid} is not in 0..{count - 1} "
                                  f"(process count {count})")
    if count == 1:
      return False
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
    return True
  if mode == "on" or _launched_by_cluster():
    jax.distributed.initialize()
    return True
  return False


def sync(name: str) -> None:
  """A barrier of all processes (a no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def main_process_first(name: str, fn: Callable[[], T]) -> T:
  """``fn()`` on process 0, then on the others once it is done.

  For work on a shared filesystem that ``fn`` caches (building a dataset, converting a
  checkpoint): process 0 does it while the rest wait at a barrier, then they find it done. Without
  the barrier, every process would write the same files at once.
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    try:
      out = fn()
    finally:  # the others must not wait forever for a process 0 that failed
      sync(f"main_process_first:{name}")
    return out
  sync(f"main_process_first:{name}")
  return fn()


def create_mesh(devices: list | int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over all devices of all hosts, the given ones, or (an int ``n > 0``, a
  config's ``num_devices``) the first ``n``; ``-1`` or None means all."""
  if isinstance(devices, int):
    devices = jax.devices()[:devices] if devices > 0 else None
  devices = jax.devices() if devices is None else devices
  # Auto axes: XLA propagates shardings through the model (newer JAX defaults to Explicit axes,
  # which would demand an out_sharding on every gather such as an embedding lookup).
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  """A one-line error naming the config ``field`` when the batch does not split over the mesh."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"global batch size {global_batch} does not divide over {n} devices; "
                     f"choose a multiple of {n} (e.g. --config.{field}={n * max(1, global_batch // n)})")


def host_rows(global_batch: int) -> slice:
  """The rows of a global batch that this process loads."""
  per_host = global_batch // jax.process_count()
  start = jax.process_index() * per_host
  return slice(start, start + per_host)


def shard_batch(global_batch: Any, mesh: Mesh) -> Any:
  """Places a batch (numpy pytree, identical on all hosts) on the mesh, split along axis 0.

  Every host holds the same global batch description (same seed, same permutation) but copies only
  its own rows to its devices.
  """
  local = jax.tree_util.tree_map(lambda x: np.asarray(x)[host_rows(np.shape(x)[0])], global_batch)
  return from_host_rows(local, mesh)


def from_host_rows(local_batch: Any, mesh: Mesh) -> Any:
  """A global batch-sharded array from this host's rows (``host_rows`` of the global batch)."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding, x, (x.shape[0] * jax.process_count(),) + x.shape[1:])

  return jax.tree_util.tree_map(put, local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree on every device of the mesh (params, optimizer state)."""
  if jax.process_count() > 1:
    # Through the host: with several processes, device_put of an array committed to one local
    # device (a jnp result) builds a malformed global array whose shards fail later (in Orbax's
    # save), at least with one device per process in JAX 0.10.
    tree = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array)
                        and x.is_fully_addressable else x, tree)
  return jax.device_put(tree, replicated(mesh))
