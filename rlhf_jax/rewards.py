"""Rewards written in plain Python, scored on the host between two programs.

A reward function has the shape TRL users know::

  def reward_fn(prompts: list[str], completions: list[str], **columns)
      -> list[float | None]

``columns`` are the dataset's other fields of each row's prompt (e.g. a
reference answer), repeated for the G samples of the prompt. A function may
return None for rows it does not apply to (TRL's convention): the row gets
no contribution from it, and the Nones are counted. Several functions are
combined as a weighted sum (``RewardFunctions``).

``score_on_host`` runs between the compiled rollout program and the
compiled update program (``train.make_grpo_rollout`` /
``train.make_grpo_update``): each process reads only the rows it holds
(its addressable shards), decodes and scores them, and the scores become
one global array with the rollout's batch sharding. Nothing is sent
between hosts and no compiled program calls back into Python, so there is
no callback deadlock on a mesh or across processes.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import pathlib
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

RewardFn = Callable[..., Sequence[float | None]]
# decode(ids i32[N, T], mask bool[N, T]) -> N texts.
Decode = Callable[[np.ndarray, np.ndarray], list[str]]


class RewardError(ValueError):
  """A reward function that cannot be loaded, or returned a bad value.

  The message names the function (its ``module:function`` spec) and what
  was expected.
  """


def _import_file(path: pathlib.Path, spec: str):
  """The module of a ``.py`` file, imported once per resolved path."""
  path = path.resolve()
  digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
  name = f"_rlhf_jax_reward_{path.stem}_{digest}"
  if name in sys.modules:  # a second spec naming the same file
    return sys.modules[name]
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise RewardError(f"--reward {spec}: cannot import {path}")
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  try:
    module_spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]  # no half-run module for a later retry
    raise
  return module


def load_reward_function(spec: str) -> RewardFn:
  """The function named by ``module:function``.

  ``module`` is an importable module (``my_pkg.rewards``) or the path of a
  ``.py`` file (``rewards/length.py``); the module's top level runs once,
  as any import does.

  Raises:
    RewardError: no colon, the module or file cannot be imported, or the
      attribute is missing, not callable or takes fewer than two
      positional arguments (the message names the spec).
  """
  module_name, sep, attr = spec.rpartition(":")
  if not sep or not module_name or not attr:
    raise RewardError(
      f"--reward {spec!r}: expected module:function (e.g. "
      "rlhf_jax.tasks.rewards:sentiment or path/to/file.py:fn)"
    )
  try:
    if module_name.endswith(".py"):
      path = pathlib.Path(module_name)
      if not path.is_file():
        raise RewardError(f"--reward {spec}: no such file {path}")
      module = _import_file(path, spec)
    else:
      module = importlib.import_module(module_name)
  except RewardError:
    raise
  except (Exception, SystemExit) as e:  # the user's module failed to import
    raise RewardError(
      f"--reward {spec}: importing {module_name} failed: "
      f"{type(e).__name__}: {e} ({_where_raised(e, None, 1)}; --debug "
      "shows the traceback)"
    ) from e
  if not hasattr(module, attr):
    raise RewardError(
      f"--reward {spec}: {module_name} has no function {attr!r}"
    )
  fn = getattr(module, attr)
  if not callable(fn):
    raise RewardError(
      f"--reward {spec}: {module_name}.{attr} is a "
      f"{type(fn).__name__}, not a function"
    )
  _check_signature(fn, spec, attr)
  return fn


def _check_signature(fn: Callable, spec: str, name: str) -> None:
  """Raises RewardError unless ``fn`` takes (prompts, completions)
  positionally; the columns come as keywords, so are not asked for. A
  callable without a signature (some builtins) passes."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return
  kinds = [p.kind for p in params]
  kind = inspect.Parameter
  positional = (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)
  if kind.VAR_POSITIONAL in kinds or sum(k in positional for k in kinds) >= 2:
    return
  takes = ", ".join(p.name for p in params) or "nothing"
  raise RewardError(
    f"--reward {spec}: {name} takes ({takes}); a reward function is "
    "called as fn(prompts, completions, **columns)"
  )


