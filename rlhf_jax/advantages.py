"""Advantage estimators: GAE, discounted returns, RLOO and GRPO group baselines.

Time convention (docs/conventions.md, convention 1): tensors are
response-aligned [B, T]; ``rewards[:, t]`` is credited for emitting y_t and
``values[:, t]`` is V(s_t), the value of the state before y_t. The episode
ends after the last valid token, so the value after it is 0 (no bootstrap).

Masked slots are transparent: a reverse ``lax.scan`` carries the next VALID
position's value and advantage across them, so tail padding and holes (masked
slots between valid ones) are handled alike, and the rewards and values stored
in masked slots (even NaN) are never read. Masked outputs hold 0
(docs/conventions.md, convention 5). Whitening is NOT applied here: call
``masked_whiten`` on the result (docs/conventions.md, convention 7).
"""

import jax
import jax.numpy as jnp

from rlhf_jax.checks import check_number, is_int
from rlhf_jax.masked import promote_f32, validate_mask


def _float_bt(x: jax.Array, name: str) -> jax.Array:
  """x promoted to at least f32, checked to be [B, T] (masks: validate_mask)."""
  x = promote_f32(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [B, T], got shape {x.shape}")
  return x


def gae_advantages(
  rewards: jax.Array,
  values: jax.Array,
  response_mask: jax.Array,
  *,
  gamma: float | jax.Array,
  lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation (Schulman et al. 2016, eq. 11-16).

    delta_t = r_t + gamma V(s_{t'}) - V(s_t)
    A_t     = delta_t + gamma lam A_{t'}
    R_t     = A_t + V(s_t)   (the lambda-return, the value target)

  where t' is the next valid position after t; after the last valid token
  V = 0 and A = 0. Computed by a reverse ``lax.scan`` over T.

  One response of 3 valid tokens and a padded slot holding NaN, which is
  never read (t=2: A = 1 - 0.8 = 0.2, no bootstrap; t=1: 0.8 - 0.4 + 0.95 *
  0.2 = 0.59; t=0: 0.4 - 0.5 + 0.95 * 0.59 = 0.4605; R = A + V):

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import gae_advantages
  >>> rewards = jnp.array([[0.0, 0.0, 1.0, jnp.nan]])
  >>> values = jnp.array([[0.5, 0.4, 0.8, jnp.nan]])
  >>> mask = jnp.array([[True, True, True, False]])
  >>> adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
  >>> np.asarray(adv, np.float64).round(4).tolist()
  [[0.4605, 0.59, 0.2, 0.0]]
  >>> np.asarray(ret, np.float64).round(4).tolist()
  [[0.9605, 0.99, 1.0, 0.0]]

  Args:
    rewards: f32[B, T] per-token rewards (e.g. from kl_shaped_rewards).
    values: f32[B, T] critic values V(s_t) stored at rollout time.
    response_mask: bool[B, T] True = valid; tail padding and holes allowed.
    gamma: discount in [0, 1] (Python float or traced f32[]).
    lam: GAE lambda in [0, 1] (Python float or traced f32[]).

  Returns:
    (advantages f32[B, T], returns f32[B, T]); both 0 at masked slots.
    Not whitened.

  Raises:
    ValueError: inputs not [B, T] or shapes differ.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  rewards = _float_bt(rewards, "rewards")
  values = _float_bt(values, "values")
  if values.shape != rewards.shape:
    raise ValueError(
      f"values shape {values.shape} != rewards shape {rewards.shape}"
    )
  mask = validate_mask(response_mask, rewards.shape, "response_mask")
  _check_unit("gamma", gamma)
  _check_unit("lam", lam)
  # where BEFORE arithmetic: masked garbage (NaN, 1e9) never enters the scan.
  rewards = jnp.where(mask, rewards, 0)
  values = jnp.where(mask, values, 0)
  dt = jnp.result_type(rewards, values)  # f32 (f64 for f64 inputs)
  rewards, values = rewards.astype(dt), values.astype(dt)
  gamma = jnp.asarray(gamma, dt)
  lam = jnp.asarray(lam, dt)

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    # A masked slot passes the carry through unchanged (transparent).
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0)

  zeros = jnp.zeros(rewards.shape[:1], dt)
  _, adv_tb = jax.lax.scan(
    step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True
  )
  advantages = adv_tb.T
  returns = jnp.where(mask, advantages + values, 0)
  return advantages, returns


def discounted_returns(
  rewards: jax.Array,
  response_mask: jax.Array,
  *,
  gamma: float | jax.Array,
) -> jax.Array:
  """Reward-to-go G_t = r_t + gamma G_{t'} (t' = next valid position).

  G = 0 after the last valid token (Sutton & Barto 2018, eq. 3.9). With
  gamma = 1 this is the plain sum of future rewards (REINFORCE).

  A hole (masked slot between valid ones) is skipped, not counted as a
  step: G_2 = 3 and G_0 = 1 + 0.5 * G_2 = 2.5; masked slots hold 0.

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import discounted_returns
  >>> rewards = jnp.array([[1.0, 7.0, 3.0, 7.0]])
  >>> mask = jnp.array([[True, False, True, False]])
  >>> g = discounted_returns(rewards, mask, gamma=0.5)
  >>> np.asarray(g, np.float64).round(4).tolist()
  [[2.5, 0.0, 3.0, 0.0]]

  Args:
    rewards: f32[B, T] per-token rewards.
    response_mask: bool[B, T] True = valid; tail padding and holes allowed.
    gamma: discount in [0, 1] (Python float or traced f32[]).

  Returns:
    f32[B, T] returns, 0 at masked slots.

  Raises:
    ValueError: rewards not [B, T], mask shape differs, or a Python gamma
      outside [0, 1].
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  rewards = _float_bt(rewards, "rewards")
  mask = validate_mask(response_mask, rewards.shape, "response_mask")
  _check_unit("gamma", gamma)
  rewards = jnp.where(mask, rewards, 0)
  gamma = jnp.asarray(gamma, rewards.dtype)

  def step(next_ret, xs):
    r, m = xs
    ret = r + gamma * next_ret
    return jnp.where(m, ret, next_ret), jnp.where(m, ret, 0)

  zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, ret_tb = jax.lax.scan(step, zeros, (rewards.T, mask.T), reverse=True)
  return ret_tb.T


def _check_unit(name: str, v) -> None:
  """A Python number in [0, 1] (an array passes: it may be traced)."""
  check_number(name, v, lambda v: 0 <= v <= 1, "in [0, 1]")


def _grouped(scores: jax.Array, group_size: int, min_size: int) -> jax.Array:
  scores = promote_f32(scores)
  if scores.ndim != 1:
    raise ValueError(f"scores must be [B], got shape {scores.shape}")
  if not is_int(group_size) or group_size < min_size:  # not a bool
    raise ValueError(
      f"group_size must be an int >= {min_size}, got {group_size!r}"
    )
  group_size = int(group_size)
  if scores.shape[0] % group_size:
    raise ValueError(
      f"batch size {scores.shape[0]} is not a multiple of group_size"
      f" {group_size} (rows must be prompt * G + g)"
    )
  return scores.reshape(-1, group_size)


def rloo_advantages(scores: jax.Array, *, group_size: int) -> jax.Array:
  """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, eq. 6).

    A_i = s_i - 1/(G-1) sum_{j != i} s_j = G/(G-1) (s_i - mean_j s_j)

  over the G samples of the same prompt (rows prompt * G + g).

  Two prompts, G = 3 (first group: 0 - (2 + 4) / 2 = -3, 2 - 2 = 0,
  4 - 1 = 3; a group of equal scores gives 0):

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import rloo_advantages
  >>> scores = jnp.array([0.0, 2.0, 4.0, 5.0, 5.0, 5.0])
  >>> np.asarray(rloo_advantages(scores, group_size=3), np.float64).tolist()
  [-3.0, 0.0, 3.0, 0.0, 0.0, 0.0]

  Args:
    scores: f32[B] sequence scores, B = num_prompts * G.
    group_size: G >= 2 (static).

  Returns:
    f32[B] advantages (sequence level; broadcast over tokens as needed).

  Raises:
    ValueError: scores not 1-D, G < 2, or B not a multiple of G.
  """
  s = _grouped(scores, group_size, 2)
  others = (jnp.sum(s, axis=1, keepdims=True) - s) / (group_size - 1)
  # A group of equal scores gives exactly 0 (not the rounding of the sums).
  return jnp.where(_flat(s), 0.0, s - others).reshape(-1)


def _flat(s: jax.Array) -> jax.Array:
  """bool[N, 1]: the group's scores are all equal."""
  return jnp.all(s == s[:, :1], axis=1, keepdims=True)


def grpo_advantages(
  scores: jax.Array,
  *,
  group_size: int,
  normalize_std: bool = True,
  unbiased: bool = True,
  eps: float = 1e-6,
) -> jax.Array:
  """Group-relative advantages (Shao et al. 2024, DeepSeekMath sec. 4.1.2).

    A_i = (s_i - mean(s_group)) / (std(s_group) + eps)

  over the G samples of the same prompt (rows prompt * G + g). With
  ``normalize_std=False`` only the mean is removed (Liu et al. 2025,
  "Dr. GRPO"). The std is Bessel-corrected by default (as torch.std in the
  reference implementations; docs/conventions.md, convention 7); a group of
  identical scores gives advantages 0.

  Two prompts, G = 3 (first group: mean 2, Bessel std sqrt(8 / 2) = 2):

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import grpo_advantages
  >>> scores = jnp.array([0.0, 2.0, 4.0, 5.0, 5.0, 5.0])
  >>> a = grpo_advantages(scores, group_size=3)
  >>> np.asarray(a, np.float64).round(4).tolist()
  [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
  >>> a = grpo_advantages(scores, group_size=3, normalize_std=False)
  >>> np.asarray(a, np.float64).round(4).tolist()
  [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]

  Args:
    scores: f32[B] sequence scores, B = num_prompts * G.
    group_size: G >= 1 (static); G = 1 gives all-zero advantages.
    normalize_std: divide by the group std.
    unbiased: Bessel-corrected std (n - 1); False divides by n.
    eps: added to the std.

  Returns:
    f32[B] advantages.

  Raises:
    ValueError: scores not 1-D, G < 1, B not a multiple of G, or eps
      below 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  check_number("eps", eps, lambda v: v >= 0, ">= 0")
  s = _grouped(scores, group_size, 1)
  centered = s - jnp.mean(s, axis=1, keepdims=True)
  if normalize_std:
    dof = max(group_size - 1, 1) if unbiased else group_size
    var = jnp.sum(centered * centered, axis=1, keepdims=True) / dof
    # Double where: sqrt'(0) = inf would give NaN gradients for equal scores.
    pos = var > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1)), 0)
    centered = centered / (std + eps)
  # A group of equal scores gives exactly 0: in f32 its mean can be off by
  # an ulp, which the division by a tiny std would amplify into a bias.
  return jnp.where(_flat(s), 0.0, centered).reshape(-1)
