"""Consistency audit of a preference dataset (revealed preference).

``audit_judgements`` builds each prompt's preference graph (audit.graph)
and reports, over the prompts where cycles CAN occur (3 or more distinct
responses; "checkable"):

* cycles: simple cycles of length >= 3 (exact count up to a cap), cyclic
  triangles, their lengths, the shortest examples;
* the minimum feedback arc set (audit.fas): the fewest judgements to drop
  so that one scalar ordering per prompt agrees with all the others, exact
  for components up to ``exact_max_nodes`` responses, an upper bound from
  the Eades-Lin-Smyth heuristic above (``min_fas_exact`` False);
* rationalisability = 1 - minFAS / checkable judgements: the largest
  fraction of judgements one scalar reward per prompt can agree with
  (Afriat 1967; Varian 1982: a consistent set of choices is exactly one
  that some utility rationalises);

and over every prompt: pairs judged both ways (contradictory duplicates,
2-cycles) and pairs judged more than once. When no prompt has 3 responses
(HH-RLHF: each pair brings its own two responses) nothing about cycles can
be observed: ``checkable`` is False and the cycle and rationalisability
fields are None, never 0, with ``message`` saying why.

``annotator_consistency`` splits the same judgements by annotator.
"""

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from rlhf_jax.audit.fas import EXACT_MAX_NODES, min_feedback_arc_set
from rlhf_jax.audit.graph import (
  Judgements,
  PromptGraph,
  contradictory_pairs,
  cyclic_triangles,
  prompt_graphs,
  simple_cycles,
  weak_components,
)
from rlhf_jax.audit.noise import estimate_noise

NOT_CHECKABLE = "no prompt has 3 or more responses; cycles cannot be checked"


@dataclasses.dataclass
class GraphAudit:
  """The result of ``audit_judgements``.

  Attributes:
    summary: JSON-able numbers (see ``audit_judgements``).
    contradicts: bool[N] the judgement is dropped by the best ordering of
      its prompt (it is in the minimum FAS); False outside checkable
      prompts.
    checkable: bool[N] the judgement's prompt has >= 3 responses.
    rank: i64[R] each response's place in its prompt's best ordering
      (0 = best; -1 for a response in no judgement).
    prompt_fas: i64[C] minimum FAS of each checkable prompt.
    examples: the shortest cycles enumerated (all of them unless the
      enumeration was capped), as (prompt index, [response indices]), each
      response preferred to the next and the last to the first.
    rounds: (sizes i64[G], fas i64[G]) of the complete rounds (components
      in which every pair of responses is judged exactly once) that the
      noise estimate uses.
  """

  summary: dict[str, Any]
  contradicts: np.ndarray
  checkable: np.ndarray
  rank: np.ndarray
  prompt_fas: np.ndarray
  examples: list[tuple[int, list[int]]]
  rounds: tuple[np.ndarray, np.ndarray]


def _complete_round(g: PromptGraph, comp: np.ndarray) -> bool:
  """Every pair of ``comp`` judged exactly once (a tournament)."""
  w = g.weights[np.ix_(comp, comp)]
  k = comp.size
  pair = w + w.T
  return bool(np.all(pair[np.triu_indices(k, 1)] == 1))


