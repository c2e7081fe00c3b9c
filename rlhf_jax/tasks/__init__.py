"""Demo tasks: prompts, gold scorers and simulated annotators.

The default pipeline's task is "make TinyStories happier", the sentiment task
of Ziegler et al. (2019) at CPU size: story openings (prompts.py), a gold
sentiment score from the VADER lexicon (gold.py) and a simulated annotator
making noisy Bradley-Terry choices on it (annotator.py).
"""

import pathlib

from rlhf_jax.tasks.annotator import (
  LabelledPairs,
  SimulatedAnnotator,
  bradley_terry_prob,
)
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.prompts import STORY_OPENINGS, split_prompts, story_prefixes

# Prompt files of the instruct-style tasks (shipped with the package).
TASK_DATA = pathlib.Path(__file__).resolve().parent / "data"

__all__ = [
  "TASK_DATA",
  "STORY_OPENINGS",
  "GoldScorer",
  "LabelledPairs",
  "SimulatedAnnotator",
  "bradley_terry_prob",
  "split_prompts",
  "story_prefixes",
]
