"""The same step under ``jax.pmap`` over the local devices.

State is replicated (every leaf gets a leading device axis of size n) and
the batch is split into n equal slices on a new leading axis. The step must
be built with ``axis_name=PMAP_AXIS`` so its reductions are global: masked
means use one (sum, count) pair psum'd over the axis (``rlhf_jax.masked``).

Gradients under pmap (jax 0.12; pinned by
tests/parallel/test_parallel_steps.py): the replicated params are
per-device values and pmap transposes ``psum`` into ``psum``, so
``jax.grad`` of a loss that psums its numerator (a masked mean with
``axis_name``) returns n times this device's share of the full-batch
gradient. ``jax.lax.pmean(grads, axis_name)`` therefore gives exactly the
full-batch gradient on every device (a psum would be n times too large).
Inside ``shard_map`` with replicated (unmapped) params the gradient is
instead already the full sum: neither pmean nor psum it there.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
PMAP_AXIS = "batch"


def _devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
  return list(jax.local_devices() if devices is None else devices)


def replicate(
  tree: PyTree, devices: Sequence[jax.Device] | None = None
) -> PyTree:
  """Copies every leaf to each device, stacked on a new leading axis.

  Args:
    tree: pytree of arrays (typed PRNG keys included).
    devices: target devices (default: local devices, pmap order).

  Returns:
    Pytree whose leaves have shape [n, *x.shape], shard i on device i.
  """
  devs = _devices(devices)
  sharding = NamedSharding(Mesh(np.asarray(devs), ("_r",)), PartitionSpec("_r"))

  def rep(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return jax.device_put(
      jnp.broadcast_to(x[None], (len(devs), *x.shape)), sharding
    )

  return jax.tree.map(rep, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """Inverse of ``replicate``: the copy on the first device, without axis 0.

  Reads shard 0 only (no gather of the n copies).
  """

  def unrep(x: jax.Array) -> jax.Array:
    return x.addressable_shards[0].data.reshape(x.shape[1:])

  return jax.tree.map(unrep, tree)


def split_batch(batch: PyTree, num_devices: int | None = None) -> PyTree:
  """Reshapes every [B, ...] leaf to [n, B // n, ...] (device i gets rows
  i*B/n .. (i+1)*B/n - 1, so the split keeps row order).

  Raises:
    ValueError: B is not divisible by n.
  """
  n = len(jax.local_devices()) if num_devices is None else num_devices

  def split(x: Any) -> Any:
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(
        f"batch leaf of shape {x.shape} cannot be split over {n} devices: "
        "the leading (batch) size must be a multiple of the device count"
      )
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])

  return jax.tree.map(split, batch)


def pmap_step(
  step_fn: Callable[..., tuple[PyTree, PyTree]],
  *,
  axis_name: str = PMAP_AXIS,
  donate: bool = True,
  devices: Sequence[jax.Device] | None = None,
) -> Callable[..., tuple[PyTree, PyTree]]:
  """``jax.pmap`` of ``step_fn(state, batch, *extra) -> (state, metrics)``.

  Args:
    step_fn: the step built with ``axis_name=axis_name``.
    axis_name: the pmap axis name its reductions use.
    donate: donate the replicated state's buffers.
    devices: devices to map over (default: local devices).

  Returns:
    The pmapped step: takes ``replicate(state)`` and ``split_batch(batch)``
    and returns a replicated state and per-device metrics (identical across
    devices when the step reduces them over ``axis_name``; take
    ``unreplicate``).
  """
  return jax.pmap(
    step_fn,
    axis_name=axis_name,
    donate_argnums=(0,) if donate else (),
    devices=None if devices is None else list(devices),
  )
