"""rollout.generate: zero sampler/trainer mismatch, EOS, greedy, top-k/p."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.rollout import generate, top_k_filter, top_p_filter
from rlhf_jax.rollout.generate import response_mask_from_ids
from rlhf_jax.rollout.sampling import (
  apply_temperature,
  first_argmax,
  sample_token,
)
from rlhf_jax.train.common import response_logits, teacher_forced_logprobs

CFG = models.ModelConfig(
  model_type="llama",
  vocab_size=64,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  intermediate_size=64,
  max_position_embeddings=128,
)
PAD = 0
NEVER = CFG.vocab_size  # an id the model can never sample: no EOS


@pytest.fixture(scope="module")
def params():
  p = models.init_params(CFG, jax.random.key(0))
  # Sharper logits than the 0.02 init so sampling is not uniform (mean
  # logprob about -2.5 against log(1/64) = -4.16). At x8 the logits reach
  # |30| and f32 rounding differences between the one-token decode kernels
  # and the full forward reach 2e-5; at x4 they stay below 3e-6.
  return jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, p)


def _prompts():
  """Left-padded prompts of mixed lengths 5, 3, 1, 6 (P = 6)."""
  rng = np.random.default_rng(0)
  lengths = [5, 3, 1, 6]
  ids = np.zeros((4, 6), np.int32)
  mask = np.zeros((4, 6), bool)
  for b, n in enumerate(lengths):
    ids[b, 6 - n :] = rng.integers(3, CFG.vocab_size, n)
    mask[b, 6 - n :] = True
  return jnp.asarray(ids), jnp.asarray(mask)


def _teacher_forced(params, rollout, temperature):
  """The trainer's logprobs (train.common.teacher_forced_logprobs)."""
  ids = jnp.concatenate([rollout.prompt_ids, rollout.response_ids], 1)
  mask = jnp.concatenate([rollout.prompt_mask, rollout.response_mask], 1)
  return teacher_forced_logprobs(
    params,
    ids,
    mask,
    prompt_length=rollout.prompt_ids.shape[1],
    response_mask=rollout.response_mask,
    temperature=jnp.float32(temperature),
    model_config=CFG,
  )


def _training_logits(params, ids, mask, prompt_length):
  """The trainer's logits f32[B, T, V]: rows P - 1 .. L - 2."""
  return response_logits(params, ids, mask, prompt_length, CFG)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_zero_mismatch_with_training_logprobs(params, temperature):
  ids, mask = _prompts()
  ro = generate(
    params,
    ids,
    mask,
    jax.random.key(1),
    config=CFG,
    max_new_tokens=12,
    temperature=temperature,
    eos_token_id=5,
    pad_token_id=PAD,
  )
  trained = _teacher_forced(params, ro, temperature)
  np.testing.assert_allclose(ro.logprobs, trained, atol=1e-5, rtol=0)
  assert np.all(np.asarray(ro.logprobs)[~np.asarray(ro.response_mask)] == 0)
  # Something was actually sampled and scored.
  assert float(jnp.sum(ro.response_mask)) > 8
  assert float(jnp.min(jnp.where(ro.response_mask, ro.logprobs, 0))) < -0.01


def test_greedy_equals_argmax_of_full_forward(params):
  ids, mask = _prompts()
  ro = generate(
    params,
    ids,
    mask,
    jax.random.key(0),
    config=CFG,
    max_new_tokens=10,
    greedy=True,
    eos_token_id=NEVER,
    pad_token_id=PAD,
  )
  full_ids = jnp.concatenate([ids, ro.response_ids], 1)
  full_mask = jnp.concatenate([mask, ro.response_mask], 1)
  logits = models.forward(params, full_ids, full_mask, config=CFG)
  argmax = jnp.argmax(logits[:, 5:-1], axis=-1)
  np.testing.assert_array_equal(ro.response_ids, argmax)
  assert bool(jnp.all(ro.truncated)) and bool(jnp.all(ro.response_mask))


