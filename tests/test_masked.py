"""Tests for rlhf_jax.masked: hand cases, float64 loop references, garbage in
masked slots, bf16, jit, trace counts, micro-batching and axis_name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from rlhf_jax import masked

# Mask layouts for B=4, T=5 (True = valid).
MASKS = {
  "no_padding": np.ones((4, 5), bool),
  "tail_padding": np.array(
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool
  ),
  "holes": np.array(
    [[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 1]], bool
  ),
  "empty_rows": np.array(
    [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool
  ),
}
MODES = masked.LOSS_AGG_MODES


def _data(seed=0, shape=(4, 5)):
  return np.random.default_rng(seed).normal(size=shape)


# ---------------------------------------------------------------- references
def ref_sum(x, m):
  s = 0.0
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      if m[i, j]:
        s += x[i, j]
  return s


def ref_mean(x, m):
  n = int(m.sum())
  return ref_sum(x, m) / n if n else 0.0


def ref_var(x, m, unbiased=True):
  vals = [
    x[i, j] for i in range(x.shape[0]) for j in range(x.shape[1]) if m[i, j]
  ]
  n = len(vals)
  if n - int(unbiased) <= 0:
    return 0.0
  mu = sum(vals) / n
  return sum((v - mu) ** 2 for v in vals) / (n - int(unbiased))


def ref_whiten(x, m, shift_mean=True, unbiased=True, eps=1e-8):
  mu, var = ref_mean(x, m), ref_var(x, m, unbiased)
  out = np.zeros_like(x)
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      if m[i, j]:
        out[i, j] = (x[i, j] - mu) / np.sqrt(var + eps) + (
          0 if shift_mean else mu
        )
  return out


def ref_aggregate(x, m, mode):
  if mode == "token-mean":
    return ref_mean(x, m)
  rows = []
  for i in range(x.shape[0]):
    n = int(m[i].sum())
    if n == 0:
      continue  # empty rows are left out of sequence means
    s = sum(x[i, j] for j in range(x.shape[1]) if m[i, j])
    denom = {"seq-mean-token-mean": n, "seq-mean-token-sum-norm": x.shape[1]}
    rows.append(s / denom.get(mode, 1))
  return sum(rows) / len(rows) if rows else 0.0


OPS = {
  "sum": (lambda x, m: masked.masked_sum(x, m), ref_sum),
  "mean": (lambda x, m: masked.masked_mean(x, m), ref_mean),
  "var": (lambda x, m: masked.masked_var(x, m), ref_var),
  "var_biased": (
    lambda x, m: masked.masked_var(x, m, unbiased=False),
    functools.partial(ref_var, unbiased=False),
  ),
  "whiten": (lambda x, m: masked.masked_whiten(x, m), ref_whiten),
  "whiten_noshift": (
    lambda x, m: masked.masked_whiten(x, m, shift_mean=False),
    functools.partial(ref_whiten, shift_mean=False),
  ),
  **{
    f"agg_{mode}": (
      functools.partial(
        lambda x, m, mode: masked.aggregate_loss(x, m, loss_agg_mode=mode),
        mode=mode,
      ),
      functools.partial(ref_aggregate, mode=mode),
    )
    for mode in MODES
  },
}


# ---------------------------------------------------------------- hand cases
def test_r7_empty_rows_and_nan_in_masked_slots():
  values = jnp.array([[0.5, -0.2, 0.1], [0.3, 0.9, -0.4]])
  mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)
  # Row 0: (0.5 - 0.2) / 2 = 0.15; row 1 empty -> 0 [a plain sum/count: NaN].
  row_means = masked.masked_mean(values, mask, axis=-1)
  np.testing.assert_allclose(row_means, [0.15, 0.0], atol=1e-7)
  # Token mean over the 2 valid tokens: 0.3 / 2 = 0.15.
  np.testing.assert_allclose(masked.masked_mean(values, mask), 0.15, atol=1e-7)
  g = jax.grad(lambda v: jnp.sum(masked.masked_mean(v, mask, axis=-1)))(values)
  # d row-mean / d v = 1/2 at valid slots of row 0, 0 elsewhere (empty row).
  np.testing.assert_array_equal(g, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
  # NaN in a masked slot: (1 + 4) / 2 = 2.5 [NaN if multiplied by the mask].
  x = jnp.array([1.0, 2.0, jnp.nan, 4.0])
  m = jnp.array([1, 0, 0, 1], bool)
  assert float(masked.masked_mean(x, m)) == 2.5
  bug = jnp.sum(x * m.astype(jnp.float32)) / jnp.sum(m)
  assert np.isnan(float(bug))  # NaN * 0.0 = NaN
  g = jax.grad(lambda x: masked.masked_mean(x, m))(x)
  np.testing.assert_array_equal(g, [0.5, 0.0, 0.0, 0.5])


@pytest.mark.parametrize("s", [0.0, 1.0, -1e9, float("nan")])
def test_r9_metrics_ignore_padded_slots(s):
  logprobs = jnp.array(
    [[-0.5, -1.5, -2.0, s, s], [-0.2, s, s, s, s]], jnp.float32
  )
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  # Row sums of -logprobs: 0.5 + 1.5 + 2.0 = 4.0 and 0.2; mean 2.1.
  # [S = +1 counted: (4.0 - 2) and (0.2 - 4) -> mean -0.9.]
  out = masked.aggregate_loss(
    -logprobs, mask, loss_agg_mode="seq-mean-token-sum"
  )
  np.testing.assert_allclose(out, 2.1, atol=1e-6)


def test_aggregate_modes_hand_case():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
  m = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
  # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5 [counting padding: 10 / 9].
  # seq-mean-token-mean: (2 + 4) / 2 = 3.0 [with the empty row: 6 / 3 = 2].
  # seq-mean-token-sum: (6 + 4) / 2 = 5.0.
  # seq-mean-token-sum-norm: (6 / 3 + 4 / 3) / 2 = 5 / 3 [T = 3 for every
  # row, not the row's length 1: (6/3 + 4/1) / 2 = 3].
  expect = {
    "token-mean": 2.5,
    "seq-mean-token-mean": 3.0,
    "seq-mean-token-sum": 5.0,
    "seq-mean-token-sum-norm": 5.0 / 3.0,
  }
  for mode, want in expect.items():
    got = masked.aggregate_loss(x, m, loss_agg_mode=mode)
    np.testing.assert_allclose(got, want, rtol=1e-7, err_msg=mode)


def test_var_and_whiten_hand_case():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  m = jnp.array([[1, 1, 1, 0]], bool)
  # mean 2; squared deviations 1 + 0 + 1 = 2; unbiased 2 / 2 = 1.0
  # [biased 2/3; counting the masked 100 gives var ~ 2366].
  np.testing.assert_allclose(masked.masked_var(x, m), 1.0, rtol=1e-7)
  np.testing.assert_allclose(
    masked.masked_var(x, m, unbiased=False), 2 / 3, rtol=1e-6
  )
  w = masked.masked_whiten(x, m, eps=0.0)
  np.testing.assert_allclose(w, [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
  w = masked.masked_whiten(x, m, shift_mean=False, eps=0.0)
  np.testing.assert_allclose(w, [[1.0, 2.0, 3.0, 0.0]], atol=1e-6)
  # One valid entry: unbiased variance is 0/0 -> defined as 0.
  assert float(masked.masked_var(x, jnp.array([[1, 0, 0, 0]], bool))) == 0.0


def test_r12_gradient_accumulation_equals_full_batch():
  y = jnp.array([1.0, 2.0, 3.0, 6.0])

  def loss(w, ys, mask, normalizer=None):
    per_token = (w - ys) ** 2
    return masked.aggregate_loss(per_token, mask, normalizer=normalizer)

  full = jax.grad(loss)(0.0, y[None], jnp.ones((1, 4), bool))
  # d/dw mean (w - y)^2 at w = 0: mean(-2 y) = -2 * 3 = -6.
  np.testing.assert_allclose(full, -6.0, rtol=1e-7)
  ones2 = jnp.ones((1, 2), bool)
  # Each micro-batch divides by the step's token count (4):
  # (-2 - 4) / 4 + (-6 - 12) / 4 = -1.5 - 4.5 = -6.
  acc = jax.grad(loss)(0.0, y[None, :2], ones2, 4.0) + jax.grad(loss)(
    0.0, y[None, 2:], ones2, 4.0
  )
  np.testing.assert_allclose(acc, -6.0, rtol=1e-7)
  # [Summing each micro-batch's own mean: -3 + -9 = -12.]
  bug = jax.grad(loss)(0.0, y[None, :2], ones2) + jax.grad(loss)(
    0.0, y[None, 2:], ones2
  )
  np.testing.assert_allclose(bug, -12.0, rtol=1e-7)
  # Unequal token counts: micro-batches [1, 2, 3] and [6] (padded to T=3).
  ys_a = y[None, :3]
  ys_b = jnp.array([[6.0, 123.0, -50.0]])  # padding must not count
  m_b = jnp.array([[1, 0, 0]], bool)
  ga = jax.grad(loss)(0.0, ys_a, jnp.ones((1, 3), bool), 4.0)
  gb = jax.grad(loss)(0.0, ys_b, m_b, 4.0)
  # (-2 - 4 - 6) / 4 + (-12) / 4 = -3 - 3 = -6.
  np.testing.assert_allclose(ga + gb, -6.0, rtol=1e-7)
  # [Averaging per-micro-batch means: (-4 + -12) / 2 = -8.]


def test_r12_seq_mean_normalizer_counts_nonempty_rows():
  x = jnp.array(_data(3, (4, 5)), jnp.float32)
  m = jnp.asarray(MASKS["empty_rows"])  # 2 non-empty rows
  for mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
    full = jax.grad(
      lambda x, mode=mode: masked.aggregate_loss(x, m, loss_agg_mode=mode)
    )(x)
    parts = [
      jax.grad(
        lambda x, sl=sl, mode=mode: masked.aggregate_loss(
          x[sl], m[sl], loss_agg_mode=mode, normalizer=2.0
        )
      )(x)
      for sl in (slice(0, 1), slice(1, 4))
    ]
    np.testing.assert_allclose(parts[0] + parts[1], full, atol=1e-7)


# ------------------------------------------------------- reference and parity
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("op", list(OPS))
def test_matches_float64_loop_reference(op, mask_name):
  fn, ref = OPS[op]
  x, m = _data(1), MASKS[mask_name]
  got = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(m)))
  want = ref(x, m)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("op", list(OPS))
def test_jit_equals_nojit(op):
  fn = OPS[op][0]
  x = jnp.asarray(_data(2), jnp.float32)
  m = jnp.asarray(MASKS["holes"])
  np.testing.assert_allclose(jax.jit(fn)(x, m), fn(x, m), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("garbage", [1e9, -1e9, float("nan"), float("inf")])
@pytest.mark.parametrize("op", list(OPS))
def test_garbage_in_masked_slots(op, garbage):
  fn = OPS[op][0]
  m = MASKS["empty_rows"] | MASKS["holes"]
  clean = _data(4)
  dirty = np.where(m, clean, garbage)
  x_clean = jnp.asarray(np.where(m, clean, 0.0), jnp.float32)
  x_dirty = jnp.asarray(dirty, jnp.float32)
  np.testing.assert_array_equal(fn(x_dirty, m), fn(x_clean, m))
  g = jax.grad(lambda x: jnp.sum(fn(x, m) * 1.3))(x_dirty)
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(np.asarray(g)[~m], 0.0)


@pytest.mark.parametrize("op", list(OPS))
def test_bf16_inputs_give_finite_f32(op):
  fn = OPS[op][0]
  x = jnp.asarray(_data(5), jnp.bfloat16)
  out = fn(x, MASKS["tail_padding"])
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_traces_once_for_same_shapes():
  n_traces = 0

  @jax.jit
  def f(x, m):
    nonlocal n_traces
    n_traces += 1
    return (
      masked.masked_whiten(x, m),
      masked.masked_var(x, m),
      [masked.aggregate_loss(x, m, loss_agg_mode=mode) for mode in MODES],
    )

  for seed, name in enumerate(("holes", "tail_padding", "empty_rows")):
    f(jnp.asarray(_data(seed), jnp.float32), jnp.asarray(MASKS[name]))
  assert n_traces == 1


def test_errors():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="mask shape"):
    masked.masked_mean(x, jnp.ones((3, 2), bool))
  with pytest.raises(TypeError, match="bool"):
    masked.masked_sum(x, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="loss_agg_mode"):
    masked.aggregate_loss(x, jnp.ones((2, 3), bool), loss_agg_mode="mean")
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    masked.aggregate_loss(jnp.zeros(3), jnp.ones(3, bool))


# ------------------------------------------------------------------ axis_name
def test_axis_name_gives_global_statistics(devices8):
  mesh = Mesh(np.array(devices8), ("d",))
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  m = rng.random((16, 3)) < 0.6
  m[2:4] = False  # device 1 holds no valid token at all
  m[5] = False  # an empty row on device 2
  m = jnp.asarray(m)
  x = jnp.where(m, x, jnp.nan)  # garbage must stay out under psum too

  def local(x, m):
    return (
      masked.masked_mean(x, m, axis_name="d"),
      masked.masked_var(x, m, axis_name="d"),
      masked.masked_whiten(x, m, axis_name="d"),
      [
        masked.aggregate_loss(x, m, loss_agg_mode=mode, axis_name="d")
        for mode in MODES
      ],
    )

  sharded = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P("d"), P("d")),
      out_specs=(P(), P(), P("d"), [P()] * len(MODES)),
    )
  )(x, m)
  single = (
    masked.masked_mean(x, m),
    masked.masked_var(x, m),
    masked.masked_whiten(x, m),
    [masked.aggregate_loss(x, m, loss_agg_mode=mode) for mode in MODES],
  )
  for got, want in zip(
    jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Without axis_name each device would use its local statistics.
  local_only = jax.jit(
    jax.shard_map(
      lambda x, m: masked.masked_mean(x, m)[None],
      mesh=mesh,
      in_specs=(P("d"), P("d")),
      out_specs=P("d"),
    )
  )(x, m)
  assert not np.allclose(local_only, single[0])
