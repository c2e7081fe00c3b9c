"""Example reward functions in plain Python (``rlhf-jax grpo --reward``).

Each has the shape ``fn(prompts, completions, **columns) -> list[float]``
(``rlhf_jax.rewards``) and runs on the host between the compiled rollout
and update programs.

>>> word_count(["Once"], ["upon a time there"])
[4.0]
>>> word_count(["Once"], ["upon a time"], target_words=[5])
[-2.0]
"""

import functools
from collections.abc import Sequence

from rlhf_jax.tasks.gold import GoldScorer


@functools.cache
def _vader() -> GoldScorer:
  return GoldScorer()  # loads the lexicon once per process


def sentiment(
  prompts: Sequence[str], completions: Sequence[str], **columns
) -> list[float]:
  """VADER compound sentiment of each completion, in [-1, 1] (the gold
  score of the "make TinyStories happier" task, tasks/gold.py)."""
  del prompts, columns
  return [float(s) for s in _vader().score(list(completions))]


def word_count(
  prompts: Sequence[str],
  completions: Sequence[str],
  target_words: Sequence[int] | None = None,
  **columns,
) -> list[float]:
  """Words per completion; with a ``target_words`` column, minus the
  absolute distance to it (0 is best)."""
  del prompts, columns
  counts = [float(len(c.split())) for c in completions]
  if target_words is None:
    return counts
  return [0.0 - abs(c - t) for c, t in zip(counts, target_words, strict=True)]