def test_fixed_key_reproduces_and_topk1_equals_greedy(params):
  ids, mask = _prompts()
  kw = dict(config=CFG, max_new_tokens=10, eos_token_id=5, pad_token_id=PAD)
  a = generate(params, ids, mask, jax.random.key(3), **kw)
  b = generate(params, ids, mask, jax.random.key(3), **kw)
  c = generate(params, ids, mask, jax.random.key(4), **kw)
  np.testing.assert_array_equal(a.response_ids, b.response_ids)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert not np.array_equal(a.response_ids, c.response_ids)
  greedy = generate(params, ids, mask, jax.random.key(0), greedy=True, **kw)
  top1 = generate(params, ids, mask, jax.random.key(9), top_k=1, **kw)
  np.testing.assert_array_equal(greedy.response_ids, top1.response_ids)


def test_top_p_keeps_smallest_set_reaching_p():
  # probs 0.5, 0.3, 0.15, 0.05: p = 0.8 keeps {0.5, 0.3} (mass 0.8 reached
  # with two tokens); p = 0.81 needs the third. A "mass after < p" bug
  # keeps only the first token at p = 0.8.
  probs = jnp.array([[0.15, 0.5, 0.05, 0.3]])
  logits = jnp.log(probs)
  kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0]
  np.testing.assert_array_equal(kept(0.8), [False, True, False, True])
  np.testing.assert_array_equal(kept(0.81), [True, True, False, True])
  np.testing.assert_array_equal(kept(0.4), [False, True, False, False])
  np.testing.assert_array_equal(kept(1.0), [True, True, True, True])
  np.testing.assert_array_equal(
    np.isfinite(np.asarray(top_k_filter(logits, 2)))[0],
    [False, True, False, True],
  )


def test_sampling_helpers_check_their_arguments():
  """The public helpers took values generate refuses: top_p 0 or 5, top_k
  -3 (or 2.5, a jax shape error), temperature 0 (inf and NaN logits)."""
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
  keys = jax.random.split(jax.random.key(0), 1)
  for bad in (0.0, 5.0, -1.0, float("nan"), np.float32(0.0)):
    with pytest.raises(ValueError, match=r"^top_p must be (finite and )?in"):
      top_p_filter(logits, bad)
    with pytest.raises(ValueError, match=r"^top_p must be"):
      sample_token(logits, keys, temperature=1.0, top_p=bad)
  for bad in (-3, 2.5, True):
    with pytest.raises(ValueError, match=r"^top_k must be an integer >= 0"):
      top_k_filter(logits, bad)
    with pytest.raises(ValueError, match=r"^top_k must be an integer >= 0"):
      sample_token(logits, keys, temperature=1.0, top_k=bad)
  for bad in (0.0, -1.0, float("nan"), np.float32(0.0)):
    with pytest.raises(ValueError, match=r"^temperature must be finite"):
      apply_temperature(logits, bad)
  # Traced values are not read: the filters run inside jit.
  kept = jax.jit(top_p_filter)(logits, 0.8)
  np.testing.assert_array_equal(
    np.isfinite(kept)[0], [False, True, False, True]
  )
  # Per-row values broadcast (not checked, as before).
  two = jnp.concatenate([logits, logits])
  rows = jax.jit(top_p_filter)(two, jnp.array([[0.8], [1.0]]))
  np.testing.assert_array_equal(np.isfinite(rows).sum(axis=1), [2, 4])
  np.testing.assert_allclose(
    apply_temperature(two, jnp.array([[0.5], [1.0]])),
    two * jnp.array([[2.0], [1.0]]),
  )