def audit_judgements(
  judgements: Judgements,
  num_responses: int,
  *,
  exact_max_nodes: int = EXACT_MAX_NODES,
  max_cycles: int = 10_000,
  max_examples: int = 5,
) -> GraphAudit:
  """The consistency audit of N judgements (module docstring).

  Args:
    judgements: the judgements (e.g. ``intern_pairs(...).judgements``).
    num_responses: R, the number of response indices.
    exact_max_nodes: strongly connected components up to this size get an
      exact minimum FAS; larger ones the heuristic (flagged).
    max_cycles: cap of the cycle enumeration (over the whole dataset).
    max_examples: shortest cycles kept as examples.

  Returns:
    ``GraphAudit``. Its summary: ``judgements``, ``prompts``,
    ``responses``, ``self_judgements`` (a response judged against itself,
    left out), ``checkable`` (bool), ``message`` (why not, else None),
    ``prompts_checkable``, ``judgements_checkable``,
    ``max_responses_per_prompt``, ``contradictory_pairs`` /
    ``contradictory_judgements`` (pairs judged both ways / their minority
    labels), ``repeated_pairs`` (unordered pairs judged more than once);
    over checkable prompts (None when there are none): ``cycles`` (simple
    cycles of length >= 3; a lower bound when ``cycles_capped``),
    ``cycle_lengths`` {length: count}, ``cyclic_triangles``,
    ``prompts_with_cycles``, ``min_fas``, ``min_fas_exact``,
    ``min_fas_lower_bound``, ``approx_components``, ``rationalisability``
    and ``inconsistency`` (= min_fas / judgements_checkable).
  """
  j = judgements
  n = j.winner.shape[0]
  contradicts = np.zeros(n, bool)
  checkable = np.zeros(n, bool)
  rank = np.full(num_responses, -1, np.int64)
  prompt_fas, examples_all = [], []
  cycle_lengths: Counter = Counter()
  sizes, round_fas = [], []
  s = {
    "contradictory_pairs": 0,
    "contradictory_judgements": 0,
    "repeated_pairs": 0,
    "cyclic_triangles": 0,
    "cycles": 0,
    "prompts_with_cycles": 0,
    "min_fas": 0,
    "min_fas_lower_bound": 0,
    "approx_components": 0,
  }
  capped, budget, max_n = False, max_cycles, 0
  for g in prompt_graphs(j):
    w = g.weights
    pairs, minority = contradictory_pairs(w)
    s["contradictory_pairs"] += pairs
    s["contradictory_judgements"] += minority
    s["repeated_pairs"] += int((np.triu(w + w.T, 1) > 1).sum())
    max_n = max(max_n, g.nodes.size)
    fas = min_feedback_arc_set(w, exact_max_nodes=exact_max_nodes)
    pos = np.empty(g.nodes.size, np.int64)
    pos[fas.order] = np.arange(g.nodes.size)
    rank[g.nodes] = pos
    contradicts[g.rows] = pos[g.edge_a] > pos[g.edge_b]
    if g.nodes.size < 3:
      continue
    checkable[g.rows] = True
    prompt_fas.append(fas.cost)
    s["min_fas"] += fas.cost
    s["min_fas_lower_bound"] += fas.lower_bound
    s["approx_components"] += fas.approx_components
    s["cyclic_triangles"] += cyclic_triangles(w)
    if budget > 0:
      cycles, stopped = simple_cycles(w, max_cycles=budget)
      capped |= stopped
      budget -= len(cycles)
    else:
      cycles = simple_cycles(w, max_cycles=1)[0]
      capped |= bool(cycles)
    s["cycles"] += len(cycles)
    s["prompts_with_cycles"] += bool(cycles)
    cycle_lengths.update(len(c) for c in cycles)
    examples_all += [(g.prompt, g.nodes[c].tolist()) for c in cycles]
    for comp in weak_components(g):
      if comp.size >= 3 and _complete_round(g, comp):
        sub = w[np.ix_(comp, comp)]
        sizes.append(comp.size)
        round_fas.append(min_feedback_arc_set(sub).cost)
  n_check = int(checkable.sum())
  examples_all.sort(key=lambda x: len(x[1]))
  summary: dict[str, Any] = {
    "judgements": n,
    "prompts": int(np.unique(j.prompt).size),
    "responses": int(num_responses),
    "self_judgements": int(np.sum(j.winner == j.loser)),
    "checkable": n_check > 0,
    "message": None if n_check else NOT_CHECKABLE,
    "prompts_checkable": len(prompt_fas),
    "judgements_checkable": n_check,
    "max_responses_per_prompt": max_n,
    "contradictory_pairs": s["contradictory_pairs"],
    "contradictory_judgements": s["contradictory_judgements"],
    "repeated_pairs": s["repeated_pairs"],
  }
  graph_keys = (
    "cycles",
    "cycles_capped",
    "cycle_lengths",
    "cyclic_triangles",
    "prompts_with_cycles",
    "min_fas",
    "min_fas_exact",
    "min_fas_lower_bound",
    "approx_components",
    "rationalisability",
    "inconsistency",
  )
  if n_check:
    summary.update({k: s[k] for k in s if k in graph_keys})
    summary["cycles_capped"] = capped
    summary["cycle_lengths"] = {
      str(k): v for k, v in sorted(cycle_lengths.items())
    }
    summary["min_fas_exact"] = s["approx_components"] == 0
    summary["inconsistency"] = s["min_fas"] / n_check
    summary["rationalisability"] = 1.0 - s["min_fas"] / n_check
  else:
    summary.update({k: None for k in graph_keys})
  return GraphAudit(
    summary=summary,
    contradicts=contradicts & checkable,
    checkable=checkable,
    rank=rank,
    prompt_fas=np.array(prompt_fas, np.int64),
    examples=examples_all[:max_examples],
    rounds=(np.array(sizes, np.int64), np.array(round_fas, np.int64)),
  )


