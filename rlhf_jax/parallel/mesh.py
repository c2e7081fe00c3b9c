"""Device meshes with the axes ('data', 'fsdp', 'tensor').

``data`` replicates parameters and splits the batch, ``fsdp`` splits both the
batch and the parameters (ZeRO-3 style: parameters are all-gathered per use),
``tensor`` splits attention heads and MLP columns (Megatron style). Which
parameter axis goes where is decided by the rule tables in
``rlhf_jax.parallel.rules``.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(
  *,
  data: int = -1,
  fsdp: int = 1,
  tensor: int = 1,
  devices: Sequence[jax.Device] | None = None,
  axis_type: AxisType = AxisType.Auto,
) -> Mesh:
  """Builds a ``Mesh`` of shape (data, fsdp, tensor) over ``devices``.

  Args:
    data: size of the 'data' axis; -1 = all devices not used by the others.
    fsdp: size of the 'fsdp' axis; -1 allowed (at most one axis may be -1).
    tensor: size of the 'tensor' axis; -1 allowed.
    devices: devices to use (default: ``jax.devices()``, all processes).
    axis_type: the axis type given to every axis. ``AxisType.Auto`` (the
      default) lets XLA's partitioner propagate shardings inside a jitted
      step, which is what ``jax.jit(..., in_shardings, out_shardings)``
      expects; ``AxisType.Explicit`` enables sharding-in-types.

  Returns:
    ``Mesh`` with axis names ``('data', 'fsdp', 'tensor')``. Devices are laid
    out by ``jax.make_mesh`` (topology aware) when ``devices`` covers all
    devices, else in the given order; 'tensor' varies fastest, so it stays
    within a host.

  Raises:
    ValueError: a size is 0 or < -1, more than one size is -1, or the product
      of the sizes does not equal the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh axis {name!r} has size {size}; use >= 1 or -1")
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if n % fixed:
      raise ValueError(
        f"{n} devices are not divisible by the fixed mesh axes {sizes} "
        f"(product {fixed})"
      )
    sizes[free[0]] = n // fixed
  shape = tuple(sizes[a] for a in MESH_AXES)
  if int(np.prod(shape)) != n:
    raise ValueError(
      f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} has "
      f"{int(np.prod(shape))} slots but {n} devices were given"
    )
  types = (axis_type,) * len(MESH_AXES)
  if n == len(jax.devices()) and devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)
