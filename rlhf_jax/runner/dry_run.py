"""Dry run: AOT-compile one train step on a mesh without allocating weights.

``dry_run(stage, model_config, mesh=..., rules=...)`` builds everything a
step takes as abstract values (``jax.ShapeDtypeStruct`` carrying the target
``NamedSharding``): the train state through ``jax.eval_shape`` of its
initialiser, the frozen reference / reward params likewise, and a batch of
the requested static shapes. It then lowers and compiles the step exactly as
a run would (``parallel.jit_step``: state shardings in = out, donated
state, replicated metrics) and reads XLA's memory and cost analyses:

  report = dry_run("ppo", cfg, mesh=make_mesh(fsdp=8), rules=FSDP)
  print(report.format())

Nothing of weight size is allocated, so a model far larger than host memory
can be checked on a laptop with fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).

What the figures mean:
  * ``param_*`` / ``opt_state_*`` / ``state_*``: computed from the abstract
    state and its shardings (``Sharding.shard_shape``), the bytes one device
    holds; the max over devices. "params" are the trainable params of the
    state: the policy (SFT, DPO), the scalar model (RM), policy AND critic
    (PPO). ``frozen_bytes_per_device``: the non-donated extra arguments
    (DPO reference; PPO reference and reward model).
  * ``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``temp_bytes``:
    ``compiled.memory_analysis()`` of the SPMD-partitioned program, hence per
    device. Donated state buffers are aliased to outputs, so a device's peak
    is about argument + output - alias + temp (``peak_bytes_estimate``).
  * ``flops_per_step``: ``compiled.cost_analysis()["flops"]`` of the
    partitioned (per-device) program. XLA's cost analysis counts a loop body
    once, not once per iteration, so the layer scan of every forward and
    backward pass, the PPO sampler's decode loop, the PPO epoch / minibatch
    scans and micro-batch scans each count as one iteration: for a model
    with scanned layers the figure is far below the real work.
  * ``matmul_flops_per_step``: the matmul FLOPs of the step's jaxpr with
    every loop multiplied by its trip count (``jaxpr_matmul_flops``), over
    all devices; ``format`` divides it by the device count. The PPO
    sampler's while loop is counted at its maximum, ``max_new_tokens``
    iterations (no early stop on EOS), so for PPO it is an upper bound.
  * ``lower_seconds``: tracing and lowering; ``compile_seconds``: the XLA
    compile (a hit in jax's persistent compilation cache, when enabled,
    makes it the load time instead).
"""

import collections
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jax_core
from jax.sharding import Mesh, NamedSharding

