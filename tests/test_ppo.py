"""Tests for rlhf_jax.ppo: clipped policy and value losses, entropy, stats."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from rlhf_jax import stats as st
from rlhf_jax.ppo import (
  entropy_bonus,
  explained_variance,
  ppo_policy_loss,
  ppo_value_loss,
)

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
B, T = 5, 6


def _masks() -> dict[str, np.ndarray]:
  """The four padding patterns every op is checked on."""
  t = np.arange(T)
  holes = np.random.default_rng(7).random((B, T)) < 0.6
  holes[:, 0] = True
  empty = t[None, :] < np.array([6, 0, 4, 0, 1])[:, None]
  return {
    "no_padding": np.ones((B, T), bool),
    "tail_padding": t[None, :] < np.array([6, 3, 1, 5, 2])[:, None],
    "holes": holes,
    "all_masked_rows": empty,
  }


MASKS = _masks()


def _agg_ref(per_token, mask, mode):
  """float64 loop reference for aggregate_loss."""
  if mode == "token-mean":
    num = sum(per_token[b][t] for b in range(B) for t in range(T) if mask[b, t])
    den = sum(1 for b in range(B) for t in range(T) if mask[b, t])
    return num / den if den else 0.0
  rows = []
  for b in range(B):
    vals = [per_token[b][t] for t in range(T) if mask[b, t]]
    if vals:
      rows.append(sum(vals) / len(vals) if mode.endswith("mean") else sum(vals))
  return sum(rows) / len(rows) if rows else 0.0


def _mean_ref(x, mask):
  vals = [x[b][t] for b in range(B) for t in range(T) if mask[b, t]]
  return sum(vals) / len(vals) if vals else 0.0


def _policy_ref(lp, olp, adv, mask, low, high, dual, mode):
  per = [[0.0] * T for _ in range(B)]
  ratio = [[0.0] * T for _ in range(B)]
  clip, dual_on = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      r = math.exp(float(lp[b, t]) - float(olp[b, t]))
      a = float(adv[b, t])
      u, c = r * a, min(max(r, 1 - low), 1 + high) * a
      o = min(u, c)
      clip[b][t] = float(c < u)
      if dual is not None and a < 0 and dual * a > o:
        o, dual_on[b][t] = dual * a, 1.0
      per[b][t], ratio[b][t] = -o, r
  logr = [[math.log(r) if r else 0.0 for r in row] for row in ratio]
  stats = {
    "ppo/clipfrac": _mean_ref(clip, mask),
    "ppo/dual_clipfrac": _mean_ref(dual_on, mask),
    "ppo/approx_kl": -_mean_ref(logr, mask),
    "ppo/approx_kl_k3": _mean_ref(
      [
        [r - 1 - lr if r else 0.0 for r, lr in zip(*rw, strict=True)]
        for rw in zip(ratio, logr, strict=True)
      ],
      mask,
    ),
    "ppo/ratio_mean": _mean_ref(ratio, mask),
    "ppo/ratio_max": max(
      [ratio[b][t] for b in range(B) for t in range(T) if mask[b, t]],
      default=0.0,
    ),
    "ppo/ratio_dev_max": max(
      [abs(ratio[b][t] - 1) for b in range(B) for t in range(T) if mask[b, t]],
      default=0.0,
    ),
    "ppo/policy_loss": _agg_ref(per, mask, mode),
  }
  return _agg_ref(per, mask, mode), stats


def _value_ref(v, ov, ret, mask, c, mode):
  per = [[0.0] * T for _ in range(B)]
  err = [[0.0] * T for _ in range(B)]
  clip = [[0.0] * T for _ in range(B)]
  for b in range(B):
    for t in range(T):
      if mask[b, t]:
        vb, ob, rb = float(v[b, t]), float(ov[b, t]), float(ret[b, t])
        vc = ob + min(max(vb - ob, -c), c)
        e1, e2 = (vb - rb) ** 2, (vc - rb) ** 2
        clipped = e2 > e1 and abs(vb - ob) > c
        per[b][t], err[b][t], clip[b][t] = 0.5 * max(e1, e2), e1, float(clipped)
  valid = np.asarray(mask, bool)
  r64, v64 = (
    np.asarray(ret, np.float64)[valid],
    np.asarray(v, np.float64)[valid],
  )
  ev = 1 - (r64 - v64).var() / r64.var() if valid.sum() > 1 else 0.0
  stats = {
    "val/clipfrac": _mean_ref(clip, mask),
    "val/error": _mean_ref(err, mask),
    "val/loss": _agg_ref(per, mask, mode),
    "val/vpred": float(v64.mean()) if valid.any() else 0.0,
    "val/explained_variance": ev,
  }
  return _agg_ref(per, mask, mode), stats


def _data(seed, mask, dtype=np.float32):
  rng = np.random.default_rng(seed)
  olp = -np.abs(rng.normal(size=(B, T))) - 0.1
  lp = olp + rng.normal(size=(B, T)) * 0.6  # ratios ~ 0.3 .. 3
  adv = rng.normal(size=(B, T)) * 2
  ov = rng.normal(size=(B, T))
  v = ov + rng.normal(size=(B, T)) * 0.3
  ret = rng.normal(size=(B, T))
  ent = np.abs(rng.normal(size=(B, T))) * 3
  out = dict(lp=lp, olp=olp, adv=adv, v=v, ov=ov, ret=ret, ent=ent)
  return {k: x.astype(dtype) for k, x in out.items()} | {"mask": mask}


CONFIGS = {
  "symmetric": dict(cliprange=0.2),
  "asym_dual": dict(
    cliprange=0.2, cliprange_low=0.2, cliprange_high=0.28, dual_clip=1.5
  ),
}


def _policy(d, cfg, mode="token-mean", **kw):
  return ppo_policy_loss(
    d["lp"], d["olp"], d["adv"], d["mask"], loss_agg_mode=mode, **cfg, **kw
  )


def _value(d, mode="token-mean", **kw):
  return ppo_value_loss(
    d["v"],
    d["ov"],
    d["ret"],
    d["mask"],
    cliprange_value=0.2,
    loss_agg_mode=mode,
    **kw,
  )


# ---------------------------------------------------------------------------
# Hand-checkable cases.


def test_policy_loss_agg_modes_hand_values():
  # ratio 1 everywhere (logp == old) so obj = A and loss = -agg(A).
  # A = [[1, 2, 3], [4, S, S]], mask [[1, 1, 1], [1, 0, 0]]:
  # token-mean -(1+2+3+4)/4 = -2.5; seq-mean-token-mean -(2 + 4)/2 = -3.0;
  # seq-mean-token-sum -(6 + 4)/2 = -5.0. [mean over all 6 slots with
  # padding as 0: -10/6 = -1.666667]
  adv = jnp.array([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
  mask = jnp.array([[True, True, True], [True, False, False]])
  lp = jnp.full((2, 3), -1.0)
  expected = {
    "token-mean": -2.5,
    "seq-mean-token-mean": -3.0,
    "seq-mean-token-sum": -5.0,
  }
  for mode, want in expected.items():
    loss, _ = ppo_policy_loss(
      lp, lp, adv, mask, cliprange=0.2, loss_agg_mode=mode
    )
    np.testing.assert_allclose(float(loss), want, atol=1e-6)


def _one_token(ratio, adv, **cfg):
  old = jnp.log(jnp.array([[0.1]]))
  f = lambda r: (
    -ppo_policy_loss(
      old + jnp.log(r)[None, None],
      old,
      jnp.array([[adv]]),
      jnp.ones((1, 1), bool),
      **cfg,
    )[0]
  )
  r = jnp.float32(ratio)
  return float(f(r)), float(jax.grad(f)(r))


def test_policy_loss_dual_clip_hand_value():
  # rho 4, A -1, eps 0.2, c 3: min(-4, -1.2) = -4; dual max(-4, 3 * -1) = -3
  # with zero gradient. [no dual clip: -4 with gradient -1]
  obj, g = _one_token(4.0, -1.0, cliprange=0.2, dual_clip=3.0)
  np.testing.assert_allclose(obj, -3.0, atol=1e-6)
  assert g == 0.0
  obj, g = _one_token(4.0, -1.0, cliprange=0.2)
  np.testing.assert_allclose((obj, g), (-4.0, -1.0), atol=1e-6)
  # A > 0 is never dual-clipped: rho 4, A +1 -> min(4, 1.2) = 1.2.
  obj, _ = _one_token(4.0, 1.0, cliprange=0.2, dual_clip=3.0)
  np.testing.assert_allclose(obj, 1.2, atol=1e-6)


def test_policy_loss_asymmetric_clip_hand_value():
  # rho 1.25, A +1, eps_low 0.2, eps_high 0.28: clip to [0.8, 1.28] keeps
  # 1.25 -> obj 1.25, gradient 1. [symmetric 0.2: 1.2, gradient 0]
  obj, g = _one_token(1.25, 1.0, cliprange=0.2, cliprange_high=0.28)
  np.testing.assert_allclose((obj, g), (1.25, 1.0), atol=1e-6)
  # Lower side: rho 0.7, A -2, eps_low 0.2: min(-1.4, 0.8 * -2 = -1.6)
  # = -1.6, clipped, gradient 0. [max instead of min: -1.4]
  obj, g = _one_token(0.7, -2.0, cliprange=0.5, cliprange_low=0.2)
  np.testing.assert_allclose(obj, -1.6, atol=1e-6)
  assert g == 0.0


def test_policy_stats_hand_values():
  # Seed tokens: rho [3, 1.3], A [4, -3], eps 0.2. Only the first is
  # clipped -> clipfrac 0.5. k1 = mean(-ln 3, -ln 1.3) = -(1.098612 +
  # 0.262364) / 2 = -0.680488. k3 = mean(3 - 1 - 1.098612, 1.3 - 1 -
  # 0.262364) = mean(0.901388, 0.037636) = 0.469512. ratio mean 2.15, max 3.
  old = jnp.log(jnp.array([[0.02, 0.10]]))
  new = jnp.log(jnp.array([[0.06, 0.13]]))
  _, s = ppo_policy_loss(
    new, old, jnp.array([[4.0, -3.0]]), jnp.ones((1, 2), bool), cliprange=0.2
  )
  np.testing.assert_allclose(float(s["ppo/clipfrac"].value), 0.5)
  np.testing.assert_allclose(
    float(s["ppo/approx_kl"].value), -0.680488, atol=1e-5
  )
  np.testing.assert_allclose(
    float(s["ppo/approx_kl_k3"].value), 0.469512, atol=1e-5
  )
  np.testing.assert_allclose(float(s["ppo/ratio_mean"].value), 2.15, atol=1e-5)
  np.testing.assert_allclose(float(s["ppo/ratio_max"].value), 3.0, atol=1e-5)


def test_r10_value_clipping_against_rollout_values():
  # returns [1, 0, 2], old_values 0.5, values [1.2, -0.4, 0.6], c 0.2:
  # clipped values [0.7, 0.3, 0.6]; squared errors unclipped [0.04, 0.16,
  # 1.96], clipped [0.09, 0.09, 1.96]; max [0.09, 0.16, 1.96];
  # 0.5 * 2.21 / 3 = 0.368333. Gradient: element 0 takes the clipped
  # (constant) branch -> 0; element 1: (-0.4 - 0) / 3 = -0.133333;
  # element 2: (0.6 - 2) / 3 = -0.466667.
  # [clipped against the new values (no clipping): 0.36, gradient 0.066667]
  values = jnp.array([[1.2, -0.4, 0.6]])
  old, ret = jnp.full((1, 3), 0.5), jnp.array([[1.0, 0.0, 2.0]])
  mask = jnp.ones((1, 3), bool)
  f = lambda v: ppo_value_loss(v, old, ret, mask, cliprange_value=0.2)
  loss, stats = f(values)
  np.testing.assert_allclose(float(loss), 0.368333, atol=1e-6)
  g = jax.grad(lambda v: f(v)[0])(values)
  np.testing.assert_allclose(
    np.asarray(g)[0], [0.0, -0.133333, -0.466667], atol=1e-6
  )
  assert float(np.asarray(g)[0, 0]) == 0.0
  np.testing.assert_allclose(
    float(stats["val/clipfrac"].value), 1 / 3, atol=1e-7
  )
  # val/error is the unclipped mean squared error (0.04 + 0.16 + 1.96) / 3.
  np.testing.assert_allclose(float(stats["val/error"].value), 0.72, atol=1e-6)


def test_entropy_bonus_hand_values():
  # entropy [[1, 2, S], [3, S, S]]: token-mean 6 / 3 = 2;
  # seq-mean-token-mean (1.5 + 3) / 2 = 2.25. [padding counted: 6 / 6 = 1]
  ent = jnp.array([[1.0, 2.0, jnp.nan], [3.0, 1e9, -1e9]])
  mask = jnp.array([[True, True, False], [True, False, False]])
  np.testing.assert_allclose(float(entropy_bonus(ent, mask)[0]), 2.0)
  np.testing.assert_allclose(
    float(entropy_bonus(ent, mask, loss_agg_mode="seq-mean-token-mean")[0]),
    2.25,
  )


def test_explained_variance_hand_values():
  # returns [1, 2, 3]: Var = 2/3. values [1.5, 2, 2.5]: R - V = [-0.5, 0,
  # 0.5], Var = 1/6 -> 1 - (1/6) / (2/3) = 0.75. The last slot is masked.
  # With V offset by +1, EV stays 0.75. [1 - MSE / Var(R) gives
  # 1 - (1/6 + 1) / (2/3) = -0.75 there; padding counted: different again]
  ret = jnp.array([[1.0, 2.0, 3.0, 7.0]])
  mask = jnp.array([[True, True, True, False]])
  ev = explained_variance(jnp.array([[1.5, 2.0, 2.5, 0.0]]), ret, mask)
  np.testing.assert_allclose(float(ev), 0.75, atol=1e-6)
  ev = explained_variance(jnp.array([[2.5, 3.0, 3.5, 0.0]]), ret, mask)
  np.testing.assert_allclose(float(ev), 0.75, atol=1e-6)  # offset-invariant
  np.testing.assert_allclose(float(explained_variance(ret, ret, mask)), 1.0)
  # Constant returns: undefined, reported as 0 (finite).
  const = jnp.ones((1, 4))
  assert float(explained_variance(ret, const, mask)) == 0.0


# ---------------------------------------------------------------------------
# Float64 loop references on random data, every padding pattern.


@pytest.mark.parametrize("pattern", sorted(MASKS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_policy_loss_matches_float64_loop(pattern, mode, cfg_name):
  d = _data(1, MASKS[pattern])
  cfg = CONFIGS[cfg_name]
  loss, stats = _policy(d, cfg, mode)
  low = cfg.get("cliprange_low") or cfg["cliprange"]
  high = cfg.get("cliprange_high") or cfg["cliprange"]
  want, want_stats = _policy_ref(
    d["lp"],
    d["olp"],
    d["adv"],
    d["mask"],
    low,
    high,
    cfg.get("dual_clip"),
    mode,
  )
  np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-6)
  for k, v in want_stats.items():
    np.testing.assert_allclose(float(stats[k].value), v, rtol=1e-6, atol=1e-6)


def test_reference_data_exercises_every_branch():
  # Guards the loop-reference test against vacuous data: every case of
  # (sign of A, side of the clip range) occurs, and dual clipping too.
  d = _data(1, MASKS["no_padding"])
  ratio = np.exp(d["lp"].astype(np.float64) - d["olp"])
  pos, neg = d["adv"] > 0, d["adv"] < 0
  for side in (ratio > 1.28, ratio < 0.8, (ratio > 0.8) & (ratio < 1.2)):
    assert (side & pos).any() and (side & neg).any()
  _, s = _policy(d, CONFIGS["asym_dual"])
  assert 0.1 < float(s["ppo/clipfrac"].value) < 0.9
  assert 0.0 < float(s["ppo/dual_clipfrac"].value) < 0.5


@pytest.mark.parametrize("pattern", sorted(MASKS))
@pytest.mark.parametrize("mode", MODES)
def test_value_loss_matches_float64_loop(pattern, mode):
  d = _data(2, MASKS[pattern])
  loss, stats = _value(d, mode)
  want, want_stats = _value_ref(d["v"], d["ov"], d["ret"], d["mask"], 0.2, mode)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-6)
  for k, v in want_stats.items():
    np.testing.assert_allclose(float(stats[k].value), v, rtol=1e-6, atol=1e-6)
  assert 0.0 < float(
    _value(_data(2, MASKS["no_padding"]))[1]["val/clipfrac"].value
  )


@pytest.mark.parametrize("pattern", sorted(MASKS))
@pytest.mark.parametrize("mode", MODES)
def test_entropy_bonus_matches_float64_loop(pattern, mode):
  d = _data(3, MASKS[pattern])
  got, got_stats = entropy_bonus(d["ent"], d["mask"], loss_agg_mode=mode)
  want = _agg_ref(d["ent"].astype(np.float64), d["mask"], mode)
  np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-6)
  stat = float(got_stats["ppo/entropy"].value)
  np.testing.assert_allclose(stat, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pattern", sorted(MASKS))
def test_explained_variance_matches_float64_loop(pattern):
  d = _data(4, MASKS[pattern])
  m = d["mask"]
  r = d["ret"].astype(np.float64)[m]
  e = r - d["v"].astype(np.float64)[m]
  want = 1 - e.var() / r.var()
  got = explained_variance(d["v"], d["ret"], m)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# jit, garbage in masked slots, bf16, tracing.


def _all_ops(d):
  """Every op on one data dict -> (outputs, and a scalar for gradients)."""
  pl, ps = _policy(d, CONFIGS["asym_dual"])
  pl2, _ = _policy(d, CONFIGS["symmetric"], "seq-mean-token-sum")
  vl, vs = _value(d, "seq-mean-token-mean")
  eb, es = entropy_bonus(d["ent"], d["mask"])
  ev = explained_variance(d["v"], d["ret"], d["mask"])
  out = dict(pl=pl, pl2=pl2, vl=vl, eb=eb, ev=ev)
  out |= st.values(ps) | st.values(vs) | st.values(es)
  return out, pl + pl2 + vl - 0.01 * eb


def _grads(d):
  def total(lp, v, ent):
    return _all_ops(d | dict(lp=lp, v=v, ent=ent))[1]

  return jax.grad(total, argnums=(0, 1, 2))(d["lp"], d["v"], d["ent"])


@pytest.mark.parametrize("pattern", sorted(MASKS))
def test_jit_equals_eager(pattern):
  d = _data(5, MASKS[pattern])
  eager = _all_ops(d)[0]
  jitted = jax.jit(lambda d: _all_ops(d)[0])(d)
  for k in eager:
    np.testing.assert_allclose(eager[k], jitted[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("garbage", [1e9, -1e9, np.nan])
@pytest.mark.parametrize(
  "pattern", ["tail_padding", "holes", "all_masked_rows"]
)
def test_garbage_in_masked_slots_changes_nothing(pattern, garbage):
  d = _data(6, MASKS[pattern])
  m = d["mask"]
  dirty = {
    k: (np.where(m, x, np.float32(garbage)) if k != "mask" else x)
    for k, x in d.items()
  }
  clean_out, dirty_out = _all_ops(d)[0], _all_ops(dirty)[0]
  for k in clean_out:
    assert float(clean_out[k]) == float(dirty_out[k]), k
  for gc, gd in zip(_grads(d), _grads(dirty), strict=True):
    gd = np.asarray(gd)
    assert np.isfinite(gd).all()
    np.testing.assert_array_equal(gd, np.asarray(gc))
    assert (gd[~m] == 0).all()


def test_all_masked_batch_gives_zero_loss_and_finite_grads():
  d = _data(8, np.zeros((B, T), bool))
  out, _ = _all_ops(d)
  assert all(float(v) == 0.0 for v in out.values())
  assert all(np.isfinite(g).all() and (g == 0).all() for g in _grads(d))


@pytest.mark.parametrize("pattern", ["no_padding", "holes"])
def test_bf16_inputs_give_finite_f32_outputs(pattern):
  d = _data(9, MASKS[pattern], dtype=jnp.bfloat16)
  out, _ = _all_ops(d)
  for k, v in out.items():
    assert v.dtype == jnp.float32 and np.isfinite(float(v)), k
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in _grads(d))


def test_each_op_traces_once_for_same_shapes():
  counters = {"policy": 0, "value": 0, "entropy": 0, "ev": 0}

  def counted(name, fn):
    def run(*a):
      counters[name] += 1  # Python side effect: runs only while tracing
      return fn(*a)

    return jax.jit(run)

  policy = counted("policy", functools.partial(ppo_policy_loss, cliprange=0.2))
  value = counted(
    "value", functools.partial(ppo_value_loss, cliprange_value=0.2)
  )
  ent = counted("entropy", entropy_bonus)
  ev = counted("ev", explained_variance)
  for seed in (10, 11, 12):  # same shapes, new values and masks
    rng = np.random.default_rng(seed)
    d = _data(seed, rng.random((B, T)) < 0.7)
    jax.block_until_ready(policy(d["lp"], d["olp"], d["adv"], d["mask"]))
    jax.block_until_ready(value(d["v"], d["ov"], d["ret"], d["mask"]))
    jax.block_until_ready(ent(d["ent"], d["mask"]))
    jax.block_until_ready(ev(d["v"], d["ret"], d["mask"]))
  assert counters == {"policy": 1, "value": 1, "entropy": 1, "ev": 1}


# ---------------------------------------------------------------------------
# Micro-batching and devices (docs/conventions.md, conventions 6 and 14).


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_normalizer_sum_to_full_batch(mode):
  d = _data(13, MASKS["tail_padding"])  # unequal tokens per micro-batch
  m = d["mask"]
  if mode == "token-mean":
    norm = float(m.sum())
  else:
    norm = float((m.sum(-1) > 0).sum())

  def loss(lp, rows):
    part = {k: x[rows] for k, x in d.items()} | {"lp": lp[rows]}
    return _policy(part, CONFIGS["asym_dual"], mode, normalizer=norm)[0]

  full_loss, full_grad = jax.value_and_grad(
    lambda lp: _policy(d | {"lp": lp}, CONFIGS["asym_dual"], mode)[0]
  )(d["lp"])
  halves = (slice(0, 2), slice(2, B))
  acc_loss = sum(float(loss(d["lp"], h)) for h in halves)
  acc_grad = sum(jax.grad(loss)(d["lp"], h) for h in halves)
  np.testing.assert_allclose(acc_loss, float(full_loss), rtol=1e-6)
  np.testing.assert_allclose(acc_grad, full_grad, rtol=1e-6, atol=1e-8)


def test_axis_name_gives_global_reductions(devices8):
  # 8 rows, one per device, with 0..7 valid tokens: a mean of per-device
  # means would weight rows unequally; the global (sum, count) must not.
  mesh = Mesh(np.array(devices8), ("d",))
  rows = 8
  lengths = np.arange(rows)
  mask = np.arange(T)[None, :] < np.minimum(lengths, T)[:, None]
  rng = np.random.default_rng(14)
  lp, olp = (
    rng.normal(size=(rows, T)).astype(np.float32) * 0.3 - 1 for _ in range(2)
  )
  adv, v, ov, ret = (
    rng.normal(size=(rows, T)).astype(np.float32) for _ in range(4)
  )

  def local(lp, olp, adv, v, ov, ret, mask):
    pl, ps = ppo_policy_loss(
      lp, olp, adv, mask, cliprange=0.2, dual_clip=3.0, axis_name="d"
    )
    vl, vs = ppo_value_loss(
      v, ov, ret, mask, cliprange_value=0.2, axis_name="d"
    )
    return pl, ps, vl, vs

  args = (lp, olp, adv, v, ov, ret, mask)
  sharded = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(PartitionSpec("d"),) * 7,
      out_specs=PartitionSpec(),
      check_vma=False,
    )
  )(*args)
  full = (
    *ppo_policy_loss(lp, olp, adv, mask, cliprange=0.2, dual_clip=3.0),
    *ppo_value_loss(v, ov, ret, mask, cliprange_value=0.2),
  )
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
    sharded,
    full,
  )


def test_validation_errors():
  x = jnp.zeros((2, 3))
  m = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="advantages"):
    ppo_policy_loss(x, x, jnp.zeros((2, 4)), m, cliprange=0.2)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    ppo_policy_loss(x[0], x[0], x[0], m[0], cliprange=0.2)
  with pytest.raises(TypeError, match="bool"):
    ppo_policy_loss(x, x, x, x, cliprange=0.2)
  with pytest.raises(ValueError, match="dual_clip"):
    ppo_policy_loss(x, x, x, m, cliprange=0.2, dual_clip=0.5)
  with pytest.raises(ValueError, match="cliprange must be < 1, got 1.5"):
    ppo_policy_loss(x, x, x, m, cliprange=1.5)
  with pytest.raises(ValueError, match="cliprange_low must be < 1"):
    ppo_policy_loss(x, x, x, m, cliprange=0.2, cliprange_low=1.5)
  with pytest.raises(ValueError, match="loss_agg_mode"):
    ppo_policy_loss(x, x, x, m, cliprange=0.2, loss_agg_mode="sum")
  with pytest.raises(ValueError, match="old_values"):
    ppo_value_loss(x, x[:1], x, m, cliprange_value=0.2)
  with pytest.raises(ValueError, match="cliprange_value"):
    ppo_value_loss(x, x, x, m, cliprange_value=-0.1)
  with pytest.raises(ValueError, match="entropy"):
    entropy_bonus(x[:, :2], m)