def label_noise(audit: GraphAudit) -> dict[str, Any]:
  """The label-noise estimate of the audit's complete rounds
  (audit.noise.estimate_noise); ``noise`` None without any."""
  return estimate_noise(*audit.rounds)


def annotator_consistency(
  judgements: Judgements,
  audit: GraphAudit,
  names: list[str],
  *,
  num_responses: int,
) -> dict[str, Any]:
  """Consistency of each annotator, with the consensus and with itself.

  Args:
    judgements: the judgements, with ``annotator`` set.
    audit: ``audit_judgements`` of the same judgements (the consensus).
    names: annotator ids by index.
    num_responses: R.

  Returns:
    ``annotators`` (count); ``per_annotator``: {id: {judgements,
    checkable, consensus_agreement (share of its checkable judgements the
    pooled best ordering keeps; None without any), self_contradictory_pairs
    (pairs it judged both ways), rationalisability (1 - minFAS of its own
    judgements / those in its own prompts with >= 3 responses; None
    without such prompts)}}; ``shared_pairs``: unordered pairs judged by
    two or more annotators; ``shared_pair_agreement``: share of label
    pairs on them, from different annotators, that agree (None without
    any).
  """
  j = judgements
  if j.annotator is None:
    raise ValueError("judgements have no annotator column")
  per: dict[str, Any] = {}
  for a, name in enumerate(names):
    sel = j.annotator == a
    own = Judgements(j.prompt[sel], j.winner[sel], j.loser[sel], None)
    mine = audit_judgements(own, num_responses, max_cycles=1000)
    chk = audit.checkable[sel]
    per[name] = {
      "judgements": int(sel.sum()),
      "checkable": int(chk.sum()),
      "consensus_agreement": (
        1.0 - float(audit.contradicts[sel][chk].mean()) if chk.any() else None
      ),
      "self_contradictory_pairs": mine.summary["contradictory_pairs"],
      "rationalisability": mine.summary["rationalisability"],
    }
  # Labels of the same unordered pair by different annotators.
  lo = np.minimum(j.winner, j.loser)
  hi = np.maximum(j.winner, j.loser)
  order = np.lexsort((j.annotator, hi, lo))
  agree = total = shared = 0
  start = 0
  keys = np.stack([lo[order], hi[order]], 1)
  for end in range(1, order.size + 1):
    if end < order.size and (keys[end] == keys[start]).all():
      continue
    rows = order[start:end]
    start = end
    if np.unique(j.annotator[rows]).size < 2:
      continue
    shared += 1
    win = j.winner[rows]
    ann = j.annotator[rows]
    same = win[:, None] == win[None, :]
    other = ann[:, None] != ann[None, :]
    agree += int((same & other).sum())
    total += int(other.sum())
  return {
    "annotators": len(names),
    "per_annotator": per,
    "shared_pairs": shared,
    "shared_pair_agreement": agree / total if total else None,
  }