from rlhf_jax import models, parallel
from rlhf_jax.parallel import Rules
from rlhf_jax.train import (
  DPOConfig,
  GRPOConfig,
  PPOConfig,
  RewardModelConfig,
  SFTConfig,
  TrainState,
  init_ppo_state,
  make_dpo_step,
  make_grpo_step,
  make_ppo_step,
  make_reward_model_step,
  make_sft_step,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch, SFTBatch

PyTree = Any
StageConfig = SFTConfig | RewardModelConfig | DPOConfig | PPOConfig | GRPOConfig

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
_CONFIG_TYPES = {
  "sft": SFTConfig,
  "rm": RewardModelConfig,
  "dpo": DPOConfig,
  "ppo": PPOConfig,
  "grpo": GRPOConfig,
}
# Stages that sample (their decode loop runs max_new_tokens times).
_SAMPLING = ("ppo", "grpo")
_MIB = 1 << 20
_GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class DryRunReport:
  """Per-device memory and FLOPs of one compiled train step.

  Byte figures are per device unless named ``_total``; -1 means the backend
  gave no memory analysis. See the module docstring for their sources.

  Attributes:
    stage: "sft", "rm", "dpo", "ppo" or "grpo".
    mesh_shape: mesh axis sizes, e.g. {"data": 1, "fsdp": 8, "tensor": 1}.
    num_params: trainable parameters in the state (PPO: policy + critic).
    param_bytes_total: bytes of those parameters, unsharded.
    param_bytes_per_device: max over devices of the param shard bytes.
    opt_state_bytes_per_device: same for the optimizer state leaves.
    state_bytes_per_device: same for the whole train state.
    frozen_bytes_per_device: same for the frozen extra arguments (DPO
      reference, PPO reference and reward model; 0 when there are none).
    temp_bytes: XLA temporaries of the compiled program.
    argument_bytes: its arguments (state, batch, frozen params).
    output_bytes: its outputs (new state, metrics).
    alias_bytes: output bytes that reuse donated argument buffers.
    flops_per_step: XLA cost-analysis FLOPs of the per-device program (loop
      bodies counted once); nan when unavailable.
    matmul_flops_per_step: matmul FLOPs of the whole step on all devices,
      loops times their trip counts (``jaxpr_matmul_flops``; the PPO
      sampler's loop at its maximum, max_new_tokens).
    lower_seconds: trace + lower wall time.
    compile_seconds: XLA compile wall time.
  """

  stage: str
  mesh_shape: dict[str, int]
  num_params: int
  param_bytes_total: int
  param_bytes_per_device: int
  opt_state_bytes_per_device: int
  state_bytes_per_device: int
  frozen_bytes_per_device: int
  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  flops_per_step: float
  matmul_flops_per_step: float
  lower_seconds: float
  compile_seconds: float

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh_shape.values())

  @property
  def peak_bytes_estimate(self) -> int:
    """argument + output - alias + temp bytes per device (-1 if unknown)."""
    parts = (
      self.argument_bytes,
      self.output_bytes,
      self.alias_bytes,
      self.temp_bytes,
    )
    if min(parts) < 0:
      return -1
    return (
      self.argument_bytes
      + self.output_bytes
      - self.alias_bytes
      + self.temp_bytes
    )

  def format(self) -> str:
    """A readable multi-line table of the report (bytes in KiB/MiB/GiB)."""
    mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    rows = [
      ("parameters", f"{self.num_params:,}"),
      ("param bytes (all devices)", format_bytes(self.param_bytes_total)),
      ("per device:", ""),
      ("  params", format_bytes(self.param_bytes_per_device)),
      ("  optimizer state", format_bytes(self.opt_state_bytes_per_device)),
      ("  train state", format_bytes(self.state_bytes_per_device)),
      ("  frozen params", format_bytes(self.frozen_bytes_per_device)),
      ("  program arguments", format_bytes(self.argument_bytes)),
      ("  program outputs", format_bytes(self.output_bytes)),
      ("  donated (aliased)", format_bytes(self.alias_bytes)),
      ("  temporaries", format_bytes(self.temp_bytes)),
      ("  peak estimate", format_bytes(self.peak_bytes_estimate)),
      ("  FLOPs per step (XLA)", _format_flops(self.flops_per_step)),
      (
        "  matmul FLOPs per step",
        _format_flops(self.matmul_flops_per_step / self.num_devices),
      ),
      ("lower / compile", self._format_times()),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
      f"dry run: {self.stage} on mesh {mesh} ({self.num_devices} devices)"
    ]
    lines += [f"  {name:<{width}}  {value}".rstrip() for name, value in rows]
    return "\n".join(lines)

  def _format_times(self) -> str:
    return f"{self.lower_seconds:.1f} s / {self.compile_seconds:.1f} s"


def format_bytes(n: int) -> str:
  """1536 -> '1.5 KiB'; 3 << 30 -> '3.00 GiB'; negative -> 'n/a'."""
  if n < 0:
    return "n/a"
  if n >= _GIB:
    return f"{n / _GIB:.2f} GiB"
  if n >= _MIB:
    return f"{n / _MIB:.1f} MiB"
  if n >= 1024:
    return f"{n / 1024:.1f} KiB"
  return f"{n} B"


def _format_flops(flops: float) -> str:
  if math.isnan(flops):
    return "n/a"
  return f"{flops:.3e}"


# ------------------------------------------------------------ byte counting


def _leaf_bytes(x: jax.ShapeDtypeStruct | jax.Array, shape: Any) -> int:
  return math.prod(shape) * x.dtype.itemsize


def tree_bytes(tree: PyTree) -> int:
  """Unsharded bytes of all leaves (arrays or ShapeDtypeStructs)."""
  return sum(_leaf_bytes(x, x.shape) for x in jax.tree.leaves(tree))


def bytes_per_device(tree: PyTree) -> int:
  """Max over devices of the bytes of the shards each device holds.

  Args:
    tree: pytree of arrays or ``jax.ShapeDtypeStruct``s, each with a
      ``.sharding`` (a leaf's shard shape is ``sharding.shard_shape``).

  Returns:
    The largest per-device sum of shard bytes (0 for an empty tree).
    A replicated leaf counts in full on every device.
  """
  per_device: collections.Counter = collections.Counter()
  for x in jax.tree.leaves(tree):
    if x.sharding is None:
      raise ValueError(f"leaf {x} has no sharding")
    nbytes = _leaf_bytes(x, x.sharding.shard_shape(x.shape))
    for device in x.sharding.device_set:
      per_device[device] += nbytes
  return max(per_device.values(), default=0)


