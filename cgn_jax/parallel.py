"""Devices, meshes and batch placement: the same code on 1 CPU, 8 GPUs or many hosts.

Params are replicated and the batch is split along the ``data`` axis of a 1-D mesh; ``jax.jit`` with
these shardings lets XLA insert the cross-device reductions (batch-norm statistics, gradient means),
so results do not depend on the device count beyond float reduction order. Each host feeds only its
own rows of the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


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
  return jax.device_put(tree, replicated(mesh))
