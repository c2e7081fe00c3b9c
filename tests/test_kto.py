"""Tests for the KTO loss (Ethayarajh et al. 2024): rlhf_jax.preference.

kto_loss takes sequence logprob sums f32[B], labels bool[B] and the
reference point z_ref; kto_kl is the summable batch KL estimate of z_ref.
Hand values, TRL's published formula on the same numbers, masked rows with
garbage, gradients, jit parity, and micro-batch / device invariance of the
loss with a global normalizer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax
from rlhf_jax import stats as st
from rlhf_jax.preference import KTO_STAT_NAMES, kto_kl, kto_loss


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


# Four rows: implicit rewards r = logp - ref = [1, -1, 0, -1]; rows 0-1
# desirable, rows 2-3 undesirable.
LOGP = jnp.array([-3.0, -5.0, -2.0, -7.0])
REF = jnp.array([-4.0, -4.0, -2.0, -6.0])
LABELS = jnp.array([True, True, False, False])


def _trl_kto_losses(logp, ref, labels, kl, *, beta, wd, wu):
  """TRL's KTOTrainer.kto_loss, transcribed (numpy, float64):

  chosen_losses = 1 - sigmoid(beta * (chosen_logratios - kl))
  rejected_losses = 1 - sigmoid(beta * (kl - rejected_logratios))
  losses = cat(desirable_weight * chosen_losses,
               undesirable_weight * rejected_losses)
  with kl = (policy_KL_logps - reference_KL_logps).mean().clamp(min=0).
  """
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  ratios = np.asarray(logp, np.float64) - np.asarray(ref, np.float64)
  labels = np.asarray(labels, bool)
  chosen = 1 - sig(beta * (ratios[labels] - kl))
  rejected = 1 - sig(beta * (kl - ratios[~labels]))
  return np.concatenate([wd * chosen, wu * rejected])


def test_hand_value():
  # beta 0.5, z = 0.4, lambda_D 1, lambda_U 2:
  # row 0 (desirable, r 1):    1 * (1 - sig(0.5 * (1 - 0.4)))  = sig(-0.3)
  #                                                             = 0.4255575
  # row 1 (desirable, r -1):   1 * (1 - sig(0.5 * (-1 - 0.4))) = sig(0.7)
  #                                                             = 0.6681878
  # row 2 (undesirable, r 0):  2 * (1 - sig(0.5 * (0.4 - 0)))  = 2 sig(-0.2)
  #                                                             = 0.9003320
  # row 3 (undesirable, r -1): 2 * (1 - sig(0.5 * (0.4 + 1)))  = 2 sig(-0.7)
  #                                                             = 0.6636245
  # mean = 2.6577017 / 4 = 0.6644254.
  # [z with the wrong sign in the undesirable branch gives 0.7611321;
  # the two weights swapped give 0.7423672]
  loss, stats = kto_loss(
    LOGP,
    REF,
    LABELS,
    0.4,
    beta=0.5,
    desirable_weight=1.0,
    undesirable_weight=2.0,
  )
  np.testing.assert_allclose(float(loss), 0.6644254290988049, rtol=1e-6)
  v = st.values(stats)
  assert set(v) == set(KTO_STAT_NAMES)
  np.testing.assert_allclose(v["kto/loss"], 0.6644254290988049, rtol=1e-6)
  np.testing.assert_allclose(v["kto/z_ref"], 0.4, rtol=1e-6)
  # Implicit rewards beta r: chosen (0.5 - 0.5) / 2 = 0, rejected
  # (0 - 0.5) / 2 = -0.25; logps: chosen (-3 - 5) / 2, rejected (-2 - 7) / 2.
  np.testing.assert_allclose(v["rewards/chosen"], 0.0, atol=1e-7)
  np.testing.assert_allclose(v["rewards/rejected"], -0.25, rtol=1e-6)
  np.testing.assert_allclose(v["logps/chosen"], -4.0, rtol=1e-6)
  np.testing.assert_allclose(v["logps/rejected"], -4.5, rtol=1e-6)
  assert float(v["count/chosen"]) == 2.0 and float(v["count/rejected"]) == 2.0


def test_negative_reference_point_is_clamped_at_zero():
  # z_ref = -0.4 -> z = 0: rows sig(-0.5), sig(0.5), 2 sig(0), 2 sig(-0.5);
  # mean = (0.3775407 + 0.6224593 + 1 + 0.7550813) / 4 = 0.6887703.
  # [no clamp: 0.7142594]
  kw = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
  loss, stats = kto_loss(LOGP, REF, LABELS, -0.4, **kw)
  np.testing.assert_allclose(float(loss), 0.6887703343990728, rtol=1e-6)
  assert float(st.values(stats)["kto/z_ref"]) == 0.0
  loss0, _ = kto_loss(LOGP, REF, LABELS, 0.0, **kw)
  assert float(loss) == float(loss0)


def test_identical_policy_gives_half_lambda_per_row():
  logp = jnp.array([-2.0, -9.0, -1.0])
  labels = jnp.array([True, False, False])
  loss, _ = kto_loss(
    logp,
    logp,
    labels,
    0.0,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=3.0,
  )
  # (1 / 2 + 3 / 2 + 3 / 2) / 3 = 7 / 6
  np.testing.assert_allclose(float(loss), 7.0 / 6.0, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trls_formula_on_the_same_numbers(seed):
  rng = np.random.default_rng(seed)
  b = 16
  logp = rng.normal(-20, 5, b).astype(np.float32)
  ref = (logp + rng.normal(0, 2, b)).astype(np.float32)
  labels = rng.random(b) < 0.4
  kl_logp = rng.normal(-30, 5, b).astype(np.float32)
  kl_ref = (kl_logp + rng.normal(0.3, 1, b)).astype(np.float32)
  beta, wd, wu = 0.1, 1.0, 1.33
  trl_kl = max(float(np.mean(kl_logp.astype(np.float64) - kl_ref)), 0.0)
  want = _trl_kto_losses(logp, ref, labels, trl_kl, beta=beta, wd=wd, wu=wu)
  kl = kto_kl(jnp.asarray(kl_logp), jnp.asarray(kl_ref))
  np.testing.assert_allclose(
    max(float(kl.value), 0.0), trl_kl, rtol=1e-5, atol=1e-5
  )
  loss, stats = kto_loss(
    jnp.asarray(logp),
    jnp.asarray(ref),
    jnp.asarray(labels),
    kl.value,
    beta=beta,
    desirable_weight=wd,
    undesirable_weight=wu,
  )
  np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-5)
  v = st.values(stats)
  ratios = logp.astype(np.float64) - ref
  # TRL logs rewards/chosen_sum / count/chosen: the same mean.
  np.testing.assert_allclose(
    v["rewards/chosen"], beta * ratios[labels].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    v["rewards/rejected"], beta * ratios[~labels].mean(), rtol=1e-5
  )


def test_kto_kl_hand_value_and_mask():
  # log-ratios 1 - 0 = 1, -1 - 1 = -2, (masked: nan), 3 - 0 = 3:
  # mean over valid = (1 - 2 + 3) / 3 = 2 / 3. [mask ignored: nan]
  kl = kto_kl(
    jnp.array([1.0, -1.0, jnp.nan, 3.0]),
    jnp.array([0.0, 1.0, 0.0, 0.0]),
    jnp.array([True, True, False, True]),
  )
  np.testing.assert_allclose(float(kl.value), 2.0 / 3.0, rtol=1e-6)
  assert float(kl.count) == 3.0
  empty = kto_kl(jnp.ones(2), jnp.zeros(2), jnp.zeros(2, bool))
  assert float(empty.value) == 0.0


def _loss_fn(logp, ref, labels, z, mask):
  loss, stats = kto_loss(
    logp,
    ref,
    labels,
    z,
    mask,
    beta=0.3,
    desirable_weight=1.2,
    undesirable_weight=0.8,
  )
  return loss, stats


def test_garbage_in_masked_rows_changes_nothing_and_grads_stay_finite():
  rng = np.random.default_rng(3)
  logp = jnp.asarray(rng.normal(-10, 3, 6).astype(np.float32))
  ref = jnp.asarray(rng.normal(-10, 3, 6).astype(np.float32))
  labels = jnp.array([True, False, True, False, True, True])
  mask = jnp.array([True, True, False, True, False, True])
  clean_loss, clean_stats = _loss_fn(
    logp[mask], ref[mask], labels[mask], 0.2, None
  )
  for junk in (jnp.nan, 1e9, -jnp.inf):
    bad_logp = jnp.where(mask, logp, junk)
    bad_ref = jnp.where(mask, ref, junk)
    loss, stats = _loss_fn(bad_logp, bad_ref, labels, 0.2, mask)
    np.testing.assert_allclose(float(loss), float(clean_loss), rtol=1e-6)
    for k, v in st.values(stats).items():
      np.testing.assert_allclose(v, st.values(clean_stats)[k], rtol=1e-6)
    grads = jax.grad(lambda x, r: _loss_fn(x, r, labels, 0.2, mask)[0])(
      bad_logp, bad_ref
    )
    assert np.all(np.isfinite(grads))
    assert np.all(np.asarray(grads)[~np.asarray(mask)] == 0.0)


def test_gradients_hand_value_and_no_gradient_into_reference_or_z():
  # Desirable row: d/dr [1 - sig(beta (r - z))] = -beta sig(u) sig(-u),
  # u = beta (r - z); undesirable row: +beta sig(u') sig(-u'),
  # u' = beta (z - r). With beta 0.5, z 0.4, B = 4 rows, weights 1 and 2.
  z = 0.4

  def f(logp, ref, zz):
    return kto_loss(
      logp,
      ref,
      LABELS,
      zz,
      beta=0.5,
      desirable_weight=1.0,
      undesirable_weight=2.0,
    )[0]

  g_logp, g_ref, g_z = jax.grad(f, argnums=(0, 1, 2))(LOGP, REF, z)
  r = np.asarray(LOGP - REF, np.float64)
  want = []
  for i, ri in enumerate(r):
    if bool(LABELS[i]):
      u = 0.5 * (ri - z)
      want.append(-0.5 * _sigmoid(u) * _sigmoid(-u) / 4)
    else:
      u = 0.5 * (z - ri)
      want.append(2 * 0.5 * _sigmoid(u) * _sigmoid(-u) / 4)
  np.testing.assert_allclose(g_logp, want, rtol=1e-5)
  assert np.all(np.asarray(g_ref) == 0.0)
  assert float(g_z) == 0.0


def test_jit_parity_and_bf16_inputs():
  kw = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
  eager, s1 = kto_loss(LOGP, REF, LABELS, 0.4, **kw)
  jitted, s2 = jax.jit(lambda a, b, c, z: kto_loss(a, b, c, z, **kw))(
    LOGP, REF, LABELS, 0.4
  )
  assert float(eager) == float(jitted)
  for k in s1:
    np.testing.assert_array_equal(st.values(s1)[k], st.values(s2)[k])
  loss, stats = kto_loss(
    LOGP.astype(jnp.bfloat16), REF.astype(jnp.bfloat16), LABELS, 0.4, **kw
  )
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(np.isfinite(v) for v in st.values(stats).values())


def test_float_labels_and_extreme_magnitudes():
  kw = dict(beta=1.0, desirable_weight=1.0, undesirable_weight=1.0)
  a, _ = kto_loss(LOGP, REF, LABELS.astype(jnp.float32), 0.1, **kw)
  b, _ = kto_loss(LOGP, REF, LABELS, 0.1, **kw)
  assert float(a) == float(b)
  big = jnp.array([1e30, -1e30, 1e4, -1e4])
  loss, grads = jax.value_and_grad(
    lambda x: kto_loss(x, jnp.zeros(4), LABELS, 0.0, **kw)[0]
  )(big)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(grads))


def test_micro_batches_with_a_global_normalizer_sum_to_the_batch_loss():
  rng = np.random.default_rng(7)
  b = 12
  logp = jnp.asarray(rng.normal(-8, 2, b).astype(np.float32))
  ref = jnp.asarray(rng.normal(-8, 2, b).astype(np.float32))
  labels = jnp.asarray(rng.random(b) < 0.5)
  mask = jnp.asarray(rng.random(b) < 0.8)
  whole, whole_stats = _loss_fn(logp, ref, labels, 0.3, mask)
  n = jnp.sum(mask)
  total, merged = 0.0, None
  for part in np.split(np.arange(b), 3):
    loss, stats = kto_loss(
      logp[part],
      ref[part],
      labels[part],
      0.3,
      mask[part],
      beta=0.3,
      desirable_weight=1.2,
      undesirable_weight=0.8,
      normalizer=n,
    )
    total = total + loss
    merged = stats if merged is None else st.merge(merged, stats)
  np.testing.assert_allclose(float(total), float(whole), rtol=1e-6)
  for k, v in st.values(merged).items():
    np.testing.assert_allclose(v, st.values(whole_stats)[k], rtol=1e-6)


def test_axis_name_gives_the_global_loss_and_kl():
  # vmap with an axis name runs the collectives like pmap over 4 shards.
  rng = np.random.default_rng(11)
  b = 16
  logp = jnp.asarray(rng.normal(-8, 2, b).astype(np.float32))
  ref = jnp.asarray(rng.normal(-8, 2, b).astype(np.float32))
  labels = jnp.asarray(rng.random(b) < 0.5)
  mask = jnp.asarray(rng.random(b) < 0.8)
  whole, whole_stats = _loss_fn(logp, ref, labels, 0.3, mask)
  whole_kl = kto_kl(logp, ref, mask)

  def shard(a, r, lab, m):
    loss, stats = kto_loss(
      a,
      r,
      lab,
      0.3,
      m,
      beta=0.3,
      desirable_weight=1.2,
      undesirable_weight=0.8,
      axis_name="d",
    )
    return loss, st.values(stats), kto_kl(a, r, m, axis_name="d").value

  split = lambda x: x.reshape(4, b // 4)
  loss, values, kl = jax.vmap(shard, axis_name="d")(
    split(logp), split(ref), split(labels), split(mask)
  )
  np.testing.assert_allclose(loss, float(whole), rtol=1e-6)
  np.testing.assert_allclose(kl, float(whole_kl.value), rtol=1e-6)
  for k, v in values.items():
    np.testing.assert_allclose(v, st.values(whole_stats)[k], rtol=1e-6)


def test_bad_arguments_raise():
  kw = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
  with pytest.raises(ValueError, match="beta"):
    kto_loss(LOGP, REF, LABELS, 0.0, **{**kw, "beta": 0.0})
  with pytest.raises(ValueError, match="undesirable_weight"):
    kto_loss(LOGP, REF, LABELS, 0.0, **{**kw, "undesirable_weight": -1.0})
  with pytest.raises(ValueError, match="z_ref"):
    kto_loss(LOGP, REF, LABELS, jnp.zeros(4), **kw)
  with pytest.raises(ValueError, match="shapes"):
    kto_loss(LOGP, REF[:3], LABELS, 0.0, **kw)
  with pytest.raises(ValueError, match="shapes"):
    kto_kl(LOGP, REF, jnp.ones(3, bool))


def test_exported_at_the_top_level():
  assert rlhf_jax.kto_loss is kto_loss and rlhf_jax.kto_kl is kto_kl
