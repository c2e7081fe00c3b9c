"""Simulated accept/reject feedback: a user who accepts suggestions.

A product that suggests continuations sees only "accepted" or "rejected"
per suggestion, and its goal is an accept rate (e.g. 0.8). The simulated
user of the accept-rate task accepts a continuation y with probability

  P(accept | y) = sigmoid(beta * (g(y) - threshold)),

g = the task's gold score (VADER compound sentiment, gold.py). beta sets the
label noise (beta = inf: accept exactly the continuations above the
threshold); the threshold is calibrated so that the initial policy's
expected accept rate, mean_y P(accept | y) over its samples, is a given
value (0.3 in the accept-rate preset) (``calibrate_threshold``).

The labels are Bernoulli draws from a seeded ``np.random.Generator``, one
uniform per continuation whatever the scores, so they depend only on
(seed, number labelled so far, scores). ``accept_probability`` is the same
probability as a plain-Python reward function (``rlhf-jax grpo --reward``),
with the threshold and beta passed per row as columns.

>>> import numpy as np
>>> user = SimulatedUser(beta=10.0, threshold=0.5, seed=0)
>>> user.accept_probability(np.array([0.5, 0.8])).round(4).tolist()
[0.5, 0.9526]
"""

import math
from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks.annotator import bradley_terry_prob


class SimulatedUser:
  """Accepts a continuation with probability sigmoid(beta (g - threshold)).

  Stateful only in its random stream (one uniform per label).
  """

  def __init__(self, *, beta: float, threshold: float, seed: int) -> None:
    """Builds the user.

    Args:
      beta: inverse temperature on the gold score (>= 0; inf allowed).
      threshold: gold score accepted with probability 1/2.
      seed: seed of the Bernoulli draws.

    Raises:
      ValueError: beta < 0 or NaN, or a non-finite threshold.
    """
    if not beta >= 0:
      raise ValueError(f"beta must be >= 0, got {beta}")
    if not math.isfinite(threshold):
      raise ValueError(f"threshold must be finite, got {threshold}")
    self.beta = float(beta)
    self.threshold = float(threshold)
    self._rng = np.random.default_rng([seed, 0xACCE])

  def accept_probability(self, gold: np.ndarray) -> np.ndarray:
    """f64[N] P(accept) of continuations with gold scores f[N]."""
    gold = np.asarray(gold, np.float64)
    return bradley_terry_prob(
      gold, np.full_like(gold, self.threshold), beta=self.beta
    )

  def label(self, gold: np.ndarray) -> np.ndarray:
    """bool[N] accept (True) / reject draws for gold scores f[N]."""
    p = self.accept_probability(gold)
    return self._rng.random(p.shape) < p


def expected_accept_rate(gold: np.ndarray, *, beta: float, threshold: float):
  """mean_i sigmoid(beta (g_i - threshold)): the expected accept rate."""
  g = np.asarray(gold, np.float64)
  t = np.full_like(g, threshold)
  return float(np.mean(bradley_terry_prob(g, t, beta=beta)))


def calibrate_threshold(
  gold: np.ndarray, *, beta: float, accept_rate: float, tol: float = 1e-6
) -> float:
  """The threshold t with expected_accept_rate(gold, t) = accept_rate.

  The rate falls monotonically in t, from 1 (t -> -inf) to 0, so bisection
  on [min g - 50 / beta - 1, max g + 50 / beta + 1] finds it (with beta =
  inf, a quantile of the gold scores up to ties).

  Args:
    gold: f[N] gold scores of the initial policy's samples (N >= 1).
    beta: the user's inverse temperature (> 0).
    accept_rate: target rate in (0, 1).
    tol: bisection stops when the bracket is narrower.

  Raises:
    ValueError: empty gold, beta <= 0 or accept_rate outside (0, 1).
  """
  g = np.asarray(gold, np.float64)
  if g.size == 0:
    raise ValueError("calibrate_threshold needs at least one gold score")
  if not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if not 0 < accept_rate < 1:
    raise ValueError(f"accept_rate must be in (0, 1), got {accept_rate}")
  pad = 1.0 + (50.0 / beta if math.isfinite(beta) else 0.0)
  lo, hi = float(g.min()) - pad, float(g.max()) + pad
  while hi - lo > tol:
    mid = 0.5 * (lo + hi)
    if expected_accept_rate(g, beta=beta, threshold=mid) > accept_rate:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def accept_probability(
  prompts: Sequence[str],
  completions: Sequence[str],
  accept_threshold: Sequence[float],
  accept_beta: Sequence[float],
  **columns,
) -> list[float]:
  """P(accept) of each completion under the simulated user, as a reward.

  A ``rlhf-jax grpo --reward`` function: the gold score of each completion
  (tasks.rewards.sentiment) through sigmoid(beta (g - threshold)), with
  the threshold and beta given per row (columns ``accept_threshold``,
  ``accept_beta``).
  """
  from rlhf_jax.tasks.rewards import sentiment  # the cached VADER scorer

  del columns
  gold = np.asarray(sentiment(prompts, completions), np.float64)
  p = bradley_terry_prob(
    gold,
    np.asarray(accept_threshold, np.float64),
    beta=np.asarray(accept_beta, np.float64),
  )
  return [float(x) for x in p]