def _num_elements(tree: PyTree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def flops_from_cost_analysis(cost: Any) -> float:
  """The "flops" figure of ``compiled.cost_analysis()``.

  Args:
    cost: a dict (jax >= 0.4.3x), a list of dicts (older jax: one per
      program; summed) or None.

  Returns:
    FLOPs as a float; nan when no dict holds a "flops" key.
  """
  if cost is None:
    return math.nan
  if isinstance(cost, dict):
    cost = [cost]
  values = [c["flops"] for c in cost if c and "flops" in c]
  return float(sum(values)) if values else math.nan


def _sub_jaxprs(value: Any) -> list[Any]:
  """The jaxprs held in one equation parameter (a jaxpr or a sequence)."""
  if isinstance(value, jax_core.Jaxpr | jax_core.ClosedJaxpr):
    return [value]
  if isinstance(value, tuple | list):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_matmul_flops(jaxpr: Any, *, while_trip_count: int = 1) -> float:
  """Matmul FLOPs of a jaxpr, loops multiplied by their trip counts.

  Counts 2 * prod(output shape) * prod(contracted sizes) per
  ``dot_general`` (the matmuls, which hold nearly all of a transformer's
  FLOPs), recursing into nested jaxprs: a ``scan`` body counts ``length``
  times, a ``while`` body ``while_trip_count`` times (a while loop's trip
  count is not static; pass its maximum for an upper bound), a ``cond`` its
  most expensive branch. Shapes are those of the jaxpr: for a jitted step,
  the global (unsharded) arrays, i.e. the work of all devices together.

  Args:
    jaxpr: a ``Jaxpr`` or ``ClosedJaxpr`` (e.g. ``jax.jit(f).trace(...)
      .jaxpr``).
    while_trip_count: iterations assumed for every while loop.

  Returns:
    FLOPs (float, exact for integer-sized shapes).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      contracted = math.prod(lhs[i] for i in lhs_contract)
      total += 2.0 * math.prod(out) * contracted
      continue

    def flops(j: Any) -> float:
      return jaxpr_matmul_flops(j, while_trip_count=while_trip_count)

    if name == "while":
      total += while_trip_count * flops(eqn.params["body_jaxpr"])
      continue
    subs = [flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if name == "scan":
      total += eqn.params["length"] * sum(subs)
    elif name == "cond":
      total += max(subs, default=0.0)
    else:
      total += sum(subs)
  return total


def _memory(compiled: Any) -> dict[str, int]:
  keys = {
    "temp_bytes": "temp_size_in_bytes",
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
  }
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:  # backends without the analysis
    stats = None
  return {k: int(getattr(stats, v, -1)) for k, v in keys.items()}


# -------------------------------------------------------------- stage plans


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What one stage's step takes.

  Attributes:
    step: the pure step ``step(state, batch, *extra)``.
    init_state: ``() -> state`` (evaluated only under ``jax.eval_shape``).
    param_axes: logical axes of each params tree in the state.
    batch: pytree of unsharded ShapeDtypeStructs.
    extra: per frozen argument, ``(init, logical axes)``.
    trainable: ``state -> (params trees, optimizer state trees)``.
  """

  step: Callable[..., tuple[PyTree, PyTree]]
  init_state: Callable[[], PyTree]
  param_axes: tuple[PyTree, ...]
  batch: PyTree
  extra: tuple[tuple[Callable[[], PyTree], PyTree], ...]
  trainable: Callable[[PyTree], tuple[PyTree, PyTree]]


def _ids(batch: int, length: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, length), jnp.int32)


def _mask(batch: int, length: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, length), jnp.bool_)


def _preference_batch(
  b: int, p: int, t: int, with_ref: bool
) -> PreferenceBatch:
  ref = jax.ShapeDtypeStruct((b,), jnp.float32) if with_ref else None
  return PreferenceBatch(
    prompt_ids=_ids(b, p),
    prompt_mask=_mask(b, p),
    chosen_ids=_ids(b, t),
    chosen_mask=_mask(b, t),
    rejected_ids=_ids(b, t),
    rejected_mask=_mask(b, t),
    ref_chosen_logprobs=ref,
    ref_rejected_logprobs=ref,
  )


