"""Shardings of train states and batches, sharded init and the jitted step.

The step function itself holds no mesh code (docs/conventions.md,
Distribution): shardings are derived from logical axis names and attached
only at ``jax.jit``:

  shardings = state_shardings(init_fn, rng, mesh=mesh, rules=FSDP,
                              param_axes=[param_logical_axes(cfg)])
  state = shard_init(init_fn, rng, shardings=shardings)
  step = jit_step(step_fn, shardings, batch_sharding(mesh, FSDP))
  state, metrics = step(state, batch)

Divisibility: a parameter dimension whose size is not divisible by the total
size of the mesh axes its rule assigns is left replicated on that dimension
(with the other dimensions still sharded) instead of raising, so one rule
table serves models whose widths do not all divide the mesh (for example a
vocabulary of 50257 on 'tensor' = 2). ``fit_spec`` implements the rule.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.parallel.rules import BATCH_AXES, Rules, mesh_axes_for

PyTree = Any


class ShardingError(ValueError):
  """Arguments that cannot give a state's shardings (named in the message)."""


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def _axes_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(
  spec: PartitionSpec, shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide.

  Args:
    spec: a PartitionSpec of mesh axis names (one entry per leading dim).
    shape: the array's shape.
    mesh: the mesh whose axis sizes apply.

  Returns:
    PartitionSpec with entry i set to None wherever ``shape[i]`` is not a
    multiple of the product of the mesh axis sizes in ``spec[i]``.

  Raises:
    ValueError: ``spec`` has more entries than ``shape`` has dimensions.
  """
  if len(spec) > len(shape):
    raise ValueError(
      f"PartitionSpec {spec} has {len(spec)} entries for an array of shape "
      f"{tuple(shape)}"
    )
  out = [
    axes if dim % _axes_size(mesh, axes) == 0 else None
    for axes, dim in zip(spec, shape, strict=False)
  ]
  return PartitionSpec(*out)


def logical_to_shardings(
  logical_specs: PyTree,
  mesh: Mesh,
  rules: Rules,
  *,
  shapes: PyTree | None = None,
) -> PyTree:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on ``mesh``.

  Args:
    logical_specs: pytree whose leaves are ``PartitionSpec``s of logical axis
      names (e.g. ``P('embed', 'mlp')``); None leaves mean replicated.
    mesh: the target mesh.
    rules: a rule table from ``rlhf_jax.parallel.rules``.
    shapes: optional pytree of the same structure with ``.shape`` leaves
      (arrays or ``jax.ShapeDtypeStruct``); when given, dimensions that a
      mesh axis does not divide fall back to replicated (``fit_spec``).

  Returns:
    Pytree of ``NamedSharding`` with the structure of ``logical_specs``.
  """
  logical_specs = jax.tree.map(
    lambda s: PartitionSpec() if s is None else s,
    logical_specs,
    is_leaf=_is_spec,
  )
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  if shapes is not None:
    mesh_specs = jax.tree.map(
      lambda s, x: fit_spec(s, x.shape, mesh),
      mesh_specs,
      shapes,
      is_leaf=_is_spec,
    )
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), mesh_specs, is_leaf=_is_spec
  )


