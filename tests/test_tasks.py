"""Tests of rlhf_jax.tasks: prompts, VADER gold scorer, simulated annotator."""

import math

import numpy as np
import pytest

from rlhf_jax.tasks import (
  STORY_OPENINGS,
  GoldScorer,
  SimulatedAnnotator,
  bradley_terry_prob,
  split_prompts,
  story_prefixes,
)


@pytest.fixture(scope="module")
def gold():
  return GoldScorer()


class DictScorer:
  """Gold scores looked up from a dict: synthetic gaps for the annotator."""

  def __init__(self, table):
    self.table = table

  def score(self, texts):
    return np.array([self.table[t] for t in texts], dtype=np.float64)


# ---------------------------------------------------------------- gold scorer


def test_gold_hand_checked_values(gold):
  # VADER compound = s / sqrt(s^2 + 15), s = sum of lexicon valences.
  # "happy" = 2.7: 2.7 / sqrt(7.29 + 15) = 2.7 / 4.72123 = 0.57188.
  # "sad" = -2.1: -2.1 / sqrt(4.41 + 15) = -2.1 / 4.40568 = -0.47665.
  # A bug returning the 'pos' share instead of compound gives 0.552.
  s = gold.score(["The dog was happy.", "The dog was sad."])
  assert s.dtype == np.float64 and s.shape == (2,)
  np.testing.assert_allclose(s, [0.5719, -0.4767], atol=5e-5)
  np.testing.assert_allclose(s[0], 2.7 / math.sqrt(2.7**2 + 15), atol=5e-5)
  # Negation: "not happy" scales the valence by -0.74 (VADER N_SCALAR):
  # s = -1.998, -1.998 / sqrt(3.992 + 15) = -0.45852.
  np.testing.assert_allclose(
    gold.score(["The dog was not happy."]), [-0.4585], atol=5e-5
  )


def test_gold_ordering_and_neutral(gold):
  s = gold.score(
    [
      "Tom was happy and he loved his new ball.",
      "Tom sat on the chair.",
      "Tom was sad and scared.",
      "",
    ]
  )
  assert s[0] > s[1] > s[2]
  assert s[1] == 0.0 and s[3] == 0.0
  assert np.all(np.abs(s) <= 1.0)


def test_story_openings_are_neutral(gold):
  # The policy must learn the sentiment; the prompts must not carry it.
  assert 50 <= len(STORY_OPENINGS) <= 80
  assert len(set(STORY_OPENINGS)) == len(STORY_OPENINGS)
  np.testing.assert_array_equal(gold.score(STORY_OPENINGS), 0.0)


def test_gold_rejects_a_bare_string(gold):
  with pytest.raises(TypeError, match="sequence of strings, not a str"):
    gold.score("The dog was happy.")
  with pytest.raises(TypeError, match="item 1 is int"):
    gold.score(["ok", 3])


# ------------------------------------------------------------------- prompts


def test_split_prompts_deterministic_disjoint():
  prompts = [f"p{i}" for i in range(20)]
  train, held = split_prompts(prompts, eval_fraction=0.25, seed=3)
  assert (train, held) == split_prompts(prompts, eval_fraction=0.25, seed=3)
  assert len(held) == 5 and len(train) == 15
  assert sorted(train + held, key=prompts.index) == prompts
  # Each part keeps input order.
  assert train == sorted(train, key=prompts.index)
  # The seed matters: some other seed holds out a different set.
  others = [
    split_prompts(prompts, eval_fraction=0.25, seed=s)[1] for s in (4, 5)
  ]
  assert any(o != held for o in others)


def test_split_prompts_edges():
  assert split_prompts(["a", "b"], eval_fraction=0.0, seed=0) == (
    ["a", "b"],
    [],
  )
  # A tiny fraction still holds out one prompt.
  assert len(split_prompts(["a", "b", "c"], eval_fraction=0.01, seed=0)[1]) == 1
  with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
    split_prompts(["a"], eval_fraction=1.0, seed=0)
  with pytest.raises(ValueError, match="leaves no training prompt"):
    split_prompts(["a"], eval_fraction=0.5, seed=0)


def test_story_prefixes():
  texts = [
    "one two three four five six seven",
    "short text",  # 2 words < min_words + 1: skipped
    "a b c d e f g h i j",
    "one two three four five six seven",  # may duplicate the first
  ]
  out = story_prefixes(texts, min_words=3, max_words=5, seed=1)
  assert out == story_prefixes(texts, min_words=3, max_words=5, seed=1)
  assert len(set(out)) == len(out)
  assert 2 <= len(out) <= 3
  for p in out:
    n = len(p.split())
    assert 3 <= n <= 5
    assert any(t.startswith(p + " ") for t in texts)
  # max_words is capped at n_words - 1: a 4-word text gives its first 3.
  assert story_prefixes(["w x y z"], min_words=3, max_words=9, seed=0) == [
    "w x y"
  ]
  with pytest.raises(ValueError, match="min_words <= max_words"):
    story_prefixes(texts, min_words=4, max_words=3, seed=0)


# ----------------------------------------------------------------- annotator


