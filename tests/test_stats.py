"""Summable statistics (rlhf_jax.stats): merging parts gives the whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from rlhf_jax import stats as st


def _data(seed=0, shape=(8, 6), mean=0.0, spread=1.0):
  rng = np.random.default_rng(seed)
  x = (mean + spread * rng.normal(size=shape)).astype(np.float32)
  mask = rng.random(shape) < 0.7
  mask[3] = False  # an all-masked row
  return x, mask


def _all(x, v, mask):
  return {
    "mean": st.Mean.of(x, mask),
    "sum": st.Sum.of(mask),
    "max": st.Max.of(x, mask),
    "ev": st.ExplainedVariance.of(v, x, mask),
  }


def _reference(x, v, mask):
  x64, v64 = x.astype(np.float64)[mask], v.astype(np.float64)[mask]
  return {
    "mean": x64.mean(),
    "sum": mask.sum(),
    "max": x64.max(),
    "ev": 1 - np.var(x64 - v64) / np.var(x64),
  }


def test_merge_and_fold_of_parts_equal_the_whole():
  x, mask = _data()
  v = x + np.float32(0.3) * _data(1)[0]
  want = _reference(x, v, mask)
  parts = [
    _all(x[i : i + 2], v[i : i + 2], mask[i : i + 2]) for i in (0, 2, 4, 6)
  ]
  merged = parts[0]
  for p in parts[1:]:
    merged = st.merge(merged, p)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *parts)
  for got in (st.values(merged), st.values(st.fold(stacked))):
    for k, w in want.items():
      np.testing.assert_allclose(float(got[k]), w, rtol=1e-5, err_msg=k)


def test_reduce_over_devices_equals_the_whole(devices8):
  x, mask = _data(2)
  v = x * np.float32(0.8)
  want = _reference(x, v, mask)
  mesh = Mesh(np.array(devices8), ("d",))

  def local(x, v, m):
    return st.values(st.reduce(_all(x, v, m), "d"))

  got = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(PartitionSpec("d"),) * 3,
      out_specs=PartitionSpec(),
      check_vma=False,
    )
  )(x, v, mask)
  for k, w in want.items():
    np.testing.assert_allclose(float(got[k]), w, rtol=1e-5, err_msg=k)


def test_explained_variance_keeps_precision_with_a_large_mean():
  # Returns ~100 +- 0.01: power sums in f32 (E[R^2] - E[R]^2) lose every
  # digit here and gave 0.0 [or a large negative number].
  x, mask = _data(3, mean=100.0, spread=0.01)
  v = x + np.float32(0.001) * _data(4)[0]
  want = _reference(x, v, mask)["ev"]
  halves = [
    st.ExplainedVariance.of(v[s], x[s], mask[s])
    for s in (slice(0, 4), slice(4, 8))
  ]
  got = halves[0].merge(halves[1]).value
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_explained_variance_of_constant_returns_is_zero():
  r = np.full((2, 5), 0.7, np.float32)
  v = r + np.float32(0.01)
  got = st.ExplainedVariance.of(v, r, np.ones((2, 5), bool)).value
  assert float(got) == 0.0


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_max_reports_overflow_and_nan_but_empty_is_zero(bad):
  assert float(st.Max.of(jnp.array([1.0, 2.0]), jnp.zeros(2, bool)).value) == 0
  got = float(st.Max.of(jnp.array([1.0, bad])).value)
  assert np.isnan(got) if np.isnan(bad) else got == np.inf


def test_mean_ignores_garbage_in_masked_slots_and_stops_gradients():
  x = jnp.array([1.0, jnp.nan, 3.0])
  mask = jnp.array([True, False, True])
  assert float(st.Mean.of(x, mask).value) == 2.0
  g = jax.grad(lambda x: st.Mean.of(x, mask).value)(x)
  assert np.all(np.asarray(g) == 0)


def test_fold_of_a_two_dimensional_stack():
  # PPO folds statistics stacked [epochs, minibatches]: fold twice.
  x, mask = _data(5, shape=(12, 4))
  v = x * np.float32(0.5)
  want = _reference(x, v, mask)
  parts = [
    _all(x[i : i + 2], v[i : i + 2], mask[i : i + 2]) for i in range(0, 12, 2)
  ]
  stacked = jax.tree.map(lambda *a: jnp.stack(a).reshape(3, 2), *parts)
  got = st.values(st.fold(st.fold(stacked)))
  for k, w in want.items():
    np.testing.assert_allclose(float(got[k]), w, rtol=1e-5, err_msg=k)
