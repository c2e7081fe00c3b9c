"""Pieces every step factory shares: sequences, micro-batches, safe updates.

Loss functions used with ``accumulate_gradients`` return contributions that
are already divided by the GLOBAL count of the step's batch (tokens, pairs or
sequences; docs/conventions.md, conventions 6 and 14), and the library's
summable statistics (docs/conventions.md, convention 15). Summing the
contributions and merging the statistics over micro-batches gives the loss,
statistics and gradient of one batch of the same sequences, whatever the number
of micro-batches.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.checks import is_int
from rlhf_jax.logprobs import (
  TEMPERATURE_EXPECTED,
  at_least_min_temperature,
  entropy_from_logits,
  logprobs_from_logits,
  response_rows,
)
from rlhf_jax.masked import check_mask_dtype
from rlhf_jax.train.state import PPOState, TrainState, check_optimizer
from rlhf_jax.types import PPOBatch, PreferenceBatch, Rollout

PyTree = Any


def response_logits(
  params: Any,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  prompt_length: int,
  model_config: Any,
) -> jax.Array:
  """Logits f32[B, T, V] of the rows that predict the response tokens.

  Rows P - 1 .. L - 2 of ``models.forward`` for input_ids i32[B, L] with
  P = ``prompt_length`` and T = L - P: row t predicts input_ids[:, P + t]
  (``logprobs.response_logprobs``'s slice, convention 1). The LM head and
  any softmax over V then skip the prompt rows.
  """
  return models.forward(
    params,
    input_ids,
    attention_mask,
    config=model_config,
    logits_range=response_rows(prompt_length, input_ids.shape[1]),
  )


def response_values(
  value_params: Any,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  prompt_length: int,
  model_config: Any,
) -> jax.Array:
  """Values f32[B, T] of the states before y_0 .. y_{T-1}: rows P - 1 ..
  L - 2, the critic's last layer run on those rows only."""
  rows = response_rows(prompt_length, input_ids.shape[1])
  return models.values_forward(
    value_params,
    input_ids,
    attention_mask,
    config=model_config,
    rows_range=rows,
  )


def teacher_forced_logprobs(
  params: Any,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  *,
  prompt_length: int,
  response_mask: jax.Array,
  temperature: jax.Array,
  model_config: Any,
) -> jax.Array:
  """f32[B, T] logprobs of the response tokens input_ids[:, P:] under
  ``params`` (``logprobs.response_logprobs``'s convention 1), with the LM
  head and the softmax over V run on rows P - 1 .. L - 2 only."""
  logits = response_logits(
    params, input_ids, attention_mask, prompt_length, model_config
  )
  return logprobs_from_logits(
    logits,
    input_ids[:, prompt_length:],
    temperature=temperature,
    mask=response_mask,
  )


def check_batch_type(batch: Any, kind: type | tuple[type, ...]) -> None:
  """Raises TypeError, naming both types, unless ``batch`` is a ``kind``."""
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(batch, kinds):
    names = " or ".join(k.__name__ for k in kinds)
    raise TypeError(
      f"the batch must be of type {names}, got {type(batch).__name__}"
    )


def check_batch(batch: Any, kind: type | tuple[type, ...]) -> None:
  """A train step's batch is of its type, with at least one row and one
  prompt token (the first response token is predicted from the last
  prompt position), checked at trace time.

  Raises:
    TypeError: another type (a dict, another batch type), naming both.
    ValueError: prompt_ids not [B, P], or B = 0 or P = 0, naming its
      shape (the step's other checks name the other fields).
  """
  check_batch_type(batch, kind)
  shape = jnp.shape(batch.prompt_ids)
  if len(shape) != 2:  # before a step reads shape[1]
    raise ValueError(f"prompt_ids shape {shape}: expected [B, L]")
  if 0 in shape:
    raise ValueError(
      f"prompt_ids shape {shape}: expected at least one row and one prompt "
      "token (B >= 1, P >= 1)"
    )


# How each state type is made, for the error of a step given another.
_MADE_BY = {
  TrainState: "train.TrainState.create(params, optimizer, rng)",
  PPOState: "train.init_ppo_state",
}


def check_state(state: Any, kind: type) -> None:
  """Checks that a step's state is a ``kind``, at trace time.

  Raises:
    TypeError: another type, naming both and how a ``kind`` is made (the
      params dict as the state failed on a bare AttributeError of
      ``.params``).
  """
  if not isinstance(state, kind):
    made = _MADE_BY.get(kind, kind.__name__)
    raise TypeError(
      f"the state must be a {kind.__name__} (made by {made}), got "
      f"{type(state).__name__}"
    )


def check_step_args(
  state: Any,
  batch: Any,
  kind: type | tuple[type, ...],
  state_kind: type = TrainState,
) -> None:
  """Checks a train step's state and batch at trace time.

  Raises:
    TypeError: a state (`check_state`) or batch (`check_batch`) of
      another type.
    ValueError: a batch of another shape (`check_batch`).
  """
  check_state(state, state_kind)
  check_batch(batch, kind)


def check_rows(*groups: tuple[str, Any, str, Any]) -> None:
  """Checks (ids name, ids, mask name, mask) groups at trace time: each
  ids i32[B, L] with a mask of its shape, and one B for all.

  Raises:
    TypeError: ids or a mask that is not an array (a list: jax.numpy
      takes no lists), or a float mask, naming the field.
    ValueError: the first other problem, naming the fields.
  """
  first = None
  for id_name, ids, mask_name, mask in groups:
    for name, x in ((id_name, ids), (mask_name, mask)):
      if not hasattr(x, "shape"):  # arrays, tracers, ShapeDtypeStructs
        raise TypeError(
          f"{name} must be an array (jax or numpy), got {type(x).__name__}"
        )
    shape, mask_shape = jnp.shape(ids), jnp.shape(mask)
    if len(shape) != 2:
      raise ValueError(f"{id_name} shape {shape}: expected [B, L]")
    if mask_shape != shape:
      raise ValueError(
        f"{mask_name} shape {mask_shape}: expected {shape}, as {id_name}"
      )
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
      raise ValueError(
        f"{id_name} dtype {jnp.result_type(ids)}: expected integer token ids"
      )
    check_mask_dtype(mask_name, mask)
    if first is None:
      first = (id_name, shape[0])
    elif shape[0] != first[1]:
      raise ValueError(
        f"{id_name} has {shape[0]} rows but {first[0]} {first[1]}: expected "
        "one batch size"
      )


FROZEN_KEYS = ("ref", "reward")  # what PPO's and GRPO's steps read


def check_frozen(frozen: Any, required: Sequence[str], hint: str) -> dict:
  """A step's ``frozen`` argument as a dict (None: empty) holding every
  key of ``required`` with a value other than None, checked at trace time.

  Raises:
    TypeError: ``frozen`` is neither a dict nor None.
    ValueError: a required key is missing or None, or a key other than
      "ref" and "reward" (misspelt), naming it and ``hint`` (what to
      pass).
  """
  if frozen is None:
    frozen = {}
  if not isinstance(frozen, Mapping):
    raise TypeError(
      f"frozen must be a dict ({hint}), got {type(frozen).__name__}"
    )
  unknown = sorted(map(str, set(frozen) - set(FROZEN_KEYS)))
  if unknown:  # a misspelt "ref" was ignored: no KL term, no error
    raise ValueError(
      f"frozen holds {unknown}: expected only {list(FROZEN_KEYS)} ({hint})"
    )
  missing = [k for k in required if frozen.get(k) is None]
  if missing:
    names = ", ".join(f"frozen[{k!r}]" for k in missing)
    raise ValueError(f"{names} missing: {hint}")
  return frozen


def check_preference_batch(batch: PreferenceBatch) -> None:
  """A PreferenceBatch's fields agree (`check_rows`), and chosen and
  rejected have one length T (they run side by side).

  Raises:
    TypeError: a field that is not an array, naming it.
    ValueError: fields that disagree, naming them.
  """
  check_rows(
    ("prompt_ids", batch.prompt_ids, "prompt_mask", batch.prompt_mask),
    ("chosen_ids", batch.chosen_ids, "chosen_mask", batch.chosen_mask),
    ("rejected_ids", batch.rejected_ids, "rejected_mask", batch.rejected_mask),
  )
  t_c, t_r = batch.chosen_ids.shape[1], batch.rejected_ids.shape[1]
  if t_c != t_r:
    raise ValueError(
      f"chosen_ids length {t_c} but rejected_ids {t_r}: expected one padded "
      "response length T"
    )


def concat_prompt_response(
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  response_ids: jax.Array,
  response_mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Full sequences [prompt | response] for teacher forcing.

  Args:
    prompt_ids: i32[B, P] left-padded. prompt_mask: bool[B, P].
    response_ids: i32[B, T] right-padded. response_mask: bool[B, T].

  Returns:
    (input_ids i32[B, P+T], attention_mask bool[B, P+T]); position ids come
    from the attention mask (cumsum - 1), so left padding is harmless.

  Raises:
    TypeError: ids or a mask that is not an array (names it).
    ValueError: a mask of another shape than its ids, a batch size that
      differs, ids or masks not [B, L], ids not integer, or T = 0 (names
      them).
  """
  check_rows(
    ("prompt_ids", prompt_ids, "prompt_mask", prompt_mask),
    ("response_ids", response_ids, "response_mask", response_mask),
  )
  if jnp.shape(response_ids)[1] == 0:  # nothing to score or learn
    raise ValueError(
      f"response_ids shape {jnp.shape(response_ids)}: expected at least one "
      "slot (T >= 1)"
    )
  ids = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
  mask = jnp.concatenate(
    [prompt_mask.astype(bool), response_mask.astype(bool)], axis=1
  )
  return ids, mask


def sequences(rows: PPOBatch | Rollout) -> tuple[jax.Array, jax.Array]:
  """(input_ids i32[B, P+T], attention_mask bool[B, P+T]) of a Rollout or
  PPOBatch: its prompt and response side by side."""
  return concat_prompt_response(
    rows.prompt_ids, rows.prompt_mask, rows.response_ids, rows.response_mask
  )


def policy_and_values(
  params: tuple,
  rows: PPOBatch | Rollout,
  *,
  model_config: Any,
  temperature: float | jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Teacher-forced forward of policy and critic on [prompt | response].

  Args:
    params: (policy params, critic params).
    rows: a PPOBatch or Rollout (prompt_ids i32[B, P], prompt_mask
      bool[B, P], response_ids i32[B, T], response_mask bool[B, T]).
    model_config: config of both backbones.
    temperature: the sampling temperature (docs/conventions.md, 4).

  Returns:
    (logprobs f32[B, T] at the sampling temperature, 0 at masked slots;
    token entropy f32[B, T]; values f32[B, T], unmasked).
  """
  policy, value = params
  mask = rows.response_mask
  ids, attn = sequences(rows)
  prompt_len = rows.prompt_ids.shape[1]
  temperature = jnp.asarray(temperature, model_config.acc_dtype)
  logits = response_logits(policy, ids, attn, prompt_len, model_config)
  logp = logprobs_from_logits(
    logits, ids[:, prompt_len:], temperature=temperature, mask=mask
  )
  ent = entropy_from_logits(logits, temperature=temperature)
  values = response_values(value, ids, attn, prompt_len, model_config)
  return logp, ent, values


def split_micro_batches(batch: PyTree, num_micro_batches: int) -> PyTree:
  """Reshapes every [B, ...] leaf to [N, B/N, ...].

  Raises:
    ValueError: N not an integer >= 1, leaves of different B, or B not
      divisible by N.
  """
  n = num_micro_batches
  if not an_int_at_least(1)[0](n):
    raise ValueError(f"num_micro_batches must be an integer >= 1, got {n!r}")
  leaves = jax.tree.leaves(batch)
  if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
    raise ValueError(
      "every leaf of the batch must be [B, ...] (got no leaves or a scalar)"
    )
  sizes = sorted({jnp.shape(x)[0] for x in leaves})
  if len(sizes) > 1:
    raise ValueError(
      f"leading sizes {sizes}: every leaf of the batch must be [B, ...] "
      "with one B"
    )
  size = sizes[0]
  if size % num_micro_batches:
    raise ValueError(
      f"batch size {size} is not divisible by num_micro_batches="
      f"{num_micro_batches}"
    )

  def split(x):
    return x.reshape(
      (num_micro_batches, size // num_micro_batches) + x.shape[1:]
    )

  return jax.tree.map(split, batch)


def global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """x as f32, summed over the pmap axis when there is one."""
  x = jnp.asarray(x, jnp.float32)
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def loss_normalizer(
  mask: jax.Array, loss_agg_mode: str, axis_name: str | None
) -> jax.Array:
  """The step's global denominator for ``aggregate_loss(normalizer=...)``.

  Valid tokens for "token-mean", non-empty rows for the seq-mean modes,
  counted over the whole step batch (and all pmap devices).
  """
  mask = mask.astype(bool)
  if loss_agg_mode == "token-mean":
    count = jnp.sum(mask)
  else:
    count = jnp.sum(jnp.any(mask, axis=-1))
  return global_sum(count, axis_name)


def accumulate_gradients(
  loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, st.Stats]],
  params: PyTree,
  batch: PyTree,
  *,
  num_micro_batches: int = 1,
) -> tuple[jax.Array, st.Stats, PyTree]:
  """Loss, statistics and gradient of ``loss_fn`` over micro-batches.

  Args:
    loss_fn: (params, micro_batch) -> (loss f32[], summable statistics),
      the loss normalised by the whole batch's counts; the statistics of
      the micro-batches are merged (``stats.fold`` of their stack).
    params: differentiated pytree.
    batch: pytree of [B, ...] arrays.
    num_micro_batches: static N; B must be divisible by N.

  Returns:
    (loss f32[], merged statistics, grads like params).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro_batches == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return loss, metrics, grads

  # Every micro-batch inside one rolled loop, so only one micro-batch's
  # activations are live at a time (a first micro-batch peeled off the
  # loop was scheduled beside it, and two micro-batches took the memory of
  # one batch). Gradients add up in the carry from exact zeros; losses and
  # statistics come out stacked and are folded.
  def body(grads, mb):
    (loss, metrics), g = grad_fn(params, mb)
    return jax.tree.map(jnp.add, grads, g), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  micro = split_micro_batches(batch, num_micro_batches)
  grads, (losses, metrics) = jax.lax.scan(body, zeros, micro)
  return jnp.sum(losses), st.fold(metrics), grads


def all_finite(tree: PyTree) -> jax.Array:
  """bool[]: every element of every leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def finite_given_norms(tree: PyTree, *norms: jax.Array) -> jax.Array:
  """bool[]: `all_finite(tree)`, read off the norms of its parts when those
  are finite.

  A norm sqrt(sum x^2) is NaN or inf when any x is, so finite norms prove
  every element finite without a pass over the tree; only a non-finite
  norm (a NaN or inf element, or a sum of squares past the float range)
  runs the elementwise check. The gradients' norm is computed for the
  metrics anyway, so a step skips reading its gradients once more.

  Args:
    tree: the arrays, e.g. gradients.
    *norms: f32[] global norms (``optax.tree.norm``) that together cover
      every leaf of ``tree``.

  Raises:
    TypeError: no norm given.
  """
  if not norms:
    raise TypeError("finite_given_norms needs at least one norm of the tree")
  norms_finite = jnp.all(jnp.isfinite(jnp.stack(norms)))
  return jax.lax.cond(
    norms_finite, lambda: jnp.array(True), lambda: all_finite(tree)
  )


def apply_if_finite(
  optimizer: optax.GradientTransformation,
  params: PyTree,
  opt_state: PyTree,
  grads: PyTree,
  *,
  finite: jax.Array | None = None,
) -> tuple[PyTree, PyTree, jax.Array, jax.Array]:
  """One optax update, skipped when the gradients are not finite.

  A step with NaN/inf gradients leaves params and optimizer state unchanged
  (instead of writing NaN into them); the caller counts it.

  Args:
    optimizer: optax transformation.
    params: current params.
    opt_state: its optimizer state.
    grads: gradients like params.
    finite: optional precomputed flag (e.g. over several param groups).

  Returns:
    (params, opt_state, finite bool[], grad_norm f32[]).

  Raises:
    TypeError: ``optimizer`` is not an optax GradientTransformation.
  """
  check_optimizer("optimizer", optimizer)
  norm = optax.tree.norm(grads)
  if finite is None:
    finite = finite_given_norms(grads, norm)

  def update():
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # Both branches of the cond keep the state's dtypes (an update that
    # would promote a leaf is cast back, so the state never changes type).
    return _like(new_params, params), _like(new_opt_state, opt_state)

  # A conditional, not a select of new against old state: with the state
  # donated, XLA updates params and optimizer state in place instead of
  # keeping both copies (PPO iteration 1.03-1.06x, benchmarks/README.md).
  params, opt_state = jax.lax.cond(finite, update, lambda: (params, opt_state))
  return params, opt_state, finite, norm


def _like(new: PyTree, old: PyTree) -> PyTree:
  """``new`` with each leaf cast to the dtype of its ``old`` twin."""
  return jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), new, old)


