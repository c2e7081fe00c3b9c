"""gae_advantages vs rlax.truncated_generalized_advantage_estimation.

Convention mapping. rlax (Sutton & Barto indexing) takes, per trajectory,
r_t and discount_t at times [1, k] and values v at times [0, k], and returns
A_t = delta_t + discount_t lambda A_{t+1} with
delta_t = r_t + discount_t v_{t+1} - v_t. Ours is response-aligned:
rewards[t] is credited for emitting y_t, values[t] = V(s_t) before y_t, and
the episode ends after the last valid token. So, for a row with n valid tokens:
  r_t        <- rewards[:n]
  values     <- concat(values[:n], [0])   (no bootstrap: the episode ends)
  discount_t <- gamma for every step      (the final discount multiplies the
                                           zero bootstrap, so gamma or 0 there
                                           give the same result)
  lambda_    <- lam
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rlhf_jax.advantages import gae_advantages


def _rlax_gae(rewards, values, gamma, lam):
  bootstrap = jnp.concatenate([values, jnp.zeros((1,), values.dtype)])
  discount = jnp.full_like(rewards, gamma)
  return rlax.truncated_generalized_advantage_estimation(
    rewards, discount, lam, bootstrap
  )


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae_matches_rlax_on_unpadded_rows(gamma, lam):
  rng = np.random.default_rng(0)
  rewards = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  mask = jnp.ones((3, 6), bool)
  got, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
  want = jax.vmap(_rlax_gae, in_axes=(0, 0, None, None))(
    rewards, values, gamma, lam
  )
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(returns, want + values, atol=1e-6)


def test_gae_matches_rlax_on_valid_prefix_of_padded_rows():
  # A tail-padded row equals rlax run on its valid prefix only.
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(3, 6)).astype(np.float32)
  values = rng.normal(size=(3, 6)).astype(np.float32)
  lengths = [6, 4, 1]
  mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
  got, _ = gae_advantages(
    np.where(mask, rewards, np.nan),
    np.where(mask, values, 1e9),
    mask,
    gamma=0.97,
    lam=0.92,
  )
  for b, n in enumerate(lengths):
    want = _rlax_gae(
      jnp.asarray(rewards[b, :n]), jnp.asarray(values[b, :n]), 0.97, 0.92
    )
    np.testing.assert_allclose(got[b, :n], want, atol=1e-6)
    np.testing.assert_array_equal(got[b, n:], 0.0)
