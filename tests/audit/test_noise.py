"""The label-noise estimate, checked by simulation.

default_gold.npz holds the gold (VADER compound) scores, x 10^4 as int16,
of the 1640 groups of 4 continuations that the default pipeline
(`rlhf-jax run`, seed 0) sampled for its training feedback. The simulated
annotator of that pipeline (tasks.SimulatedAnnotator, beta 20) labels all 6
pairs of each group, as stages/feedback.py does; the known noise is the
fraction of labels against the gold order, a gold tie counting 1/2.
"""

import itertools
import pathlib

import numpy as np
import pytest

from rlhf_jax import audit
from rlhf_jax.audit import noise
from rlhf_jax.tasks import SimulatedAnnotator

GOLD = pathlib.Path(__file__).with_name("default_gold.npz")


def _gold() -> np.ndarray:
  return np.load(GOLD)["gold_x1e4"].astype(np.float64) / 1e4


def _label_groups(gold, *, beta, seed):
  """Pairs of every group as the feedback stage labels them, and the
  realised noise."""
  k = gold.shape[1]
  within = np.array(list(itertools.combinations(range(k), 2)))
  ga = gold[:, within[:, 0]].reshape(-1)
  gb = gold[:, within[:, 1]].reshape(-1)
  ann = SimulatedAnnotator(None, beta=beta, seed=seed)
  a_wins = ann.choose(ga, gb)
  group = np.repeat(np.arange(gold.shape[0]), len(within))
  ia = within[:, 0][np.tile(np.arange(len(within)), gold.shape[0])]
  ib = within[:, 1][np.tile(np.arange(len(within)), gold.shape[0])]
  prompts = [f"prompt {g // 20}" for g in group]
  texts_a = [f"story {g}.{i}" for g, i in zip(group, ia, strict=True)]
  texts_b = [f"story {g}.{i}" for g, i in zip(group, ib, strict=True)]
  chosen = [
    a if w else b for a, b, w in zip(texts_a, texts_b, a_wins, strict=True)
  ]
  rejected = [
    b if w else a for a, b, w in zip(texts_a, texts_b, a_wins, strict=True)
  ]
  g_c = np.where(a_wins, ga, gb)
  g_r = np.where(a_wins, gb, ga)
  known = (np.sum(g_c < g_r) + 0.5 * np.sum(g_c == g_r)) / g_c.size
  return prompts, chosen, rejected, known


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_estimate_within_002_on_the_default_pipelines_labels(seed):
  gold = _gold()
  assert gold.shape == (1640, 4)
  prompts, chosen, rejected, known = _label_groups(gold, beta=20.0, seed=seed)
  x = audit.intern_pairs(prompts, chosen, rejected)
  a = audit.audit_judgements(x.judgements, len(x.responses))
  est = audit.label_noise(a)
  assert est["rounds"] == 1640 and est["rounds_skipped"] == 0
  assert abs(est["noise"] - known) < 0.02, (est, known)
  assert est["noise_low"] <= est["noise"] <= est["noise_high"]
  # The uniform-flip correction misses most flips (adjacent pairs are
  # flipped most and never detected): it is far below the known noise.
  assert audit.uniform_noise_estimate(est["detected"], 4) < known - 0.02


@pytest.mark.parametrize("beta", [5.0, 10.0, 40.0])
def test_noise_estimate_tracks_other_annotator_betas(beta):
  prompts, chosen, rejected, known = _label_groups(_gold(), beta=beta, seed=3)
  x = audit.intern_pairs(prompts, chosen, rejected)
  est = audit.label_noise(
    audit.audit_judgements(x.judgements, len(x.responses))
  )
  assert abs(est["noise"] - known) < 0.03, (est, known)


def test_noise_estimate_on_the_models_own_data():
  # Labels drawn from the estimator's own model (Gaussian utilities,
  # Bradley-Terry): the estimate recovers the noise closely.
  rng = np.random.default_rng(0)
  u = 3.0 * rng.standard_normal((3000, 4))
  pairs = np.array(list(itertools.combinations(range(4), 2)))
  d = u[:, pairs[:, 0]] - u[:, pairs[:, 1]]
  first = rng.random(d.shape) < 1 / (1 + np.exp(-d))
  fas_table = noise._patterns(4)[2]
  code = ((~first) * (1 << np.arange(6))).sum(1)
  est = audit.estimate_noise(np.full(3000, 4), fas_table[code])
  known = np.mean(np.where(d > 0, ~first, first))
  assert abs(est["noise"] - known) < 0.01


def test_uniform_flip_polynomial_for_four():
  # Under uniform flips h(eps) = E[minFAS] / 6 = eps / 2 + O(eps^2) for K=4
  # (3 of the 6 single flips are non-adjacent and detected).
  pairs, flips, fas = noise._patterns(4)
  assert fas.max() == 1  # a tournament on 4 never needs 2 drops
  single = flips.sum(1) == 1
  assert fas[single].sum() == 3
  assert audit.uniform_noise_estimate(0.5 * 0.001, 4) == pytest.approx(
    0.001, rel=0.02
  )


def test_no_complete_round_no_estimate():
  out = audit.estimate_noise(np.array([2, 7]), np.array([0, 1]))
  assert out["noise"] is None and out["rounds_skipped"] == 2
