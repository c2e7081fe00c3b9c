"""Tests for rlhf_jax.advantages: GAE, discounted returns, RLOO, GRPO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import advantages as adv

MASKS = {
  "no_padding": np.ones((4, 5), bool),
  "tail_padding": np.array(
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool
  ),
  "holes": np.array(
    [[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 1]], bool
  ),
  "empty_rows": np.array(
    [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool
  ),
}


def _case(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(4, 5)), rng.normal(size=(4, 5))


def ref_gae(rewards, values, mask, gamma, lam):
  """float64 loop over the valid positions only (holes skipped)."""
  advs = np.zeros_like(rewards)
  rets = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    valid = [t for t in range(rewards.shape[1]) if mask[b, t]]
    next_value, next_adv = 0.0, 0.0
    for t in reversed(valid):
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_value = values[b, t]
      advs[b, t] = next_adv
      rets[b, t] = next_adv + values[b, t]
  return advs, rets


def ref_returns(rewards, mask, gamma):
  out = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    g = 0.0
    for t in reversed(range(rewards.shape[1])):
      if mask[b, t]:
        g = rewards[b, t] + gamma * g
        out[b, t] = g
  return out


def ref_rloo(scores, g):
  out = np.zeros_like(scores)
  for i in range(len(scores)):
    group = range(i // g * g, i // g * g + g)
    others = [scores[j] for j in group if j != i]
    out[i] = scores[i] - sum(others) / len(others)
  return out


def ref_grpo(scores, g, normalize_std=True, eps=1e-6):
  out = np.zeros_like(scores)
  for i in range(len(scores)):
    grp = scores[i // g * g : i // g * g + g]
    a = scores[i] - grp.mean()
    out[i] = a / (grp.std(ddof=1) + eps) if normalize_std else a
  return out


# ---------------------------------------------------------------- hand cases
@pytest.mark.parametrize("pad_value", [50.0, 1e9, -1e9, float("nan")])
def test_r3_gae_ignores_values_at_padding(pad_value):
  rewards = jnp.array([[0.0, 0.0, 1.0, pad_value]])
  values = jnp.array([[0.5, 0.4, 0.8, pad_value]])
  mask = jnp.array([[1, 1, 1, 0]], bool)
  a, r = adv.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
  # t=2: delta = 1 + 0 (episode ends) - 0.8 = 0.2; A = 0.2.
  # t=1: delta = 0 + 0.8 - 0.4 = 0.4; A = 0.4 + 0.95 * 0.2 = 0.59.
  # t=0: delta = 0 + 0.4 - 0.5 = -0.1; A = -0.1 + 0.95 * 0.59 = 0.4605.
  # [Bootstrapping from the padded value 50: A = 2.71675, 2.965, 2.7 ...]
  np.testing.assert_allclose(a, [[0.4605, 0.59, 0.2, 0.0]], atol=1e-6)
  np.testing.assert_allclose(r, [[0.9605, 0.99, 1.0, 0.0]], atol=1e-6)
  g = jax.grad(
    lambda v: jnp.sum(
      adv.gae_advantages(rewards, v, mask, gamma=1.0, lam=0.95)[0]
    )
  )(values)
  assert np.all(np.isfinite(g))
  assert float(g[0, 3]) == 0.0


def test_gae_hole_is_transparent():
  x = 123.0  # never read
  rewards = jnp.array([[1.0, x, 2.0]])
  values = jnp.array([[0.5, x, 1.0]])
  mask = jnp.array([[1, 0, 1]], bool)
  a, r = adv.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
  # t=2: delta = 2 - 1.0 = 1.0; A = 1.0.
  # t=0 (next valid is t=2): delta = 1 + 0.9 * 1.0 - 0.5 = 1.4;
  #   A = 1.4 + 0.72 * 1.0 = 2.12; return 2.62.
  # [Treating the hole as a step with r = v = 0: A_0 = 1.6664.]
  np.testing.assert_allclose(a, [[2.12, 0.0, 1.0]], atol=1e-6)
  np.testing.assert_allclose(r, [[2.62, 0.0, 2.0]], atol=1e-6)


def test_discounted_returns_hand_case():
  rewards = jnp.array([[1.0, 0.0, 2.0, 7.0], [3.0, 9.0, 4.0, 9.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 1, 0]], bool)
  # Row 0: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5.
  # Row 1 (hole at 1): G2 = 4, G0 = 3 + 0.5 * 4 = 5 [reading the hole: 7.5].
  np.testing.assert_allclose(
    adv.discounted_returns(rewards, mask, gamma=0.5),
    [[1.5, 1.0, 2.0, 0.0], [5.0, 0.0, 4.0, 0.0]],
  )
  # gamma = 2 returned growing sums, NaN all NaN (gae_advantages refused).
  for gamma in (2.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
      adv.discounted_returns(rewards, mask, gamma=gamma)


def test_rloo_and_grpo_hand_cases():
  s = jnp.array([1.0, 2.0, 3.0, 6.0])
  # G = 2: groups [1, 2], [3, 6]: 1 - 2, 2 - 1, 3 - 6, 6 - 3.
  np.testing.assert_allclose(
    adv.rloo_advantages(s, group_size=2), [-1.0, 1.0, -3.0, 3.0]
  )
  # G = 4: 1 - (2 + 3 + 6) / 3 = -2.666667, 2 - 10/3, 3 - 3, 6 - 2.
  # [Including the sample itself in the baseline (mean 3): -2, -1, 0, 3.]
  np.testing.assert_allclose(
    adv.rloo_advantages(s, group_size=4),
    [-8 / 3, -4 / 3, 0.0, 4.0],
    rtol=1e-6,
  )
  # GRPO, G = 4: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = 2.160247:
  # [-0.925820, -0.462910, 0, 1.388730].
  np.testing.assert_allclose(
    adv.grpo_advantages(s, group_size=4, eps=0.0),
    [-0.925820, -0.462910, 0.0, 1.388730],
    atol=1e-6,
  )
  # Biased std sqrt(14 / 4) = 1.870829: -2 / 1.870829 = -1.069045.
  np.testing.assert_allclose(
    adv.grpo_advantages(s, group_size=4, unbiased=False, eps=0.0)[0],
    -1.069045,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    adv.grpo_advantages(s, group_size=4, normalize_std=False),
    [-2.0, -1.0, 0.0, 3.0],
  )
  # Identical scores: advantages 0 and finite gradients.
  same = jnp.ones(4)
  np.testing.assert_array_equal(adv.grpo_advantages(same, group_size=2), 0.0)
  g = jax.grad(lambda s: jnp.sum(adv.grpo_advantages(s, group_size=2) ** 2))(
    same
  )
  assert np.all(np.isfinite(g))


# ------------------------------------------------------- reference and parity
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_gae_and_returns_match_loop_reference(mask_name):
  rewards, values = _case(1)
  m = MASKS[mask_name]
  a, r = adv.gae_advantages(rewards, values, m, gamma=0.95, lam=0.9)
  want_a, want_r = ref_gae(rewards, values, m, 0.95, 0.9)
  np.testing.assert_allclose(a, want_a, atol=1e-6)
  np.testing.assert_allclose(r, want_r, atol=1e-6)
  np.testing.assert_allclose(
    adv.discounted_returns(rewards, m, gamma=0.9),
    ref_returns(rewards, m, 0.9),
    atol=1e-6,
  )


@pytest.mark.parametrize("group_size", [2, 3, 6])
def test_group_advantages_match_loop_reference(group_size):
  s = np.random.default_rng(group_size).normal(size=12)
  np.testing.assert_allclose(
    adv.rloo_advantages(s, group_size=group_size),
    ref_rloo(s, group_size),
    atol=1e-6,
  )
  for normalize_std in (True, False):
    np.testing.assert_allclose(
      adv.grpo_advantages(
        s, group_size=group_size, normalize_std=normalize_std
      ),
      ref_grpo(s, group_size, normalize_std),
      atol=1e-6,
    )
  # Identities: RLOO = G/(G-1) (s - group mean); both sum to 0 per group.
  grp = s.reshape(-1, group_size)
  np.testing.assert_allclose(
    adv.rloo_advantages(s, group_size=group_size),
    (
      group_size / (group_size - 1) * (grp - grp.mean(1, keepdims=True))
    ).ravel(),
    atol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(adv.grpo_advantages(s, group_size=group_size))
    .reshape(-1, group_size)
    .sum(1),
    0.0,
    atol=1e-5,
  )


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_identity_gae_gamma_lam_one_is_reward_to_go_minus_values(mask_name):
  rewards, values = _case(2)
  m = MASKS[mask_name]
  a, r = adv.gae_advantages(rewards, values, m, gamma=1.0, lam=1.0)
  rtg = adv.discounted_returns(rewards, m, gamma=1.0)
  np.testing.assert_allclose(a, np.where(m, rtg - values, 0), atol=1e-5)
  np.testing.assert_allclose(r, rtg, atol=1e-5)
  # lam = 1 with any gamma: A = discounted return - V (Monte Carlo).
  a, _ = adv.gae_advantages(rewards, values, m, gamma=0.9, lam=1.0)
  rtg = adv.discounted_returns(rewards, m, gamma=0.9)
  np.testing.assert_allclose(a, np.where(m, rtg - values, 0), atol=1e-5)


def test_jit_equals_nojit_and_traces_once():
  n_traces = 0

  def f(rewards, values, m, gamma, lam, scores):
    nonlocal n_traces
    n_traces += 1
    return (
      adv.gae_advantages(rewards, values, m, gamma=gamma, lam=lam),
      adv.discounted_returns(rewards, m, gamma=gamma),
      adv.rloo_advantages(scores, group_size=2),
      adv.grpo_advantages(scores, group_size=2),
    )

  jf = jax.jit(f)
  for seed, name in enumerate(("holes", "tail_padding", "empty_rows")):
    rewards, values = _case(seed)
    args = (rewards, values, MASKS[name], 0.9 + seed / 100, 0.95, values[0, :4])
    got = jf(*args)
  assert n_traces == 1
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(f(*args)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("garbage", [1e9, -1e9, float("nan")])
def test_garbage_in_masked_slots(garbage):
  rewards, values = _case(3)
  m = MASKS["empty_rows"] | MASKS["holes"]
  dirty_r = jnp.asarray(np.where(m, rewards, garbage), jnp.float32)
  dirty_v = jnp.asarray(np.where(m, values, garbage), jnp.float32)

  def f(r, v):
    return (
      adv.gae_advantages(r, v, m, gamma=0.99, lam=0.95),
      adv.discounted_returns(r, m, gamma=0.99),
    )

  clean = f(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32))
  dirty = f(dirty_r, dirty_v)
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty), strict=True):
    np.testing.assert_array_equal(a, b)
  grads = jax.grad(
    lambda r, v: sum(jnp.sum(x) for x in jax.tree.leaves(f(r, v))), (0, 1)
  )(dirty_r, dirty_v)
  for g in grads:
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~m], 0.0)


def test_bf16_inputs_give_finite_f32():
  rewards, values = _case(4)
  m = MASKS["tail_padding"]
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  outs = (
    *adv.gae_advantages(bf(rewards), bf(values), m, gamma=0.99, lam=0.95),
    adv.discounted_returns(bf(rewards), m, gamma=0.99),
    adv.rloo_advantages(bf(values[0, :4]), group_size=2),
    adv.grpo_advantages(bf(values[0, :4]), group_size=2),
  )
  for x in outs:
    assert x.dtype == jnp.float32
    assert np.all(np.isfinite(x))


def test_errors():
  with pytest.raises(ValueError, match="multiple of group_size"):
    adv.rloo_advantages(jnp.zeros(5), group_size=2)
  with pytest.raises(ValueError, match="group_size must be"):
    adv.rloo_advantages(jnp.zeros(4), group_size=1)
  # A bool was taken as 1 (all-zero advantages); NumPy's ints refused.
  with pytest.raises(ValueError, match="group_size must be"):
    adv.grpo_advantages(jnp.zeros(4), group_size=True)
  np.testing.assert_allclose(
    adv.grpo_advantages(jnp.array([1.0, 3.0]), group_size=np.int64(2)),
    adv.grpo_advantages(jnp.array([1.0, 3.0]), group_size=2),
  )
  with pytest.raises(ValueError, match="multiple of group_size"):
    adv.grpo_advantages(jnp.zeros(6), group_size=4)
  with pytest.raises(ValueError, match=r"scores must be \[B\]"):
    adv.grpo_advantages(jnp.zeros((2, 2)), group_size=2)
  with pytest.raises(ValueError, match="values shape"):
    adv.gae_advantages(
      jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3), bool),
      gamma=1.0, lam=1.0,
    )  # fmt: skip
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    adv.discounted_returns(jnp.zeros(3), jnp.ones(3, bool), gamma=1.0)
  with pytest.raises(ValueError, match="response_mask shape"):
    adv.discounted_returns(jnp.zeros((2, 3)), jnp.ones((2, 2), bool), gamma=1.0)
