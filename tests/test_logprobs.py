"""Tests for rlhf_jax.logprobs: alignment, temperature, entropy, chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import logprobs as lp

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
B, P, T, V = 4, 3, 5, 7


def _case(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, P + T, V)) * 2.0
  ids = rng.integers(0, V, size=(B, P + T))
  return logits, ids


def ref_response_logprobs(logits, ids, prompt_length, temperature, mask):
  """float64 loop: log_softmax(logits[b, P+t-1] / tau)[ids[b, P+t]]."""
  b_size, seq_len, _ = logits.shape
  t_size = seq_len - prompt_length
  out = np.zeros((b_size, t_size))
  for b in range(b_size):
    for t in range(t_size):
      if not mask[b, t]:
        continue
      z = logits[b, prompt_length + t - 1] / temperature
      lse = np.log(np.sum(np.exp(z - z.max()))) + z.max()
      out[b, t] = z[ids[b, prompt_length + t]] - lse
  return out


def ref_entropy(logits, temperature):
  flat = logits.reshape(-1, logits.shape[-1])
  out = np.zeros(flat.shape[0])
  for i, row in enumerate(flat):
    z = row / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    out[i] = -sum(pi * np.log(pi) for pi in p if pi > 0)
  return out.reshape(logits.shape[:-1])


# ---------------------------------------------------------------- hand cases
def test_r2_logprob_alignment():
  logits = jnp.array(
    [[[2.0, 0, 1], [0, 1, 0], [1, 3, 0], [0, 0, 5]]], jnp.float32
  )
  ids = jnp.array([[0, 2, 1, 1]])
  out = lp.response_logprobs(logits, ids, prompt_length=2)
  # Token 1 (t=0) is scored by row 1 = [0, 1, 0]:
  #   1 - log(1 + e + 1) = 1 - 1.551445 = -0.551445.
  # Token 1 (t=1) is scored by row 2 = [1, 3, 0]:
  #   3 - log(e + e^3 + 1) = 3 - 3.169846 = -0.169846.
  # [Unshifted rows 2 and 3 give -0.169846 - 5.013 ..., the sum over the wrong
  # rows is -1.098612 or -2.407606.]
  np.testing.assert_allclose(out, [[-0.551445, -0.169846]], atol=1e-6)
  np.testing.assert_allclose(jnp.sum(out), -0.721291, atol=1e-6)
  # The last row is never used: changing it changes nothing.
  logits2 = logits.at[0, 3].set(jnp.nan)
  np.testing.assert_array_equal(
    lp.response_logprobs(logits2, ids, prompt_length=2), out
  )


def test_r4_temperature_in_training_logprobs():
  logits = jnp.array([[[2.0, 1.0, 0.0]]])
  tok = jnp.array([[0]])
  out = lp.logprobs_from_logits(logits, tok, temperature=0.5)
  # z = [4, 2, 0]: 4 - log(e^4 + e^2 + 1) = 4 - 4.142932 = -0.142932.
  # [Ignoring the temperature: 2 - log(e^2 + e + 1) = -0.407606.]
  np.testing.assert_allclose(out, [[-0.142932]], atol=1e-6)
  np.testing.assert_allclose(
    lp.logprobs_from_logits(logits, tok), [[-0.407606]], atol=1e-6
  )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_r4_first_ppo_ratio_is_exactly_one(temperature):
  logits, ids = _case(1)
  mask = jnp.asarray(MASKS["tail_padding"])
  fn = jax.jit(
    lambda lg, ids, tau: lp.response_logprobs(
      lg, ids, prompt_length=P, temperature=tau, response_mask=mask
    )
  )
  logits = jnp.asarray(logits, jnp.float32)
  # Rollout-time logprobs and training-time logprobs on the same parameters.
  old = fn(logits, ids, temperature)
  new = fn(logits, ids, temperature)
  ratio = jnp.exp(new - old)
  np.testing.assert_array_equal(ratio, 1.0)
  if temperature != 1.0:
    # [Training at temperature 1 after sampling at tau: ratio != 1.]
    assert not np.allclose(jnp.exp(fn(logits, ids, 1.0) - old), 1.0)


def test_entropy_hand_cases():
  # Uniform over 4: log 4 = 1.386294 [a sign bug gives -1.386294].
  np.testing.assert_allclose(
    lp.entropy_from_logits(jnp.zeros(4)), np.log(4), rtol=1e-6
  )
  # [0, 0, -inf]: uniform over 2 -> log 2, and finite gradients.
  x = jnp.array([0.0, 0.0, -jnp.inf])
  np.testing.assert_allclose(lp.entropy_from_logits(x), np.log(2), rtol=1e-6)
  g = jax.grad(lambda x: lp.entropy_from_logits(x))(x)
  assert np.all(np.isfinite(g))
  # Temperature 0.5 on [log 3, 0]: z = [2 log 3, 0], p = [0.9, 0.1];
  # H = -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.325083.
  x = jnp.array([np.log(3.0), 0.0])
  np.testing.assert_allclose(
    lp.entropy_from_logits(x, temperature=0.5), 0.325083, atol=1e-6
  )


def test_sequence_logprobs_hand_case():
  x = jnp.array([[-1.0, -2.0, 7.0], [-3.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
  m = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
  # Sums: -3, -3, 0 (empty); means: -1.5, -3, 0 [counting padding: 4, 15].
  np.testing.assert_allclose(lp.sequence_logprobs(x, m), [-3.0, -3.0, 0.0])
  np.testing.assert_allclose(
    lp.sequence_logprobs(x, m, average=True), [-1.5, -3.0, 0.0]
  )


# ------------------------------------------------------- reference and parity
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_response_logprobs_matches_loop_reference(mask_name):
  logits, ids = _case(2)
  m = MASKS[mask_name]
  got = lp.response_logprobs(
    jnp.asarray(logits, jnp.float32),
    ids,
    prompt_length=P,
    temperature=0.8,
    response_mask=m,
  )
  want = ref_response_logprobs(logits, ids, P, 0.8, m)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  # Sequence sums and means against the same reference.
  n = m.sum(-1)
  np.testing.assert_allclose(
    lp.sequence_logprobs(got, m), want.sum(-1), atol=1e-6
  )
  np.testing.assert_allclose(
    lp.sequence_logprobs(got, m, average=True),
    np.where(n > 0, want.sum(-1) / np.maximum(n, 1), 0.0),
    atol=1e-6,
  )


def test_entropy_matches_loop_reference():
  logits, _ = _case(3)
  got = lp.entropy_from_logits(
    jnp.asarray(logits, jnp.float32), temperature=1.3
  )
  np.testing.assert_allclose(got, ref_entropy(logits, 1.3), atol=1e-6)


def test_jit_equals_nojit():
  logits, ids = _case(4)
  logits = jnp.asarray(logits, jnp.float32)
  m = jnp.asarray(MASKS["holes"])

  def f(logits, ids, m, tau):
    return (
      lp.response_logprobs(
        logits, ids, prompt_length=P, temperature=tau, response_mask=m
      ),
      lp.entropy_from_logits(logits, temperature=tau),
      lp.sequence_logprobs(logits[..., 0], jnp.ones(logits.shape[:2], bool)),
    )

  for got, want in zip(
    jax.jit(f)(logits, ids, m, 0.7), f(logits, ids, m, 0.7), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("garbage", [1e9, -1e9, float("nan")])
def test_garbage_in_masked_slots(garbage):
  logits, ids = _case(5)
  m = MASKS["empty_rows"] | MASKS["holes"]
  # Logits rows P+t-1 and token ids P+t of masked response slots are garbage.
  rows = np.zeros((B, P + T), bool)
  rows[:, P - 1 : P + T - 1] = ~m
  dirty_logits = np.where(rows[..., None], garbage, logits)
  dirty_ids = ids.copy()
  dirty_ids[:, P:][~m] = -12345  # out-of-range id at masked slots

  def f(logits, ids):
    return lp.response_logprobs(
      logits, ids, prompt_length=P, temperature=0.9, response_mask=m
    )

  clean = f(jnp.asarray(logits, jnp.float32), ids)
  dirty = f(jnp.asarray(dirty_logits, jnp.float32), dirty_ids)
  np.testing.assert_array_equal(dirty, clean)
  np.testing.assert_array_equal(np.asarray(dirty)[~m], 0.0)
  g = jax.grad(lambda x: jnp.sum(f(x, dirty_ids)))(
    jnp.asarray(dirty_logits, jnp.float32)
  )
  assert np.all(np.isfinite(g))
  # Entropy with garbage rows under a mask: same values, finite gradients.
  resp_logits = jnp.asarray(dirty_logits[:, P - 1 : P + T - 1], jnp.float32)
  ent = lp.entropy_from_logits(resp_logits, mask=m)
  want = lp.entropy_from_logits(
    jnp.asarray(logits[:, P - 1 : P + T - 1], jnp.float32)
  )
  np.testing.assert_allclose(ent, np.where(m, want, 0), rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(lp.entropy_from_logits(x, mask=m)))(
    resp_logits
  )
  assert np.all(np.isfinite(g))
  # Sequence logprobs with garbage in masked slots.
  x = jnp.where(m, 0.3, garbage)
  for average in (False, True):
    g = jax.grad(
      lambda x, average=average: jnp.sum(
        lp.sequence_logprobs(x, m, average=average)
      )
    )(x)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(
      lp.sequence_logprobs(x, m, average=average),
      lp.sequence_logprobs(jnp.where(m, 0.3, 0.0), m, average=average),
    )


def test_a_token_outside_the_vocabulary_is_nan_not_another_tokens():
  """Token -1 gave the logprob of token V - 1 (and V a fill value) with a
  finite gradient; now NaN at that slot, in value and gradient, while a
  masked slot still holds 0 whatever its id."""
  logits = jnp.zeros((1, 4, 4))
  tokens = jnp.array([[0, -1, 4, -7]])
  mask = jnp.array([[True, True, True, False]])
  out = lp.logprobs_from_logits(logits, tokens, mask=mask)
  np.testing.assert_allclose(out[0, 0], -np.log(4), rtol=1e-6)
  assert np.isnan(out[0, 1:3]).all() and out[0, 3] == 0
  grad = jax.grad(
    lambda x: lp.logprobs_from_logits(x, tokens, mask=mask).sum()
  )(logits)[0]
  np.testing.assert_allclose(grad[0], [0.75, -0.25, -0.25, -0.25])
  assert np.isnan(grad[1:3]).all() and (grad[3] == 0).all()
  # The chunked form agrees; int16 ids (V = 40000 does not fit int16) are
  # compared at 32 bits, not wrapped.
  hidden, unemb = jnp.ones((1, 4, 2)), jnp.zeros((2, 4))
  chunked, _ = lp.chunked_logprobs_and_entropy(
    hidden, unemb, tokens, mask=mask, chunk_size=2
  )
  np.testing.assert_array_equal(chunked, out)
  wide = lp.logprobs_from_logits(
    jnp.zeros((1, 2, 40000)), jnp.array([[5, 30000]], jnp.int16)
  )
  np.testing.assert_allclose(wide, -np.log(40000), rtol=1e-6)


def test_bf16_inputs_give_finite_f32():
  logits, ids = _case(6)
  logits = jnp.asarray(logits, jnp.bfloat16)
  out = lp.response_logprobs(
    logits, ids, prompt_length=P, response_mask=MASKS["tail_padding"]
  )
  ent = lp.entropy_from_logits(logits)
  seq = lp.sequence_logprobs(out.astype(jnp.bfloat16), MASKS["tail_padding"])
  for x in (out, ent, seq):
    assert x.dtype == jnp.float32
    assert np.all(np.isfinite(x))


def test_traces_once_for_same_shapes():
  n_traces = 0

  @jax.jit
  def f(logits, ids, m, tau):
    nonlocal n_traces
    n_traces += 1
    out = lp.response_logprobs(
      logits, ids, prompt_length=P, temperature=tau, response_mask=m
    )
    return out, lp.entropy_from_logits(logits, temperature=tau)

  for seed, tau in enumerate((0.5, 1.0, 1.5)):
    logits, ids = _case(seed)
    f(jnp.asarray(logits, jnp.float32), ids, MASKS["holes"], tau)
  assert n_traces == 1


def test_errors():
  logits = jnp.zeros((2, 5, 3))
  ids = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(ValueError, match="prompt_length"):
    lp.response_logprobs(logits, ids, prompt_length=0)
  with pytest.raises(ValueError, match="prompt_length"):
    lp.response_logprobs(logits, ids, prompt_length=5)
  with pytest.raises(ValueError, match="input_ids"):
    lp.response_logprobs(logits, ids[:, :4], prompt_length=2)
  with pytest.raises(ValueError, match="tokens shape"):
    lp.logprobs_from_logits(logits, ids[:, :4])
  with pytest.raises(ValueError, match="mask shape"):
    lp.response_logprobs(
      logits, ids, prompt_length=2, response_mask=jnp.ones((2, 2), bool)
    )
  # Float ids were truncated (1.7 read as 1); tau <= 0 gave NaN or a
  # finite wrong value.
  with pytest.raises(ValueError, match="tokens dtype float32: expected int"):
    lp.logprobs_from_logits(logits, ids.astype(jnp.float32))
  w, h = jnp.zeros((4, 3)), jnp.zeros((2, 5, 4))
  with pytest.raises(ValueError, match="tokens dtype float32: expected int"):
    lp.chunked_logprobs_and_entropy(h, w, ids.astype(jnp.float32))
  for tau in (0, -1.0, float("nan"), np.float32(0), 1e-30):
    for fn, args in (
      (lp.logprobs_from_logits, (logits, ids)),
      (lp.entropy_from_logits, (logits,)),
      (lp.chunked_logprobs_and_entropy, (h, w, ids)),
    ):
      with pytest.raises(ValueError, match="must be finite and >= 0.01 "):
        fn(*args, temperature=tau)
  # The floor itself is taken, as float32 holds it too (0.0099999998).
  for tau in (0.01, np.float32(0.01), np.array(0.01, np.float32)):
    assert np.isfinite(
      lp.logprobs_from_logits(logits, ids, temperature=tau)
    ).all()


# -------------------------------------------------------------------- chunked
@pytest.mark.parametrize("vocab,chunk", [(11, 4), (12, 4), (5, 8), (7, 1)])
def test_chunked_equals_unchunked_values_and_grads(vocab, chunk):
  rng = np.random.default_rng(vocab * 10 + chunk)
  hidden = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, vocab)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, vocab, size=(2, 3)))
  tokens = tokens.at[0, 0].set(vocab - 1)  # the last real column is selectable
  mask = jnp.array([[1, 1, 0], [1, 0, 1]], bool)

  def chunked(hidden, w):
    return lp.chunked_logprobs_and_entropy(
      hidden, w, tokens, temperature=0.7, chunk_size=chunk, mask=mask
    )

  def full(hidden, w):
    z = hidden @ w
    return (
      lp.logprobs_from_logits(z, tokens, temperature=0.7, mask=mask),
      jnp.where(mask, lp.entropy_from_logits(z, temperature=0.7), 0),
    )

  for got, want in zip(
    jax.jit(chunked)(hidden, w), full(hidden, w), strict=True
  ):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  def scalar(fn):
    def loss(h, w):
      logprobs, entropy = fn(h, w)
      # Weighted sum so a logprob/entropy mix-up cannot cancel.
      return jnp.sum(logprobs * 1.7 - entropy * 0.3)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  g_chunk = scalar(chunked)(hidden, w)
  g_full = scalar(full)(hidden, w)
  for got, want in zip(g_chunk, g_full, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_padding_is_never_selected_and_probabilities_sum_to_one():
  # V = 5 padded to 8: scoring every real token gives probabilities summing
  # to 1 [including the zero-weight padded columns, logit 0, gives 8/5 ...].
  hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 3)))
  hidden = jnp.broadcast_to(hidden[:, :1], (1, 5, 3)).astype(jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  tokens = jnp.arange(5)[None]
  out, ent = jax.jit(
    lambda h, w: lp.chunked_logprobs_and_entropy(h, w, tokens, chunk_size=4)
  )(hidden, w)
  np.testing.assert_allclose(jnp.sum(jnp.exp(out)), 1.0, rtol=1e-6)
  assert np.all(ent > 0) and np.all(ent <= np.log(5) + 1e-6)


def test_chunked_never_materialises_full_logits():
  b, t, d, vocab, chunk = 2, 3, 4, 64, 8
  hidden = jnp.ones((b, t, d))
  w = jnp.ones((d, vocab))
  tokens = jnp.zeros((b, t), jnp.int32)

  def loss(hidden, w):
    out, ent = lp.chunked_logprobs_and_entropy(
      hidden, w, tokens, chunk_size=chunk
    )
    return jnp.sum(out) + jnp.sum(ent)

  def max_intermediate(jaxpr):
    biggest = 0
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            biggest = max(biggest, max_intermediate(inner))
    return biggest

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, w)
  # Largest array: W-sized (D * V = 256) or one chunk of logits per step,
  # never B * T * V = 384. The unchunked path does build [B, T, V].
  assert max_intermediate(jaxpr.jaxpr) < b * t * vocab
  full = jax.make_jaxpr(
    jax.grad(lambda h: jnp.sum(lp.logprobs_from_logits(h @ w, tokens)))
  )(hidden)
  assert max_intermediate(full.jaxpr) >= b * t * vocab


def test_chunked_garbage_bf16_and_traced_temperature():
  rng = np.random.default_rng(9)
  hidden = rng.normal(size=(2, 3, 4))
  w = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
  tokens = rng.integers(0, 9, size=(2, 3))
  mask = np.array([[1, 0, 1], [0, 0, 0]], bool)
  dirty_h = jnp.asarray(np.where(mask[..., None], hidden, np.nan), jnp.float32)
  dirty_t = np.where(mask, tokens, 99)
  n_traces = 0

  @jax.jit
  def f(h, w, tokens, tau):
    nonlocal n_traces
    n_traces += 1
    return lp.chunked_logprobs_and_entropy(
      h, w, tokens, temperature=tau, chunk_size=4, mask=mask
    )

  clean = f(jnp.asarray(hidden, jnp.float32), w, tokens, 1.2)
  dirty = f(dirty_h, w, dirty_t, 1.2)
  for a, b in zip(clean, dirty, strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(a)[~mask], 0.0)
  f(dirty_h, w, dirty_t, 0.6)
  assert n_traces == 1
  g = jax.grad(lambda h, w: jnp.sum(sum(f(h, w, dirty_t, 0.8))), (0, 1))(
    dirty_h, w
  )
  assert all(np.all(np.isfinite(x)) for x in g)
  out = lp.chunked_logprobs_and_entropy(
    jnp.asarray(hidden, jnp.bfloat16),
    w.astype(jnp.bfloat16),
    tokens,
    chunk_size=4,
  )
  for x in out:
    assert x.dtype == jnp.float32 and np.all(np.isfinite(x))


# ------------------------------------------------------- custom backward pass


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_logprobs_gradient_equals_log_softmax_autodiff(mask_name):
  """The backward pass of logprobs_from_logits (onehot - softmax, one pass
  over the logits) equals autodiff of the plain log-softmax formula, for
  the logits and for a traced temperature."""
  logits, ids = _case(7)
  m = MASKS[mask_name]
  z = jnp.asarray(logits[:, P:], jnp.float32)  # [B, T, V]
  tokens = jnp.asarray(ids[:, P:])
  w = jnp.asarray(np.random.default_rng(8).normal(size=(B, T)), jnp.float32)

  def plain(x, tau):
    logp = jax.nn.log_softmax(x / tau, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(w * jnp.where(m, picked, 0))

  def ours(x, tau):
    out = lp.logprobs_from_logits(x, tokens, temperature=tau, mask=m)
    return jnp.sum(w * out)

  tau = jnp.float32(0.7)
  np.testing.assert_allclose(ours(z, tau), plain(z, tau), rtol=1e-6)
  got = jax.grad(ours, argnums=(0, 1))(z, tau)
  want = jax.grad(plain, argnums=(0, 1))(z, tau)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Masked slots get exactly zero gradient.
  np.testing.assert_array_equal(np.asarray(got[0])[~m], 0.0)


def test_logprobs_backward_keeps_only_the_logits():
  """The backward pass keeps one [B, T, V] array, the logits themselves:
  autodiff of the forward also kept the sanitised copy of the logits
  and exp(z - max), two more such buffers in every train step."""
  logits, ids = _case(9)
  z = jnp.asarray(logits[:, P:], jnp.float32)
  tokens = jnp.asarray(ids[:, P:])

  def f(x):
    out = lp.logprobs_from_logits(
      x, tokens, temperature=0.9, mask=MASKS["holes"]
    )
    return jnp.sum(out)

  _, backward = jax.vjp(f, z)
  kept = [x for x in jax.tree.leaves(backward) if x.shape == z.shape]
  assert len(kept) == 1, [x.shape for x in jax.tree.leaves(backward)]


def test_logprobs_gradient_overwrites_the_logits_buffer():
  """Under jit, the logits' gradient from a [N, D] x [D, V] LM head is
  written over the logits' own buffer: the step's temporaries hold one
  [B, T, V] array, not two (the backward works on [N, V] rows, so no
  reshape inside its fusion keeps XLA from reusing the buffer)."""
  n_b, n_t, d, v = 4, 16, 8, 4096
  h = jax.random.normal(jax.random.key(0), (n_b * n_t, d))
  w = jax.random.normal(jax.random.key(1), (d, v))
  tokens = jax.random.randint(jax.random.key(2), (n_b, n_t), 0, v)
  mask = jnp.arange(n_t)[None, :] < jnp.array([[16], [9], [1], [12]])

  def loss(h, w):
    logits = (h @ w).reshape(n_b, n_t, v)
    return jnp.sum(lp.logprobs_from_logits(logits, tokens, mask=mask))

  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(h, w).compile()
  logits_bytes = n_b * n_t * v * 4
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 1.5 * logits_bytes, (temp, logits_bytes)
