"""Evaluation statistics for the run reports: distinct-n, win rate, the
standard error of an accuracy and the response-length baseline."""

import math
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import PreferencePair


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Corpus distinct-n: unique n-grams / total n-grams over all texts.

  Li et al. (2016), "A Diversity-Promoting Objective Function for Neural
  Conversation Models", section 4.3 (distinct-1 / distinct-2). Tokens are
  whitespace-separated words, case kept; n-grams never span two texts. A
  policy collapsing onto one story drives it towards 1 / (number of texts).

  Args:
    texts: generated texts.
    n: n-gram order, >= 1.

  Returns:
    A float in [0, 1]; 0.0 when no text has n words (no n-grams).

  Raises:
    ValueError: if n < 1.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  grams = [
    tuple(words[i : i + n])
    for words in (t.split() for t in texts)
    for i in range(len(words) - n + 1)
  ]
  return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
  """Paired win rate of a over b; ties count half.

  win_rate = mean_i( 1[a_i > b_i] + 0.5 * 1[a_i == b_i] ), so two identical
  policies score 0.5 and win_rate(a, b) + win_rate(b, a) = 1. Used for the
  gold win rate of a trained policy against the initial one on the same
  held-out prompts (pair i = the two policies' continuations of prompt i).

  Args:
    scores_a: f[N] scores of a's texts.
    scores_b: f[N] scores of b's texts, paired with scores_a by position.

  Returns:
    A float in [0, 1].

  Raises:
    ValueError: on shape mismatch, non-1-D or empty input, or NaN scores.
  """
  a = np.asarray(scores_a, np.float64)
  b = np.asarray(scores_b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or a.size == 0:
    raise ValueError(
      f"win_rate needs two non-empty 1-D arrays of equal length, got "
      f"{a.shape} and {b.shape}"
    )
  if np.isnan(a).any() or np.isnan(b).any():
    raise ValueError("win_rate: scores contain NaN")
  return float(np.mean((a > b) + 0.5 * (a == b)))


def accuracy_stderr(accuracy: float, n: int) -> float:
  """Binomial standard error sqrt(p (1 - p) / n) of an accuracy on n pairs."""
  return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / max(n, 1))


def mean_stderr(x: np.ndarray, groups: int | None = None) -> float:
  """Standard error of the mean of f[N]: std (ddof 1) / sqrt(n).

  With ``groups``, x holds that many consecutive groups of equal size
  (e.g. the samples of one prompt, which are not independent): the error
  is that of the mean of the group means, n = groups.

  Raises:
    ValueError: fewer than 2 values (or groups), or N not a multiple of
      ``groups``.
  """
  x = np.asarray(x, np.float64).reshape(-1)
  if groups is not None:
    if groups < 1 or x.size % groups:
      raise ValueError(f"{x.size} values do not split into {groups} groups")
    x = x.reshape(groups, -1).mean(axis=1)
  if x.size < 2:
    raise ValueError(f"a standard error needs 2 or more values, got {x.size}")
  return float(np.std(x, ddof=1) / math.sqrt(x.size))


def length_baseline(pairs: list[PreferencePair]) -> dict[str, float | int]:
  """Predict the longer response (characters); equal lengths are wrong.

  Returns:
    {"accuracy": #(len(chosen) > len(rejected)) / n, "ties": #(equal) / n,
    "n": n}, lengths in characters of the response texts (the part after
    the shared prompt), before any truncation.
  """
  c = np.array([len(p.chosen) for p in pairs])
  r = np.array([len(p.rejected) for p in pairs])
  n = len(pairs)
  return {
    "accuracy": float(np.mean(c > r)) if n else 0.0,
    "ties": float(np.mean(c == r)) if n else 0.0,
    "n": n,
  }