def test_host_prompts_are_checked_before_sampling(params):
  """NumPy prompts the compiled program cannot check: a right-padded
  mask sampled other tokens than left padding on one path only, mask
  values 2 were taken, and a real token's id outside [0, V) gave NaN
  logprobs or (negative) read the embedding of id + V. Pad slots are
  never read: -100 there gives the same tokens (it spread NaN before
  `models.embedded_ids`). An all-pad row (the padding rows of
  `TokenizedDataset.take(-1)`) passes."""
  ids, mask = (np.asarray(a) for a in _prompts())
  kw = dict(config=CFG, max_new_tokens=2, eos_token_id=5, pad_token_id=PAD)
  right = np.flip(mask, axis=1)
  two = mask.astype(np.int32) * 2
  assert not mask[1, 0] and mask[1, -1]
  high, negative, pad = ids.copy(), ids.copy(), ids.copy()
  high[1, -1] = CFG.vocab_size  # real tokens
  negative[1, -1] = -1
  pad[1, 0] = -100  # a pad slot
  for i, m, message in (
    (ids, right, r"prompt_mask\[0\] is not left-padded .*: 111110"),
    (ids, two, r"prompt_mask holds \[2\]: expected bool, or 0/1"),
    (high, mask, rf"prompt_ids\[1, 5\] = {CFG.vocab_size}: expected a token"),
    (negative, mask, r"prompt_ids\[1, 5\] = -1: expected a token"),
  ):
    with pytest.raises(ValueError, match=message):
      generate(params, i, m, jax.random.key(0), **kw)
  empty = mask.copy()
  empty[2] = False
  control = generate(params, ids, mask, jax.random.key(0), **kw)
  got = generate(params, ids, empty, jax.random.key(0), **kw)
  np.testing.assert_array_equal(got.response_ids[:2], control.response_ids[:2])
  padded = generate(params, pad, mask, jax.random.key(0), **kw)
  np.testing.assert_array_equal(padded.response_ids, control.response_ids)
  np.testing.assert_array_equal(padded.logprobs, control.logprobs)
  # What the check prevents: the same ids as device arrays, not read.
  for bad in (high, negative):
    spoilt = generate(params, jnp.asarray(bad), mask, jax.random.key(0), **kw)
    assert not np.isfinite(np.asarray(spoilt.logprobs)[1]).any()
    np.testing.assert_array_equal(spoilt.logprobs[0], control.logprobs[0])


def test_top_k_sampling_stays_in_top_k(params):
  ids, mask = _prompts()
  ro = generate(
    params,
    ids,
    mask,
    jax.random.key(5),
    config=CFG,
    max_new_tokens=8,
    top_k=3,
    temperature=2.0,
    eos_token_id=NEVER,
    pad_token_id=PAD,
  )
  full_ids = jnp.concatenate([ids, ro.response_ids], 1)
  full_mask = jnp.concatenate([mask, ro.response_mask], 1)
  logits = models.forward(params, full_ids, full_mask, config=CFG)[:, 5:-1]
  top3 = jax.lax.top_k(logits, 3)[1]
  assert bool(jnp.all(jnp.any(top3 == ro.response_ids[..., None], -1)))
  # The logprob is of the temperature-scaled, untruncated distribution.
  ref = jnp.take_along_axis(
    jax.nn.log_softmax(logits / 2.0), ro.response_ids[..., None], -1
  )[..., 0]
  np.testing.assert_allclose(ro.logprobs, ref, atol=1e-5)


