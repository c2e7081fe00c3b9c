"""KL estimators, KL-shaped rewards, missing-EOS penalty and KL controllers.

Per-token estimators of KL(pi || pi_ref) from samples y_t ~ pi, with the
log-ratio d_t = log pi(y_t) - log pi_ref(y_t) (DESIGN.md convention 8;
Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

  k1 = d                       unbiased, can be negative (default in the reward)
  k2 = d^2 / 2                 biased, low variance, >= 0
  k3 = (r - 1) - log r = exp(-d) - 1 + d,  r = pi_ref / pi = exp(-d)
                               unbiased, >= 0, low variance

Time convention: all tensors are response-aligned [B, T] (convention 1).
Masked slots of every per-token output hold 0.
"""

from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from rlhf_jax.masked import promote_f32, validate_mask

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = ("k1", "k2", "k3")

# k3 evaluates exp(-d) on clip(d, -K3_LOG_RATIO_CLIP, K3_LOG_RATIO_CLIP): it is
# exact while the probability ratio stays within e^{+-20} (~5e8), far beyond
# any sane policy update, and finite (no f32 overflow at d < -88) beyond.
K3_LOG_RATIO_CLIP = 20.0


def kl_estimate(
  logprobs: jax.Array,
  ref_logprobs: jax.Array,
  *,
  kl_estimator: KLEstimator = "k1",
  mask: jax.Array | None = None,
) -> jax.Array:
  """Per-token KL(pi || pi_ref) estimate (Schulman 2020; convention 8).

  With d = logprobs - ref_logprobs:
    k1 = d;  k2 = 0.5 d^2;  k3 = exp(-d) - 1 + d.
  For k3, exp(-d) uses d clipped to +-K3_LOG_RATIO_CLIP (20) so it stays
  finite; the linear term uses the unclipped d.

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
    d_clip = jnp.clip(d, -K3_LOG_RATIO_CLIP, K3_LOG_RATIO_CLIP)
    kl = jnp.exp(-d_clip) - 1 + d
  if mask is not None:
    kl = jnp.where(mask, kl, 0)
  return kl


def last_valid_index(mask: jax.Array) -> jax.Array:
  """Index of the last True entry per row, from the mask (never token ids).

  Args:
    mask: bool[B, T].

  Returns:
    i32[B] index of the last True; -1 for rows with no True entry.
  """
  mask = jnp.asarray(mask) != 0
  t = mask.shape[-1]
  last = t - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
  return jnp.where(jnp.any(mask, axis=-1), last, -1).astype(jnp.int32)


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
  mask, never from token ids (convention 3). Rows with no valid token get
  no score.

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
    ValueError: shape mismatch or unknown estimator.
  """
  logprobs = jnp.asarray(logprobs)
  mask = validate_mask(response_mask, logprobs.shape, "response_mask")
  scores = promote_f32(scores)
  if scores.shape != logprobs.shape[:1]:
    raise ValueError(
      f"scores shape {scores.shape} must be [B] = {logprobs.shape[:1]}"
    )
  kl = kl_estimate(logprobs, ref_logprobs, kl_estimator=kl_estimator, mask=mask)
  rewards = -jnp.asarray(kl_coef, kl.dtype) * kl
  last = last_valid_index(mask)
  is_last = jnp.arange(mask.shape[-1])[None, :] == last[:, None]
  rewards = rewards + jnp.where(is_last, scores[:, None], 0)
  return jnp.where(mask, rewards, 0), kl


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
  (convention 13): pass response ids, never the full sequence, because an
  EOS inside the prompt (chat templates) does not end the response.

  Args:
    scores: f32[B] sequence scores.
    response_ids: i32[B, T] response tokens only.
    response_mask: bool[B, T] True at valid response tokens.
    eos_token_id: the EOS id (Python int).
    penalty: amount subtracted (>= 0 for a penalty), float or traced f32[].

  Returns:
    f32[B] penalised scores.

  Raises:
    ValueError: shape mismatch.
  """
  response_ids = jnp.asarray(response_ids)
  mask = validate_mask(response_mask, response_ids.shape, "response_mask")
  scores = promote_f32(scores)
  if scores.shape != response_ids.shape[:1]:
    raise ValueError(
      f"scores shape {scores.shape} must be [B] = {response_ids.shape[:1]}"
    )
  has_eos = jnp.any(mask & (response_ids == eos_token_id), axis=-1)
  return jnp.where(has_eos, scores, scores - jnp.asarray(penalty, scores.dtype))


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


def fixed_kl_controller(kl_coef: float) -> KLController:
  """A controller whose coefficient never changes.

  Args:
    kl_coef: the constant coefficient (>= 0).

  Returns:
    KLController; update returns the state unchanged.

  Raises:
    ValueError: kl_coef < 0.
  """
  if kl_coef < 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

  def init() -> KLControllerState:
    return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

  def update(
    state: KLControllerState,
    observed_kl: jax.Array | float,
    n_steps: jax.Array | int,
  ) -> KLControllerState:
    del observed_kl, n_steps
    return state

  return KLController(init=init, update=update)


def adaptive_kl_controller(
  init_kl_coef: float,
  *,
  target_kl: float,
  horizon: float,
) -> KLController:
  """Proportional controller of Ziegler et al. 2019, sec. 2.2 (convention 9).

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

  def init() -> KLControllerState:
    return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

  def update(
    state: KLControllerState,
    observed_kl: jax.Array | float,
    n_steps: jax.Array | int,
  ) -> KLControllerState:
    kl = jnp.asarray(observed_kl, jnp.float32)
    err = jnp.clip(kl / target_kl - 1.0, -0.2, 0.2)
    mult = 1.0 + err * jnp.asarray(n_steps, jnp.float32) / horizon
    return KLControllerState(kl_coef=state.kl_coef * mult)

  return KLController(init=init, update=update)
