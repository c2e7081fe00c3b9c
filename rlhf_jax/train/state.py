"""Train states: flax.struct dataclasses holding arrays only.

Every field is a pytree of arrays, so a state passes through jax.jit (with
shardings and donation), pmap and orbax-checkpoint unchanged. Per-step
randomness is ``jax.random.fold_in(state.rng, state.step)``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax.checks import check_key
from rlhf_jax.kl import KLControllerState

PyTree = Any


def check_optimizer(name: str, optimizer: Any) -> None:
  """Raises TypeError naming ``name`` unless ``optimizer`` is an optax
  GradientTransformation (``optax.adam`` itself, uncalled, is not)."""
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(
      f"{name} must be an optax GradientTransformation (e.g. "
      f"optax.adam(1e-5)), got {type(optimizer).__name__}"
    )


@struct.dataclass
class TrainState:
  """State of the single-model steps (SFT, reward model, DPO).

  Attributes:
    step: i32[] number of steps taken (skipped steps included).
    params: model params (unboxed pytree).
    opt_state: optax state of ``params``.
    rng: PRNG key (typed key array).
    skipped_steps: i32[] steps whose gradients were not finite (skipped).
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  skipped_steps: jax.Array

  @classmethod
  def create(
    cls,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
  ) -> "TrainState":
    """Initial state: step 0, fresh optimizer state.

    Raises:
      TypeError: ``optimizer`` is not an optax GradientTransformation;
        ``rng`` is not an array (`checks.check_key`).
      ValueError: ``rng`` is an array but not one PRNG key.
    """
    check_optimizer("optimizer", optimizer)
    check_key("rng", rng)
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=rng,
      skipped_steps=jnp.zeros((), jnp.int32),
    )


@struct.dataclass
class RewardNormState:
  """Affine reward normalisation r' = gain * r + bias (lm-human-preferences).

  The gain and bias are fitted once, on samples of the initial policy, so
  that normalised scores have mean 0 and std 1 there (Ziegler et al. 2019,
  sec. 2.2). ``fitted`` is False until then (identity).
  """

  gain: jax.Array
  bias: jax.Array
  fitted: jax.Array

  @classmethod
  def identity(cls, dtype: Any = jnp.float32) -> "RewardNormState":
    return cls(
      gain=jnp.ones((), dtype),
      bias=jnp.zeros((), dtype),
      fitted=jnp.zeros((), bool),
    )


@struct.dataclass
class PPOState:
  """State of one RLHF/PPO run.

  Reference and reward-model params are NOT here: they are frozen, passed to
  the step separately and never donated.

  Attributes:
    step: i32[] PPO iterations done.
    policy_params: policy LM params.
    value_params: critic params ({"backbone", "head"}).
    policy_opt_state: optax state of the policy.
    value_opt_state: optax state of the critic.
    rng: PRNG key.
    kl_state: adaptive/fixed KL controller state (kl_coef).
    reward_norm: RewardNormState.
    skipped_steps: i32[] optimizer updates skipped for non-finite grads.
  """

  step: jax.Array
  policy_params: PyTree
  value_params: PyTree
  policy_opt_state: PyTree
  value_opt_state: PyTree
  rng: jax.Array
  kl_state: KLControllerState
  reward_norm: RewardNormState
  skipped_steps: jax.Array
