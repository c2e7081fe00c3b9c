"""Minimum feedback arc set: the fewest judgements to drop for acyclicity.

For a weighted digraph W (W[a, b] = judgements a > b) and an ordering pi of
its nodes (best first), the judgements pi contradicts are its BACKWARD
edges:

  cost(pi) = sum over a placed below b of W[a, b].

The minimum over orderings is the weight of a minimum feedback arc set
(FAS): the fewest judgements whose removal leaves an acyclic graph, i.e.
that no scalar reward can rationalise (Afriat 1967 / Varian's GARP for
pairwise choices). The problem is NP-hard (Karp 1972) but decomposes over
strongly connected components: edges between components all point forward
in a topological order of the condensation, so

  minFAS(G) = sum over SCCs C of minFAS(C).

Each component with at most ``exact_max_nodes`` nodes is solved EXACTLY by
dynamic programming over subsets (Held & Karp 1962 for orderings; as used
for FAS by Lawler 1964): with dp[S] the least cost of placing the set S
first, in any order,

  dp[S + {v}] = min over v not in S of dp[S] + sum_{u in S} W[v, u],

(v is placed right below S: its wins over S are contradicted), O(2^n n^2)
time and O(2^n n) memory. Larger components use the greedy ordering of
Eades, Lin & Smyth (1993) ("A fast and effective heuristic for the
feedback arc set problem", IPL 47): repeatedly move sinks to the end,
sources to the front, else the node with the largest out-weight minus
in-weight to the front, followed by a local search that moves single nodes
to their best position until no move lowers the cost. The result is then
an upper bound, flagged ``exact=False``, reported beside the lower bound
sum_{a<b} min(W[a, b], W[b, a]) (every 2-cycle loses its minority).
"""

from typing import NamedTuple

import numpy as np

from rlhf_jax.audit.graph import strongly_connected_components

# Components up to this size are solved exactly (2^16 x 16 table entries).
EXACT_MAX_NODES = 16


class FeedbackArcSet(NamedTuple):
  """A (minimum) feedback arc set, as the ordering that leaves it.

  Attributes:
    cost: total weight of the backward edges of ``order`` (judgements the
      ordering contradicts); the minimum when ``exact``.
    order: i64[n] nodes, best first.
    exact: every component was solved exactly.
    lower_bound: a lower bound on the minimum (== cost when exact).
    approx_components: components solved by the heuristic.
  """

  cost: int
  order: np.ndarray
  exact: bool
  lower_bound: int
  approx_components: int


def backward_weight(weights: np.ndarray, order: np.ndarray) -> int:
  """Judgements an ordering contradicts: sum of W[a, b] with a below b.

  >>> w = np.array([[0, 2, 0], [0, 0, 1], [1, 0, 0]])
  >>> backward_weight(w, np.array([0, 1, 2]))
  1
  """
  w = np.asarray(weights)
  o = np.asarray(order)
  sub = w[np.ix_(o, o)]  # sub[i, j]: i-th placed beats j-th placed
  return int(np.tril(sub, -1).sum())


def _exact_order(w: np.ndarray) -> np.ndarray:
  """A minimum-cost ordering by the subset DP (module docstring)."""
  n = w.shape[0]
  full = 1 << n
  # c[v, S] = sum_{u in S} w[v, u], built by doubling over the bits.
  c = np.zeros((n, 1), np.int64)
  for b in range(n):
    c = np.concatenate([c, c + w[:, b : b + 1]], axis=1)
  masks = np.arange(full, dtype=np.int64)
  popcount = np.zeros(full, np.int64)
  for b in range(n):
    popcount += (masks >> b) & 1
  big = np.iinfo(np.int64).max // 4
  dp = np.full(full, big, np.int64)
  dp[0] = 0
  last = np.full(full, -1, np.int64)
  for k in range(1, n + 1):
    layer = masks[popcount == k]
    for v in range(n):
      sel = layer[(layer >> v) & 1 == 1]
      prev = sel ^ (1 << v)
      cand = dp[prev] + c[v, prev]
      better = cand < dp[sel]
      dp[sel[better]] = cand[better]
      last[sel[better]] = v
  order, s = [], full - 1
  while s:
    v = int(last[s])
    order.append(v)
    s ^= 1 << v
  return np.array(order[::-1], np.int64)