logger = logging.getLogger("rlhf_jax.rewards")


@dataclasses.dataclass(frozen=True)
class RewardFunctions:
  """Reward functions and their weights: r = sum_k w_k r_k.

  Attributes:
    fns: the functions.
    weights: one weight per function.
    names: one name per function (its spec), for metrics and errors.
  """

  fns: tuple[RewardFn, ...]
  weights: tuple[float, ...]
  names: tuple[str, ...]
  # Host-side memory of the warning below (said once per instance).
  _warned: dict = dataclasses.field(
    default_factory=dict, init=False, compare=False, repr=False
  )

  @classmethod
  def load(
    cls, specs: Sequence[str], weights: Sequence[float] = ()
  ) -> "RewardFunctions":
    """Loads ``module:function`` specs (weights default to 1).

    Raises:
      RewardError: a spec cannot be loaded, no spec, or a weight count or
        value that does not fit.
    """
    if isinstance(specs, str):
      specs = (specs,)
    if not specs:
      raise RewardError("--reward: expected at least one module:function")
    weights = tuple(weights or ()) or (1.0,) * len(specs)
    if len(weights) != len(specs):
      raise RewardError(
        f"--reward-weights: {len(weights)} weights for {len(specs)} "
        "--reward functions; expected one per function"
      )
    for w in weights:
      if not isinstance(w, int | float) or not math.isfinite(w):
        raise RewardError(f"--reward-weights: {w!r} is not a finite number")
    if not any(weights):
      raise RewardError(
        "--reward-weights: all 0, so every reward would be 0 and nothing "
        "learned; give at least one function a weight"
      )
    fns = tuple(load_reward_function(s) for s in specs)
    return cls(fns, tuple(float(w) for w in weights), tuple(specs))

  def __call__(
    self,
    prompts: list[str],
    completions: list[str],
    **columns: list,
  ) -> tuple[np.ndarray, dict[str, float]]:
    """Weighted rewards f32[N] and per-function metrics.

    Returns:
      (rewards f32[N], {"rewards/<fn>/mean": mean over the rows it
      scored, "rewards/<fn>/none_count": rows it returned None for}),
      <fn> the function's name (TRL's names), the spec's end.

    A completion that every function returned None for gets reward 0;
    the first batch holding one logs a warning (TRL's too), since a run
    whose functions all return None trains on nothing.

    Raises:
      RewardError: a function raised, returned other than N values, or a
        value that is neither a finite number nor None.
    """
    n = len(completions)
    total = np.zeros(n, np.float64)
    unscored = np.ones(n, bool)
    metrics = {}
    keys = self.metric_names()
    for fn, w, name, key in zip(
      self.fns, self.weights, self.names, keys, strict=True
    ):
      values = _checked(fn, name, prompts, completions, columns, n)
      scored = ~np.isnan(values)
      unscored &= ~scored
      total += w * np.where(scored, values, 0.0)
      key = "rewards/" + key
      metrics[f"{key}/mean"] = (
        float(values[scored].mean()) if scored.any() else float("nan")
      )
      metrics[f"{key}/none_count"] = float(n - scored.sum())
    if unscored.any() and not self._warned:
      self._warned["none"] = True
      logger.warning(
        "every --reward function returned None for %d of %d completions "
        "(the first: completion %d); they get reward 0, so a batch of only "
        "those trains on nothing (rewards/<fn>/none_count counts them)",
        int(unscored.sum()),
        n,
        int(np.argmax(unscored)),
      )
    with np.errstate(over="ignore"):  # an overflow is the error below
      out = total.astype(np.float32)
    if not np.all(np.isfinite(out)):
      i = int(np.argmin(np.isfinite(out)))
      raise RewardError(
        f"the weighted reward of completion {i} is {float(total[i])!r}, "
        "beyond "
        "float32 (|r| < 3.4e38 expected); scale the --reward functions"
      )
    return out, metrics

  def metric_names(self) -> tuple[str, ...]:
    """One distinct name per function for its metrics: the function's
    name (TRL's), the whole spec where two share that name, numbered
    (``#1``, ``#2``) where a spec is given twice."""
    short = [s.rpartition(":")[2] for s in self.names]
    names = [
      spec if short.count(sh) > 1 else sh
      for spec, sh in zip(self.names, short, strict=True)
    ]
    seen: dict[str, int] = {}
    out = []
    for name in names:
      seen[name] = seen.get(name, 0) + 1
      out.append(f"{name}#{seen[name]}" if names.count(name) > 1 else name)
    return tuple(out)