# ------------------------------------------------------------ config checks

Rule = tuple[Callable[[Any], bool], str]
# A sampling temperature (``logprobs.MIN_TEMPERATURE`` says why the floor).
TEMPERATURE: Rule = (at_least_min_temperature, TEMPERATURE_EXPECTED)


def at_least(low: float) -> Rule:
  """v >= low."""
  return (lambda v: v >= low, f">= {low}")


def an_int_at_least(low: int) -> Rule:
  """v an integer (not a bool) >= low: a count or a token id."""

  def ok(v) -> bool:
    return is_int(v) and v >= low

  return (ok, f"an integer >= {low}")


def above(low: float) -> Rule:
  """v > low."""
  return (lambda v: v > low, f"> {low}")


def within(low: float, high: float, *, open_high: bool = False) -> Rule:
  """low <= v <= high (or < high)."""
  if open_high:
    return (lambda v: low <= v < high, f"in [{low}, {high})")
  return (lambda v: low <= v <= high, f"in [{low}, {high}]")


def a_bool() -> Rule:
  """v is True or False (a Python bool: "no" or 1 would pass as truthy)."""
  return (lambda v: isinstance(v, bool), "True or False")


def a_bool_or_none() -> Rule:
  """v is True, False or None (None: decided later, e.g. by shapes); the
  message names None, which `config_problems` lets pass."""
  return (lambda v: isinstance(v, bool), "True, False or None")


