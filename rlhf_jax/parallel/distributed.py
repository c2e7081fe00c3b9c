"""Multi-host setup: jax.distributed initialisation and per-host batches.

Each process (host) loads only its slice of the global batch
(``process_batch_slice``) and ``host_local_batch_to_global`` joins the
slices into global ``jax.Array``s laid out on the mesh, without any host
ever holding the full batch. The jitted step then runs as one SPMD program
over every device of every process.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.parallel.rules import BATCH_AXES

PyTree = Any


def initialize_distributed(
  coordinator_address: str,
  num_processes: int,
  process_id: int,
  *,
  local_device_count: int | None = None,
  cpu_collectives: str = "gloo",
  initialization_timeout: int = 300,
) -> None:
  """Joins this process to a multi-process JAX job.

  Must run before any JAX computation (before the backends start).

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: number of processes in the job.
    process_id: this process's index in [0, num_processes).
    local_device_count: number of CPU devices this process exposes (CPU
      simulation of several hosts); None keeps the platform default.
    cpu_collectives: cross-process collectives on CPU ('gloo' or 'mpi').
    initialization_timeout: seconds to wait for all processes to join.

  Raises:
    ValueError: process_id outside [0, num_processes).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} must be in [0, {num_processes})")
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=initialization_timeout,
  )


def _default_batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes))


def process_batch_slice(
  global_batch_size: int, *, sharding: NamedSharding | None = None
) -> slice:
  """Rows of the global batch that this process must load.

  Args:
    global_batch_size: B, the global batch size.
    sharding: the batch sharding (``batch_sharding(mesh, rules)``); when
      given, the rows are those held by this process's devices under it
      (exact for any device order); else the even split by process index.

  Returns:
    ``slice(start, stop)`` into [0, B).

  Raises:
    ValueError: B not divisible by the process count, or this process's
      rows are not one contiguous range under ``sharding``.
  """
  nproc = jax.process_count()
  if global_batch_size % nproc:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the "
      f"{nproc} processes"
    )
  if sharding is None:
    per = global_batch_size // nproc
    start = jax.process_index() * per
    return slice(start, start + per)
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = set()
  for idx in index_map.values():
    rows.update(range(*idx[0].indices(global_batch_size)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(
      "this process's batch rows are not contiguous under the sharding; "
      "build the mesh with process-contiguous devices (jax.make_mesh)"
    )
  return slice(start, stop)


def host_local_batch_to_global(
  local_batch: PyTree,
  mesh: Mesh,
  sharding: NamedSharding | None = None,
) -> PyTree:
  """Assembles per-process batch slices into global arrays.

  Args:
    local_batch: pytree of host arrays [B / num_processes, ...], the rows
      ``process_batch_slice(B, sharding=sharding)`` of the global batch.
    mesh: the global mesh.
    sharding: the batch sharding (default: batch axis over the mesh's
      'data' and 'fsdp' axes).

  Returns:
    Pytree of global ``jax.Array``s [B, ...] with ``sharding``.
  """
  if sharding is None:
    sharding = _default_batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    local_batch,
  )
