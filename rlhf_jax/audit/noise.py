"""Label-noise estimate from the inconsistency of complete rounds.

Setting: responses come in rounds of K (3 <= K <= 5) in which every pair
is judged exactly once (a tournament; the default pipeline's annotator
labels all 6 pairs of groups of 4). Noise is the probability eps that a
judgement disagrees with the latent order of the two responses (a latent
tie counts 1/2: the judge flips a fair coin there).

Why the observed inconsistency is not eps. Let h be the fraction of
judgements a minimum feedback arc set drops (audit.fas): h counts only
flips that leave a cycle. A flip of two responses ADJACENT in the latent
order leaves a transitive tournament (the order of the other one), so it
is never detected; in a round of 4, three of the six pairs are adjacent.
With flips independent and equally likely on every pair (uniform noise)
the expected h is a polynomial in eps, h(eps) = E[minFAS] / 6 =
eps/2 - O(eps^2) for K = 4, and eps = h^-1(observed h). But human-like and
simulated judges (Bradley-Terry: P(a > b) = sigmoid(u_a - u_b); Bradley &
Terry 1952) flip mostly CLOSE pairs, which are mostly adjacent, so under
the uniform model the detected share is far too high: on the default
pipeline's labels it gives 0.015 for a true 0.0625.

The estimator here assumes the Bradley-Terry judge on latent utilities
u = s z with z ~ N(0, 1) independent within a round (Thurstone-like
spread, scale s unknown). Then both

  eps(s) = E[sigmoid(-|u_a - u_b|)]          (noise)
  h(s)   = E[minFAS(T)] / (K (K - 1) / 2)    (detected share)

are known functions of s, decreasing from (1/2, h of a random tournament)
at s = 0 to (0, 0) as s -> inf. The estimate is eps(h^-1(observed h)).
Given the utilities, the probability of each of the 2^(K(K-1)/2) label
patterns is a product of sigmoids and its minFAS is precomputed, so E[.]
over labels is exact; E over z is a fixed-seed average of ``draws`` rounds
(common random numbers, so h(s) is smooth and monotone), on a log grid of
s inverted by linear interpolation.

How much the shape of the utility distribution matters: in the low-noise
limit eps ~ 2 ln 2 / s * int f^2 and h ~ c_K / s^2 * int f^3 for the
density f of z, so eps ~ sqrt(h) * sqrt((int f^2)^2 / int f^3): the
shape enters only as (int f^2)^2 / int f^3 (Gaussian 0.87, uniform 1,
Laplace 0.75) under a square root. On the default pipeline's observed h
(0.0074) the Gaussian, uniform and Laplace models give 0.066, 0.070 and
0.064; its known noise is 0.0625 (tests/audit/test_noise.py checks the
estimate by simulation within 0.02).

Rounds of other shapes (incomplete rounds, repeated pairs, K > 5) are left
out and counted; without any complete round there is no estimate.
"""

import functools
import itertools
from typing import NamedTuple

import numpy as np

from rlhf_jax.audit.fas import backward_weight

MIN_ROUND = 3
MAX_ROUND = 5
# log-spaced utility scales s; h(s) is inverted by interpolation.
_SCALES = np.exp(np.linspace(np.log(0.02), np.log(2000.0), 97))
_DRAWS = {3: 8000, 4: 4000, 5: 300}


class NoiseCurve(NamedTuple):
  """h(s) and eps(s) of one round size on the scale grid.

  Attributes:
    size: K.
    detected: f64[S] expected fraction of judgements in a minimum FAS.
    noise: f64[S] expected fraction of flipped judgements.
  """

  size: int
  detected: np.ndarray
  noise: np.ndarray