def eades_lin_smyth(weights: np.ndarray) -> np.ndarray:
  """Greedy ordering of Eades, Lin & Smyth (1993), weighted.

  Returns:
    i64[n] nodes, best first.

  >>> w = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]])
  >>> eades_lin_smyth(w).tolist()
  [0, 1, 2]
  """
  w = np.asarray(weights, np.int64).copy()
  np.fill_diagonal(w, 0)
  alive = np.ones(w.shape[0], bool)
  front: list[int] = []
  back: list[int] = []
  while alive.any():
    changed = True
    while changed:
      changed = False
      live = np.flatnonzero(alive)
      sub = w[np.ix_(live, live)]
      out_w, in_w = sub.sum(1), sub.sum(0)
      sinks = live[out_w == 0]
      if sinks.size:
        back.extend(sinks.tolist()[::-1])
        alive[sinks] = False
        changed = True
        continue
      sources = live[in_w == 0]
      if sources.size:
        front.extend(sources.tolist())
        alive[sources] = False
        changed = True
    if not alive.any():
      break
    live = np.flatnonzero(alive)
    sub = w[np.ix_(live, live)]
    v = int(live[np.argmax(sub.sum(1) - sub.sum(0))])
    front.append(v)
    alive[v] = False
  return np.array(front + back[::-1], np.int64)


def insertion_local_search(
  weights: np.ndarray, order: np.ndarray, *, max_passes: int = 50
) -> np.ndarray:
  """Moves single nodes to their best position while the cost drops.

  For node v taken out of the ordering, placing it after the first j of
  the others costs sum_{u among them} W[v, u] + sum_{u after} W[u, v]; both
  sums are prefix sums, so one node is placed in O(n).
  """
  w = np.asarray(weights, np.int64)
  order = np.asarray(order, np.int64).copy()
  for _ in range(max_passes):
    improved = False
    for v in order.tolist():
      rest = order[order != v]
      pos = int(np.flatnonzero(order == v)[0])
      beats = np.concatenate([[0], np.cumsum(w[v, rest])])  # v below prefix
      loses = w[rest, v]
      after = loses.sum() - np.concatenate([[0], np.cumsum(loses)])
      cost = beats + after
      j = int(np.argmin(cost))
      if cost[j] < cost[pos]:
        order = np.concatenate([rest[:j], [v], rest[j:]])
        improved = True
    if not improved:
      break
  return order


def pairwise_lower_bound(weights: np.ndarray) -> int:
  """sum_{a<b} min(W[a, b], W[b, a]): every ordering pays each 2-cycle's
  minority."""
  w = np.asarray(weights)
  return int(np.triu(np.minimum(w, w.T), 1).sum())


def min_feedback_arc_set(
  weights: np.ndarray, *, exact_max_nodes: int = EXACT_MAX_NODES
) -> FeedbackArcSet:
  """The ordering that contradicts the fewest judgements (module docstring).

  Args:
    weights: i64[n, n] W[a, b] = judgements a > b (diagonal ignored).
    exact_max_nodes: components up to this size are solved exactly; larger
      ones by Eades-Lin-Smyth + local search (``exact=False``).

  Returns:
    ``FeedbackArcSet``; cost == backward_weight(weights, order).

  >>> w = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])  # a 3-cycle
  >>> r = min_feedback_arc_set(w)
  >>> r.cost, r.exact
  (1, True)
  """
  w = np.asarray(weights, np.int64).copy()
  np.fill_diagonal(w, 0)
  comps = strongly_connected_components(w > 0)[::-1]  # topological order
  order: list[int] = []
  lower, approx = 0, 0
  for comp in comps:
    if comp.size == 1:
      order.append(int(comp[0]))
      continue
    sub = w[np.ix_(comp, comp)]
    if comp.size <= exact_max_nodes:
      local = _exact_order(sub)
      lower += backward_weight(sub, local)
    else:
      local = insertion_local_search(sub, eades_lin_smyth(sub))
      lower += pairwise_lower_bound(sub)
      approx += 1
    order.extend(comp[local].tolist())
  order_arr = np.array(order, np.int64)
  cost = backward_weight(w, order_arr)
  return FeedbackArcSet(cost, order_arr, approx == 0, lower, approx)
