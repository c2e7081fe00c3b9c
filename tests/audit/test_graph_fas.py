"""Preference graphs, cycles and minimum feedback arc sets.

Hand-made graphs with known cycles and known minimum FAS (found exactly),
planted cycles in a synthetic ranked dataset, and random small graphs
checked against brute force over all orderings and all vertex sequences.
"""

import itertools

import numpy as np
import pytest

from rlhf_jax import audit
from rlhf_jax.audit.fas import backward_weight


def _graph(n, edges):
  w = np.zeros((n, n), np.int64)
  for a, b in edges:
    w[a, b] += 1
  return w


def _pairs(prompt, edges, names="abcdefghijklmnopqrstuvwxyz"):
  """Pair rows (prompt, chosen, rejected) from winner -> loser edges."""
  return [(prompt, names[a], names[b]) for a, b in edges]


def _audit(rows):
  p, c, r = zip(*rows, strict=True)
  x = audit.intern_pairs(list(p), list(c), list(r))
  return audit.audit_judgements(x.judgements, len(x.responses)), x


# ------------------------------------------------------------- hand-made

# (edges, simple cycles of length >= 3, cyclic triangles, min FAS)
HAND = {
  # a > b > c > a: one 3-cycle; dropping any one judgement removes it.
  "triangle": ([(0, 1), (1, 2), (2, 0)], 1, 1, 1),
  # A transitive tournament on 4: no cycle at all.
  "transitive": ([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], 0, 0, 0),
  # The strong tournament on 4 (scores 2, 2, 1, 1): a>b, a>c, b>c, b>d,
  # c>d, d>a. Cycles a-b-d, a-c-d and a-b-c-d (3); triangles 2; dropping
  # d>a alone makes it transitive (1). (A plausible bug counting rotations
  # of each cycle gives 3 + 3 + 4 = 10.)
  "strong4": ([(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (3, 0)], 3, 2, 1),
  # Two disjoint 3-cycles joined by a forward edge: 2 cycles, FAS 2.
  "two_triangles": (
    [(0, 1), (1, 2), (2, 0), (2, 3), (3, 4), (4, 5), (5, 3)],
    2,
    2,
    2,
  ),
  # The complete digraph on 3 written as 6 judgements (every pair both
  # ways): 2 oriented 3-cycles, 3 contradictory pairs, FAS 3.
  "both_ways": ([(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)], 2, 2, 3),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_made_graphs(name):
  edges, cycles, triangles, fas = HAND[name]
  n = 1 + max(max(e) for e in edges)
  w = _graph(n, edges)
  found, capped = audit.simple_cycles(w)
  assert (len(found), capped) == (cycles, False)
  assert audit.cyclic_triangles(w) == triangles
  r = audit.min_feedback_arc_set(w)
  assert (r.cost, r.exact, r.lower_bound) == (fas, True, fas)
  assert backward_weight(w, r.order) == fas
  a, _ = _audit(_pairs("p", edges))
  s = a.summary
  assert s["checkable"] and s["message"] is None
  assert (s["cycles"], s["cyclic_triangles"], s["min_fas"]) == (
    cycles,
    triangles,
    fas,
  )
  assert s["rationalisability"] == pytest.approx(1 - fas / len(edges))
  assert a.contradicts.sum() == fas


def test_multiplicity_weights_the_feedback_arc_set():
  # a > b three times, b > c three times, c > a once: drop c > a (1).
  w = _graph(3, [(0, 1)] * 3 + [(1, 2)] * 3 + [(2, 0)])
  assert audit.min_feedback_arc_set(w).cost == 1
  # c > a five times: now dropping a > b (3) is cheapest, not c > a (5).
  w = _graph(3, [(0, 1)] * 3 + [(1, 2)] * 3 + [(2, 0)] * 5)
  r = audit.min_feedback_arc_set(w)
  assert r.cost == 3
  assert r.order.tolist() in ([1, 2, 0], [2, 0, 1])


def test_contradictory_duplicates_are_counted_on_two_response_prompts():
  rows = [("p", "a", "b"), ("p", "a", "b"), ("p", "b", "a"), ("q", "x", "y")]
  a, _ = _audit(rows)
  s = a.summary
  assert (s["contradictory_pairs"], s["contradictory_judgements"]) == (1, 1)
  assert s["repeated_pairs"] == 1
  # Only 2 responses per prompt: no cycle of 3 can be observed.
  assert not s["checkable"]
  assert s["message"] == audit.NOT_CHECKABLE


def test_hh_like_data_says_cycles_cannot_be_checked():
  # Every pair has its own prompt and responses (HH-RLHF): no cycle is
  # observable, which is not the same as 0 inconsistency.
  rows = [(f"prompt {i}", f"good {i}", f"bad {i}") for i in range(50)]
  a, _ = _audit(rows)
  s = a.summary
  assert s["checkable"] is False
  assert s["message"] == (
    "no prompt has 3 or more responses; cycles cannot be checked"
  )
  for key in ("cycles", "min_fas", "rationalisability", "inconsistency"):
    assert s[key] is None, key
  assert s["judgements_checkable"] == 0
  assert audit.label_noise(a)["noise"] is None


def _ranked_rows(prompt, k, flips):
  """All pairs of responses r0 > r1 > ... > r(k-1), pairs in ``flips``
  reversed."""
  rows = []
  for i, j in itertools.combinations(range(k), 2):
    w, l_ = (j, i) if (i, j) in flips else (i, j)
    rows.append((prompt, f"r{w}", f"r{l_}"))
  return rows


def test_planted_cycles_are_found_exactly():
  # 40 prompts, 6 ranked responses, all 15 pairs each. Reversing (0, 2)
  # plants exactly one cycle (r0 > r1 > r2 > r0); reversing (0, 3) plants
  # three (r0 r1 r3, r0 r2 r3, r0 r1 r2 r3); each costs one judgement.
  rows = []
  for p in range(40):
    flips = {0: {(0, 2)}, 1: {(0, 3)}, 2: {(0, 2), (3, 5)}}.get(p % 4, set())
    rows += _ranked_rows(f"prompt {p}", 6, flips)
  a, _ = _audit(rows)
  s = a.summary
  # Per 4 prompts: 1 + 3 + (1 + 1) cycles and 1 + 1 + 2 judgements.
  assert s["cycles"] == 10 * 6
  assert s["cycle_lengths"] == {"3": 10 * 5, "4": 10 * 1}
  assert s["min_fas"] == 10 * 4
  assert s["min_fas_exact"] is True
  assert s["prompts_with_cycles"] == 30
  assert s["rationalisability"] == pytest.approx(1 - 40 / (40 * 15))
  # The shortest examples are 3-cycles, each preferred to the next.
  prompt, cyc = a.examples[0]
  assert len(cyc) == 3


def test_large_component_is_approximate_and_flagged():
  # 20 responses in order, the last preferred to the first: one cycle
  # through all 20 (one strongly connected component of 20 > 16 nodes).
  rows = _ranked_rows("p", 20, {(0, 19)})
  a, _ = _audit(rows)
  s = a.summary
  assert s["min_fas_exact"] is False
  assert s["approx_components"] == 1
  assert s["min_fas"] == 1  # the heuristic finds the optimum here
  assert s["min_fas_lower_bound"] == 0  # no 2-cycle to bound it by
  w = _graph(20, [(i, j) for i, j in itertools.combinations(range(20), 2)])
  w[0, 19], w[19, 0] = 0, 1
  assert audit.min_feedback_arc_set(w, exact_max_nodes=20).cost == 1


# ---------------------------------------------------------- brute force


def _brute_fas(w):
  n = w.shape[0]
  return min(
    backward_weight(w, np.array(p)) for p in itertools.permutations(range(n))
  )


def _brute_cycles(w):
  """Simple cycles of length >= 3: vertex sequences starting at their
  smallest vertex, every consecutive edge (and last -> first) present."""
  n = w.shape[0]
  count = 0
  for k in range(3, n + 1):
    for seq in itertools.permutations(range(n), k):
      if seq[0] != min(seq):
        continue
      if all(w[seq[i], seq[(i + 1) % k]] > 0 for i in range(k)):
        count += 1
  return count


def _random_graph(rng, n):
  w = rng.integers(0, 3, (n, n)) * (rng.random((n, n)) < 0.45)
  np.fill_diagonal(w, 0)
  return w.astype(np.int64)


@pytest.mark.parametrize("seed", range(4))
def test_random_graphs_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  for _ in range(25):
    n = int(rng.integers(2, 8))
    w = _random_graph(rng, n)
    r = audit.min_feedback_arc_set(w)
    assert r.exact and r.cost == _brute_fas(w) == r.lower_bound
    assert sorted(r.order.tolist()) == list(range(n))
    # The heuristic is an upper bound, never below the optimum.
    approx = audit.min_feedback_arc_set(w, exact_max_nodes=1)
    assert approx.cost >= r.cost
    assert approx.lower_bound <= r.cost
    if n <= 6:
      assert len(audit.simple_cycles(w)[0]) == _brute_cycles(w)
    tri = sum(
      (w[a, b] > 0) * (w[b, c] > 0) * (w[c, a] > 0)
      for a, b, c in itertools.permutations(range(n), 3)
    )
    assert audit.cyclic_triangles(w) == tri // 3


def test_exact_dp_at_sixteen_nodes_matches_a_planted_optimum():
  # A transitive tournament on 16 with 4 reversed pairs: r15 > r0 joins
  # everything into one strongly connected component of 16 (solved by the
  # DP). The minimum FAS is 4: dropping the 4 reversed judgements restores
  # the order, and no ordering does better since the cycles r0 r1 r2,
  # r6 r7 r8, r12 r13 r14 and r0 r3 r15 share no judgement.
  n = 16
  flips = {(0, 2), (6, 8), (12, 14), (0, 15)}
  w = np.zeros((n, n), np.int64)
  for i, j in itertools.combinations(range(n), 2):
    if (i, j) in flips:
      w[j, i] = 1
    else:
      w[i, j] = 1
  assert len(audit.strongly_connected_components(w > 0)) == 1
  r = audit.min_feedback_arc_set(w)
  assert (r.cost, r.exact, r.approx_components) == (4, True, 0)


def test_scc_matches_reachability():
  rng = np.random.default_rng(7)
  for _ in range(20):
    n = int(rng.integers(1, 9))
    adj = rng.random((n, n)) < 0.25
    np.fill_diagonal(adj, False)
    reach = adj | np.eye(n, dtype=bool)
    for _ in range(n):
      reach = reach | ((reach.astype(int) @ reach.astype(int)) > 0)
    same = reach & reach.T
    comps = audit.strongly_connected_components(adj)
    label = np.empty(n, int)
    for i, c in enumerate(comps):
      label[c] = i
    assert np.array_equal(same, label[:, None] == label[None, :])
    # Reverse topological order: no edge from an earlier component to a
    # later one.
    for a, b in zip(*np.nonzero(adj), strict=True):
      assert label[a] >= label[b]


def test_cycle_enumeration_cap_is_flagged():
  w = np.ones((7, 7), np.int64) - np.eye(7, dtype=np.int64)
  cycles, capped = audit.simple_cycles(w, max_cycles=50)
  assert capped and len(cycles) == 50


def test_ranked_pairs():
  rows, win, lose, ties = audit.ranked_pairs([[0, 1, 2], [0, 1, 1]])
  assert np.stack([rows, win, lose], 1).tolist() == [
    [0, 0, 1],
    [0, 0, 2],
    [0, 1, 2],
    [1, 0, 1],
    [1, 0, 2],
  ]
  assert ties == 1


def test_annotator_consistency():
  # Annotator "x" is a clean order a > b > c (a > b twice); "y" says
  # b > a, c > a and a > c: a 2-cycle of its own.
  p = ["p"] * 7
  c = ["a", "a", "b", "a", "b", "c", "a"]
  r = ["b", "b", "c", "c", "a", "a", "c"]
  ann = ["x", "x", "x", "x", "y", "y", "y"]
  x = audit.intern_pairs(p, c, r, ann)
  a = audit.audit_judgements(x.judgements, len(x.responses))
  # Pooled, a > b > c contradicts 2 judgements (b > a, c > a); b > a > c 3.
  assert a.summary["min_fas"] == 2
  out = audit.annotator_consistency(
    x.judgements, a, x.annotators, num_responses=len(x.responses)
  )
  per = out["per_annotator"]
  assert per["x"] == {
    "judgements": 4,
    "checkable": 4,
    "consensus_agreement": 1.0,
    "self_contradictory_pairs": 0,
    "rationalisability": 1.0,
  }
  assert per["y"]["consensus_agreement"] == pytest.approx(1 / 3)
  assert per["y"]["self_contradictory_pairs"] == 1
  assert per["y"]["rationalisability"] == pytest.approx(2 / 3)
  # Shared pairs (a, b): labels x a, x a, y b -> 0 of 4 cross-annotator
  # label pairs agree; (a, c): x a, y c, y a -> 2 of 4. 2 / 8 in all.
  assert out["shared_pairs"] == 2
  assert out["shared_pair_agreement"] == pytest.approx(0.25)