def one_of(*choices: Any) -> Rule:
  """v is one of ``choices``."""
  return (lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def _passes(rule: Rule, value: Any) -> bool:
  """Whether ``value`` keeps ``rule``; a value the rule cannot compare
  (a string for a number) does not."""
  try:
    return bool(rule[0](value))
  except (TypeError, ValueError):
    return False


def rl_problems(config: Any) -> list[str]:
  """What PPO's and GRPO's configs share: token ids that must be given
  (None would fail only when the step is traced), and `clip_problems`."""
  out = [
    f"{name}=None: expected an integer >= 0"
    for name in ("eos_token_id", "pad_token_id")
    if getattr(config, name) is None
  ]
  return out + clip_problems(config)


def clip_problems(config: Any) -> list[str]:
  """A ``cliprange`` of 1 or more where it is also the lower clip
  (``cliprange_low`` unset): the ratio's lower bound 1 - cliprange would
  be 0 or below."""
  low, clip = config.cliprange_low, config.cliprange
  if low is None and _passes((lambda v: float(v) >= 1, ""), clip):
    return [
      f"cliprange={clip!r}: expected < 1 while cliprange_low is unset (the "
      "lower clip is then 1 - cliprange); set cliprange_low for a wider "
      "upper clip"
    ]
  return []


def config_problems(config: Any) -> list[str]:
  """What is wrong with a frozen config, one ``field=value: expected ...``
  per field: a field annotated bool holding something else, a non-finite
  float anywhere, a break of the class's ``RULES`` (None values pass: None
  means "off"), a bool in a field of another type, and
  ``cross_problems``."""
  out = []
  rules = getattr(type(config), "RULES", {})
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if f.type in (bool, "bool") and not isinstance(v, bool | np.bool_):
      out.append(f"{f.name}={v!r}: expected True or False")  # 1 is not True
    elif isinstance(v, float) and not math.isfinite(v):
      out.append(f"{f.name}={v!r}: expected a finite number")
    elif v is not None and f.name in rules and not _passes(rules[f.name], v):
      out.append(f"{f.name}={v!r}: expected {rules[f.name][1]}")
    elif isinstance(v, bool | np.bool_) and "bool" not in str(f.type):
      out.append(f"{f.name}={v!r}: expected a number, not a bool")  # 1 > 0
  cross = getattr(config, "cross_problems", None)
  return out + (cross() if cross else [])


def check_config(config: Any) -> None:
  """Raises ValueError naming every bad field of ``config`` (at build time,
  before anything is traced)."""
  problems = config_problems(config)
  if problems:
    raise ValueError(f"{type(config).__name__}: {'; '.join(problems)}")


def check_score_fn(score_fn: Any) -> None:
  """Raises TypeError, when a step is built, for a ``score_fn`` that is
  neither None nor callable (it failed only when traced)."""
  if score_fn is not None and not callable(score_fn):
    raise TypeError(
      "score_fn must be a function score_fn(frozen_reward, input_ids, "
      "attention_mask, response_mask) -> f32[B] (or None), got "
      f"{type(score_fn).__name__}"
    )


def check_build(
  model_config: Any,
  config: Any,
  config_type: type,
  optimizers: Sequence[tuple[str, Any]] = (),
) -> None:
  """What every step factory checks when it is built, before any trace.

  Args:
    model_config: the factory's model config argument.
    config: its step config argument, which must be a ``config_type``.
    optimizers: (argument name, value) of its optimizers.

  Raises:
    TypeError: an argument of another type (arguments in another order,
      ``optax.adam`` uncalled), naming it.
    ValueError: a field of ``config`` out of range (each one named), or a
      float64 model config while jax_enable_x64 is off.
  """
  if not isinstance(model_config, models.ModelConfig):
    raise TypeError(
      "model_config must be a models.ModelConfig (models.load_hf_config), "
      f"got {type(model_config).__name__}"
    )
  if not isinstance(config, config_type):
    raise TypeError(
      f"config must be a {config_type.__name__}, got {type(config).__name__}"
    )
  for name, optimizer in optimizers:
    check_optimizer(name, optimizer)
  model_config.check_dtypes()
  check_config(config)


def stacked_pairs(
  batch: PreferenceBatch,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[chosen; rejected] sequences for one forward on 2B rows.

  Returns:
    (input_ids i32[2B, P+T], attention_mask bool[2B, P+T], response_mask
    bool[2B, T]); rows 0..B-1 chosen, B..2B-1 rejected.

  Raises:
    TypeError, ValueError: fields that are not arrays, or disagree
      (`check_preference_batch`).
  """
  check_preference_batch(batch)
  ids_c, mask_c = concat_prompt_response(
    batch.prompt_ids, batch.prompt_mask, batch.chosen_ids, batch.chosen_mask
  )
  ids_r, mask_r = concat_prompt_response(
    batch.prompt_ids, batch.prompt_mask, batch.rejected_ids, batch.rejected_mask
  )
  resp = jnp.concatenate([batch.chosen_mask, batch.rejected_mask], axis=0)
  return (
    jnp.concatenate([ids_c, ids_r], axis=0),
    jnp.concatenate([mask_c, mask_r], axis=0),
    resp.astype(bool),
  )


def unstack_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[2B, ...] -> (chosen [B, ...], rejected [B, ...])."""
  size = x.shape[0] // 2
  return x[:size], x[size:]


def finish_step(
  state: TrainState,
  optimizer: optax.GradientTransformation,
  stats: st.Stats,
  grads,
  axis_name: str | None,
) -> tuple[TrainState, dict]:
  """Sums over devices (pmap), applies the update if finite, counts skips.

  Returns the new state and the metrics: the values of the library's
  statistics, train/grad_norm, train/skipped and train/skipped_steps.
  """
  if axis_name is not None:
    # Each device differentiated its share of the globally normalised loss.
    grads = jax.lax.psum(grads, axis_name)
  metrics = st.values(st.reduce(stats, axis_name))
  params, opt_state, finite, grad_norm = apply_if_finite(
    optimizer, state.params, state.opt_state, grads
  )
  skipped = state.skipped_steps + (~finite).astype(jnp.int32)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    skipped_steps=skipped,
  )
  metrics["train/grad_norm"] = grad_norm
  metrics["train/skipped"] = (~finite).astype(jnp.float32)
  metrics["train/skipped_steps"] = skipped.astype(jnp.float32)
  return new_state, metrics
