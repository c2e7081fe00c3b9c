"""The mesh a run uses: options, multi-host start, and where arrays go.

``MeshConfig`` is the ``--mesh.*`` option group of every stage and script;
``Placement`` is the mesh plus its rule table, and the one place that turns
host arrays, model params and train states into arrays laid out on it:

  placement = Placement.create(MeshConfig(data=2, fsdp=4))
  config, params = placement.load_model(model_dir)   # straight into shards
  state, shardings = placement.init_state(
      lambda p, r: TrainState.create(p, opt, r), params, rng,
      param_axes=[models.param_logical_axes(config)])
  step = placement.jit_step(step_fn, shardings, extra=(params,))
  state, metrics = step(state, placement.batch(host_batch), params)

Arrays are global: every process holds the same host data (the data
pipeline is deterministic) and contributes the shards its devices own, so
the same code runs on one CPU, one GPU host or several processes.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from rlhf_jax import models, parallel
from rlhf_jax.data.padding import check_padding
from rlhf_jax.parallel.rules import Rules
from rlhf_jax.runner.progress import ProgressBar
from rlhf_jax.runner.runtime import UserError, is_primary_process

PyTree = Any
RuleName = Literal["auto", "data", "fsdp", "fsdp_tp"]


class MeshError(UserError):
  """A mesh, rule table or batch that does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh ('data', 'fsdp', 'tensor') and its sharding rules."""

  data: int = -1
  """Devices on the 'data' axis (batch split, params replicated); -1 = all
  devices the other axes leave."""
  fsdp: int = 1
  """Devices on the 'fsdp' axis (batch and params split, ZeRO-3 style);
  -1 = the rest."""
  tensor: int = 1
  """Devices on the 'tensor' axis (heads and MLP columns split); -1 = the
  rest."""
  rules: RuleName = "auto"
  """Logical-axis rule table: data, fsdp, fsdp_tp, or auto (fsdp_tp when
  tensor > 1, fsdp when fsdp > 1, else data)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process start (jax.distributed); a single host needs nothing."""

  coordinator_address: str | None = None
  """host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, else one
  process)."""
  num_processes: int | None = None
  """Processes in the job (default: $JAX_NUM_PROCESSES)."""
  process_id: int | None = None
  """This process's index (default: $JAX_PROCESS_ID)."""


def start_distributed(config: DistributedConfig) -> None:
  """Joins a multi-process job when ``config`` names one (else no-op).

  Raises:
    MeshError: an incomplete or inconsistent setting.
  """
  values = (config.coordinator_address, config.num_processes)
  if all(v is None for v in values) and config.process_id is None:
    return
  if None in values or config.process_id is None:
    raise MeshError(
      "--distributed needs coordinator-address, num-processes and "
      f"process-id together (got {config})"
    )
  if config.num_processes == 1:
    return
  host, _, port = config.coordinator_address.rpartition(":")
  # Port 99999 passed a digits-only check, then every process hung.
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise MeshError(
      f"--distributed.coordinator-address {config.coordinator_address!r}: "
      "expected HOST:PORT with a port in 1..65535 (e.g. 127.0.0.1:12345)"
    )
  try:
    parallel.initialize_distributed(
      config.coordinator_address, config.num_processes, config.process_id
    )
  except ValueError as e:
    raise MeshError(f"--distributed: {e}") from None


def _rule_table(config: MeshConfig, mesh: Mesh) -> tuple[str, Rules]:
  name = config.rules
  if name == "auto":
    if mesh.shape["tensor"] > 1:
      name = "fsdp_tp"
    elif mesh.shape["fsdp"] > 1:
      name = "fsdp"
    else:
      name = "data"
  return name, parallel.rules_for(name)