def test_response_mask_through_first_eos():
  ids = jnp.array([[4, 2, 7, 2], [4, 5, 6, 7], [2, 0, 0, 0]])
  np.testing.assert_array_equal(
    response_mask_from_ids(ids, eos_token_id=2),
    [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
  )


def _zero_head(params):
  """All logits exactly 0: greedy argmax then always picks token 0."""
  p = dict(params)
  assert "lm_head" in p, "test config is untied"
  p["lm_head"] = jnp.zeros_like(p["lm_head"])
  return p


def test_eos_pad_mask_truncation_and_early_stop(params):
  ids, mask = _prompts()
  kw = dict(config=CFG, max_new_tokens=16, pad_token_id=PAD, greedy=True)
  free, steps_free = generate(
    params,
    ids,
    mask,
    jax.random.key(0),
    eos_token_id=NEVER,
    return_num_steps=True,
    **kw,
  )
  assert int(steps_free) == 16
  # With all-zero logits greedy emits token 0 = EOS at once in every row
  # (pad 1 here, so pad and EOS differ).
  ro, steps = generate(
    _zero_head(params),
    ids,
    mask,
    jax.random.key(0),
    eos_token_id=0,
    return_num_steps=True,
    **{**kw, "pad_token_id": 1},
  )
  assert int(steps) == 1  # the loop left after one decode step
  np.testing.assert_array_equal(ro.response_ids[:, 0], 0)
  np.testing.assert_array_equal(ro.response_ids[:, 1:], 1)
  np.testing.assert_array_equal(ro.response_lengths, 1)
  assert not bool(jnp.any(ro.truncated))
  # Pick the EOS as a token row 0 emits at step 3 in the free run: row 0
  # stops there, other rows go on; no token after the first EOS survives.
  eos0 = int(free.response_ids[0, 3])
  first = int(np.argmax(np.asarray(free.response_ids[0]) == eos0))
  ro2 = generate(params, ids, mask, jax.random.key(0), eos_token_id=eos0, **kw)
  r0 = np.asarray(ro2.response_ids[0])
  np.testing.assert_array_equal(
    r0[: first + 1], free.response_ids[0, : first + 1]
  )
  assert np.all(r0[first + 1 :] == PAD)
  assert int(ro2.response_lengths[0]) == first + 1
  assert not bool(ro2.truncated[0])
  for b in range(4):
    row = np.asarray(free.response_ids[b])
    if eos0 not in row:
      assert bool(ro2.truncated[b]) and bool(jnp.all(ro2.response_mask[b]))


def test_vmap_over_keys_groups_samples(params):
  ids, mask = _prompts()
  keys = jax.random.split(jax.random.key(11), 3)
  kw = dict(config=CFG, max_new_tokens=6, eos_token_id=5, pad_token_id=PAD)
  batched = jax.vmap(lambda k: generate(params, ids, mask, k, **kw))(keys)
  for g in range(3):
    single = generate(params, ids, mask, keys[g], **kw)
    np.testing.assert_array_equal(batched.response_ids[g], single.response_ids)
    np.testing.assert_allclose(batched.logprobs[g], single.logprobs, atol=1e-6)


def test_row_keys_make_rows_independent_of_batch_split(params):
  ids, mask = _prompts()
  kw = dict(config=CFG, max_new_tokens=6, eos_token_id=5, pad_token_id=PAD)
  whole = generate(params, ids, mask, jax.random.key(2), **kw)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
    jax.random.key(2), jnp.arange(4, dtype=jnp.uint32)
  )
  half = generate(params, ids[2:], mask[2:], keys[2:], **kw)
  np.testing.assert_array_equal(whole.response_ids[2:], half.response_ids)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_num_samples_equals_repeated_prompts(params, kv_cache):
  """Each prompt prefilled once for its S rows: the same tokens and (to
  float rounding: the prefill runs on B rows, not B S) logprobs as S
  copies of each prompt row, with the same per-row keys."""
  ids, mask = _prompts()
  kw = dict(
    config=CFG,
    max_new_tokens=6,
    eos_token_id=5,
    pad_token_id=PAD,
    kv_cache=kv_cache,
  )
  rng = jax.random.key(4)
  copies = generate(
    params, jnp.repeat(ids, 3, 0), jnp.repeat(mask, 3, 0), rng, **kw
  )
  once = generate(params, ids, mask, rng, num_samples=3, **kw)
  np.testing.assert_array_equal(once.prompt_ids, copies.prompt_ids)
  np.testing.assert_array_equal(once.prompt_mask, copies.prompt_mask)
  np.testing.assert_array_equal(once.response_ids, copies.response_ids)
  np.testing.assert_array_equal(once.response_mask, copies.response_mask)
  np.testing.assert_allclose(once.logprobs, copies.logprobs, atol=1e-5)
  # Rows of one prompt differ (their own keys), as with copies.
  assert len({tuple(r) for r in np.asarray(once.response_ids[:3])}) > 1