def state_logical_specs(
  abstract_state: PyTree, param_axes: Sequence[PyTree] = ()
) -> PyTree:
  """Logical PartitionSpecs for every leaf of a (possibly boxed) state.

  Sources of names, in order:
    1. flax ``nn.Partitioned`` / ``LogicallyPartitioned`` boxes (a state
       initialised from boxed params, where optax states inherit the boxes);
    2. ``param_axes``: each is a pytree of logical PartitionSpecs with the
       structure of one params tree (e.g. a model's
       ``param_logical_axes(config)``). Every subtree of the state with that
       tree structure and compatible ranks gets those specs: the params
       themselves and the optax states that mirror them (Adam's mu and nu,
       momentum traces).
  All other leaves (step counters, PRNG keys, optax counts, KL controller
  and reward statistics, factored second moments) are replicated: ``P()``.

  Args:
    abstract_state: output of ``jax.eval_shape`` of a state initialiser.
    param_axes: a sequence of logical-axes pytrees (one per params tree,
      e.g. ``[policy_axes, value_axes]``).

  Returns:
    Pytree of PartitionSpecs with the structure of the UNBOXED state.
  """
  specs = nn.get_partition_spec(abstract_state)
  state = nn.meta.unbox(abstract_state)
  targets = []
  for axes in param_axes:
    treedef = jax.tree.structure(axes, is_leaf=_is_spec)
    if treedef.num_leaves == 0 or treedef == jax.tree.structure(0):
      continue
    targets.append((treedef, jax.tree.leaves(axes, is_leaf=_is_spec)))

  def match(node: Any) -> list[Any] | None:
    if not targets or isinstance(node, jax.ShapeDtypeStruct):
      return None
    treedef = jax.tree.structure(node)
    for target_def, target_specs in targets:
      if treedef != target_def:
        continue
      leaves = jax.tree.leaves(node)
      if all(
        s is None or len(s) <= len(x.shape)
        for s, x in zip(target_specs, leaves, strict=True)
      ):
        return target_specs
    return None

  def assign(node: Any, spec_node: Any) -> Any:
    found = match(node)
    if found is None:
      return spec_node
    return jax.tree.unflatten(
      jax.tree.structure(node),
      [PartitionSpec() if s is None else s for s in found],
    )

  # Walk the state top-down; a node matching a params structure is treated
  # as one leaf and replaced by that params tree's specs.
  return jax.tree.map(
    assign, state, specs, is_leaf=lambda n: match(n) is not None
  )


def state_shardings(
  init_fn: Callable[..., PyTree],
  *args: Any,
  mesh: Mesh,
  rules: Rules,
  param_axes: Sequence[PyTree] = (),
  **kwargs: Any,
) -> PyTree:
  """NamedShardings for the whole state returned by ``init_fn(*args)``.

  Nothing is computed: shapes come from ``jax.eval_shape``. Params and the
  optax states mirroring them are sharded by their logical names (see
  ``state_logical_specs``), scalars and other leaves replicated, and
  non-dividing dimensions fall back to replicated (``fit_spec``).

  Args:
    init_fn: ``init_fn(*args, **kwargs) -> state`` (params may be boxed).
    *args: its positional arguments (arrays or ShapeDtypeStructs).
    mesh: target mesh.
    rules: logical-axis rule table.
    param_axes: sequence of logical-axes pytrees, one per params tree.
    **kwargs: keyword arguments of ``init_fn``.

  Returns:
    Pytree of NamedSharding with the structure of the unboxed state.

  Raises:
    ShardingError: an optax optimizer among ``args`` or ``param_axes``, or
      the rules shard parameters on ``mesh`` but no leaf of the state has a
      logical axis name (``param_axes`` left out).
  """
  _check_arrays_only(args, param_axes)
  abstract = jax.eval_shape(lambda *a: init_fn(*a, **kwargs), *args)
  logical = state_logical_specs(abstract, param_axes)
  shardings = logical_to_shardings(
    logical, mesh, rules, shapes=nn.meta.unbox(abstract)
  )
  _check_params_named(logical, rules, mesh)
  return shardings


def _is_optimizer(x: Any) -> bool:
  return isinstance(x, optax.GradientTransformation)


def _check_arrays_only(args: Sequence[Any], param_axes: Sequence[Any]) -> None:
  for i, a in enumerate(args):
    if any(map(_is_optimizer, jax.tree.leaves(a, is_leaf=_is_optimizer))):
      raise ShardingError(
        f"state_shardings argument {i} is an optax optimizer: pass arrays "
        "only and close over the optimizer, e.g. state_shardings(lambda p, "
        "r: TrainState.create(p, opt, r), params, rng, ...)"
      )
  for i, axes in enumerate(param_axes):
    if any(map(_is_optimizer, jax.tree.leaves(axes, is_leaf=_is_optimizer))):
      raise ShardingError(
        f"param_axes[{i}] is an optax optimizer; param_axes holds logical "
        "axis names, e.g. [models.param_logical_axes(config)]"
      )


