"""Summable statistics: metrics that merge over micro-batches and devices.

A batch mean cannot be combined with another batch's mean unless the counts
travel with it. Every loss of the library therefore returns its statistics
as pytrees of sums (docs/conventions.md, convention 15):

  Mean(total, count)   value = total / count (0 when count == 0)
  Sum(total)           value = total (counts, e.g. tokens)
  Max(max)             value = max (0 when nothing was valid)
  ExplainedVariance    value = 1 - Var[R - V] / Var[R] from (count, mean,
                       sum of squared deviations), merged exactly (Chan et
                       al. 1979)

``merge`` adds (or maxes) two statistics, ``reduce`` does the same over a
``pmap``/``shard_map`` axis and ``fold`` over a stacked leading axis (a
``lax.scan`` output). Merging the statistics of N micro-batches, or of the
shards of D devices, gives the statistic of the whole batch, up to float
rounding of the sums. ``values`` turns a dict of statistics into f32[]
metrics. Gradients never flow through a statistic.

>>> import jax.numpy as jnp
>>> from rlhf_jax import stats
>>> x, valid = jnp.array([1.0, 2.0, 9.0]), jnp.array([True, True, False])
>>> a = stats.Mean.of(x, valid)
>>> b = stats.Mean.of(jnp.array([6.0]))
>>> float(a.merge(b).value)  # (1 + 2 + 6) / 3, not mean(1.5, 6.0)
3.0
"""

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax.masked import (
  LossAggMode,
  aggregate_loss,
  aggregate_sums,
  safe_div,
)


def _f(x: jax.Array) -> jax.Array:
  """x as a stop-gradient array of at least f32."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jax.lax.stop_gradient(x)


def _valid(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """bool mask of x's shape (all True when None)."""
  if mask is None:
    return jnp.ones(jnp.shape(x), bool)
  return jnp.asarray(mask).astype(bool)


def _stat(cls):
  """A frozen dataclass registered as a pytree (every field an array)."""
  return jax.tree_util.register_dataclass(
    dataclasses.dataclass(frozen=True)(cls)
  )