def test_num_samples_takes_numpy_integers(params):
  ids, mask = _prompts()
  kw = dict(config=CFG, max_new_tokens=2, eos_token_id=5, pad_token_id=PAD)
  rng = jax.random.key(1)
  a = generate(params, ids, mask, rng, num_samples=np.int64(2), **kw)
  b = generate(params, ids, mask, rng, num_samples=2, **kw)
  assert a.response_ids.shape == (8, 2)
  np.testing.assert_array_equal(a.response_ids, b.response_ids)


@pytest.mark.parametrize("option", ["num_samples", "cache_buckets"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_counts_below_one_are_named(params, option, bad):
  ids, mask = _prompts()
  with pytest.raises(ValueError, match=f"{option} must be an integer >= 1"):
    generate(
      params,
      ids,
      mask,
      jax.random.key(0),
      config=CFG,
      max_new_tokens=4,
      eos_token_id=5,
      pad_token_id=PAD,
      **{option: bad},
    )


_BAD_SAMPLING = [
  # (keyword, value, message): each gave NaN logprobs, wrong tokens or a
  # raw error from deep inside the program.
  ("temperature", 0.0, "temperature must be finite and >= 0.01 .*got 0.0"),
  ("temperature", -1.0, "temperature must be finite and >= 0.01 .*got -1.0"),
  ("temperature", float("nan"), "temperature must be finite and >= 0.01"),
  # 1e-40 (subnormal) read as 0: every logit / temperature was inf.
  ("temperature", 1e-40, "temperature must be finite and >= 0.01"),
  (
    "temperature",
    0.009,
    r"temperature must be .*temperature\), got 0.009 \(for argmax",
  ),
  ("top_p", 0.0, r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
  ("top_p", 1.5, r"top_p must be in \(0, 1\] \(1 = off\), got 1.5"),
  ("top_k", 2.5, r"top_k must be an integer >= 0 \(0 = off\), got 2.5"),
  ("top_k", -1, r"top_k must be an integer >= 0 \(0 = off\), got -1"),
  ("max_new_tokens", 2.5, "max_new_tokens must be an integer >= 1, got 2.5"),
  ("pad_token_id", 64, r"pad_token_id must be a token id in \[0, 64\)"),
  ("pad_token_id", None, r"pad_token_id must be a token id in \[0, 64\)"),
  ("pad_token_id", 1.5, r"pad_token_id must be a token id .* got 1.5"),
  ("eos_token_id", None, "eos_token_id must be an integer"),
]


@pytest.mark.parametrize("name, bad, message", _BAD_SAMPLING)
def test_bad_sampling_arguments_are_named(params, name, bad, message):
  ids, mask = _prompts()
  kw = dict(config=CFG, max_new_tokens=4, eos_token_id=5, pad_token_id=PAD)
  with pytest.raises(ValueError, match=message):
    generate(params, ids, mask, jax.random.key(0), **(kw | {name: bad}))
  if name in ("temperature", "top_p"):  # and before an AOT compile
    with pytest.raises(ValueError, match=message):
      generate.lower(params, ids, mask, jax.random.key(0), **kw, **{name: bad})


def test_bad_prompts_and_keys_are_named(params):
  ids, mask = _prompts()
  kw = dict(config=CFG, max_new_tokens=4, eos_token_id=5, pad_token_id=PAD)
  key = jax.random.key(0)
  cases = [
    ((ids[:, :0], mask[:, :0], key), r"must both be \[B, P\] with B, P >= 1"),
    ((ids.astype(jnp.float32), mask, key), "prompt_ids dtype float32"),
    ((ids, mask.astype(jnp.float32), key), "prompt_mask dtype float32"),
    ((ids, mask, 0), r"rng must be a PRNG key .* got int32\[\]"),
  ]
  for args, message in cases:
    with pytest.raises(ValueError, match=message):
      generate(params, *args, **kw)
  # Lists were traced as trees of scalars: TracerArrayConversionError.
  lists = (ids.tolist(), mask.tolist())
  for args in ((lists[0], mask), (ids, tuple(lists[1]))):
    name = "prompt_ids" if isinstance(args[0], list) else "prompt_mask"
    kind = type(args[0] if name == "prompt_ids" else args[1]).__name__
    with pytest.raises(TypeError) as e:
      generate(params, *args, key, **kw)
    assert str(e.value) == (
      f"generate: {name} is a Python {kind}; expected an array [B, P] (wrap "
      "it in np.asarray)"
    )
  with pytest.raises(TypeError, match="generate: prompt_mask is a Python"):
    generate(params, ids, prompt_mask=lists[1], rng=key, **kw)
  # Still taken: int masks, NumPy ids, legacy uint32 keys (one, or per row).
  legacy = jax.random.PRNGKey(0)
  for args in (
    (ids, mask.astype(jnp.int32), key),
    (ids, mask, legacy),
    (ids, mask, jax.random.split(legacy, ids.shape[0])),
  ):
    out = generate(params, *args, **(kw | {"pad_token_id": np.int64(PAD)}))
    assert out.response_ids.shape == (4, 4)


def test_same_shapes_compile_once_temperature_is_traced(params):
  ids, mask = _prompts()
  kw = dict(config=CFG, max_new_tokens=5, eos_token_id=5, pad_token_id=PAD)
  generate(params, ids, mask, jax.random.key(0), temperature=0.9, **kw)
  before = generate._cache_size()
  for t, seed in ((0.9, 1), (1.3, 2), (0.5, 3)):
    generate(params, ids, mask, jax.random.key(seed), temperature=t, **kw)
  assert generate._cache_size() == before


def test_first_argmax_and_gumbel_draws_match_jax():
  # first_argmax is jnp.argmax (first index on ties); sample_token's
  # Gumbel-max draws the same tokens as jax.random.categorical per row key.
  x = jnp.array([[0.0, 3.0, 3.0, 1.0], [-jnp.inf, -1.0, -2.0, -1.0]])
  np.testing.assert_array_equal(first_argmax(x), [1, 1])
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 3.0
  np.testing.assert_array_equal(
    first_argmax(logits), jnp.argmax(logits, axis=-1)
  )
  keys = jax.random.split(jax.random.key(1), 64)
  tok, logp = sample_token(logits, keys, temperature=jnp.float32(0.8))
  want = jax.vmap(jax.random.categorical)(keys, logits / 0.8)
  np.testing.assert_array_equal(tok, want)
  ref = jax.nn.log_softmax(logits / 0.8)[jnp.arange(64), want]
  np.testing.assert_allclose(logp, ref, atol=1e-6)
  # One key for the whole batch was a vmap error about axis 0.
  with pytest.raises(ValueError, match=r"expected one PRNG key per row, key"):
    sample_token(logits, jax.random.key(1), temperature=jnp.float32(0.8))
  assert len(set(np.asarray(tok).tolist())) > 10  # real sampling
  # A temperature number below the floor (1e-30 took every update to NaN).
  with pytest.raises(ValueError, match=r"temperature must be finite and >="):
    sample_token(logits, keys, temperature=1e-30)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_exact_sampling_draws_from_the_training_forward(params, temperature):
  # kv_cache=False: each token is the Gumbel-max draw (row key, step t) from
  # the TRAINING forward's logits of the finished sequence at position
  # P + t - 1, bitwise, and the logprobs are the trainer's. (The KV-cache
  # path agrees with these logits only up to float32 rounding.) EOS is the
  # token row 0 draws at step 3, so rows finish at different steps.
  ids, mask = _prompts()
  kw = dict(
    config=CFG,
    max_new_tokens=12,
    temperature=jnp.float32(temperature),
    pad_token_id=PAD,
  )
  key = jax.random.key(1)
  dry = generate(
    params, ids, mask, key, kv_cache=False, eos_token_id=NEVER, **kw
  )
  eos = int(dry.response_ids[0, 3])
  ro = generate(params, ids, mask, key, kv_cache=False, eos_token_id=eos, **kw)
  assert not bool(ro.truncated[0]) and int(ro.response_lengths[0]) <= 4
  full = jnp.concatenate([ro.prompt_ids, ro.response_ids], 1)
  fmask = jnp.concatenate([ro.prompt_mask, ro.response_mask], 1)
  p = ids.shape[1]
  logits = _training_logits(params, full, fmask, p)
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
    key, jnp.arange(4, dtype=jnp.uint32)
  )
  rmask = np.asarray(ro.response_mask)
  for t in range(12):
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
    want, _ = sample_token(
      logits[:, t], step_keys, temperature=jnp.float32(temperature)
    )
    got = np.asarray(ro.response_ids[:, t])
    np.testing.assert_array_equal(
      got[rmask[:, t]], np.asarray(want)[rmask[:, t]]
    )
  # The trainer's function on the same logits; a separately compiled program
  # may fuse the logsumexp differently (seen: 1 ulp). Inside one program
  # (the PPO step) the mismatch metric is exactly 0 (test_ppo_learns).
  trained = _teacher_forced(params, ro, temperature)
  np.testing.assert_allclose(ro.logprobs, trained, atol=1e-6, rtol=0)
  # The partial buffer of step t gives the finished sequence's logits at
  # P + t - 1 bitwise (causal masking hides the later slots).
  for t in (1, 6):
    part = (jnp.arange(12) < t)[None, :]
    logits_t = _training_logits(
      params,
      jnp.concatenate([ids, jnp.where(part, ro.response_ids, PAD)], 1),
      jnp.concatenate([mask, ro.response_mask & part], 1),
      p,
    )
    ok = rmask[:, t - 1]
    np.testing.assert_array_equal(
      np.asarray(logits_t[:, t - 1])[ok],
      np.asarray(logits[:, t - 1])[ok],
    )


# Random123's known-answer vectors for Threefry-2x32, 20 rounds (Salmon et
# al. 2011): (key, counter) -> output.
_THREEFRY_KAT = [
  ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
  ((2**32 - 1,) * 2, (2**32 - 1,) * 2, (0x1CB996FC, 0xBB002BE7)),
  (
    (0x13198A2E, 0x03707344),
    (0x243F6A88, 0x85A308D3),
    (0xC4923A9C, 0x483DF7A0),
  ),
]


def test_straight_line_threefry_gives_the_same_bits():
  """rlhf_jax.rollout registers JAX's straight-line threefry on CPU
  (rollout/threefry_cpu.py): known answers hold, and every bit equals the
  rolled loop JAX uses on CPU by default."""
  from jax._src.interpreters import mlir
  from jax._src.random import threefry2x32 as tf
  from jax.extend.random import threefry_2x32

  from rlhf_jax.rollout import threefry_cpu

  assert threefry_cpu.REGISTERED
  for key, count, want in _THREEFRY_KAT:
    got = jax.jit(threefry_2x32)(np.uint32(key), np.uint32(count))
    np.testing.assert_array_equal(np.asarray(got), np.uint32(want))

  def draws():  # a fresh function: lowered with the rule registered now
    keys = jax.random.split(jax.random.key(7), 5)
    return jax.jit(
      lambda k: (
        jax.vmap(lambda kk: jax.random.bits(kk, (333,), jnp.uint32))(k),
        jax.vmap(lambda kk: jax.random.gumbel(kk, (64,)))(k),
      )
    )(keys)

  straight = draws()
  rolled_rule = tf._threefry2x32_cpu_lowering_rule
  try:
    mlir.register_lowering(tf.threefry2x32_p, rolled_rule, platform="cpu")
    rolled = draws()
  finally:
    threefry_cpu.use_straight_line_threefry_on_cpu()
  for a, b in zip(straight, rolled, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def lowered_text(params, **kw) -> str:
  """StableHLO of generate on `_prompts()` with the test config."""
  ids, mask = _prompts()
  fn = functools.partial(
    generate, config=CFG, eos_token_id=NEVER, pad_token_id=PAD, **kw
  )
  return jax.jit(fn).lower(params, ids, mask, jax.random.key(0)).as_text()


def test_decode_loop_has_no_nested_loop(params):
  """T = 1 sampling lowers to one while loop (the decode steps): drawing
  the Gumbel noise adds no loop of its own per step."""
  text = lowered_text(params, max_new_tokens=3)
  assert text.count("stablehlo.while") == 1