@functools.lru_cache(maxsize=8)
def _patterns(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(pairs i64[m, 2], flips bool[2^m, m], minFAS i64[2^m]) of K nodes.

  Pattern bit e set: pair e = (i, j), i < j, is judged j > i.
  """
  pairs = np.array(list(itertools.combinations(range(k), 2)), np.int64)
  m = len(pairs)
  codes = np.arange(1 << m)
  flips = ((codes[:, None] >> np.arange(m)) & 1).astype(bool)
  perms = [np.array(p) for p in itertools.permutations(range(k))]
  fas = np.empty(1 << m, np.int64)
  for code in codes:
    w = np.zeros((k, k), np.int64)
    a = np.where(flips[code], pairs[:, 1], pairs[:, 0])
    b = np.where(flips[code], pairs[:, 0], pairs[:, 1])
    w[a, b] = 1
    fas[code] = min(backward_weight(w, p) for p in perms)
  return pairs, flips, fas


@functools.lru_cache(maxsize=8)
def noise_curve(k: int) -> NoiseCurve:
  """The Gaussian Bradley-Terry curves h(s), eps(s) for rounds of K.

  Args:
    k: round size, 3..5.

  Returns:
    ``NoiseCurve`` on the module's scale grid (seed 0, fixed draws).
  """
  if not MIN_ROUND <= k <= MAX_ROUND:
    raise ValueError(f"round size {k}: expected {MIN_ROUND}..{MAX_ROUND}")
  pairs, flips, fas = _patterns(k)
  z = np.random.default_rng(0).standard_normal((_DRAWS[k], k))
  gap = z[:, pairs[:, 0]] - z[:, pairs[:, 1]]  # [M, m]
  fl = flips.astype(np.float64)
  det, eps = np.empty(_SCALES.size), np.empty(_SCALES.size)
  for i, s in enumerate(_SCALES):
    d = s * gap
    # log P(pair e judged i > j) and log P(judged j > i).
    keep, flip = -np.logaddexp(0.0, -d), -np.logaddexp(0.0, d)
    logp = keep @ (1.0 - fl).T + flip @ fl.T  # [M, 2^m]
    p = np.exp(logp)
    det[i] = float((p @ fas).mean()) / len(pairs)
    eps[i] = float(np.mean(np.exp(-np.logaddexp(0.0, np.abs(d)))))
  return NoiseCurve(k, det, eps)


def invert_noise(detected: float, sizes: dict[int, int]) -> float:
  """eps at which the expected detected share equals ``detected``.

  Args:
    detected: observed fraction of judgements in a minimum FAS.
    sizes: round size K -> number of judgements in rounds of that size
      (the curves are mixed with these weights).

  Returns:
    The noise estimate in [0, 1/2].
  """
  total = sum(sizes.values())
  det = sum(n * noise_curve(k).detected for k, n in sizes.items()) / total
  eps = sum(n * noise_curve(k).noise for k, n in sizes.items()) / total
  # Both fall as the scale grows (to 0 at s = inf); interpolate on
  # increasing `det`.
  det = np.concatenate([[0.0], det[::-1]])
  eps = np.concatenate([[0.0], eps[::-1]])
  return float(np.interp(detected, det, eps))


def estimate_noise(
  round_sizes: np.ndarray, round_fas: np.ndarray
) -> dict[str, float | int | None]:
  """The label-noise estimate of complete rounds (module docstring).

  Args:
    round_sizes: i64[G] K of each complete round (3..5; others are left
      out and counted as ``rounds_skipped``).
    round_fas: i64[G] minimum FAS of each round.

  Returns:
    ``noise``: the estimate (None without a usable round); ``noise_low``,
    ``noise_high``: the estimate at the detected share -+ 2 standard
    errors (rounds resampled as independent); ``detected``: the observed
    share of judgements in a minimum FAS; ``rounds``, ``judgements``,
    ``rounds_skipped``.

  >>> out = estimate_noise(np.array([4, 4]), np.array([0, 0]))
  >>> out["noise"], out["rounds"]
  (0.0, 2)
  """
  sizes = np.asarray(round_sizes, np.int64)
  fas = np.asarray(round_fas, np.int64)
  ok = (sizes >= MIN_ROUND) & (sizes <= MAX_ROUND)
  out: dict[str, float | int | None] = {
    "rounds": int(ok.sum()),
    "rounds_skipped": int((~ok).sum()),
    "judgements": 0,
    "detected": None,
    "noise": None,
    "noise_low": None,
    "noise_high": None,
  }
  if not ok.any():
    return out
  sizes, fas = sizes[ok], fas[ok]
  m = sizes * (sizes - 1) // 2
  counts = {int(k): int(m[sizes == k].sum()) for k in np.unique(sizes)}
  n = int(m.sum())
  detected = float(fas.sum()) / n
  # Ratio estimator's standard error over rounds.
  g = sizes.size
  resid = fas - detected * m
  se = float(np.sqrt(np.sum(resid**2) * g / max(g - 1, 1))) / n
  out.update(
    judgements=n,
    detected=detected,
    noise=invert_noise(detected, counts),
    noise_low=invert_noise(max(detected - 2 * se, 0.0), counts),
    noise_high=invert_noise(detected + 2 * se, counts),
  )
  return out


def uniform_noise_estimate(detected: float, k: int) -> float:
  """The estimate under UNIFORM flips (each pair flipped with prob. eps),
  for comparison: eps solving E[minFAS] / m = detected for rounds of K.

  >>> round(uniform_noise_estimate(0.0074, 4), 4)
  0.0152
  """
  pairs, flips, fas = _patterns(k)
  m = len(pairs)
  nflip = flips.sum(1)
  grid = np.linspace(0.0, 0.5, 2001)
  h = np.array(
    [np.sum(e**nflip * (1 - e) ** (m - nflip) * fas) / m for e in grid]
  )
  return float(np.interp(detected, h, grid))
