"""The accept-rate task's simulated user (rlhf_jax.tasks.accept)."""

import math

import numpy as np
import pytest

from rlhf_jax.tasks.accept import (
  SimulatedUser,
  accept_probability,
  calibrate_threshold,
  expected_accept_rate,
)


def test_accept_probability_hand_values():
  # beta 10, threshold 0.5: g = 0.5 -> sigmoid(0) = 0.5; g = 0.8 ->
  # sigmoid(3) = 0.952574; g = 0.2 -> sigmoid(-3) = 0.047426.
  user = SimulatedUser(beta=10.0, threshold=0.5, seed=0)
  p = user.accept_probability(np.array([0.5, 0.8, 0.2]))
  np.testing.assert_allclose(p, [0.5, 0.9525741, 0.0474259], rtol=1e-6)
  hard = SimulatedUser(beta=math.inf, threshold=0.5, seed=0)
  np.testing.assert_array_equal(
    hard.accept_probability(np.array([0.4, 0.5, 0.6])), [0.0, 0.5, 1.0]
  )


def test_labels_are_bernoulli_and_seeded():
  gold = np.full(20000, 0.5 + math.log(3) / 10)  # P(accept) = 0.75
  a = SimulatedUser(beta=10.0, threshold=0.5, seed=1).label(gold)
  b = SimulatedUser(beta=10.0, threshold=0.5, seed=1).label(gold)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == bool and abs(a.mean() - 0.75) < 0.015


def test_calibrated_threshold_gives_the_rate():
  rng = np.random.default_rng(0)
  gold = np.clip(rng.normal(0.3, 0.4, 500), -1, 1)
  for beta in (5.0, 10.0, 20.0):
    t = calibrate_threshold(gold, beta=beta, accept_rate=0.3)
    rate = expected_accept_rate(gold, beta=beta, threshold=t)
    assert abs(rate - 0.3) < 1e-5, (beta, rate)
  # beta = inf: the fraction of scores above t (a quantile up to ties).
  t = calibrate_threshold(gold, beta=math.inf, accept_rate=0.3)
  assert abs(np.mean(gold > t) - 0.3) <= 1.01 / 500


def test_calibration_rejects_bad_arguments():
  with pytest.raises(ValueError, match="accept_rate"):
    calibrate_threshold(np.zeros(3), beta=1.0, accept_rate=1.0)
  with pytest.raises(ValueError, match="beta"):
    calibrate_threshold(np.zeros(3), beta=0.0, accept_rate=0.5)
  with pytest.raises(ValueError, match="at least one"):
    calibrate_threshold(np.zeros(0), beta=1.0, accept_rate=0.5)
  with pytest.raises(ValueError, match="beta"):
    SimulatedUser(beta=-1.0, threshold=0.0, seed=0)


def test_reward_function_is_the_users_probability():
  texts = ["The dog was happy.", "It was a sad, terrible day.", "A cat."]
  from rlhf_jax.tasks.gold import GoldScorer

  gold = GoldScorer().score(texts)
  user = SimulatedUser(beta=10.0, threshold=0.2, seed=0)
  got = accept_probability(
    ["p"] * 3, texts, accept_threshold=[0.2] * 3, accept_beta=[10.0] * 3
  )
  np.testing.assert_allclose(got, user.accept_probability(gold), rtol=1e-12)
