"""Gold sentiment scorer: the VADER lexicon's compound score.

The simulated annotator of the default pipeline prefers the happier story.
"Happier" is measured by VADER (Hutto & Gilbert 2014, "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM), a
lexicon of ~7,500 words whose valences in [-4, 4] are the means of ten human
ratings, plus rules for negation ("not happy"), boosters ("very"), capitals,
"but" and exclamation marks. Per text the rule-adjusted valences are summed
to s and squashed (their section 3.3; `normalize` in the package):

  compound = s / sqrt(s^2 + alpha),   alpha = 15,

so compound is in [-1, 1]; the package rounds it to 4 decimals. Example:
"The dog was happy." has one lexicon word, happy = 2.7, so
compound = 2.7 / sqrt(2.7^2 + 15) = 0.5719.

The lexicon ships inside the vaderSentiment wheel, so scoring works offline.
Scoring is pure Python. vaderSentiment is part of the ``cli`` extra
(``pip install "rlhf_jax[cli]"``); it is imported when a ``GoldScorer`` is
built.
"""

from collections.abc import Sequence

import numpy as np

from rlhf_jax._optional import import_cli_dependency


class GoldScorer:
  """VADER compound sentiment of texts, the gold reward of the sentiment task.

  Deterministic and stateless after construction (construction loads the
  lexicon, so build one and reuse it).
  """

  def __init__(self) -> None:
    vader = import_cli_dependency(
      "vaderSentiment.vaderSentiment", purpose="GoldScorer (VADER sentiment)"
    )
    self._analyzer = vader.SentimentIntensityAnalyzer()

  def score(self, texts: Sequence[str]) -> np.ndarray:
    """Scores each text.

    Args:
      texts: N strings. An empty or sentiment-free text scores 0.0.

    Returns:
      f64[N] VADER compound scores in [-1, 1] (rounded to 4 decimals by
      VADER), in input order.

    Raises:
      TypeError: if ``texts`` is a single string (a common slip that would
        otherwise score each character) or holds a non-string.
    """
    if isinstance(texts, str):
      raise TypeError("GoldScorer.score takes a sequence of strings, not a str")
    out = np.empty(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(
          f"GoldScorer.score: item {i} is {type(text).__name__}, expected str"
        )
      out[i] = self._analyzer.polarity_scores(text)["compound"]
    return out

  __call__ = score