def _plan(
  stage: str,
  cfg: models.ModelConfig,
  optimizer: optax.GradientTransformation,
  config: StageConfig,
  b: int,
  p: int,
  t: int,
) -> _Plan:
  """The step, abstract state initialiser, batch and extras of ``stage``."""

  def policy() -> PyTree:
    return models.init_params(cfg, jax.random.key(0))

  def scalar_model() -> PyTree:
    return {
      "backbone": models.init_params(cfg, jax.random.key(1)),
      "head": models.init_head_params(cfg, jax.random.key(2)),
    }

  lm_axes = models.param_logical_axes(cfg)
  scalar_axes = models.scalar_model_logical_axes(cfg)

  def single(state: TrainState) -> tuple[PyTree, PyTree]:
    return state.params, state.opt_state

  def train_state(params_fn: Callable[[], PyTree]) -> Callable[[], PyTree]:
    return lambda: TrainState.create(params_fn(), optimizer, jax.random.key(0))

  if stage == "sft":
    batch = SFTBatch(_ids(b, p), _mask(b, p), _ids(b, t), _mask(b, t))
    return _Plan(
      make_sft_step(cfg, optimizer, config),
      train_state(policy),
      (lm_axes,),
      batch,
      (),
      single,
    )
  if stage == "rm":
    return _Plan(
      make_reward_model_step(cfg, optimizer, config),
      train_state(scalar_model),
      (scalar_axes,),
      _preference_batch(b, p, t, with_ref=False),
      (),
      single,
    )
  if stage == "dpo":
    pre = config.precomputed_ref
    return _Plan(
      make_dpo_step(cfg, optimizer, config),
      train_state(policy),
      (lm_axes,),
      _preference_batch(b, p, t, with_ref=pre),
      () if pre else ((policy, lm_axes),),
      single,
    )

  if stage == "grpo":
    return _grpo_plan(cfg, optimizer, config, policy, lm_axes, b, p)

  def ppo_state() -> PyTree:
    return init_ppo_state(
      policy(), scalar_model(), optimizer, optimizer, jax.random.key(0), config
    )

  def ppo_trainable(state: Any) -> tuple[PyTree, PyTree]:
    return (
      (state.policy_params, state.value_params),
      (state.policy_opt_state, state.value_opt_state),
    )

  def frozen() -> PyTree:
    return {"ref": policy(), "reward": scalar_model()}

  return _Plan(
    make_ppo_step(cfg, optimizer, optimizer, config),
    ppo_state,
    (lm_axes, scalar_axes),
    PromptBatch(_ids(b, p), _mask(b, p)),
    ((frozen, {"ref": lm_axes, "reward": scalar_axes}),),
    ppo_trainable,
  )


def _grpo_score(frozen: Any, ids: Any, attn: Any, resp: Any) -> Any:
  """A stand-in for host scoring: cheap, but not a constant that would
  let XLA fold the update away."""
  del frozen, attn
  return jnp.mean(ids[:, -resp.shape[1] :] * resp, axis=-1).astype(jnp.float32)


def _grpo_plan(cfg, optimizer, config, policy, lm_axes, b, p) -> _Plan:
  """GRPO as one program (rollout, a stand-in score, update): the FLOPs of
  the stage's two programs, and an upper bound on the larger one's memory
  (the fused program holds the samples and the update together)."""

  def single(state: TrainState) -> tuple[PyTree, PyTree]:
    return state.params, state.opt_state

  return _Plan(
    make_grpo_step(cfg, optimizer, config, score_fn=_grpo_score),
    lambda: TrainState.create(policy(), optimizer, jax.random.key(0)),
    (lm_axes,),
    PromptBatch(_ids(b, p), _mask(b, p)),
    # The reference only when the iteration reads it (kl_penalty, kl_coef).
    ((lambda: {"ref": policy()}, {"ref": lm_axes}),)
    if config.uses_reference
    else (),
    single,
  )


def _stage_config(
  stage: str,
  config: StageConfig | None,
  model_config: models.ModelConfig,
  response_length: int,
) -> StageConfig:
  want = _CONFIG_TYPES[stage]
  if config is not None and not isinstance(config, want):
    raise TypeError(
      f"stage {stage!r} takes a {want.__name__}, got {type(config).__name__}"
    )
  if stage not in _SAMPLING:
    return want() if config is None else config
  if config is None:
    eos = model_config.eos_token_id or 0
    pad = model_config.pad_token_id
    config = want(eos_token_id=eos, pad_token_id=eos if pad is None else pad)
  # The sampler's T is the dry run's response length.
  return dataclasses.replace(config, max_new_tokens=response_length)