def _source_file(fn: Callable) -> str | None:
  """The file defining ``fn``: a function, a functools.partial of one, or
  a callable object (its class's __call__)."""
  fn = inspect.unwrap(getattr(fn, "func", fn))
  code = getattr(fn, "__code__", None)
  if code is None:  # a callable object: its class's method
    code = getattr(vars(type(fn)).get("__call__"), "__code__", None)
  return code.co_filename if code is not None else None


def _where_raised(e: BaseException, filename: str | None, skip: int) -> str:
  """ "at FILE:LINE": the deepest frame of ``e`` (past its first ``skip``)
  in ``filename`` (the user's line, not a library's), else the deepest
  frame outside Python's frozen import machinery."""
  frames = [
    f
    for f in traceback.extract_tb(e.__traceback__)[skip:]
    if not f.filename.startswith("<frozen")
  ]
  if not frames:
    return "at the call"
  own = [f for f in frames if filename and f.filename == filename]
  frame = (own or frames)[-1]
  return f"at {frame.filename}:{frame.lineno}"


def _checked(fn, name, prompts, completions, columns, n) -> np.ndarray:
  """f64[N] values of one function, NaN where it returned None."""
  try:
    out = fn(prompts, completions, **columns)
  except (Exception, SystemExit) as e:  # the user's function failed
    raise RewardError(
      f"reward function {name} raised {type(e).__name__}: {e} "
      f"({_where_raised(e, _source_file(fn), 1)}; --debug shows the "
      "traceback)"
    ) from e
  if isinstance(out, str | bytes):
    raise RewardError(
      f"reward function {name} returned a {type(out).__name__}; expected "
      f"a list of {n} floats"
    )
  try:
    out = list(out)
  except TypeError as e:
    raise RewardError(
      f"reward function {name} returned {type(out).__name__}; expected "
      f"a list of {n} floats"
    ) from e
  if len(out) != n:
    raise RewardError(
      f"reward function {name} returned {len(out)} values for {n} "
      "completions; expected one per completion"
    )
  values = np.full(n, np.nan)
  for i, v in enumerate(out):
    if v is None:
      continue
    try:
      # A string is not a number, even one float() would parse.
      f = math.nan if isinstance(v, (str, bytes)) else float(v)
    except (TypeError, ValueError):
      f = math.nan
    if not math.isfinite(f):
      raise RewardError(
        f"reward function {name} returned {v!r} for completion {i}; "
        "expected a finite number or None"
      )
    values[i] = f
  return values


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """The rows of a batch-sharded array that this process holds.

  Only dimension 0 may be split between processes; other dimensions may be
  split between this process's devices (their shards are joined).

  Returns:
    (rows [N_local, ...] as numpy, their global row indices i64[N_local],
    sorted and without replicas).

  Raises:
    ValueError: a row of which this process holds only a part (another
      dimension split across processes).
  """
  if x.is_fully_addressable:
    return np.asarray(x), np.arange(x.shape[0])
  shards = [(s.index, np.asarray(s.data)) for s in x.addressable_shards]
  index = np.array(
    sorted(
      {r for idx, _ in shards for r in range(*idx[0].indices(x.shape[0]))}
    ),
    np.int64,
  )
  position = np.full(x.shape[0], -1, np.int64)
  position[index] = np.arange(len(index))
  rows = np.zeros((len(index), *x.shape[1:]), x.dtype)
  held = np.zeros(rows.shape, bool)
  for idx, data in shards:
    at = (position[np.arange(x.shape[0])[idx[0]]], *idx[1:])
    rows[at] = data
    held[at] = True
  if not held.all():
    raise ValueError(
      f"this process holds only part of some rows of a {x.shape} array "
      f"({x.sharding}); split only dimension 0 across processes"
    )
  return rows, index


