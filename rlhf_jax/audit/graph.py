"""Directed preference graphs: judgements, components, intransitive cycles.

A judgement "a is preferred to b" for one prompt is an edge a -> b (winner
-> loser) of that prompt's preference graph; the same pair judged several
times gives parallel edges, kept as a multiplicity ``W[a, b]`` (the number
of judgements a > b). Responses are identified by their exact text within a
prompt, so a graph has more than two nodes only where responses are shared:
ranked data (K responses per prompt), or several pairs of one prompt that
reuse responses (the default pipeline labels every pair within groups of
4). HH-RLHF gives every pair its own two responses: each prompt's graph is
one edge and no cycle can be observed at all.

Revealed preference (Afriat 1967; Varian 1982, GARP): a set of choices is
rationalisable by a scalar utility exactly when its revealed-preference
relation has no cycle. For pairwise judgements the relation is the graph
above, a scalar reward r rationalises a judgement a -> b when r(a) > r(b),
and the judgements no scalar can rationalise together are exactly those on
directed cycles.

Definitions used throughout (``audit.consistency`` reports them):

* contradictory pair: an unordered pair {a, b} judged both ways
  (W[a, b] > 0 and W[b, a] > 0), a 2-cycle; its minority labels,
  min(W[a, b], W[b, a]), are counted as contradictory judgements.
* cycle: a simple directed cycle of length >= 3 of the SUPPORT graph
  (a -> b when W[a, b] > 0), each counted once whatever its multiplicities
  (a cycle a -> b -> c -> a is one cycle, not three rotations). Counted
  exactly by enumeration up to a cap (then reported as a lower bound).
* cyclic triangle: a 3-cycle; their number is trace(A^3) / 3 for the
  support adjacency A (closed walks of length 3 in a graph without
  self-loops are triangles, each met once per rotation).

All functions are host numpy (no jit); node indices are 0..n-1 within a
graph.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Judgements(NamedTuple):
  """N pairwise judgements over responses of several prompts.

  Attributes:
    prompt: i64[N] prompt index of each judgement.
    winner: i64[N] response index (global over prompts) of the preferred
      response.
    loser: i64[N] response index of the other response.
    annotator: i64[N] annotator index, or None when the data has none.
  """

  prompt: np.ndarray
  winner: np.ndarray
  loser: np.ndarray
  annotator: np.ndarray | None = None


class Interned(NamedTuple):
  """Judgements with the texts their indices stand for.

  Attributes:
    judgements: the judgements (indices into the lists below).
    prompts: prompt texts, by prompt index.
    responses: response texts, by response index.
    response_prompt: i64[R] prompt index of each response.
    annotators: annotator ids, by annotator index (None without them).
  """

  judgements: Judgements
  prompts: list[str]
  responses: list[str]
  response_prompt: np.ndarray
  annotators: list[str] | None


def intern_pairs(
  prompts: Sequence[str],
  chosen: Sequence[str],
  rejected: Sequence[str],
  annotators: Sequence[str] | None = None,
) -> Interned:
  """Judgements from preference pairs; a response is its text in its prompt.

  Args:
    prompts: N prompt texts.
    chosen: N preferred responses.
    rejected: N dispreferred responses.
    annotators: N annotator ids (any hashable printed with str), or None.

  Returns:
    ``Interned``; equal texts under the same prompt share one index (the
    same text under two prompts is two responses).

  >>> x = intern_pairs(["p", "p"], ["a", "b"], ["b", "c"])
  >>> x.judgements.winner.tolist(), x.judgements.loser.tolist(), x.responses
  ([0, 1], [1, 2], ['a', 'b', 'c'])
  """
  n = len(prompts)
  if not len(chosen) == len(rejected) == n:
    raise ValueError(
      f"prompts, chosen and rejected differ in length: {n}, {len(chosen)}, "
      f"{len(rejected)}"
    )
  prompt_ix: dict[str, int] = {}
  resp_ix: dict[tuple[int, str], int] = {}
  resp_prompt: list[int] = []

  def response(p: int, text: str) -> int:
    key = (p, text)
    if key not in resp_ix:
      resp_ix[key] = len(resp_ix)
      resp_prompt.append(p)
    return resp_ix[key]

  pj, wj, lj = (np.zeros(n, np.int64) for _ in range(3))
  for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
    pj[i] = prompt_ix.setdefault(p, len(prompt_ix))
    wj[i] = response(int(pj[i]), c)
    lj[i] = response(int(pj[i]), r)
  ann, names = None, None
  if annotators is not None:
    if len(annotators) != n:
      raise ValueError(f"annotators: {len(annotators)} ids for {n} pairs")
    ann_ix: dict[str, int] = {}
    ann = np.array(
      [ann_ix.setdefault(str(a), len(ann_ix)) for a in annotators], np.int64
    )
    names = list(ann_ix)
  return Interned(
    Judgements(pj, wj, lj, ann),
    list(prompt_ix),
    [t for _, t in resp_ix],
    np.array(resp_prompt, np.int64),
    names,
  )


def ranked_pairs(
  ranks: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """The pairwise judgements implied by ranked rows (rank 0 = best).

  Args:
    ranks: per row, the rank of each of its responses; equal ranks tie.

  Returns:
    (row i64[M], winner i64[M], loser i64[M], tied pairs): every pair with
    different ranks is one judgement (indices within the row); pairs with
    equal ranks are counted as ties, not judgements.

  >>> _, w, l, t = ranked_pairs([[1, 0, 2]])
  >>> w.tolist(), l.tolist(), t
  ([0, 1, 1], [2, 0, 2], 0)
  """
  rows, win, lose, ties = [], [], [], 0
  for r, rk in enumerate(ranks):
    rk = list(rk)
    for i in range(len(rk)):
      for j in range(len(rk)):
        if rk[i] < rk[j]:
          rows.append(r)
          win.append(i)
          lose.append(j)
        elif rk[i] == rk[j] and i < j:
          ties += 1
  as_arr = (np.array(x, np.int64) for x in (rows, win, lose))
  return (*as_arr, ties)


class PromptGraph(NamedTuple):
  """One prompt's preference graph.

  Attributes:
    prompt: the prompt index.
    nodes: i64[n] global response indices; node i of the graph is
      ``nodes[i]``.
    weights: i64[n, n] W[a, b] = number of judgements a > b.
    rows: i64[m] indices of this prompt's judgements in the input.
    edge_a: i64[m] node index of each judgement's winner.
    edge_b: i64[m] node index of each judgement's loser.
  """

  prompt: int
  nodes: np.ndarray
  weights: np.ndarray
  rows: np.ndarray
  edge_a: np.ndarray
  edge_b: np.ndarray


def prompt_graphs(judgements: Judgements) -> list[PromptGraph]:
  """Splits judgements into one weighted graph per prompt (prompt order).

  Self-judgements (winner == loser) are not edges; callers count them.
  """
  j = judgements
  keep = np.flatnonzero(j.winner != j.loser)
  order = keep[np.argsort(j.prompt[keep], kind="stable")]
  bounds = np.flatnonzero(np.diff(j.prompt[order])) + 1
  out = []
  for rows in np.split(order, bounds) if order.size else []:
    nodes, inv = np.unique(
      np.concatenate([j.winner[rows], j.loser[rows]]), return_inverse=True
    )
    a, b = inv[: rows.size], inv[rows.size :]
    w = np.zeros((nodes.size, nodes.size), np.int64)
    np.add.at(w, (a, b), 1)
    out.append(PromptGraph(int(j.prompt[rows[0]]), nodes, w, rows, a, b))
  return out


def strongly_connected_components(adj: np.ndarray) -> list[np.ndarray]:
  """Strongly connected components (Tarjan 1972, iterative).

  Args:
    adj: bool[n, n] (or weights; nonzero = edge) adjacency, adj[a, b] for
      a -> b.

  Returns:
    The components as sorted i64 arrays, in REVERSE topological order of
    the condensation (a component comes before every component that has an
    edge into it); so reversing the list gives a topological order.

  >>> a = np.zeros((4, 4), bool); a[0, 1] = a[1, 0] = a[1, 2] = True
  >>> [c.tolist() for c in strongly_connected_components(a)]
  [[2], [0, 1], [3]]
  """
  n = adj.shape[0]
  succ = [np.flatnonzero(adj[v]).tolist() for v in range(n)]
  index = [-1] * n
  low = [0] * n
  on_stack = [False] * n
  stack: list[int] = []
  out: list[np.ndarray] = []
  counter = 0
  for root in range(n):
    if index[root] >= 0:
      continue
    work = [(root, 0)]
    while work:
      v, i = work.pop()
      if i == 0:
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack[v] = True
      recursed = False
      for k in range(i, len(succ[v])):
        w = succ[v][k]
        if index[w] < 0:
          work.append((v, k + 1))
          work.append((w, 0))
          recursed = True
          break
        if on_stack[w]:
          low[v] = min(low[v], index[w])
      if recursed:
        continue
      if low[v] == index[v]:
        comp = []
        while True:
          w = stack.pop()
          on_stack[w] = False
          comp.append(w)
          if w == v:
            break
        out.append(np.array(sorted(comp), np.int64))
      if work:
        parent = work[-1][0]
        low[parent] = min(low[parent], low[v])
  return out


def cyclic_triangles(weights: np.ndarray) -> int:
  """Number of directed 3-cycles of the support graph: trace(A^3) / 3.

  >>> w = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
  >>> cyclic_triangles(w)
  1
  """
  a = (np.asarray(weights) > 0).astype(np.int64)
  return int(np.trace(a @ a @ a)) // 3


def contradictory_pairs(weights: np.ndarray) -> tuple[int, int]:
  """(pairs judged both ways, their minority judgements).

  >>> contradictory_pairs(np.array([[0, 3], [1, 0]]))
  (1, 1)
  """
  w = np.asarray(weights)
  both = np.triu((w > 0) & (w.T > 0), 1)
  return int(both.sum()), int(np.minimum(w, w.T)[both].sum())


def simple_cycles(
  weights: np.ndarray, *, max_cycles: int = 10_000, min_length: int = 3
) -> tuple[list[list[int]], bool]:
  """Simple directed cycles of length >= ``min_length`` of the support graph.

  Backtracking within each strongly connected component from its smallest
  node (each cycle is found once, from its smallest node; Tiernan 1970),
  stopped after ``max_cycles`` cycles or 200 x max_cycles search steps.

  Args:
    weights: [n, n] multiplicities (nonzero = edge).
    max_cycles: stop after this many cycles.
    min_length: shortest cycle reported (3 leaves out 2-cycles, which are
      counted as contradictory pairs).

  Returns:
    (cycles as node lists, each starting at its smallest node; True when the
    search stopped early, so that the list is a lower bound).

  >>> w = np.ones((3, 3), int) - np.eye(3, dtype=int)
  >>> simple_cycles(w)
  ([[0, 1, 2], [0, 2, 1]], False)
  """
  adj = np.asarray(weights) > 0
  np.fill_diagonal(adj, False)
  cycles: list[list[int]] = []
  budget = [200 * max_cycles]
  for comp in strongly_connected_components(adj):
    if comp.size < min_length:
      continue
    members = set(comp.tolist())
    succ = {
      v: [int(w) for w in np.flatnonzero(adj[v]) if w in members]
      for v in members
    }
    for start in sorted(members):
      path = [start]
      on_path = {start}
      iters = [iter(w for w in succ[start] if w > start)]
      while iters:
        budget[0] -= 1
        if budget[0] < 0 or len(cycles) >= max_cycles:
          return cycles, True
        nxt = next(iters[-1], None)
        if nxt is None:
          iters.pop()
          on_path.discard(path.pop())
          continue
        if nxt in on_path:
          continue
        if start in succ[nxt] and len(path) + 1 >= min_length:
          cycles.append([*path, nxt])
        path.append(nxt)
        on_path.add(nxt)
        iters.append(iter(w for w in succ[nxt] if w > start))
  return cycles, False


def weak_components(graph: PromptGraph) -> list[np.ndarray]:
  """Weakly connected components of a prompt graph (node index arrays).

  In the default pipeline's feedback each group of K continuations is one
  component (K nodes, K (K - 1) / 2 judgements).
  """
  n = graph.nodes.size
  parent = np.arange(n)

  def find(x: int) -> int:
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = int(parent[x])
    return x

  for a, b in zip(graph.edge_a.tolist(), graph.edge_b.tolist(), strict=True):
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  roots = np.array([find(v) for v in range(n)])
  return [np.flatnonzero(roots == r) for r in np.unique(roots)]
