"""Tests for rlhf_jax.preference: reward-model losses and DPO/IPO.

The preference losses take per-pair (or per-prompt) scalars f32[B] / f32[B, K]
and so have no masked slots: padding lives in the per-token logprobs and is
removed by ``sequence_logprobs`` before these functions see it. The
masked-slot garbage test is therefore run on that composition (per-token
logprobs -> sequence_logprobs -> dpo_loss / ipo_loss), and the losses
themselves are checked for finite values and gradients at extreme
magnitudes (|x| = 1e4 .. 1e30).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from rlhf_jax.logprobs import sequence_logprobs
from rlhf_jax.preference import (
  DPO_LOSS_TYPES,
  best_of_k_loss,
  bradley_terry_loss,
  dpo_loss,
  ipo_loss,
  preference_accuracy,
  ranking_loss,
)

LN2 = math.log(2.0)


def _softplus(x: float) -> float:
  """-log sigma(-x) in float64, stable for large |x|."""
  return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _rand(seed: int, *shape: int, scale: float = 2.0) -> np.ndarray:
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(
    np.float32
  )


# ---------------------------------------------------------------------------
# Hand-checkable cases.


def test_bradley_terry_margin_hand_value():
  # r+ 2, r- 1, margin 1: d = 2 - 1 - 1 = 0, loss = softplus(0) = ln 2.
  # [margin ignored: softplus(-1) = 0.313262; margin added: 0.126928]
  loss, stats = bradley_terry_loss(
    jnp.array([2.0]), jnp.array([1.0]), margin=jnp.array([1.0])
  )
  np.testing.assert_allclose(float(loss), LN2, atol=1e-6)
  assert float(stats["rm/margin"].value) == 1.0  # the reward gap, not d
  assert float(stats["rm/accuracy"].value) == 1.0


def test_bradley_terry_label_smoothing_hand_value():
  # d = -0.5, eps 0.1: 0.9 * softplus(0.5) + 0.1 * softplus(-0.5)
  # = 0.9 * 0.974077 + 0.1 * 0.474077 = 0.924077.
  # [eps on the wrong term: 0.524077]
  loss, _ = bradley_terry_loss(
    jnp.array([1.0]), jnp.array([1.5]), label_smoothing=0.1
  )
  np.testing.assert_allclose(float(loss), 0.924077, atol=1e-6)


def test_bradley_terry_center_rewards_hand_value():
  # 0.974077 + 0.01 * (1.0 + 1.5)^2 = 0.974077 + 0.0625 = 1.036577.
  # [(r+ - r-)^2 instead of (r+ + r-)^2: 0.976577]
  loss, _ = bradley_terry_loss(
    jnp.array([1.0]), jnp.array([1.5]), center_rewards_coef=0.01
  )
  np.testing.assert_allclose(float(loss), 1.036577, atol=1e-6)


def test_best_of_k_hand_value():
  # rewards [1, 2, 0], best 1: logsumexp = ln(e + e^2 + 1) = 2.407606;
  # loss = 2.407606 - 2 = 0.407606.
  # [softmax probability instead of -log: 0.665241; index 0: 1.407606]
  loss, stats = best_of_k_loss(jnp.array([[1.0, 2.0, 0.0]]), jnp.array([1]))
  np.testing.assert_allclose(float(loss), 0.407606, atol=1e-6)
  assert float(stats["rm/accuracy"].value) == 1.0
  # A tie with the best counts as wrong (strict accuracy).
  _, stats = best_of_k_loss(jnp.array([[2.0, 2.0, 0.0]]), jnp.array([1]))
  assert float(stats["rm/accuracy"].value) == 0.0


def test_ranking_loss_hand_value():
  # rewards [3, 1, 2], ranks [0, 2, 1]: order 0 > 2 > 1, pairs
  # (0,2): d 1, (0,1): d 2, (2,1): d 1 -> softplus(-1) + softplus(-2)
  # + softplus(-1) = 0.313262 + 0.126928 + 0.313262 = 0.753451, / 3 pairs
  # = 0.251150. [no 1/C(K,2): 0.753451; ranks read as scores: 1.584484]
  loss, stats = ranking_loss(
    jnp.array([[3.0, 1.0, 2.0]]), jnp.array([[0, 2, 1]])
  )
  np.testing.assert_allclose(float(loss), 0.251150, atol=1e-6)
  assert float(stats["rm/accuracy"].value) == 1.0


def test_indices_and_ranks_must_be_integers():
  """Float ranks and a float best_index were compared or one-hot encoded
  without a word (best_index 1.5 matched no response: loss = logsumexp)."""
  r = jnp.array([[3.0, 1.0, 2.0]])
  with pytest.raises(TypeError, match="best_index must hold integers, got "):
    best_of_k_loss(r, jnp.array([1.5]))
  with pytest.raises(TypeError, match="ranks must hold integers, got dtype "):
    ranking_loss(r, [[0.0, 0.5, 1.0]])
  # Python ints and any integer dtype pass: ln(e^3 + e + e^2) - 3, and
  # the hand value of test_ranking_loss_hand_value.
  for best in ([0], np.array([0], np.int8)):
    loss, _ = best_of_k_loss(r, best)
    np.testing.assert_allclose(float(loss), 0.407606, atol=1e-6)
  loss, _ = ranking_loss(r, [[0, 2, 1]])
  np.testing.assert_allclose(float(loss), 0.251150, atol=1e-6)


def test_ranking_loss_each_prompt_counts_once():
  # Prompt A has 3 comparisons, prompt B (tied ranks 1, 1) only 2; the batch
  # loss is the mean of the two per-prompt means, not the mean of 5 pairs.
  rewards = jnp.array([[3.0, 1.0, 2.0], [0.5, -1.0, 2.0]])
  ranks = jnp.array([[0, 2, 1], [0, 1, 1]])
  loss, _ = ranking_loss(rewards, ranks)
  a = (_softplus(-1) + _softplus(-2) + _softplus(-1)) / 3
  b = (_softplus(-1.5) + _softplus(1.5)) / 2
  np.testing.assert_allclose(float(loss), (a + b) / 2, atol=1e-6)
  pooled = (3 * a + 2 * b) / 5  # the bug: every pair weighted alike
  assert abs(float(loss) - pooled) > 1e-3


def test_dpo_hand_values():
  # logratios: chosen -10 - (-10.5) = 0.5, rejected -12 - (-11) = -1.0;
  # h = 1.5, beta 0.5 -> z = 0.75, loss softplus(-0.75) = 0.386871;
  # implicit rewards 0.25, -0.5, margin 0.75.
  # [reference added instead of subtracted: softplus(-1.25) = 0.251929;
  #  beta dropped: softplus(-1.5) = 0.201413]
  args = [jnp.array([v]) for v in (-10.0, -12.0, -10.5, -11.0)]
  loss, stats = dpo_loss(*args, beta=0.5)
  np.testing.assert_allclose(float(loss), 0.386871, atol=1e-6)
  np.testing.assert_allclose(float(stats["rewards/chosen"].value), 0.25)
  np.testing.assert_allclose(float(stats["rewards/rejected"].value), -0.5)
  np.testing.assert_allclose(float(stats["rewards/margins"].value), 0.75)
  assert float(stats["rewards/accuracies"].value) == 1.0
  # cDPO eps 0.1: 0.9 * 0.386871 + 0.1 * softplus(0.75) (= 1.136871)
  # = 0.461871. [eps on the wrong term: 0.2*... = 1.061871]
  loss, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
  np.testing.assert_allclose(float(loss), 0.461871, atol=1e-6)
  # hinge: relu(1 - 0.75) = 0.25. [beta dropped: relu(1 - 1.5) = 0]
  loss, _ = dpo_loss(*args, beta=0.5, loss_type="hinge")
  np.testing.assert_allclose(float(loss), 0.25, atol=1e-6)


def test_ipo_hand_value():
  # Per-token mean logprobs: h = (-1.0 + 1.1) - (-1.2 + 1.1) = 0.2;
  # target 1 / (2 * 0.5) = 1; loss (0.2 - 1)^2 = 0.64.
  # [beta * h: (0.1 - 1)^2 = 0.81; target beta / 2: (0.2 - 0.25)^2 = 0.0025]
  args = [jnp.array([v]) for v in (-1.0, -1.2, -1.1, -1.1)]
  loss, stats = ipo_loss(*args, beta=0.5)
  np.testing.assert_allclose(float(loss), 0.64, atol=1e-6)
  np.testing.assert_allclose(
    float(stats["rewards/margins"].value), 0.1, atol=1e-6
  )


# ---------------------------------------------------------------------------
# Regression cases R5 and R6 (issue 2).


def test_r5_accuracy_with_ties():
  # Pairs: 1.0 > 0.0 yes; 0.5 == 0.5 tie; 2.0 < 2.5 no; -1 == -1 tie;
  # 0.3 > 0.1 yes -> 2 / 5 = 0.4 with 2 ties (a fraction 0.4 of the pairs).
  # [ties counted right: 0.8]
  chosen = jnp.array([1.0, 0.5, 2.0, -1.0, 0.3])
  rejected = jnp.array([0.0, 0.5, 2.5, -1.0, 0.1])
  acc = preference_accuracy(chosen, rejected)
  np.testing.assert_allclose(float(acc["accuracy"].value), 0.4, atol=1e-7)
  np.testing.assert_allclose(float(acc["ties"].value), 0.4, atol=1e-7)
  _, stats = bradley_terry_loss(chosen, rejected)
  np.testing.assert_allclose(float(stats["rm/accuracy"].value), 0.4, atol=1e-7)
  np.testing.assert_allclose(float(stats["rm/ties"].value), 0.4, atol=1e-7)
  # A constant reward model scores 0.0 (all ties), not 0.5 or 1.0.
  const = jnp.full((5,), 0.7)
  acc = preference_accuracy(const, const)
  assert float(acc["accuracy"].value) == 0.0 and float(acc["ties"].value) == 1.0


def test_r6_dpo_reference_pairing():
  # Pair A: chosen -10, rejected -12; pair B: chosen -20, rejected -15;
  # reference == policy, beta 0.1: every pair gives ln 2, rewards 0.
  # [Reference rows swapped between pairs: h_A = 10 - 3 = 7, h_B = -7;
  #  (softplus(-0.7) + softplus(0.7)) / 2 = 0.753186.]
  chosen = jnp.array([-10.0, -20.0])
  rejected = jnp.array([-12.0, -15.0])
  loss, stats = dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
  np.testing.assert_allclose(float(loss), 0.693147, atol=1e-6)
  for i in range(2):  # each pair on its own
    one = [x[i : i + 1] for x in (chosen, rejected)]
    loss_i, _ = dpo_loss(*one, *one, beta=0.1)
    np.testing.assert_allclose(float(loss_i), 0.693147, atol=1e-6)
  assert float(stats["rewards/chosen"].value) == 0.0
  assert float(stats["rewards/rejected"].value) == 0.0
  wrong, _ = dpo_loss(chosen, rejected, chosen[::-1], rejected[::-1], beta=0.1)
  np.testing.assert_allclose(float(wrong), 0.753186, atol=1e-6)


# ---------------------------------------------------------------------------
# Float64 loop references on random data.


def _bt_ref(rc, rr, margin, eps, coef):
  per = []
  for b in range(len(rc)):
    d = float(rc[b]) - float(rr[b]) - float(margin[b])
    per.append((1 - eps) * _softplus(-d) + eps * _softplus(d))
  center = sum((float(rc[b]) + float(rr[b])) ** 2 for b in range(len(rc)))
  return sum(per) / len(rc) + coef * center / len(rc)


@pytest.mark.parametrize("eps,coef", [(0.0, 0.0), (0.2, 0.05)])
def test_bradley_terry_matches_float64_loop(eps, coef):
  rc, rr, m = _rand(0, 16), _rand(1, 16), np.abs(_rand(2, 16, scale=0.5))
  loss, stats = bradley_terry_loss(
    rc, rr, margin=m, label_smoothing=eps, center_rewards_coef=coef
  )
  np.testing.assert_allclose(
    float(loss), _bt_ref(rc, rr, m, eps, coef), rtol=1e-6, atol=1e-6
  )
  acc = np.mean([float(c) > float(r) for c, r in zip(rc, rr, strict=True)])
  np.testing.assert_allclose(float(stats["rm/accuracy"].value), acc, atol=1e-7)
  np.testing.assert_allclose(
    float(stats["rm/margin"].value),
    np.mean(rc.astype(np.float64) - rr),
    atol=1e-6,
  )


def test_best_of_k_matches_float64_loop():
  r, idx = _rand(3, 8, 4), np.random.default_rng(4).integers(0, 4, size=8)
  loss, stats = best_of_k_loss(r, jnp.asarray(idx))
  ref, acc = 0.0, 0.0
  for b in range(8):
    row = [float(v) for v in r[b]]
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    ref += (lse - row[idx[b]]) / 8
    others = [v for k, v in enumerate(row) if k != idx[b]]
    acc += (row[idx[b]] > max(others)) / 8
  np.testing.assert_allclose(float(loss), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(stats["rm/accuracy"].value), acc, atol=1e-7)


def test_ranking_loss_matches_float64_loop():
  rng = np.random.default_rng(5)
  r = _rand(6, 6, 4)
  ranks = np.stack([rng.permutation(4) for _ in range(6)])
  ranks[1] = [0, 1, 1, 2]  # tied ranks: 5 comparisons instead of 6
  loss, stats = ranking_loss(r, jnp.asarray(ranks))
  total, correct, pairs = 0.0, 0, 0
  for b in range(6):
    row_loss, n = 0.0, 0
    for i in range(4):
      for j in range(4):
        if ranks[b, i] < ranks[b, j]:
          d = float(r[b, i]) - float(r[b, j])
          row_loss += _softplus(-d)
          n += 1
          correct += d > 0
    pairs += n
    total += row_loss / n / 6
  np.testing.assert_allclose(float(loss), total, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(stats["rm/accuracy"].value), correct / pairs)


@pytest.mark.parametrize(
  "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.15), ("hinge", 0.0)]
)
def test_dpo_matches_float64_loop(loss_type, eps):
  pc, pr, rc, rr = (_rand(s, 12, scale=3.0) - 20 for s in range(10, 14))
  beta = 0.3
  loss, stats = dpo_loss(
    pc, pr, rc, rr, beta=beta, label_smoothing=eps, loss_type=loss_type
  )
  ref, acc = 0.0, 0.0
  for b in range(12):
    wc = beta * (float(pc[b]) - float(rc[b]))
    wr = beta * (float(pr[b]) - float(rr[b]))
    z = wc - wr
    if loss_type == "sigmoid":
      ref += ((1 - eps) * _softplus(-z) + eps * _softplus(z)) / 12
    else:
      ref += max(0.0, 1.0 - z) / 12
    acc += (wc > wr) / 12
  np.testing.assert_allclose(float(loss), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    float(stats["rewards/accuracies"].value), acc, atol=1e-7
  )


def test_ipo_matches_float64_loop():
  pc, pr, rc, rr = (_rand(s, 12, scale=0.5) - 2 for s in range(20, 24))
  beta = 0.25
  loss, _ = ipo_loss(pc, pr, rc, rr, beta=beta)
  ref = 0.0
  for b in range(12):
    h = (float(pc[b]) - float(rc[b])) - (float(pr[b]) - float(rr[b]))
    ref += (h - 1 / (2 * beta)) ** 2 / 12
  np.testing.assert_allclose(float(loss), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Identities.


def test_bradley_terry_invariant_to_constant_shift():
  rc, rr = _rand(30, 10), _rand(31, 10)
  base, _ = bradley_terry_loss(rc, rr, label_smoothing=0.1)
  for c in (-7.0, 0.5, 100.0):
    shifted, _ = bradley_terry_loss(rc + c, rr + c, label_smoothing=0.1)
    np.testing.assert_allclose(float(shifted), float(base), atol=2e-5)


def test_dpo_policy_equal_reference_gives_ln2_per_pair():
  pc, pr = _rand(32, 7) - 30, _rand(33, 7) - 30
  for beta in (0.01, 0.1, 1.0):
    loss, stats = dpo_loss(pc, pr, pc, pr, beta=beta)
    np.testing.assert_allclose(float(loss), LN2, atol=1e-6)
    # All ties: none strictly won.
    assert float(stats["rewards/accuracies"].value) == 0.0
    assert float(stats["rewards/ties"].value) == 1.0


def test_k2_losses_reduce_to_bradley_terry():
  rc, rr = _rand(34, 9), _rand(35, 9)
  bt, _ = bradley_terry_loss(rc, rr)
  rewards = np.stack([rc, rr], axis=1)
  bok, _ = best_of_k_loss(rewards, jnp.zeros(9, jnp.int32))
  rank, _ = ranking_loss(rewards, jnp.tile(jnp.array([[0, 1]]), (9, 1)))
  np.testing.assert_allclose(float(bok), float(bt), atol=1e-6)
  np.testing.assert_allclose(float(rank), float(bt), atol=1e-6)


# ---------------------------------------------------------------------------
# jit, dtype, extreme values, tracing, validation.

_CASES = {
  "bt": lambda a, b, c, d: bradley_terry_loss(
    a, b, margin=c, label_smoothing=0.1, center_rewards_coef=0.01
  ),
  "bt_plain": lambda a, b, c, d: bradley_terry_loss(a, b),
  "dpo": lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1),
  "cdpo": lambda a, b, c, d: dpo_loss(
    a, b, c, d, beta=0.1, label_smoothing=0.1
  ),
  "hinge": lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1, loss_type="hinge"),
  "ipo": lambda a, b, c, d: ipo_loss(a, b, c, d, beta=0.1),
}
# Squared terms (IPO, reward centering) overflow f32 beyond ~1e19 by
# definition, so they are checked at 1e4 only.
_EXTREMES = [(n, 1e4) for n in sorted(_CASES)] + [
  (n, 1e30) for n in ("bt_plain", "dpo", "cdpo", "hinge")
]


def _args(seed, b=6, dtype=jnp.float32, scale=2.0):
  return [jnp.asarray(_rand(seed + i, b, scale=scale), dtype) for i in range(4)]


@pytest.mark.parametrize("name", sorted(_CASES))
def test_pair_losses_jit_equals_eager(name):
  fn = _CASES[name]
  args = _args(40)
  eager = fn(*args)
  jitted = jax.jit(fn)(*args)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
    eager,
    jitted,
  )


@pytest.mark.parametrize("name", sorted(_CASES))
def test_pair_losses_bf16_inputs_give_finite_f32(name):
  fn = _CASES[name]
  loss, stats = fn(*_args(41, dtype=jnp.bfloat16))
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  for k, v in stats.items():
    assert v.value.dtype == jnp.float32 and np.isfinite(float(v.value)), k
  grads = jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1))(
    *_args(41, dtype=jnp.bfloat16)
  )
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


@pytest.mark.parametrize("name,scale", _EXTREMES)
def test_pair_losses_finite_at_extreme_magnitudes(name, scale):
  fn = _CASES[name]
  args = _args(42, scale=scale)
  loss, _ = fn(*args)
  grads = jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1))(*args)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_ranked_losses_jit_bf16_extremes():
  r = jnp.asarray(_rand(43, 5, 4))
  idx = jnp.array([0, 3, 1, 2, 2])
  ranks = jnp.asarray(np.argsort(-np.asarray(r), axis=1).argsort(axis=1))
  for fn, lab in ((best_of_k_loss, idx), (ranking_loss, ranks)):
    eager, jitted = fn(r, lab), jax.jit(fn)(r, lab)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
    loss, _ = fn(r.astype(jnp.bfloat16), lab)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    big = r * 1e30
    g = jax.grad(lambda x, fn=fn, lab=lab: fn(x, lab)[0])(big)
    assert np.isfinite(float(fn(big, lab)[0])) and np.isfinite(g).all()
  # Correctly ranked rewards give full accuracy.
  assert float(ranking_loss(r, ranks)[1]["rm/accuracy"].value) == 1.0


@pytest.mark.parametrize("name", sorted(_CASES))
def test_pair_losses_trace_once(name):
  fn = _CASES[name]
  traces = []

  @jax.jit
  def run(a, b, c, d):
    traces.append(1)  # Python side effect: runs only while tracing
    return fn(a, b, c, d)

  for seed in (50, 51, 52):
    jax.block_until_ready(run(*_args(seed)))
  assert len(traces) == 1


def test_ranked_losses_trace_once():
  traces = []

  @jax.jit
  def run(r, idx, ranks):
    traces.append(1)
    return best_of_k_loss(r, idx)[0] + ranking_loss(r, ranks)[0]

  for seed in (53, 54, 55):
    rng = np.random.default_rng(seed)
    r = _rand(seed, 4, 3)
    ranks = np.stack([rng.permutation(3) for _ in range(4)])
    jax.block_until_ready(run(r, rng.integers(0, 3, 4), ranks))
  assert len(traces) == 1


def test_validation_errors():
  a3, a4 = jnp.zeros(3), jnp.zeros(4)
  with pytest.raises(ValueError, match=r"rank-1 shapes \[B\]"):
    bradley_terry_loss(a3, a4)
  with pytest.raises(ValueError, match="rank-1"):
    preference_accuracy(jnp.zeros((2, 2)), jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="margin"):
    bradley_terry_loss(a3, a3, margin=a4)
  with pytest.raises(ValueError, match="label_smoothing"):
    bradley_terry_loss(a3, a3, label_smoothing=0.7)
  with pytest.raises(ValueError, match="ref_rejected_logprobs"):
    dpo_loss(a3, a3, a3, a4, beta=0.1)
  with pytest.raises(ValueError, match=re.escape(str(DPO_LOSS_TYPES))):
    dpo_loss(a3, a3, a3, a3, beta=0.1, loss_type="ipo")
  with pytest.raises(ValueError, match="sigmoid"):
    dpo_loss(a3, a3, a3, a3, beta=0.1, loss_type="hinge", label_smoothing=0.1)
  with pytest.raises(ValueError, match="beta"):
    ipo_loss(a3, a3, a3, a3, beta=0.0)
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    best_of_k_loss(jnp.zeros((3, 1)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="best_index"):
    best_of_k_loss(jnp.zeros((3, 2)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match="ranks"):
    ranking_loss(jnp.zeros((3, 2)), jnp.zeros((3, 3), jnp.int32))


def test_axis_name_gives_global_means(devices8):
  # Under shard_map over 8 devices the losses use global (sum, count), so
  # they equal the unsharded value (a local mean of means would too here,
  # but accuracy/ties counts and uneven stats would not).
  mesh = Mesh(np.array(devices8), ("d",))
  args = _args(60, b=16)

  def local(a, b, c, d):
    loss, stats = dpo_loss(a, b, c, d, beta=0.2, axis_name="d")
    bt, bt_stats = bradley_terry_loss(a, b, axis_name="d")
    return loss, stats, bt, bt_stats

  sharded = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(PartitionSpec("d"),) * 4,
      out_specs=PartitionSpec(),
      check_vma=False,
    )
  )(*args)
  full = (
    *dpo_loss(*args, beta=0.2),
    *bradley_terry_loss(args[0], args[1]),
  )
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
    sharded,
    full,
  )


@pytest.mark.parametrize("garbage", [1e9, -1e9, np.nan])
def test_dpo_ipo_from_padded_tokens_ignore_masked_slots(garbage):
  # The DPO/IPO inputs come from per-token logprobs via sequence_logprobs;
  # garbage in the padded slots (tail padding, holes, an all-masked row)
  # must change neither the losses nor their gradients.
  rng = np.random.default_rng(70)
  t = np.arange(5)
  masks = [
    t[None, :] < np.array([5, 2, 0, 3])[:, None],
    rng.random((4, 5)) < 0.6,
  ]
  toks = [
    (-np.abs(rng.normal(size=(4, 5))) - 0.1).astype(np.float32)
    for _ in range(4)
  ]

  def losses(tc, tr, rc, rr, mc, mr):
    out = []
    for avg, fn in ((False, dpo_loss), (True, ipo_loss)):
      seq = [
        sequence_logprobs(x, m, average=avg)
        for x, m in ((tc, mc), (tr, mr), (rc, mc), (rr, mr))
      ]
      out.append(fn(*seq, beta=0.2)[0])
    return out[0] + out[1]

  mc, mr = masks
  dirty = [
    np.where(m, x, np.float32(garbage))
    for x, m in zip(toks, (mc, mr, mc, mr), strict=True)
  ]
  clean_val, clean_g = jax.value_and_grad(losses, argnums=(0, 1))(*toks, mc, mr)
  dirty_val, dirty_g = jax.value_and_grad(losses, argnums=(0, 1))(
    *dirty, mc, mr
  )
  assert float(clean_val) == float(dirty_val)
  for gc, gd, m in zip(clean_g, dirty_g, (mc, mr), strict=True):
    assert np.isfinite(gd).all() and (np.asarray(gd)[~m] == 0).all()
    np.testing.assert_array_equal(gd, gc)