def _check_optimizer_free(tree: PyTree, what: str) -> None:
  is_opt = lambda x: isinstance(x, optax.GradientTransformation)
  for leaf in jax.tree.leaves(tree, is_leaf=is_opt):
    if is_opt(leaf) or callable(leaf):
      raise MeshError(
        f"{what} holds {type(leaf).__name__}, not arrays: pass the "
        "optimizer to the state initialiser, and params (pytrees of "
        "arrays) or their logical axes here"
      )


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and its rule table; lays host data and states out on it."""

  mesh: Mesh
  rules: Rules
  rules_name: str

  @classmethod
  def create(
    cls, config: MeshConfig, devices: Sequence[jax.Device] | None = None
  ) -> "Placement":
    """The mesh of ``config`` over ``devices`` (default: every device).

    Raises:
      MeshError: the sizes do not multiply to the device count, or a size
        is 0 or below -1.
    """
    # data defaults to -1 (the rest): another axis asked for the rest.
    data = (
      1
      if config.data == -1 and -1 in (config.fsdp, config.tensor)
      else (config.data)
    )
    try:
      mesh = parallel.make_mesh(
        data=data, fsdp=config.fsdp, tensor=config.tensor, devices=devices
      )
    except ValueError as e:
      n = len(devices) if devices is not None else jax.device_count()
      raise MeshError(
        f"--mesh.data {config.data} --mesh.fsdp {config.fsdp} "
        f"--mesh.tensor {config.tensor} does not fit the {n} devices "
        f"({e})"
      ) from None
    name, rules = _rule_table(config, mesh)
    used = {
      a
      for _, axes in rules
      for a in ((axes,) if isinstance(axes, str) else axes or ())
    }
    idle = [a for a, n in mesh.shape.items() if n > 1 and a not in used]
    if idle:
      raise MeshError(
        f"--mesh.rules {name} uses no mesh axis {idle}: those devices would "
        f"repeat the same work; use --mesh.rules auto or fsdp_tp"
      )
    return cls(mesh=mesh, rules=rules, rules_name=name)

  # --------------------------------------------------------------- facts

  @property
  def is_primary(self) -> bool:
    """This process writes the run's files (process 0)."""
    return is_primary_process()

  @property
  def batch_divisor(self) -> int:
    """Batch sizes must be multiples of this (the batch axes' size)."""
    axes = self.batch_sharding().spec[0] or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def describe(self) -> str:
    """One line: mesh shape, devices, processes and the rule table."""
    shape = " ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
    return (
      f"mesh {shape} ({self.mesh.devices.size} devices, "
      f"{jax.process_count()} process(es)), rules {self.rules_name}"
    )

  def check_batch(self, size: int, what: str) -> None:
    """Raises MeshError when ``size`` rows do not split over the batch
    axes (``what`` names the option, e.g. '--ppo.batch-size')."""
    if size % self.batch_divisor:
      raise MeshError(
        f"{what} = {size} is not divisible by the {self.batch_divisor} "
        f"devices of the batch axes ({self.describe()})"
      )

  # ------------------------------------------------------------ shardings

  def batch_sharding(self) -> NamedSharding:
    return parallel.batch_sharding(self.mesh, self.rules)

  def replicated(self) -> NamedSharding:
    return parallel.replicated(self.mesh)

  def shardings_for(self, logical_axes: PyTree, tree: PyTree) -> PyTree:
    """NamedShardings of ``tree`` (arrays or ShapeDtypeStructs) from its
    logical axes (e.g. ``models.param_logical_axes(config)``).

    Raises:
      MeshError: ``logical_axes`` is not a pytree of axis names (an
        optimizer passed by mistake), or its structure differs from
        ``tree``'s.
    """
    _check_optimizer_free(logical_axes, "logical_axes")
    try:
      return parallel.logical_to_shardings(
        logical_axes, self.mesh, self.rules, shapes=tree
      )
    except ValueError as e:
      raise MeshError(f"logical axes do not match the params: {e}") from None

  def param_shardings(self, model_config: models.ModelConfig) -> PyTree:
    """Shardings of an LM's params (``models.init_params`` layout)."""
    shapes = _abstract(models.init_params, model_config)
    return self.shardings_for(models.param_logical_axes(model_config), shapes)

  def scalar_model_shardings(self, model_config: models.ModelConfig) -> PyTree:
    """Shardings of a {"backbone", "head"} value/reward model."""
    shapes = {
      "backbone": _abstract(models.init_params, model_config),
      "head": _abstract(models.init_head_params, model_config),
    }
    axes = models.scalar_model_logical_axes(model_config)
    return self.shardings_for(axes, shapes)

  def sharded_leaf(self, tree: PyTree) -> tuple[str, Any]:
    """(path, spec) of the largest leaf of ``tree`` (for run logs)."""
    best = max(
      jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: kv[1].size
    )
    return jax.tree_util.keystr(best[0]), best[1].sharding.spec

  # ------------------------------------------------------------ placement

  def put(self, tree: PyTree, shardings: PyTree) -> PyTree:
    """Host (or single-device) arrays -> global arrays in ``shardings``;
    each device receives only its own shard."""

    def place(x: Any, s: NamedSharding) -> jax.Array:
      if isinstance(x, jax.Array) and x.sharding == s:
        return x
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, s, lambda i: host[i])

    return jax.tree.map(place, tree, shardings)

  def replicate(self, tree: PyTree) -> PyTree:
    """Arrays not yet on this mesh -> fully replicated global arrays
    (typed PRNG keys included); arrays already on it are kept."""
    sharding = self.replicated()

    def place(x: Any) -> Any:
      on_mesh = isinstance(x, jax.Array) and (
        isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh
      )
      if on_mesh or not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = self.put(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
      return self.put(x, sharding)

    return jax.tree.map(place, tree)

  def put_params(self, params: PyTree, model_config) -> PyTree:
    """An LM's params laid out by its logical axes."""
    return self.put(params, self.param_shardings(model_config))

  def put_scalar_model(self, params: PyTree, model_config) -> PyTree:
    """A {"backbone", "head"} model laid out by its logical axes."""
    return self.put(params, self.scalar_model_shardings(model_config))

  def batch(self, tree: PyTree) -> PyTree:
    """Host batch arrays [B, ...] (the same on every process) -> global
    arrays with B split over the batch axes.

    Raises:
      MeshError: B is not divisible by the batch axes.
      ValueError: a prompt mask that is not left-padded or another mask
        not right-padded (``data.check_padding``).
    """
    check_padding(tree)
    sharding = self.batch_sharding()
    leaves = jax.tree.leaves(tree)
    if leaves:
      self.check_batch(int(np.shape(leaves[0])[0]), "the batch size")
    return jax.tree.map(lambda x: self.put(x, sharding), tree)

  def map_rows(
    self,
    fn: Callable[[PyTree], tuple],
    dataset: Any,
    max_rows: int,
    *,
    progress: str | None = None,
  ) -> tuple[np.ndarray, ...]:
    """``fn(batch) -> (f32[B, ...], ...)`` over every row of ``dataset`` (a
    ``data.TokenizedDataset``) in batches of one static shape: B is
    ``max_rows`` (at most the dataset's size) rounded up to the batch axes,
    the last batch padded with padding rows, whose outputs are dropped.
    With ``progress`` (a description), a progress bar over the batches is
    shown by the primary process.

    Returns:
      One numpy array [len(dataset), ...] per output of ``fn``, in row
      order.
    """
    n = len(dataset)
    size = self.rows_per_call(max_rows, n)
    parts = []
    starts = range(0, n, size)
    show = progress is not None and self.is_primary
    with ProgressBar(len(starts), progress or "", show=show) as bar:
      for start in starts:
        idx = np.arange(start, start + size)
        out = fn(self.batch(dataset.take(np.where(idx < n, idx, -1))))
        parts.append([np.asarray(x)[: min(size, n - start)] for x in out])
        bar.update(1)
    return tuple(np.concatenate(col) for col in zip(*parts, strict=True))

  def rows_per_call(self, max_rows: int, n: int) -> int:
    """``map_rows``' static batch size for ``n`` rows."""
    k = self.batch_divisor
    return -(-min(max_rows, n) // k) * k

  def load_model(
    self, model_dir: Any, **kwargs: Any
  ) -> tuple[models.ModelConfig, PyTree]:
    """``models.load_hf_checkpoint`` straight into the params' shards."""
    config = models.load_hf_config(model_dir, **kwargs)
    shardings = self.param_shardings(config)
    return models.load_hf_checkpoint(model_dir, shardings=shardings, **kwargs)

  # ----------------------------------------------------------------- jit

  def init_state(
    self,
    init_fn: Callable[..., PyTree],
    *args: Any,
    param_axes: Sequence[PyTree] | None = None,
    shardings: PyTree | None = None,
  ) -> tuple[PyTree, PyTree]:
    """``init_fn(*args)`` computed straight into its shardings.

    ``args`` are arrays only; close over the rest, e.g.
    ``init_state(lambda p, r: TrainState.create(p, opt, r), params, rng,
    param_axes=[axes])``.

    Params and the optax states mirroring them are laid out by
    ``param_axes`` (one logical-axes pytree per params tree), everything
    else replicated; or by ``shardings`` when they are known already (a
    precompiled step's, ``StepProgram.state_shardings``). Returns (state,
    state_shardings).

    Raises:
      MeshError: an optimizer among ``args`` or ``param_axes``, or no leaf
        of the state matched ``param_axes`` while the rules shard
        parameters on this mesh.
      TypeError: neither ``param_axes`` nor ``shardings`` given.
    """
    args = self.replicate(args)
    if shardings is None:
      if param_axes is None:
        raise TypeError("init_state needs param_axes or shardings")
      shardings = self._state_shardings(init_fn, args, param_axes)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings

  def abstract_state(
    self,
    init_fn: Callable[..., PyTree],
    *args: Any,
    param_axes: Sequence[PyTree],
  ) -> tuple[PyTree, PyTree]:
    """What ``init_state`` returns, computing nothing: (the state as
    ``jax.ShapeDtypeStruct``s carrying their shardings, the shardings).
    ``args`` may be abstract.

    Raises:
      MeshError: as ``init_state``.
    """
    shardings = self._state_shardings(init_fn, args, param_axes)
    shapes = jax.eval_shape(init_fn, *args)
    state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      shapes,
      shardings,
    )
    return state, shardings

  def abstract_batch(
    self, row: dict[str, np.ndarray], batch_type: type, size: int
  ) -> PyTree:
    """``batch(...)`` of ``size`` rows like ``row`` (field -> one row,
    e.g. a dataset's ``pad_row``), as ``jax.ShapeDtypeStruct``s."""
    sharding = self.batch_sharding()
    return batch_type(
      **{
        k: jax.ShapeDtypeStruct((size, *r.shape), r.dtype, sharding=sharding)
        for k, r in row.items()
      }
    )

  def _state_shardings(
    self, init_fn: Callable, args: Sequence[Any], param_axes: Sequence[PyTree]
  ) -> PyTree:
    try:
      return parallel.state_shardings(
        init_fn,
        *args,
        mesh=self.mesh,
        rules=self.rules,
        param_axes=param_axes,
      )
    except parallel.ShardingError as e:
      raise MeshError(f"{e} ({self.describe()})") from None

  def jit_step(
    self,
    step_fn: Callable[..., tuple[PyTree, PyTree]],
    state_shardings: PyTree,
    *,
    extra: Sequence[PyTree] = (),
  ) -> Callable[..., tuple[PyTree, PyTree]]:
    """``step_fn(state, batch, *extra)`` jitted with the state's shardings
    (in = out), the batch split over the batch axes, ``extra`` (frozen
    reference / reward params, already placed) in their own shardings, the
    state donated and metrics replicated.

    Raises:
      MeshError: state_shardings that hold an optimizer.
      TypeError: an ``extra`` leaf without a sharding (a host array; a
        placed jax.Array or a ShapeDtypeStruct with one is kept), naming
        it.
    """
    _check_optimizer_free(state_shardings, "state_shardings")
    for i, e in enumerate(extra):
      for path, leaf in jax.tree_util.tree_leaves_with_path(e):
        # Placed arrays, or abstract ones (ShapeDtypeStruct) with theirs.
        if not isinstance(getattr(leaf, "sharding", None), Sharding):
          where = jax.tree_util.keystr(path)
          raise TypeError(
            f"extra[{i}]{where} is a {type(leaf).__name__} without a "
            "sharding: expected arrays already placed on the mesh "
            "(placement.load_model, or jax.device_put with a sharding)"
          )
    extra_sh = tuple(jax.tree.map(lambda x: x.sharding, e) for e in extra)
    return parallel.jit_step(
      step_fn,
      state_shardings,
      self.batch_sharding(),
      extra_shardings=extra_sh,
    )

  def jit_gather(
    self, fn: Callable[..., Any], **jit_kwargs: Any
  ) -> Callable[..., Any]:
    """``jax.jit(fn)`` whose outputs come back replicated, so every process
    can read them on the host (samples, scores)."""
    return jax.jit(fn, out_shardings=self.replicated(), **jit_kwargs)


def _abstract(init: Callable, model_config: models.ModelConfig) -> PyTree:
  return jax.eval_shape(lambda k: init(model_config, k), jax.random.key(0))


def spec_str(spec: PartitionSpec) -> str:
  """'P(fsdp, None)' for run logs."""
  return "P(" + ", ".join(str(p) for p in spec) + ")"
