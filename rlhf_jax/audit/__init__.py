"""Consistency audits of preference data and reward models (host numpy).

Pairwise judgements reveal a latent reward the way consumer choices reveal
utility (Afriat 1967; Varian 1982, GARP): a set of judgements is
rationalisable by a scalar reward exactly when its preference graph has no
directed cycle. For each prompt with 3 or more responses this package
builds that graph (edge winner -> loser, with multiplicity), counts its
intransitive cycles, finds the fewest judgements to drop to make it
acyclic (the minimum feedback arc set: exact by dynamic programming over
subsets for components up to 16 responses, the Eades-Lin-Smyth 1993
heuristic above, flagged), scores rationalisability = 1 - minFAS /
judgements, estimates the label noise that produced the inconsistency,
and checks a reward model against the labels (agreement, calibration as a
reliability diagram after Guo et al. 2017, accuracy within length-matched
buckets, how it breaks the cycles).

  x = intern_pairs(prompts, chosen, rejected)     # texts -> indices
  a = audit_judgements(x.judgements, len(x.responses))
  a.summary["rationalisability"], label_noise(a)["noise"]
  reward_model_audit(r_chosen, r_rejected, len_chosen, len_rejected)

Shapes: N judgements, R responses, n nodes of one graph. Plots are in
``rlhf_jax.audit.plots`` (matplotlib, the ``cli`` extra), not imported
here.
"""

from rlhf_jax.audit.consistency import (
  NOT_CHECKABLE,
  GraphAudit,
  annotator_consistency,
  audit_judgements,
  label_noise,
)
from rlhf_jax.audit.fas import (
  EXACT_MAX_NODES,
  FeedbackArcSet,
  backward_weight,
  eades_lin_smyth,
  min_feedback_arc_set,
)
from rlhf_jax.audit.graph import (
  Interned,
  Judgements,
  cyclic_triangles,
  intern_pairs,
  prompt_graphs,
  ranked_pairs,
  simple_cycles,
  strongly_connected_components,
)
from rlhf_jax.audit.noise import estimate_noise, uniform_noise_estimate
from rlhf_jax.audit.reward import (
  calibration,
  flat_metrics,
  length_buckets,
  response_scores,
  reward_model_audit,
  reward_model_graph_audit,
)

__all__ = [
  "EXACT_MAX_NODES",
  "NOT_CHECKABLE",
  "FeedbackArcSet",
  "GraphAudit",
  "Interned",
  "Judgements",
  "annotator_consistency",
  "audit_judgements",
  "backward_weight",
  "calibration",
  "cyclic_triangles",
  "eades_lin_smyth",
  "estimate_noise",
  "flat_metrics",
  "intern_pairs",
  "label_noise",
  "length_buckets",
  "min_feedback_arc_set",
  "prompt_graphs",
  "ranked_pairs",
  "response_scores",
  "reward_model_audit",
  "reward_model_graph_audit",
  "simple_cycles",
  "strongly_connected_components",
  "uniform_noise_estimate",
]
