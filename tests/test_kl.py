"""Tests for rlhf_jax.kl: estimators, shaped rewards, EOS penalty and
KL controllers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl as klm
from rlhf_jax.masked import masked_mean

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
ESTIMATORS = klm.KL_ESTIMATORS


def _case(seed=0):
  rng = np.random.default_rng(seed)
  logprobs = -rng.exponential(size=(4, 5))
  ref = logprobs + rng.normal(size=(4, 5)) * 0.5
  scores = rng.normal(size=4)
  return logprobs, ref, scores


def ref_kl(logprobs, ref, mask, estimator):
  out = np.zeros_like(logprobs)
  for b in range(logprobs.shape[0]):
    for t in range(logprobs.shape[1]):
      if not mask[b, t]:
        continue
      d = logprobs[b, t] - ref[b, t]
      out[b, t] = {
        "k1": d,
        "k2": 0.5 * d * d,
        "k3": np.exp(-d) - 1 + d,
      }[estimator]
  return out


def ref_shaped(scores, logprobs, ref, mask, kl_coef, estimator):
  kl = ref_kl(logprobs, ref, mask, estimator)
  rewards = -kl_coef * kl
  for b in range(mask.shape[0]):
    valid = [t for t in range(mask.shape[1]) if mask[b, t]]
    if valid:
      rewards[b, valid[-1]] += scores[b]
  return rewards, kl


# ---------------------------------------------------------------- hand cases
def test_r1_kl_term_sign():
  logprobs = jnp.array([-1.0, -0.5, -2.0])
  ref = jnp.array([-1.2, -0.4, -2.5])
  k3 = klm.kl_estimate(logprobs, ref, kl_estimator="k3")
  # d = [0.2, -0.1, 0.5]; k3 = e^-d - 1 + d:
  #   e^-0.2 - 0.8 = 0.018731; e^0.1 - 1.1 = 0.005171; e^-0.5 - 0.5 = 0.106531.
  np.testing.assert_allclose(k3, [0.018731, 0.005171, 0.106531], atol=1e-6)
  kl = masked_mean(k3, jnp.ones(3, bool))
  np.testing.assert_allclose(kl, 0.043477, atol=1e-6)

  def loss(logprobs, pg_loss=0.30, kl_loss_coef=0.1):
    k3 = klm.kl_estimate(logprobs, ref, kl_estimator="k3")
    return pg_loss + kl_loss_coef * masked_mean(k3, jnp.ones(3, bool))

  # 0.30 + 0.1 * 0.043477 = 0.304348 [subtracting the KL: 0.295652].
  np.testing.assert_allclose(loss(logprobs), 0.304348, atol=1e-6)
  # The loss increases with KL: moving the policy further from the reference
  # (doubling every log-ratio) raises it, and moving onto it lowers it to 0.30.
  further = ref + 2 * (logprobs - ref)
  assert float(loss(further)) > float(loss(logprobs)) > float(loss(ref))
  np.testing.assert_allclose(loss(ref), 0.30, atol=1e-7)
  assert float(jax.grad(loss, argnums=2)(logprobs, 0.3, 0.1)) > 0


def test_estimators_hand_case():
  # d = 0.5: k1 = 0.5, k2 = 0.125, k3 = e^-0.5 - 0.5 = 0.106531.
  # d = -0.5: k1 = -0.5 (k1 can be negative), k2 = 0.125,
  #   k3 = e^0.5 - 1.5 = 0.148721.
  lp, ref = jnp.array([0.0, -1.0]), jnp.array([-0.5, -0.5])
  want = {
    "k1": [0.5, -0.5],
    "k2": [0.125, 0.125],
    "k3": [0.106531, 0.148721],
  }
  for est, w in want.items():
    got = klm.kl_estimate(lp, ref, kl_estimator=est)
    np.testing.assert_allclose(got, w, atol=1e-6, err_msg=est)


def test_identity_k1_is_log_ratio_and_estimators_are_unbiased():
  lp, ref, _ = _case(1)
  k1 = klm.kl_estimate(jnp.asarray(lp), jnp.asarray(ref))
  np.testing.assert_allclose(k1, lp - ref, atol=1e-6)
  # Exact expectations over a categorical pi: E_pi[k1] = E_pi[k3] = KL(pi||q)
  # because E_pi[q/pi] = 1; k2 and k3 are >= 0 pointwise.
  rng = np.random.default_rng(2)
  p = rng.dirichlet(np.ones(6))
  q = rng.dirichlet(np.ones(6))
  true_kl = np.sum(p * np.log(p / q))
  for est in ("k1", "k3"):
    per = klm.kl_estimate(
      jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q)), kl_estimator=est
    )
    np.testing.assert_allclose(np.sum(p * np.asarray(per)), true_kl, atol=1e-6)
  for est in ("k2", "k3"):
    assert np.all(np.asarray(klm.kl_estimate(lp, ref, kl_estimator=est)) >= 0)


def test_k3_beyond_the_exact_range_is_finite_and_points_back():
  # Below d = -60 exp(-d) continues along its tangent: e^60 (1 + (-60 - d)).
  # d = 200: e^-200 - 1 + 200 (exact); d = -200: e^60 * 141 - 201.
  # [the old clip at +-20 gave e^20 - 201 there: 4.9e8, far from the KL]
  lp = jnp.array([0.0, -200.0, 0.0])
  ref = jnp.array([-200.0, 0.0, 0.0])
  k3 = klm.kl_estimate(lp, ref, kl_estimator="k3")
  np.testing.assert_allclose(
    k3, [199.0, np.exp(60.0) * 141 - 201, 0.0], rtol=1e-6
  )
  g = jax.grad(lambda x: jnp.sum(klm.kl_estimate(x, ref, kl_estimator="k3")))(
    lp
  )
  # d/dlogp: 1 - e^-200 = 1 at d = 200; 1 - e^60 at d = -200 (pushes d up).
  np.testing.assert_allclose(g, [1.0, 1 - np.exp(60.0), 0.0], rtol=1e-6)


# Log-ratios d = log pi - log pi_ref over the whole of [-50, 50], densest
# near 0; float64 analytic value and d/d(log pi) of each estimator.
D_GRID = np.concatenate([np.linspace(-50, 50, 201), [-1e-3, 1e-3, 0.0]])
ANALYTIC = {
  "k1": (lambda d: d, lambda d: np.ones_like(d)),
  "k2": (lambda d: 0.5 * d * d, lambda d: d),
  "k3": (lambda d: np.expm1(-d) + d, lambda d: -np.expm1(-d)),
}


def _check_against_float64(value, grad, estimator, d):
  want_v, want_g = (f(d) for f in ANALYTIC[estimator])
  assert np.isfinite(value).all() and np.isfinite(grad).all()
  # d64 is the f32 log-ratio itself, so only the f32 evaluation differs.
  np.testing.assert_allclose(value, want_v, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(grad, want_g, rtol=1e-5, atol=1e-7)
  # The gradient pushes log pi towards log pi_ref (k2, k3), k1's is 1.
  if estimator != "k1":
    assert (np.sign(grad) == np.sign(d)).all()


@pytest.mark.parametrize("estimator", klm.KL_ESTIMATORS)
def test_estimator_value_and_grad_match_float64_over_minus50_to_50(estimator):
  d = D_GRID.astype(np.float32)
  ref = np.full_like(d, -3.0)  # log pi_ref; log pi = ref + d
  lp = jnp.asarray(ref + d)

  def total(x):
    return jnp.sum(klm.kl_estimate(x, jnp.asarray(ref), kl_estimator=estimator))

  value = np.asarray(
    klm.kl_estimate(lp, jnp.asarray(ref), kl_estimator=estimator)
  )
  grad = np.asarray(jax.grad(total)(lp))
  d64 = (ref + d).astype(np.float64) - ref.astype(np.float64)
  _check_against_float64(value, grad, estimator, d64)


@pytest.mark.parametrize("estimator", klm.KL_ESTIMATORS)
def test_kl_loss_term_matches_float64_over_minus50_to_50(estimator):
  # The loss path: token-mean of the estimator over valid tokens; its
  # gradient per token is the estimator's derivative / n_tokens.
  d = D_GRID.astype(np.float32).reshape(2, -1)
  ref = np.full_like(d, -3.0)
  mask = np.ones(d.shape, bool)
  mask[1, -1] = False  # one masked slot: no value, no gradient
  lp = jnp.asarray(ref + d)
  n = mask.sum()

  def loss(x):
    return klm.kl_loss(x, jnp.asarray(ref), mask, kl_estimator=estimator)

  (value, stats), grad = jax.value_and_grad(loss, has_aux=True)(lp)
  d64 = ((ref + d).astype(np.float64) - ref)[mask]
  want_v, want_g = (f(d64) for f in ANALYTIC[estimator])
  np.testing.assert_allclose(float(value), want_v.mean(), rtol=1e-5)
  np.testing.assert_allclose(
    float(stats["ppo/kl_loss"].value), want_v.mean(), rtol=1e-5
  )
  grad = np.asarray(grad)
  assert grad[1, -1] == 0.0
  _check_against_float64(
    np.asarray(klm.kl_estimate(lp, jnp.asarray(ref), kl_estimator=estimator))[
      mask
    ],
    grad[mask] * n,
    estimator,
    d64,
  )


def test_kl_shaped_rewards_hand_case():
  scores = jnp.array([1.0, 2.0, 3.0, 4.0])
  lp = jnp.array([[-1.0, -1.0, -1.0, -1.0]] * 4)
  ref = jnp.array([[-1.5, -0.5, -1.0, -9.0]] * 4)
  mask = jnp.array(
    [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], bool
  )
  rewards, kl = klm.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1)
  # k1 = d = [0.5, -0.5, 0, 8]; reward = -0.1 d, plus the score at the LAST
  # valid token: row 0 -> t=2, row 1 (no padding) -> t=3, row 2 (hole) -> t=2;
  # row 3 is empty -> all 0 [score at t=T-1 regardless of the mask: row 0
  # would get 1.0 - 0.8 at a padded slot].
  np.testing.assert_allclose(
    rewards,
    [
      [-0.05, 0.05, 1.0, 0.0],
      [-0.05, 0.05, 0.0, 2.0 - 0.8],
      [-0.05, 0.0, 3.0, 0.0],
      [0.0, 0.0, 0.0, 0.0],
    ],
    atol=1e-6,
  )
  np.testing.assert_allclose(kl, np.where(mask, [0.5, -0.5, 0.0, 8.0], 0))


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_float64_loop_reference(estimator, mask_name):
  lp, ref, scores = _case(3)
  m = MASKS[mask_name]
  got = klm.kl_estimate(lp, ref, kl_estimator=estimator, mask=m)
  np.testing.assert_allclose(got, ref_kl(lp, ref, m, estimator), atol=1e-6)
  rewards, kl = klm.kl_shaped_rewards(
    scores, lp, ref, m, kl_coef=0.05, kl_estimator=estimator
  )
  want_r, want_kl = ref_shaped(scores, lp, ref, m, 0.05, estimator)
  np.testing.assert_allclose(rewards, want_r, atol=1e-6)
  np.testing.assert_allclose(kl, want_kl, atol=1e-6)


def test_jit_equals_nojit_and_traced_kl_coef_traces_once():
  lp, ref, scores = _case(4)
  m = MASKS["holes"]
  n_traces = 0

  def f(scores, lp, ref, kl_coef):
    nonlocal n_traces
    n_traces += 1
    return (
      klm.kl_shaped_rewards(
        scores, lp, ref, m, kl_coef=kl_coef, kl_estimator="k3"
      ),
      klm.kl_estimate(lp, ref, kl_estimator="k2", mask=m),
      klm.apply_missing_eos_penalty(
        scores, jnp.zeros((4, 5), jnp.int32), m, eos_token_id=2, penalty=1.0
      ),
    )

  jf = jax.jit(f)
  for coef in (0.1, 0.2, 0.3):
    got = jf(scores + coef, lp, ref, coef)
  assert n_traces == 1
  want = f(scores + 0.3, lp, ref, 0.3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("garbage", [1e9, -1e9, float("nan")])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_garbage_in_masked_slots(estimator, garbage):
  lp, ref, scores = _case(5)
  m = MASKS["empty_rows"] | MASKS["holes"]
  dirty_lp = jnp.asarray(np.where(m, lp, garbage), jnp.float32)
  dirty_ref = jnp.asarray(np.where(m, ref, -garbage), jnp.float32)
  # Empty rows' scores are never placed either.
  dirty_scores = np.where(m.any(-1), scores, garbage)

  def f(s, x, r):
    return klm.kl_shaped_rewards(
      s, x, r, m, kl_coef=0.1, kl_estimator=estimator
    )

  clean = f(scores, jnp.asarray(lp, jnp.float32), jnp.asarray(ref, jnp.float32))
  dirty = f(dirty_scores, dirty_lp, dirty_ref)
  for a, b in zip(clean, dirty, strict=True):
    np.testing.assert_array_equal(a, b)
  grads = jax.grad(lambda s, x, r: jnp.sum(f(s, x, r)[0]), argnums=(0, 1, 2))(
    jnp.asarray(dirty_scores, jnp.float32), dirty_lp, dirty_ref
  )
  for g in grads:
    assert np.all(np.isfinite(g))


def test_bf16_inputs_give_finite_f32():
  lp, ref, scores = _case(6)
  m = MASKS["tail_padding"]
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  outs = (
    *klm.kl_shaped_rewards(bf(scores), bf(lp), bf(ref), m, kl_coef=0.1),
    klm.kl_estimate(bf(lp), bf(ref), kl_estimator="k3", mask=m),
    klm.apply_missing_eos_penalty(
      bf(scores), jnp.zeros((4, 5), jnp.int32), m, eos_token_id=1, penalty=1.0
    ),
  )
  for x in outs:
    assert x.dtype == jnp.float32
    assert np.all(np.isfinite(x))


# ------------------------------------------------------------ missing EOS, R8
def test_r8_missing_eos_penalty_on_response_only():
  eos, pad = 2, 0
  prompt = jnp.array([[11, 2, 12], [11, 2, 12]])  # EOS inside the prompt
  responses = jnp.array([[5, 6, 2, pad], [7, 8, 9, 9]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)  # row 1 truncated
  scores = jnp.array([1.0, 1.5])
  out = klm.apply_missing_eos_penalty(
    scores, responses, mask, eos_token_id=eos, penalty=1.0
  )
  # Row 0 ends with EOS: 1.0; row 1 has none: 1.5 - 1.0 = 0.5.
  np.testing.assert_allclose(out, [1.0, 0.5])
  # [Searching the full sequence finds the prompt's EOS: 1.5 unpenalised.]
  full = jnp.concatenate([prompt, responses], axis=1)
  full_mask = jnp.concatenate([jnp.ones((2, 3), bool), mask], axis=1)
  bug = klm.apply_missing_eos_penalty(
    scores, full, full_mask, eos_token_id=eos, penalty=1.0
  )
  np.testing.assert_allclose(bug, [1.0, 1.5])
  # The truncated row's score goes to its last token (index 3).
  zero = jnp.zeros((2, 4))
  rewards, _ = klm.kl_shaped_rewards(out, zero, zero, mask, kl_coef=0.1)
  np.testing.assert_allclose(rewards, [[0, 0, 1.0, 0], [0, 0, 0, 0.5]])
  # An EOS id in a masked slot (pad == eos) does not count as an EOS.
  out = klm.apply_missing_eos_penalty(
    scores,
    jnp.array([[5, 6, 7, 2], [7, 8, 2, 2]]),
    jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool),
    eos_token_id=eos,
    penalty=1.0,
  )
  np.testing.assert_allclose(out, [0.0, 1.5])


def test_missing_eos_compares_narrow_ids_at_32_bits():
  """int8 ids against eos 258 wrapped to 2 and matched; a traced eos is
  taken; one no int32 holds is in no row (it was jax's OverflowError)."""
  ids = jnp.array([[2, 3], [1, 1]], jnp.int8)
  mask = jnp.ones((2, 2), bool)
  scores = jnp.array([1.0, 2.0])

  def penalised(eos):
    return klm.apply_missing_eos_penalty(
      scores, ids, mask, eos_token_id=eos, penalty=1.0
    )

  np.testing.assert_allclose(penalised(258), [0.0, 1.0])
  np.testing.assert_allclose(penalised(2), [1.0, 1.0])
  np.testing.assert_allclose(jax.jit(penalised)(2), [1.0, 1.0])
  np.testing.assert_allclose(penalised(10**12), [0.0, 1.0])
  np.testing.assert_allclose(penalised(-(10**12)), [0.0, 1.0])
  uint = klm.apply_missing_eos_penalty(
    scores,
    jnp.array([[2**32 - 1, 0], [1, 1]], jnp.uint32),
    mask,
    eos_token_id=-1,  # no uint32 id
    penalty=1.0,
  )
  np.testing.assert_allclose(uint, [0.0, 1.0])
  # An eos array (traced, or concrete) was promoted with the uint32 ids
  # to int32, where 2**32 - 1 is -1: it matched row 0.
  for eos in (jnp.int32(-1), np.int32(-1)):
    out = jax.jit(
      lambda e: klm.apply_missing_eos_penalty(
        scores,
        jnp.array([[2**32 - 1, 0], [1, 1]], jnp.uint32),
        mask,
        eos_token_id=e,
        penalty=1.0,
      )
    )(eos)
    np.testing.assert_allclose(out, [0.0, 1.0])
  big = jnp.array(2**32 - 1, jnp.uint32)  # and the other way round
  out = klm.apply_missing_eos_penalty(
    scores, jnp.array([[-1, 0], [1, 1]]), mask, eos_token_id=big, penalty=1.0
  )
  np.testing.assert_allclose(out, [0.0, 1.0])


# ------------------------------------------------------------ controllers, R11
def test_r11_adaptive_kl_controller():
  ctrl = klm.adaptive_kl_controller(0.2, target_kl=6.0, horizon=100)
  state = ctrl.init()
  assert isinstance(state, klm.KLControllerState)
  for _ in range(3):
    state = ctrl.update(state, 12.0, 10)
  # err = clip(12/6 - 1, -0.2, 0.2) = 0.2; factor 1 + 0.2 * 10/100 = 1.02;
  # 0.2 * 1.02^3 = 0.2122416 [unclipped err = 1: 0.2 * 1.1^3 = 0.2662].
  np.testing.assert_allclose(state.kl_coef, 0.2122416, rtol=1e-6)
  state = ctrl.update(state, 3.0, 10)
  # err = clip(3/6 - 1) = -0.2; 0.2122416 * 0.98 = 0.20799677.
  np.testing.assert_allclose(state.kl_coef, 0.20799677, rtol=1e-6)


def test_kl_controller_is_jit_safe_and_scannable():
  ctrl = klm.adaptive_kl_controller(0.2, target_kl=6.0, horizon=100)
  n_traces = 0

  @jax.jit
  def update(state, kl, n):
    nonlocal n_traces
    n_traces += 1
    return ctrl.update(state, kl, n)

  state = ctrl.init()
  for _ in range(3):
    state = update(state, jnp.float32(12.0), jnp.int32(10))
  assert n_traces == 1
  np.testing.assert_allclose(state.kl_coef, 0.2122416, rtol=1e-6)
  # The state is a pytree: a scan over four observations matches R11.
  final, _ = jax.lax.scan(
    lambda s, kl: (ctrl.update(s, kl, 10), None),
    ctrl.init(),
    jnp.array([12.0, 12.0, 12.0, 3.0]),
  )
  np.testing.assert_allclose(final.kl_coef, 0.20799677, rtol=1e-6)
  fixed = klm.fixed_kl_controller(0.05)
  s = fixed.update(fixed.init(), 1e6, 1000)
  np.testing.assert_allclose(s.kl_coef, 0.05)
  s = jax.jit(fixed.update)(fixed.init(), 1e6, 1000)
  np.testing.assert_allclose(s.kl_coef, 0.05)


def test_errors():
  with pytest.raises(ValueError, match="kl_estimator"):
    klm.kl_estimate(jnp.zeros(3), jnp.zeros(3), kl_estimator="k4")
  with pytest.raises(ValueError, match="shape"):
    klm.kl_estimate(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(ValueError, match="scores shape"):
    klm.kl_shaped_rewards(
      jnp.zeros(3), jnp.zeros((2, 4)), jnp.zeros((2, 4)),
      jnp.ones((2, 4), bool), kl_coef=0.1,
    )  # fmt: skip
  with pytest.raises(TypeError, match="bool"):
    klm.kl_shaped_rewards(
      jnp.zeros(2), jnp.zeros((2, 4)), jnp.zeros((2, 4)),
      jnp.ones((2, 4)), kl_coef=0.1,
    )  # fmt: skip
  with pytest.raises(ValueError, match="target_kl"):
    klm.adaptive_kl_controller(0.1, target_kl=0.0, horizon=10)
  with pytest.raises(ValueError, match="horizon"):
    klm.adaptive_kl_controller(0.1, target_kl=6.0, horizon=-1)
  with pytest.raises(ValueError, match="kl_coef"):
    klm.fixed_kl_controller(-0.1)
