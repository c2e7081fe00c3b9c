"""Simulated human annotator: Bradley-Terry choices on a gold score.

Ziegler et al. (2019) collected pairwise human choices between continuations;
the default pipeline replaces the humans by a labeller whose choices follow
the Bradley-Terry model (Bradley & Terry 1952; the reward-model likelihood of
the seed document) on the gold score g (VADER compound, see gold.py):

  P(a preferred over b) = sigmoid(beta * (g(a) - g(b))).

beta sets the label noise. For a gold gap d = |g(a) - g(b)| the annotator
picks the less positive story with probability sigmoid(-beta * d):

  beta \\ d   0.05   0.1    0.3    0.5    1.0
  5          0.44   0.38   0.18   0.076  0.0067
  10         0.38   0.27   0.047  0.0067 4.5e-5
  20         0.27   0.12   0.0025 4.5e-5 2.1e-9

beta = 0 is a fair coin; beta = inf is the noiseless gold order. Pairs whose
gold scores tie (both stories free of sentiment words score exactly 0) are a
fair coin at every beta.

Every pair consumes exactly one uniform draw from a seeded
``np.random.Generator`` whatever the scores are, so the coins, and hence the
labels, depend only on (seed, number of pairs labelled so far, scores).
"""

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np


class Scorer(Protocol):
  """Anything with ``score(texts) -> f64[N]`` (e.g. gold.GoldScorer)."""

  def score(self, texts: Sequence[str]) -> np.ndarray: ...


class LabelledPairs(NamedTuple):
  """The annotator's choices on N pairs.

  Attributes:
    chosen: N texts the annotator preferred.
    rejected: N texts the annotator did not prefer.
    noiseless_label: bool[N], True where the noiseless annotator (beta = inf)
      makes the same choice: g(chosen) > g(rejected), or a gold tie (where
      the noiseless annotator flips the same coin). False marks a label
      flipped by the annotator's noise. Reward-model accuracy against the
      gold order is mean(where(noiseless_label, r_c > r_r, r_r > r_c)).
  """

  chosen: list[str]
  rejected: list[str]
  noiseless_label: np.ndarray


def bradley_terry_prob(
  gold_a: np.ndarray, gold_b: np.ndarray, *, beta: float
) -> np.ndarray:
  """P(a preferred) = sigmoid(beta * (g_a - g_b)), f64[N].

  Computed as 0.5 * (1 + tanh(x / 2)), which is exact at x = +-inf, and with
  x = 0 on gold ties so that beta = inf gives 0.5 there instead of NaN.
  """
  gap = np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)
  with np.errstate(invalid="ignore"):  # inf * 0 on ties, replaced below
    x = np.where(gap == 0.0, 0.0, beta * gap)
  return 0.5 * (1.0 + np.tanh(0.5 * x))


class SimulatedAnnotator:
  """Labels pairs of stories with noisy Bradley-Terry choices on a gold score.

  Stateful only in its random stream and its running statistics (see
  ``stats``); create one per run with the run's seed.
  """

  def __init__(self, gold: Scorer, *, beta: float, seed: int) -> None:
    """Builds the annotator.

    Args:
      gold: scorer of texts, higher = preferred.
      beta: inverse temperature of the choice, >= 0 (``np.inf`` allowed).
      seed: seed of the ``np.random.Generator`` drawing the choices.

    Raises:
      ValueError: if beta is negative or NaN.
    """
    if not beta >= 0.0:  # also rejects NaN
      raise ValueError(f"beta must be >= 0 (inf allowed), got {beta}")
    self.gold = gold
    self.beta = float(beta)
    self._rng = np.random.default_rng(seed)
    self._pairs = 0
    self._ties = 0
    self._agree = 0
    self._expected = 0.0

  def choose(self, gold_a: np.ndarray, gold_b: np.ndarray) -> np.ndarray:
    """Samples the choices for precomputed gold scores.

    Args:
      gold_a: f64[N] gold scores of the first texts.
      gold_b: f64[N] gold scores of the second texts.

    Returns:
      bool[N], True where a is preferred (u < P(a preferred), u ~ U[0, 1)).

    Raises:
      ValueError: on shape mismatch, non-1-D input or NaN scores.
    """
    gold_a = np.asarray(gold_a, np.float64)
    gold_b = np.asarray(gold_b, np.float64)
    if gold_a.ndim != 1 or gold_a.shape != gold_b.shape:
      raise ValueError(
        f"gold scores must be 1-D of equal length, got {gold_a.shape} and "
        f"{gold_b.shape}"
      )
    if np.isnan(gold_a).any() or np.isnan(gold_b).any():
      raise ValueError("gold scores contain NaN")
    p = bradley_terry_prob(gold_a, gold_b, beta=self.beta)
    a_wins = self._rng.random(gold_a.shape[0]) < p
    # Running statistics; ties are left out of agreement (no gold order).
    tie = gold_a == gold_b
    agree = np.where(gold_a > gold_b, a_wins, ~a_wins)
    self._pairs += gold_a.shape[0]
    self._ties += int(tie.sum())
    self._agree += int((agree & ~tie).sum())
    self._expected += float(np.maximum(p, 1.0 - p)[~tie].sum())
    return a_wins

  def label(
    self, texts_a: Sequence[str], texts_b: Sequence[str]
  ) -> LabelledPairs:
    """Labels pairs (a_i, b_i) with the annotator's noisy choice.

    Args:
      texts_a: N texts.
      texts_b: N texts, paired with texts_a by position.

    Returns:
      LabelledPairs(chosen, rejected, noiseless_label), see its docstring.

    Raises:
      ValueError: if the two lists differ in length.
    """
    if len(texts_a) != len(texts_b):
      raise ValueError(
        f"texts_a and texts_b differ in length: {len(texts_a)} vs "
        f"{len(texts_b)}"
      )
    gold_a = self.gold.score(texts_a)
    gold_b = self.gold.score(texts_b)
    a_wins = self.choose(gold_a, gold_b)
    triples = list(zip(texts_a, texts_b, a_wins, strict=True))
    chosen = [a if w else b for a, b, w in triples]
    rejected = [b if w else a for a, b, w in triples]
    g_c = np.where(a_wins, gold_a, gold_b)
    g_r = np.where(a_wins, gold_b, gold_a)
    return LabelledPairs(chosen, rejected, g_c >= g_r)

  def stats(self) -> dict[str, float]:
    """Running statistics over every pair labelled so far.

    Returns:
      ``annotator/pairs``: pairs labelled; ``annotator/gold_ties``: fraction
      with tied gold scores; ``annotator/gold_agreement``: realised fraction
      of non-tied pairs whose label follows the gold order;
      ``annotator/expected_agreement``: its expectation under the model,
      mean of max(p, 1 - p) over the same pairs. Agreements are NaN when
      every pair tied.
    """
    n_order = self._pairs - self._ties
    nan = float("nan")
    return {
      "annotator/pairs": float(self._pairs),
      "annotator/gold_ties": self._ties / self._pairs if self._pairs else nan,
      "annotator/gold_agreement": self._agree / n_order if n_order else nan,
      "annotator/expected_agreement": (
        self._expected / n_order if n_order else nan
      ),
    }
