"""Issue 2 acceptance item 1: the seed's numbers, computed by the library.

Seed: ../shared/seed/000_6faa29d97fa8914b.txt (worked examples 1 and 3 and
the easy and hard practice problems).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ppo import ppo_policy_loss
from rlhf_jax.preference import bradley_terry_loss


def test_seed_bradley_terry_probability_and_loss():
  # Delta = 1.0 - 1.5 = -0.5; P = sigma(-0.5) = 1 / (1 + e^0.5)
  # = 1 / 2.648721 = 0.377541; L = -ln 0.377541 = 0.974077.
  # [A sign bug (sigma(r- - r+)) gives P 0.6225 and L 0.4741.]
  chosen, rejected = jnp.array([1.0]), jnp.array([1.5])
  loss, stats = bradley_terry_loss(chosen, rejected)
  prob = jnp.exp(-loss)  # the loss is -log P for one pair
  assert round(float(prob), 4) == 0.3775
  assert round(float(loss), 4) == 0.9741
  np.testing.assert_allclose(float(loss), 0.974077, atol=1e-6)
  assert float(stats["rm/accuracy"].value) == 0.0  # r+ < r-: the pair is wrong


@pytest.mark.parametrize("delta", [-3.0, -0.5, 0.0, 0.5, 4.0])
def test_seed_bradley_terry_gradient_is_sigmoid_minus_one(delta):
  # Worked example 1, step 4: dL/dDelta = sigma(Delta) - 1; step 5:
  # dL/dr+ = sigma(Delta) - 1 and dL/dr- = 1 - sigma(Delta).
  # At Delta = -0.5: sigma = 0.377541, so dL/dr+ = -0.622459 (push r+ up).
  loss_of_delta = lambda d: bradley_terry_loss(d[None], jnp.zeros(1))[0]
  g = jax.grad(loss_of_delta)(jnp.float32(delta))
  expected = 1.0 / (1.0 + np.exp(-delta)) - 1.0
  np.testing.assert_allclose(float(g), expected, atol=1e-6)

  chosen, rejected = jnp.array([1.0 + delta]), jnp.array([1.0])
  g_c, g_r = jax.grad(lambda c, r: bradley_terry_loss(c, r)[0], argnums=(0, 1))(
    chosen, rejected
  )
  np.testing.assert_allclose(float(g_c[0]), expected, atol=1e-6)
  np.testing.assert_allclose(float(g_r[0]), -expected, atol=1e-6)


def _objective_of_ratio(ratio, old_prob, advantage, eps=0.2):
  """PPO objective (= -loss) of one token as a function of the ratio."""
  old = jnp.log(jnp.array([[old_prob]], jnp.float32))
  logp = old + jnp.log(ratio)[None, None]
  loss, _ = ppo_policy_loss(
    logp,
    old,
    jnp.array([[advantage]], jnp.float32),
    jnp.ones((1, 1), bool),
    cliprange=eps,
  )
  return -loss


def test_seed_ppo_positive_advantage_is_clipped():
  # Worked example 3: ratio 0.06 / 0.02 = 3, A = +4, eps 0.2.
  # unclipped 3 * 4 = 12; clipped clip(3, 0.8, 1.2) * 4 = 4.8; min = 4.8.
  # The clipped term is a constant in the ratio: gradient exactly 0.
  # [Without the min (or with max): 12, gradient 4.]
  old = jnp.log(jnp.array([[0.02]]))
  new = jnp.log(jnp.array([[0.06]]))
  loss, stats = ppo_policy_loss(
    new, old, jnp.array([[4.0]]), jnp.ones((1, 1), bool), cliprange=0.2
  )
  np.testing.assert_allclose(-float(loss), 4.8, atol=1e-5)
  assert float(stats["ppo/clipfrac"].value) == 1.0
  np.testing.assert_allclose(
    float(stats["ppo/ratio_max"].value), 3.0, rtol=1e-5
  )
  g = jax.grad(_objective_of_ratio)(jnp.float32(3.0), 0.02, 4.0)
  assert float(g) == 0.0


def test_seed_ppo_negative_advantage_ratio_above_range_is_not_clipped():
  # Hard practice problem: ratio 0.13 / 0.10 = 1.3, A = -3, eps 0.2.
  # unclipped 1.3 * -3 = -3.9; clipped clip(1.3, 0.8, 1.2) * -3 = -3.6.
  # PPO (Schulman et al. 2017, eq. 7) takes min(-3.9, -3.6) = -3.9 for
  # either sign of A: the pessimistic bound. The seed's answer, -3.6, is the
  # max (the optimistic bound); it would also zero the gradient.
  # The unclipped term keeps its gradient: d(rho * A)/d rho = A = -3.
  old = jnp.log(jnp.array([[0.10]]))
  new = jnp.log(jnp.array([[0.13]]))
  loss, stats = ppo_policy_loss(
    new, old, jnp.array([[-3.0]]), jnp.ones((1, 1), bool), cliprange=0.2
  )
  objective = -float(loss)
  np.testing.assert_allclose(objective, -3.9, atol=1e-5)
  assert abs(objective - (-3.6)) > 0.29  # NOT the seed's optimistic -3.6
  assert float(stats["ppo/clipfrac"].value) == 0.0
  g = jax.grad(_objective_of_ratio)(jnp.float32(1.3), 0.10, -3.0)
  np.testing.assert_allclose(float(g), -3.0, rtol=1e-6)


def test_seed_ppo_gradient_exactly_zero_where_clipped():
  # Four tokens, eps 0.2, one per case of (sign A, side of the range):
  #   rho 3.0, A +4: clipped (4.8 < 12)            -> gradient 0
  #   rho 1.3, A -3: NOT clipped (-3.9 < -3.6)     -> d obj/d logp = rho A
  #   rho 0.5, A -2: clipped (0.8 * -2 = -1.6 < -1) -> gradient 0
  #   rho 0.5, A +2: NOT clipped (1.0 < 1.6)        -> rho A = 1.0
  # token-mean loss: d loss/d logp_t = -rho_t A_t / 4.
  ratio = jnp.array([[3.0, 1.3, 0.5, 0.5]])
  adv = jnp.array([[4.0, -3.0, -2.0, 2.0]])
  old = jnp.log(jnp.array([[0.02, 0.10, 0.4, 0.4]]))
  mask = jnp.ones((1, 4), bool)

  def loss_fn(logp):
    return ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)[0]

  logp = old + jnp.log(ratio)
  g = np.asarray(jax.grad(loss_fn)(logp))[0]
  assert g[0] == 0.0 and g[2] == 0.0  # exactly zero, not merely small
  np.testing.assert_allclose(g[1], -(1.3 * -3.0) / 4, rtol=1e-5)
  np.testing.assert_allclose(g[3], -(0.5 * 2.0) / 4, rtol=1e-5)
  _, stats = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
  assert float(stats["ppo/clipfrac"].value) == 0.5