def _check_params_named(logical, rules: Rules, mesh: Mesh) -> None:
  """Raises when the rules shard parameters on this mesh but no leaf of the
  state carries a logical axis name (param_axes left out by mistake)."""
  named = any(
    any(a is not None for a in spec)
    for spec in jax.tree.leaves(logical, is_leaf=_is_spec)
    if spec is not None
  )
  shards = any(
    axes is not None and _axes_size(mesh, axes) > 1
    for name, axes in rules
    if name != "batch" and not name.startswith(("act_", "length"))
  )
  if shards and not named:
    raise ShardingError(
      "no leaf of the state has logical axis names, so every parameter "
      "would be replicated although the rules shard parameters on this "
      "mesh: pass param_axes=[models.param_logical_axes(config), ...] (one "
      "logical-axes pytree per params tree) or boxed params"
    )


def abstract_with_shardings(
  init_fn: Callable[..., PyTree], *args: Any, shardings: PyTree, **kwargs
) -> PyTree:
  """``jax.eval_shape(init_fn)`` with each leaf carrying its target sharding.

  This is the restore target for ``rlhf_jax.checkpoint`` (orbax restores each
  array directly into its sharding on the current mesh).
  """
  abstract = nn.meta.unbox(
    jax.eval_shape(lambda *a: init_fn(*a, **kwargs), *args)
  )
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    abstract,
    shardings,
  )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [B, ...] batch arrays: B over the rules' "batch" axes.

  The returned sharding is a valid ``in_shardings`` prefix for a whole batch
  pytree whose leaves all have a leading batch axis. B must be divisible by
  the product of those mesh axes (jit raises otherwise).
  """
  axes = mesh_axes_for(rules, "batch")
  if axes is None:
    axes = BATCH_AXES
  if isinstance(axes, str):
    axes = (axes,)
  axes = tuple(a for a in axes if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def shard_init(
  init_fn: Callable[..., PyTree],
  *args: Any,
  shardings: PyTree,
  **kwargs: Any,
) -> PyTree:
  """Runs ``init_fn(*args)`` under jit, producing each leaf in its sharding.

  Every array is created directly as shards (XLA partitions the
  initialiser), so no device ever holds a full unsharded copy of a sharded
  parameter. Boxed (``nn.Partitioned``) params are unboxed.

  Args:
    init_fn: state initialiser.
    *args: its arguments (e.g. a PRNG key).
    shardings: output of ``state_shardings`` for the same ``init_fn``.
    **kwargs: keyword arguments of ``init_fn`` (static, closed over).

  Returns:
    The unboxed state, sharded.
  """
  fn = jax.jit(
    lambda *a: nn.meta.unbox(init_fn(*a, **kwargs)), out_shardings=shardings
  )
  return fn(*args)


def _first_mesh(tree: PyTree) -> Mesh:
  for s in jax.tree.leaves(tree):
    if isinstance(s, NamedSharding):
      return s.mesh
  raise ValueError("state_shardings holds no NamedSharding")


def jit_step(
  step_fn: Callable[..., tuple[PyTree, PyTree]],
  state_shardings: PyTree,
  batch_shardings: PyTree,
  *,
  extra_shardings: tuple[PyTree, ...] = (),
  donate: bool = True,
) -> Callable[..., tuple[PyTree, PyTree]]:
  """``jax.jit`` of ``step_fn(state, batch, *extra) -> (state, metrics)``.

  The state keeps its shardings (out = in), metrics come back replicated,
  and the input state's buffers are donated (reused for the output state),
  so after a call the old state's arrays are deleted. ``extra`` arguments
  (frozen reference/reward params, ...) are never donated.

  Args:
    step_fn: the pure step (no mesh code).
    state_shardings: from ``state_shardings``.
    batch_shardings: a sharding (prefix) for the batch pytree.
    extra_shardings: shardings of further positional arguments.
    donate: donate the state argument.

  Returns:
    The jitted step. One compile per input shape/dtype signature.
  """
  metrics_sharding = replicated(_first_mesh(state_shardings))
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings, *extra_shardings),
    out_shardings=(state_shardings, metrics_sharding),
    donate_argnums=(0,) if donate else (),
  )