class _Summed:
  """Statistics whose fields add under merge, psum and fold."""

  def merge(self, other):
    """The statistic of both batches."""
    return jax.tree.map(jnp.add, self, other)

  def reduce(self, axis_name: str | None):
    """The statistic over every device of ``axis_name`` (None: unchanged)."""
    if axis_name is None:
      return self
    return jax.tree.map(lambda x: jax.lax.psum(x, axis_name), self)

  def fold(self):
    """Merges a statistic stacked along a leading axis (a scan output)."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), self)


@_stat
class Mean(_Summed):
  """A mean as (sum, count): f32[] value = total / count, 0 if count == 0.

  Attributes:
    total: f32[] sum of the valid entries (or of per-row values).
    count: f32[] number of entries summed.
  """

  total: jax.Array
  count: jax.Array

  @classmethod
  def of(cls, x: jax.Array, mask: jax.Array | None = None) -> "Mean":
    """Mean of the valid entries of x; masked slots (even NaN) are ignored.

    Args:
      x: f[...] values (any float or bool dtype).
      mask: optional bool[...] of x's shape, True = valid.
    """
    m = _valid(x, mask)
    return cls(jnp.sum(jnp.where(m, _f(x), 0)), jnp.sum(m).astype(jnp.float32))

  @classmethod
  def of_loss(
    cls,
    per_token: jax.Array,
    mask: jax.Array,
    *,
    loss_agg_mode: LossAggMode = "token-mean",
  ) -> "Mean":
    """The statistic of ``masked.aggregate_loss`` (same aggregation)."""
    num, den = aggregate_sums(per_token, mask, loss_agg_mode=loss_agg_mode)
    return cls(_f(num), _f(den))

  @property
  def value(self) -> jax.Array:
    return safe_div(self.total, self.count)


@_stat
class Sum(_Summed):
  """A total (token counts, pair counts): f32[] value = total."""

  total: jax.Array

  @classmethod
  def of(cls, x: jax.Array, mask: jax.Array | None = None) -> "Sum":
    return cls(jnp.sum(jnp.where(_valid(x, mask), _f(x), 0)))

  @property
  def value(self) -> jax.Array:
    return self.total


@_stat
class Max:
  """A maximum: f32[] value = max over valid entries, 0 if there are none
  (inf and NaN are reported as they are).

  Attributes:
    max: f32[] running maximum (-inf while nothing was valid).
  """

  max: jax.Array

  @classmethod
  def of(cls, x: jax.Array, mask: jax.Array | None = None) -> "Max":
    return cls(jnp.max(jnp.where(_valid(x, mask), _f(x), -jnp.inf)))

  def merge(self, other: "Max") -> "Max":
    return Max(jnp.maximum(self.max, other.max))

  def reduce(self, axis_name: str | None) -> "Max":
    if axis_name is None:
      return self
    return Max(jax.lax.pmax(self.max, axis_name))

  def fold(self) -> "Max":
    return Max(jnp.max(self.max, axis=0))

  @property
  def value(self) -> jax.Array:
    # Only "nothing valid" reads as 0: an overflow (inf) or NaN shows.
    return jnp.where(self.max == -jnp.inf, 0, self.max)


def _pooled(count, mean, m2, total, keep=lambda x: x):
  """(count, mean, M2) of parts pooled by ``total`` (a sum over the parts).

  M2 = sum_i M2_i + n_i (mean_i - mean)^2 (Chan, Golub and LeVeque 1979):
  deviations are taken from the means, never from raw power sums, so no
  precision is lost when the mean is large against the spread. ``keep``
  gives the pooled mean the parts' rank (a leading axis when folding).
  """
  n = total(count)
  mu = safe_div(total(count * mean), n)
  return n, mu, total(m2 + count * (mean - keep(mu)) ** 2)


def _moments(x: jax.Array, m: jax.Array) -> tuple[jax.Array, ...]:
  n = jnp.sum(m).astype(jnp.float32)
  mean = safe_div(jnp.sum(jnp.where(m, x, 0)), n)
  return n, mean, jnp.sum(jnp.where(m, (x - mean) ** 2, 0))


@_stat
class ExplainedVariance:
  """1 - Var[R - V] / Var[R] over valid tokens (population variances).

  1 is a perfect critic, 0 no better than a constant. 0 when Var[R] is 0
  up to float rounding (<= 1e-12 (1 + mean(R)^2)): finite, so it cannot
  trip NaN checks. Held as the count, means and sums of squared
  deviations of R and R - V, merged exactly (``_pooled``).

  Attributes:
    count: f32[] valid tokens.
    ret_mean, ret_m2: f32[] mean of R and sum of (R - mean)^2.
    err_mean, err_m2: the same for R - V.
  """

  count: jax.Array
  ret_mean: jax.Array
  ret_m2: jax.Array
  err_mean: jax.Array
  err_m2: jax.Array

  @classmethod
  def of(
    cls, values: jax.Array, returns: jax.Array, mask: jax.Array
  ) -> "ExplainedVariance":
    """From f[B, T] values, returns and a bool[B, T] mask."""
    m = _valid(values, mask)
    ret = jnp.where(m, _f(returns), 0)
    err = jnp.where(m, ret - _f(values), 0)
    n, ret_mean, ret_m2 = _moments(ret, m)
    _, err_mean, err_m2 = _moments(err, m)
    return cls(n, ret_mean, ret_m2, err_mean, err_m2)

  def _pool(self, total, keep=lambda x: x) -> "ExplainedVariance":
    ret = _pooled(self.count, self.ret_mean, self.ret_m2, total, keep)
    err = _pooled(self.count, self.err_mean, self.err_m2, total, keep)
    return ExplainedVariance(ret[0], ret[1], ret[2], err[1], err[2])

  def merge(self, other: "ExplainedVariance") -> "ExplainedVariance":
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), self, other)
    return both.fold()

  def reduce(self, axis_name: str | None) -> "ExplainedVariance":
    if axis_name is None:
      return self
    return self._pool(lambda x: jax.lax.psum(x, axis_name))

  def fold(self) -> "ExplainedVariance":
    return self._pool(lambda x: jnp.sum(x, axis=0), lambda x: x[None])

  @property
  def value(self) -> jax.Array:
    var_r = safe_div(self.ret_m2, self.count)
    var_e = safe_div(self.err_m2, self.count)
    flat = var_r <= 1e-12 * (1 + self.ret_mean**2)
    return jnp.where(flat, 0, 1 - var_e / jnp.where(flat, 1, var_r))


Stat = Mean | Sum | Max | ExplainedVariance
Stats = dict[str, Stat]


def aggregated(
  name: str,
  per_token: jax.Array,
  mask: jax.Array,
  *,
  loss_agg_mode: LossAggMode = "token-mean",
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, Stats]:
  """``masked.aggregate_loss`` and, under ``name``, its summable statistic.

  Returns:
    (loss f32[], {name: Mean}) with the same aggregation; the statistic is
    merged over ``axis_name``.
  """
  loss = aggregate_loss(
    per_token,
    mask,
    loss_agg_mode=loss_agg_mode,
    axis_name=axis_name,
    normalizer=normalizer,
  )
  stat = Mean.of_loss(per_token, mask, loss_agg_mode=loss_agg_mode)
  return loss, reduce({name: stat}, axis_name)


def merge(a: Stats, b: Stats) -> Stats:
  """Merges two dicts of statistics with the same keys."""
  if a.keys() != b.keys():
    raise ValueError(f"statistics differ: {sorted(a)} vs {sorted(b)}")
  return {k: a[k].merge(b[k]) for k in a}


def reduce(stats: Stats, axis_name: str | None) -> Stats:
  """Merges each statistic over the devices of ``axis_name``."""
  return {k: s.reduce(axis_name) for k, s in stats.items()}


def fold(stats: Stats) -> Stats:
  """Merges statistics stacked along a leading axis (e.g. scan outputs)."""
  return {k: s.fold() for k, s in stats.items()}


def values(stats: Stats) -> dict[str, jax.Array]:
  """The f32[] value of each statistic, under the same keys."""
  return {k: s.value for k, s in stats.items()}
