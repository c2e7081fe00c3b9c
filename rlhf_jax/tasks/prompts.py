"""Story openings for the "make TinyStories happier" task, and prompt splits.

The default pipeline reproduces the sentiment task of Ziegler et al. (2019),
"Fine-Tuning Language Models from Human Preferences", section 3.1 (continue a
story so that it is positive), at the size of the TinyStories models
(Eldan & Li 2023). Prompts come from two places:

* ``STORY_OPENINGS``: the project's own list of short, sentiment-neutral
  openings in the TinyStories style (written for this project).
* ``story_prefixes``: the first few words of stories sampled from the initial
  policy, so that prompts also cover what the model itself tends to write.

``split_prompts`` makes the deterministic train / held-out split used for
training and for evaluation.
"""

from collections.abc import Sequence

import numpy as np

# Neutral on purpose: the policy must learn to steer the continuation, not
# inherit the sentiment of the prompt. Every opening ends mid-sentence.
STORY_OPENINGS: tuple[str, ...] = (
  "Once upon a time, there was a little dog named",
  "One day, Tom went to the park and",
  "Once upon a time, in a small town, there lived a girl named",
  "Lily and her mom went to the store to buy",
  "There was a big red ball in the garden. Ben",
  "One morning, a little bird sat on a branch and",
  "Sam had a box of crayons. He took a blue one and",
  "Once upon a time, there was a cat who lived in",
  "Anna looked out of the window and saw",
  "The sun came up over the hill. A small rabbit",
  "Tim and his dad made a tower out of wood. Then",
  "In a forest far away, there was an old tree that",
  "Nina found a round stone on the way home. She",
  "One day, a boy named Max wanted to",
  "The little car drove down the road until it",
  "Once upon a time, a frog lived near a pond. Every day, he",
  "Sue had a new hat. She put it on and",
  "It was a cloudy day, so Jack stayed inside and",
  "A little duck walked to the river with",
  "Once there was a brown bear who wanted to",
  "Emma and Leo were outside with a kite when",
  "The farmer had a cow, a pig and a horse. One day, the horse",
  "Once upon a time, there was a small boat on the sea. It",
  "Grandma gave Lucy a big box. Inside the box, there was",
  "Ben went to school with his classmate Sara. At lunch, they",
  "A mouse lived in a hole in the wall. At night, it",
  'One day, Mom said, "Let\'s go to the beach." Tom',
  "There was a tall giraffe at the zoo. A girl named Zoe",
  "Once upon a time, a king had a garden with",
  "The clock on the wall said it was time to",
  "Jake found a map under his bed. The map showed",
  "A little girl named Amy wanted a pet. She asked her dad",
  "The puppy ran into the kitchen and",
  "Once upon a time, there was a robot named Bob. Bob",
  "Kim had a pencil and some paper. One day, she drew",
  "The wind blew the leaves across the yard. Tom and Sue",
  "One night, Lily looked up at the moon and",
  "There was a little train that went up the hill every day. One day, it",
  "Ned had a red wagon. He put his toys in it and",
  "Once upon a time, a squirrel found a big nut. He",
  "The children sat in a circle while the teacher",
  "One summer day, Ella and her brother went to the farm to",
  "A fish swam to the bottom of the lake and saw",
  "Once upon a time, there was a girl who had a yellow dress. She",
  "Dad made soup for dinner. Nina sat down and",
  "The snow fell all night. In the morning, Ben",
  "Once upon a time, an owl lived in a barn. Every night, the owl",
  "Max and his sister went to see their grandpa. Grandpa",
  "A butterfly landed on a flower in the garden. A boy named Leo",
  "Once upon a time, there was a baker who made",
  "The bus came to the corner, and a little boy",
  "Sara had a doll named Rosie. One day, Rosie",
  "Once upon a time, a turtle wanted to go to",
  "Tom opened the door and saw his neighbor holding",
  "There was a small house at the end of the street. In the house,",
  "Lucy took her bucket and went to the sand to",
  "Once upon a time, a lion lived in the jungle. One day, the lion",
  "The kids went to the library to find a book about",
  "One day, a little girl named Sue walked to the river and",
  "Once upon a time, there was a tiny ant who carried",
  "Bob put on his coat and his boots, and then he",
  "The moon was big and round. A little fox",
)


def split_prompts(
  prompts: Sequence[str], *, eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
  """Deterministic train / held-out split of a prompt list.

  The prompts are permuted with ``np.random.default_rng(seed)``; the first
  ``n_eval = round(eval_fraction * N)`` of the permutation (at least 1 when
  ``eval_fraction > 0``) are held out. Both parts keep the input order, so the
  result depends only on (prompts, eval_fraction, seed).

  Args:
    prompts: N prompt strings (duplicates are allowed and kept).
    eval_fraction: fraction held out, in [0, 1).
    seed: seed of the permutation.

  Returns:
    (train, held_out) lists of strings, N - n_eval and n_eval long.

  Raises:
    ValueError: if ``eval_fraction`` is outside [0, 1), or the split would
      leave no training prompt.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  n = len(prompts)
  n_eval = 0 if eval_fraction == 0.0 else max(1, round(eval_fraction * n))
  if n - n_eval < 1:
    raise ValueError(
      f"split of {n} prompts with eval_fraction={eval_fraction} leaves no "
      "training prompt"
    )
  perm = np.random.default_rng(seed).permutation(n)
  held = np.zeros(n, dtype=bool)
  held[perm[:n_eval]] = True
  train = [p for p, h in zip(prompts, held, strict=True) if not h]
  held_out = [p for p, h in zip(prompts, held, strict=True) if h]
  return train, held_out


def story_prefixes(
  texts: Sequence[str], *, min_words: int, max_words: int, seed: int
) -> list[str]:
  """Cuts the opening words of sampled stories into extra prompts.

  For each text with at least ``min_words + 1`` whitespace-separated words
  (so something is left to continue), a length k is drawn uniformly from
  [min_words, min(max_words, n_words - 1)] with ``np.random.default_rng(seed)``
  and the first k words, joined by single spaces, become a prompt. Shorter
  texts are skipped. Exact duplicates of an earlier prefix are dropped (the
  first occurrence is kept), so a model that repeats itself does not weight
  the prompt set.

  Args:
    texts: sampled stories (decoded text, no special tokens).
    min_words: smallest prefix length in words, >= 1.
    max_words: largest prefix length in words, >= min_words.
    seed: seed of the length draws; one draw per kept text, in order.

  Returns:
    Prefixes in the order of their source texts.

  Raises:
    ValueError: if ``min_words < 1`` or ``max_words < min_words``.
  """
  if min_words < 1 or max_words < min_words:
    raise ValueError(
      f"need 1 <= min_words <= max_words, got min_words={min_words}, "
      f"max_words={max_words}"
    )
  rng = np.random.default_rng(seed)
  out: list[str] = []
  seen: set[str] = set()
  for text in texts:
    words = text.split()
    if len(words) < min_words + 1:
      continue
    hi = min(max_words, len(words) - 1)
    k = int(rng.integers(min_words, hi + 1))
    prefix = " ".join(words[:k])
    if prefix not in seen:
      seen.add(prefix)
      out.append(prefix)
  return out