def test_bradley_terry_prob_values():
  # sigmoid(2 * 0.5) = 1 / (1 + e^-1) = 0.731059; ties give 0.5 at any beta.
  p = bradley_terry_prob(
    np.array([0.5, 0.1, 0.3]), np.array([0.0, 0.1, 0.8]), beta=2.0
  )
  np.testing.assert_allclose(p, [0.7310586, 0.5, 1 / (1 + math.e)], rtol=1e-6)
  p_inf = bradley_terry_prob(
    np.array([0.2, 0.0, -0.1]), np.array([0.1, 0.0, 0.0]), beta=np.inf
  )
  np.testing.assert_array_equal(p_inf, [1.0, 0.5, 0.0])


def _pairs(n, gap):
  table = {}
  a, b = [], []
  for i in range(n):
    table[f"a{i}"], table[f"b{i}"] = gap, 0.0
    a.append(f"a{i}")
    b.append(f"b{i}")
  return DictScorer(table), a, b


def test_annotator_deterministic_under_seed():
  scorer, a, b = _pairs(200, 0.1)
  out1 = SimulatedAnnotator(scorer, beta=5.0, seed=7).label(a, b)
  out2 = SimulatedAnnotator(scorer, beta=5.0, seed=7).label(a, b)
  out3 = SimulatedAnnotator(scorer, beta=5.0, seed=8).label(a, b)
  assert out1.chosen == out2.chosen and out1.rejected == out2.rejected
  np.testing.assert_array_equal(out1.noiseless_label, out2.noiseless_label)
  assert out1.chosen != out3.chosen


def test_annotator_agreement_matches_bradley_terry():
  # gap 0.2, beta 5: P(agree) = sigmoid(1) = 0.731059. Binomial std over
  # n = 4000 pairs: sqrt(0.731 * 0.269 / 4000) = 0.0070; allow 4 std.
  # A sign bug gives 0.269, beta used as 1/beta gives sigmoid(0.04) = 0.51.
  n, p = 4000, 1.0 / (1.0 + math.exp(-1.0))
  scorer, a, b = _pairs(n, 0.2)
  ann = SimulatedAnnotator(scorer, beta=5.0, seed=0)
  out = ann.label(a, b)
  agree = np.mean([c.startswith("a") for c in out.chosen])
  assert abs(agree - p) < 4 * math.sqrt(p * (1 - p) / n)
  # noiseless_label is exactly the agreement indicator (no ties here).
  np.testing.assert_array_equal(
    out.noiseless_label, [c.startswith("a") for c in out.chosen]
  )
  for c, r in zip(out.chosen, out.rejected, strict=True):
    assert c[1:] == r[1:] and c != r  # each pair kept intact
  stats = ann.stats()
  assert stats["annotator/pairs"] == n
  assert stats["annotator/gold_ties"] == 0.0
  assert stats["annotator/gold_agreement"] == pytest.approx(agree)
  assert stats["annotator/expected_agreement"] == pytest.approx(p)


def test_annotator_infinite_beta_is_noiseless():
  rng = np.random.default_rng(0)
  g = rng.uniform(-1, 1, size=(2, 300))
  table = {f"a{i}": g[0, i] for i in range(300)}
  table |= {f"b{i}": g[1, i] for i in range(300)}
  a = [f"a{i}" for i in range(300)]
  b = [f"b{i}" for i in range(300)]
  scorer = DictScorer(table)
  ann = SimulatedAnnotator(scorer, beta=np.inf, seed=1)
  out = ann.label(a, b)
  assert np.all(scorer.score(out.chosen) > scorer.score(out.rejected))
  assert out.noiseless_label.all()
  assert ann.stats()["annotator/gold_agreement"] == 1.0


def test_annotator_ties_are_coin_flips():
  # Equal gold: P = 0.5 at any beta, including inf; noiseless_label is True
  # (the noiseless annotator flips the same coin). 400 flips: 4 std = 0.1.
  scorer, a, b = _pairs(400, 0.0)
  ann = SimulatedAnnotator(scorer, beta=np.inf, seed=2)
  out = ann.label(a, b)
  frac_a = np.mean([c.startswith("a") for c in out.chosen])
  assert abs(frac_a - 0.5) < 0.1
  assert out.noiseless_label.all()
  stats = ann.stats()
  assert stats["annotator/gold_ties"] == 1.0
  assert math.isnan(stats["annotator/gold_agreement"])


def test_annotator_errors():
  scorer, a, b = _pairs(3, 0.1)
  with pytest.raises(ValueError, match="beta must be >= 0"):
    SimulatedAnnotator(scorer, beta=-1.0, seed=0)
  with pytest.raises(ValueError, match="beta must be >= 0"):
    SimulatedAnnotator(scorer, beta=float("nan"), seed=0)
  ann = SimulatedAnnotator(scorer, beta=1.0, seed=0)
  with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
    ann.label(a, b[:2])
  with pytest.raises(ValueError, match="contain NaN"):
    ann.choose(np.array([np.nan]), np.array([0.0]))


def test_annotator_on_real_gold(gold):
  # End to end with VADER: the happier story wins under a sharp annotator.
  ann = SimulatedAnnotator(gold, beta=1e6, seed=0)
  out = ann.label(
    ["The dog was sad.", "The cat was happy."],
    ["The dog was happy.", "The cat was sad."],
  )
  assert out.chosen == ["The dog was happy.", "The cat was happy."]
  assert out.rejected == ["The dog was sad.", "The cat was sad."]
