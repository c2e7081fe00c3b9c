"""KL estimators, KL-shaped rewards, missing-EOS penalty and KL controllers.

Per-token estimators of KL(pi || pi_ref) from samples y_t ~ pi, with the
log-ratio d_t = log pi(y_t) - log pi_ref(y_t) (docs/conventions.md, convention
8; Schulman 2020, "Approximating KL divergence",
http://joschu.net/blog/kl-approx.html):

  k1 = d                       unbiased, can be negative (default in the reward)
  k2 = d^2 / 2                 biased, low variance, >= 0
  k3 = (r - 1) - log r = exp(-d) - 1 + d,  r = pi_ref / pi = exp(-d)
                               unbiased, >= 0, low variance

Time convention: all tensors are response-aligned [B, T] (docs/conventions.md,
convention 1). Masked slots of every per-token output hold 0.
"""

from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from rlhf_jax import stats as st
from rlhf_jax.checks import check_integer_array, check_number, is_int
from rlhf_jax.masked import (
  LossAggMode,
  last_valid_index,
  promote_f32,
  validate_mask,
)

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = ("k1", "k2", "k3")

# k3 is exact for d >= -K3_LOG_RATIO_CLIP; below, exp(-d) continues along its
# tangent at -K3_LOG_RATIO_CLIP, so value and gradient stay finite in f32
# (exp overflows at 88.7) and the gradient keeps pointing towards d = 0.
K3_LOG_RATIO_CLIP = 60.0


def _k3(d: jax.Array) -> jax.Array:
  """exp(-d) - 1 + d, accurate near 0 and finite for any d.

  Near 0 the difference cancels (f32 loses 5% at |d| = 1e-3), so |d| < 0.1
  uses the series d^2/2 - d^3/6 + d^4/24 - d^5/120 (truncation < 3e-7
  relative). Below -K3_LOG_RATIO_CLIP exp(-d) follows its tangent.
  """
  d_low = jnp.maximum(d, -K3_LOG_RATIO_CLIP)
  exact = jnp.expm1(-d_low) + jnp.exp(-d_low) * (d_low - d) + d
  small = jnp.abs(d) < 0.1
  ds = jnp.where(small, d, 0)
  series = ds * ds * (0.5 - ds * (1 / 6 - ds * (1 / 24 - ds / 120)))
  return jnp.where(small, series, exact)


def kl_estimate(
  logprobs: jax.Array,
  ref_logprobs: jax.Array,
  *,
  kl_estimator: KLEstimator = "k1",
  mask: jax.Array | None = None,
) -> jax.Array:
  """Per-token KL(pi || pi_ref) estimate (Schulman 2020).

  docs/conventions.md, convention 8.

  With d = logprobs - ref_logprobs:
    k1 = d;  k2 = 0.5 d^2;  k3 = exp(-d) - 1 + d.
  k3 is exact for d >= -K3_LOG_RATIO_CLIP (60, a probability ratio of
  ~1e26); below, exp(-d) is continued linearly, so k3 stays finite and its
  gradient keeps the sign of d. Gradients w.r.t. ``logprobs``: k1: 1;
  k2: d; k3: 1 - exp(-d), each pushing towards d = 0 except k1 (constant:
  k1 is an unbiased value, not a useful loss term).

  >>> import jax.numpy as jnp
  >>> d = jnp.array([[-1.0, 0.0, 2.0]])
  >>> for k in ("k1", "k2", "k3"):
  ...   kl = kl_estimate(d, jnp.zeros_like(d), kl_estimator=k)
  ...   print(k, [round(float(v), 4) for v in kl[0]])
  k1 [-1.0, 0.0, 2.0]
  k2 [0.5, 0.0, 2.0]
  k3 [0.7183, 0.0, 1.1353]

  Args:
    logprobs: f32[B, T] log pi(y_t) of the sampled tokens (any float dtype).
    ref_logprobs: f32[B, T] log pi_ref(y_t), same shape.
    kl_estimator: "k1", "k2" or "k3".
    mask: optional bool[B, T]; masked slots hold 0 and their inputs (even NaN
      or +-inf) reach neither the output nor gradients.

  Returns:
    f32[B, T] per-token estimate (nats).

  Raises:
    ValueError: unknown estimator or shape mismatch.
  """
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(
      f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}"
    )
  logprobs = promote_f32(logprobs)
  ref_logprobs = promote_f32(ref_logprobs)
  if logprobs.shape != ref_logprobs.shape:
    raise ValueError(
      f"logprobs shape {logprobs.shape} != ref_logprobs shape"
      f" {ref_logprobs.shape}"
    )
  d = logprobs - ref_logprobs
  if mask is not None:
    mask = validate_mask(mask, d.shape, "mask")
    d = jnp.where(mask, d, 0)  # before exp: garbage cannot reach k3
  if kl_estimator == "k1":
    kl = d
  elif kl_estimator == "k2":
    kl = 0.5 * d * d
  else:
    kl = _k3(d)
  if mask is not None:
    kl = jnp.where(mask, kl, 0)
  return kl