def score_on_host(
  response_ids: jax.Array,
  response_mask: jax.Array,
  reward: Callable[..., tuple[np.ndarray, dict[str, float]]],
  *,
  decode: Decode,
  prompts: Sequence[str],
  group_size: int,
  columns: Mapping[str, Sequence] | None = None,
) -> tuple[jax.Array, dict[str, float]]:
  """Scores this process's rows on the host; a global f32[B] array back.

  Args:
    response_ids: i32[B, T] the rollout's responses (any sharding along B).
    response_mask: bool[B, T], same sharding.
    reward: e.g. a ``RewardFunctions``: (prompts, completions, **columns)
      -> (f32[N] rewards, metrics).
    decode: token ids and mask -> texts.
    prompts: the B / G prompt texts of the batch (global, in row order).
    group_size: G; row r continues prompt r // G.
    columns: other fields of each prompt (each B / G long), passed through.

  Returns:
    (scores f32[B] with the sharding of response_ids' rows, the reward's
    metrics over all rows: with several processes, each one's sums and
    counts are gathered (a few scalars)).

  Raises:
    RewardError: from the reward; ValueError: prompts or columns of the
      wrong length.
  """
  rows = response_ids.shape[0]
  if len(prompts) * group_size != rows:
    raise ValueError(
      f"{len(prompts)} prompts x group_size {group_size} != {rows} rows"
    )
  ids, index = local_rows(response_ids)
  mask, _ = local_rows(response_mask)
  owner = index // group_size
  kwargs = {}
  for key, values in (columns or {}).items():
    if len(values) != len(prompts):
      raise ValueError(
        f"column {key!r}: {len(values)} values, expected "
        f"{len(prompts)} (one per prompt)"
      )
    kwargs[key] = [values[i] for i in owner]
  scores, metrics = reward(
    [prompts[i] for i in owner], decode(ids, mask), **kwargs
  )
  full = np.zeros(rows, np.float32)
  full[index] = scores
  sharding = _row_sharding(response_ids)
  out = jax.make_array_from_callback((rows,), sharding, lambda i: full[i])
  if jax.process_count() > 1:
    metrics = _global_metrics(metrics, len(index))
  return out, metrics


def _global_metrics(metrics: dict[str, float], n: int) -> dict[str, float]:
  """Per-function means and None counts over every process's rows.

  Each process sends (sum, scored rows, None rows) per function: a few
  scalars through ``process_allgather``, outside any compiled step.
  """
  from jax.experimental import multihost_utils  # noqa: PLC0415

  keys = [k[: -len("/mean")] for k in metrics if k.endswith("/mean")]
  local = []
  for k in keys:
    none = metrics[f"{k}/none_count"]
    mean = metrics[f"{k}/mean"]
    local.append([0.0 if none == n else mean * (n - none), n - none, none])
  total = np.asarray(multihost_utils.process_allgather(np.array(local)))
  total = total.reshape(-1, len(keys), 3).sum(axis=0)
  out = {}
  for k, (s, scored, none) in zip(keys, total, strict=True):
    out[f"{k}/mean"] = float(s / scored) if scored else float("nan")
    out[f"{k}/none_count"] = float(none)
  return out


def _row_sharding(x: jax.Array) -> jax.sharding.Sharding:
  """The sharding of a [B] array split like the rows of ``x``."""
  sharding = x.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = sharding.spec[0] if len(sharding.spec) else None
    return jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(spec)
    )
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  raise ValueError(
    f"score_on_host: rows sharded by a {type(sharding).__name__}; expected "
    "a NamedSharding (jit with shardings) or one device"
  )