def _with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )


def _batch_shards(sharding: NamedSharding) -> int:
  axes = sharding.spec[0] if len(sharding.spec) else None
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(sharding.mesh.shape[a] for a in axes)


# ----------------------------------------------------------------- dry run


def dry_run(
  stage: str,
  model_config: models.ModelConfig,
  *,
  mesh: Mesh,
  rules: Rules,
  batch_size: int = 8,
  prompt_length: int = 16,
  response_length: int = 16,
  optimizer: optax.GradientTransformation | None = None,
  config: StageConfig | None = None,
  donate: bool = True,
) -> DryRunReport:
  """Lowers and AOT-compiles one ``stage`` step on ``mesh``; no weights.

  Args:
    stage: "sft", "rm", "dpo", "ppo" or "grpo".
    model_config: the model (policy, reference, critic and reward backbones
      all share it).
    mesh: target mesh (``parallel.make_mesh``); it may be made of fake CPU
      devices.
    rules: logical-axis rule table (``parallel.FSDP``, ...).
    batch_size: B, sequences per step (PPO: prompts per step, before
      ``group_size``). Must be divisible by the rules' batch mesh axes.
    prompt_length: P, static prompt length.
    response_length: T, static response length (PPO: the sampler's
      ``max_new_tokens``, which replaces the config's).
    optimizer: optax transformation of the trained model(s); default
      ``optax.adam(1e-5)``. PPO uses it for both policy and critic.
    config: the stage's step config (``SFTConfig``, ``RewardModelConfig``,
      ``DPOConfig`` or ``PPOConfig``); default: that class's defaults (PPO:
      EOS / pad ids from ``model_config``).
    donate: donate the state argument, as a run does.

  Returns:
    DryRunReport.

  Raises:
    ValueError: unknown stage, or a batch size the batch mesh axes do not
      divide.
    TypeError: ``config`` is not the stage's config class.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  batch_sharding = parallel.batch_sharding(mesh, rules)
  shards = _batch_shards(batch_sharding)
  if batch_size % shards:
    raise ValueError(
      f"batch_size={batch_size} is not divisible by the {shards} batch "
      f"shards of mesh {dict(mesh.shape)} ({batch_sharding.spec[0]})"
    )
  optimizer = optax.adam(1e-5) if optimizer is None else optimizer
  config = _stage_config(stage, config, model_config, response_length)
  plan = _plan(
    stage,
    model_config,
    optimizer,
    config,
    batch_size,
    prompt_length,
    response_length,
  )

  state_sh = parallel.state_shardings(
    plan.init_state, mesh=mesh, rules=rules, param_axes=plan.param_axes
  )
  state = parallel.abstract_with_shardings(plan.init_state, shardings=state_sh)
  extra, extra_sh = [], []
  for init, axes in plan.extra:
    shapes = jax.eval_shape(init)
    sh = parallel.logical_to_shardings(axes, mesh, rules, shapes=shapes)
    extra.append(_with_shardings(shapes, sh))
    extra_sh.append(sh)
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
    plan.batch,
  )

  jitted = parallel.jit_step(
    plan.step,
    state_sh,
    batch_sharding,
    extra_shardings=tuple(extra_sh),
    donate=donate,
  )
  start = time.perf_counter()
  traced = jitted.trace(state, batch, *extra)
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()

  # The sampler's decode loop runs at most max_new_tokens times.
  while_trips = response_length if stage in _SAMPLING else 1
  params, opt_state = plan.trainable(state)
  return DryRunReport(
    stage=stage,
    mesh_shape={str(k): int(v) for k, v in mesh.shape.items()},
    num_params=_num_elements(params),
    param_bytes_total=tree_bytes(params),
    param_bytes_per_device=bytes_per_device(params),
    opt_state_bytes_per_device=bytes_per_device(opt_state),
    state_bytes_per_device=bytes_per_device(state),
    frozen_bytes_per_device=bytes_per_device(extra),
    flops_per_step=flops_from_cost_analysis(compiled.cost_analysis()),
    matmul_flops_per_step=jaxpr_matmul_flops(
      traced.jaxpr, while_trip_count=while_trips
    ),
    lower_seconds=lowered_at - start,
    compile_seconds=compiled_at - lowered_at,
    **_memory(compiled),
  )