def _scores(scores: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sequence scores as f[B] of at least f32, B = shape[0]."""
  scores = promote_f32(scores)
  if scores.shape != tuple(shape[:1]):
    raise ValueError(f"scores shape {scores.shape} must be [B] = {shape[:1]}")
  return scores


def kl_shaped_rewards(
  scores: jax.Array,
  logprobs: jax.Array,
  ref_logprobs: jax.Array,
  response_mask: jax.Array,
  *,
  kl_coef: float | jax.Array,
  kl_estimator: KLEstimator = "k1",
) -> tuple[jax.Array, jax.Array]:
  """Per-token rewards: KL penalty on every token, score on the last one.

  rewards[b, t] = -kl_coef * kl[b, t] + [t = t_last(b)] * scores[b]
  (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020, eq. 1), where
  t_last(b) is the LAST True position of response_mask[b], found from the
  mask, never from token ids (docs/conventions.md, convention 3). Rows with no
  valid token get no score.

  Args:
    scores: f32[B] sequence-level reward-model scores.
    logprobs: f32[B, T] log pi(y_t) of the policy that sampled.
    ref_logprobs: f32[B, T] log pi_ref(y_t).
    response_mask: bool[B, T] True up to and including the first EOS.
    kl_coef: penalty coefficient >= 0 (Python float or traced f32[]).
    kl_estimator: "k1" (default), "k2" or "k3".

  Returns:
    (rewards f32[B, T], kl f32[B, T]): the shaped rewards and the per-token
    KL estimate actually used (for logging); both 0 at masked slots.

  Raises:
    ValueError: shape mismatch, unknown estimator, or a Python kl_coef
      below 0 or NaN.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  logprobs = jnp.asarray(logprobs)
  mask = validate_mask(response_mask, logprobs.shape, "response_mask")
  check_number("kl_coef", kl_coef, lambda v: v >= 0, ">= 0")
  scores = _scores(scores, logprobs.shape)
  kl = kl_estimate(logprobs, ref_logprobs, kl_estimator=kl_estimator, mask=mask)
  rewards = -jnp.asarray(kl_coef, kl.dtype) * kl
  last = last_valid_index(mask)
  is_last = jnp.arange(mask.shape[-1])[None, :] == last[:, None]
  rewards = rewards + jnp.where(is_last, scores[:, None], 0)
  return jnp.where(mask, rewards, 0), kl


def kl_loss(
  logprobs: jax.Array,
  ref_logprobs: jax.Array,
  response_mask: jax.Array,
  *,
  kl_estimator: KLEstimator = "k3",
  loss_agg_mode: LossAggMode = "token-mean",
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
  """KL to the reference as a loss term: agg_t kl_estimate(log pi, log pi_ref).

  Added to the policy loss with ``kl_loss_coef`` (docs/conventions.md,
  convention 8), as in GRPO (Shao et al. 2024, eq. 3, with k3) instead of, or
  besides, the KL penalty in the reward. The gradient flows through ``logprobs``
  only (the reference is a constant): per token 1 (k1), d (k2) or 1 - exp(-d)
  (k3), with d = log pi - log pi_ref.

  >>> import jax.numpy as jnp
  >>> logp = jnp.array([[-1.0, -2.0]])
  >>> loss, stats = kl_loss(logp, logp - 1.0, jnp.array([[True, False]]),
  ...                       kl_estimator="k2")
  >>> float(loss), float(stats["ppo/kl_loss"].value)  # 0.5 * 1^2
  (0.5, 0.5)

  Args:
    logprobs: f32[B, T] log pi(y_t) under the current params.
    ref_logprobs: f32[B, T] log pi_ref(y_t).
    response_mask: bool[B, T] True = valid; masked slots may hold anything.
    kl_estimator: "k1", "k2" or "k3".
    loss_agg_mode: see ``masked.aggregate_loss``.
    normalizer: optional global denominator for micro-batching.
    axis_name: optional pmap/shard_map axis: loss and statistics are global.

  Returns:
    (loss f32[], stats) with ``ppo/kl_loss`` (a ``stats.Mean`` of the same
    aggregation).

  Raises:
    ValueError: shape mismatch, unknown estimator or loss_agg_mode.
  """
  logprobs = jnp.asarray(logprobs)
  mask = validate_mask(response_mask, logprobs.shape, "response_mask")
  ref = jax.lax.stop_gradient(promote_f32(ref_logprobs))
  kl = kl_estimate(logprobs, ref, kl_estimator=kl_estimator, mask=mask)
  return st.aggregated(
    "ppo/kl_loss",
    kl,
    mask,
    loss_agg_mode=loss_agg_mode,
    normalizer=normalizer,
    axis_name=axis_name,
  )


def apply_missing_eos_penalty(
  scores: jax.Array,
  response_ids: jax.Array,
  response_mask: jax.Array,
  *,
  eos_token_id: int,
  penalty: float | jax.Array,
) -> jax.Array:
  """Subtracts ``penalty`` from the score of responses with no EOS.

  scores'[b] = scores[b] - penalty * [no t: m[b, t] and y[b, t] = eos]
  (as TRL's ``missing_eos_penalty``). Only the response region is searched
  (docs/conventions.md, convention 13): pass response ids, never the full
  sequence, because an EOS inside the prompt (chat templates) does not end the
  response.

  Args:
    scores: f32[B] sequence scores.
    response_ids: i32[B, T] response tokens only.
    response_mask: bool[B, T] True at valid response tokens.
    eos_token_id: the EOS id (an int, or a traced i32[]); one no id of
      the dtype of ``response_ids`` can hold is found in no row.
    penalty: amount subtracted (>= 0 for a penalty), float or traced f32[].

  Returns:
    f32[B] penalised scores.

  Raises:
    ValueError: shape mismatch; ``eos_token_id`` not an integer (2.5 was
      compared as a float and matched no token).
    TypeError: ``response_ids`` of a float or bool dtype.
  """
  if not is_int(eos_token_id):
    raise ValueError(f"eos_token_id must be an integer, got {eos_token_id!r}")
  check_integer_array("response_ids", response_ids)
  response_ids = jnp.asarray(response_ids)
  mask = validate_mask(response_mask, response_ids.shape, "response_mask")
  scores = _scores(scores, response_ids.shape)
  has_eos = jnp.any(mask & _is_eos(response_ids, eos_token_id), axis=-1)
  return jnp.where(has_eos, scores, scores - jnp.asarray(penalty, scores.dtype))


def _is_eos(ids: jax.Array, eos_token_id: int | jax.Array) -> jax.Array:
  """bool[...] ids == eos, exactly: narrow ids are compared at 32 bits
  (int8 ids against 258 matched token 2), and a known id outside the ids'
  range matches none (10**12 was jax's OverflowError)."""
  if ids.dtype.itemsize < 4:
    ids = ids.astype(jnp.int32)
  if isinstance(eos_token_id, jax.Array):  # traced: compared as given,
    # on the same side of 0: mixed signs wrap at 32 bits (uint32 2**32 - 1
    # is int32 -1).
    same_side = (ids >= 0) == (eos_token_id >= 0)
    return (ids == eos_token_id) & same_side
  info = jnp.iinfo(ids.dtype)
  if not info.min <= int(eos_token_id) <= info.max:
    return jnp.zeros(ids.shape, bool)
  return ids == int(eos_token_id)


class KLControllerState(NamedTuple):
  """State of a KL controller: the current reward-penalty coefficient.

  Attributes:
    kl_coef: f32[] coefficient used in ``kl_shaped_rewards``.
  """

  kl_coef: jax.Array


class KLInitFn(Protocol):
  """() -> KLControllerState."""

  def __call__(self) -> KLControllerState: ...


class KLUpdateFn(Protocol):
  """(state, observed_kl, n_steps) -> KLControllerState, pure and jit-safe."""

  def __call__(
    self,
    state: KLControllerState,
    observed_kl: jax.Array | float,
    n_steps: jax.Array | int,
  ) -> KLControllerState: ...


class KLController(NamedTuple):
  """An init/update pair (like optax.GradientTransformation).

  Attributes:
    init: () -> KLControllerState.
    update: (state, observed_kl f32[], n_steps) -> KLControllerState; pure
      and jit-safe, observed_kl is the mean per-sequence KL of the batch.
  """

  init: KLInitFn
  update: KLUpdateFn


def _multiplicative_controller(
  init_kl_coef: float,
  multiplier: Callable[[jax.Array | float, jax.Array | int], jax.Array] | None,
) -> KLController:
  """kl_coef <- kl_coef * multiplier(observed_kl, n_steps); None: fixed."""

  def init() -> KLControllerState:
    return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

  def update(
    state: KLControllerState,
    observed_kl: jax.Array | float,
    n_steps: jax.Array | int,
  ) -> KLControllerState:
    if multiplier is None:
      return state
    return KLControllerState(state.kl_coef * multiplier(observed_kl, n_steps))

  return KLController(init=init, update=update)


def fixed_kl_controller(kl_coef: float) -> KLController:
  """A controller whose coefficient never changes.

  Args:
    kl_coef: the constant coefficient (>= 0).

  Returns:
    KLController; update returns the state unchanged.

  Raises:
    ValueError: kl_coef < 0 (or NaN).
  """
  if not kl_coef >= 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
  return _multiplicative_controller(kl_coef, None)


def adaptive_kl_controller(
  init_kl_coef: float,
  *,
  target_kl: float,
  horizon: float,
) -> KLController:
  """Proportional controller of Ziegler et al. 2019, sec. 2.2.

  docs/conventions.md, convention 9:

    e = clip(KL_observed / target_kl - 1, -0.2, 0.2)
    kl_coef <- kl_coef * (1 + e * n_steps / horizon)

  Args:
    init_kl_coef: starting coefficient (> 0).
    target_kl: target KL in nats (> 0).
    horizon: adaptation horizon in samples (> 0).

  Returns:
    KLController; ``update(state, observed_kl, n_steps)`` with observed_kl the
    batch KL (nats, f32[]) and n_steps the number of samples it covers.

  Raises:
    ValueError: non-positive init_kl_coef, target_kl or horizon.
  """
  for name, val in (
    ("init_kl_coef", init_kl_coef),
    ("target_kl", target_kl),
    ("horizon", horizon),
  ):
    if not val > 0:
      raise ValueError(f"{name} must be > 0, got {val}")

  def multiplier(observed_kl, n_steps):
    kl = jnp.asarray(observed_kl, jnp.float32)
    err = jnp.clip(kl / target_kl - 1.0, -0.2, 0.2)
    return 1.0 + err * jnp.asarray(n_steps, jnp.float32) / horizon

  return _multiplicative_controller(init_kl_coef, multiplier)
