"""Prefix sharing: K responses to one prompt in one packed row
(models.shared_prompt) give each response's own logits and gradients, for
every family (learned positions, biases, sliding windows narrower than the
sequence, soft-capping, q/k norms), LoRA and remat, with left-padded
prompts, right-padded responses and an empty response; and the packed
forward does less work where `sharing_saves_work` says so.
"""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import lora
from rlhf_jax.models import shared_prompt as sp

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
NAMES = [
  "llama3_tiny",
  "gpt2_tiny",
  "qwen2_tiny",
  "qwen3_tiny",
  "gemma2_tiny",
  "gemma3_tiny",
]
P, T, K = 6, 7, 3


def _inputs(vocab: int, batch: int = 3):
  """Prompts left-padded to P (lengths 6, 3, 1), responses right-padded
  to T (row 1's second response empty)."""
  rng = np.random.default_rng(0)
  prompt = rng.integers(1, vocab, (batch, P))
  pmask = np.arange(P)[None] >= P - np.array([6, 3, 1])[:batch, None]
  resp = rng.integers(1, vocab, (batch, K, T))
  lengths = np.array([[7, 4, 2], [5, 0, 7], [1, 7, 3]])[:batch]
  rmask = np.arange(T)[None, None] < lengths[..., None]
  return tuple(map(jnp.asarray, (prompt, pmask, resp, rmask)))


def _separate(params, config, prompt, pmask, resp, rmask):
  """f32[B, K, T, V] from K forwards of [prompt | response_k]."""
  out = []
  for k in range(resp.shape[1]):
    ids = jnp.concatenate([prompt, resp[:, k]], axis=1)
    mask = jnp.concatenate([pmask, rmask[:, k]], axis=1)
    out.append(models.forward(params, ids, mask, config=config)[:, P - 1 : -1])
  return jnp.stack(out, axis=1)


def _close_on(a, b, rmask, tol):
  """a, b equal (to tol) where the predicted response token is real."""
  a, b, m = np.asarray(a), np.asarray(b), np.asarray(rmask)
  np.testing.assert_allclose(a[m], b[m], atol=tol, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_packed_logits_equal_each_responses_own_forward(name):
  config, params = models.load_hf_checkpoint(FIX / name)
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)
  got = sp.shared_prompt_logits(
    params, prompt, pmask, resp, rmask, config=config
  )
  assert got.shape == (3, K, T, config.vocab_size)
  want = _separate(params, config, prompt, pmask, resp, rmask)
  _close_on(got, want, rmask, 2e-5)


@pytest.mark.parametrize("name", ["llama3_tiny", "gemma2_tiny"])
def test_bfloat16_packed_logits_round_like_separate_rows(name):
  """In bfloat16 each response's output sums its prompt and own halves in
  float32 and rounds once, as one dot over [prompt | response_k] does:
  0.032 / 0.0 from the separate logits here, against 0.054 / 0.114 with
  each half rounded before the add."""
  config, params = models.load_hf_checkpoint(FIX / name)
  config = dataclasses.replace(config, dtype="bfloat16")
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)
  got = sp.shared_prompt_logits(
    params, prompt, pmask, resp, rmask, config=config
  )
  want = _separate(params, config, prompt, pmask, resp, rmask)
  _close_on(got, want, rmask, 0.04)


def test_each_responses_block_keeps_its_own_window():
  """Gemma 2's window of 3: response k's slots sit k T past their
  unpacked ones, so a window on packed slots would hide the prompt from
  every later response; each response's block is its own sequence's."""
  config, params = models.load_hf_checkpoint(FIX / "gemma2_tiny")
  assert config.sliding_window is not None and config.sliding_window < T
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)
  _, _, (full, sliding) = sp.packed_inputs(prompt, pmask, resp, rmask, config)
  assert full.prompt.shape == (3, P, P)
  assert full.response.shape == (3, K, T, P + T)
  # Row 0's last response, first token (its own slot P): it sees prompt
  # slots P - 2, P - 1 and itself within the window, nothing else.
  seen = np.asarray(sliding.response[0, K - 1, 0]).nonzero()[0]
  assert seen.tolist() == [P - 2, P - 1, P]
  seen = np.asarray(full.response[0, K - 1, 0]).nonzero()[0]
  assert seen.tolist() == list(range(P)) + [P]
  # The first response's third token sees the two before it and itself,
  # no prompt slot.
  seen = np.asarray(sliding.response[0, 0, 2]).nonzero()[0]
  assert seen.tolist() == [P, P + 1, P + 2]
  # Row 1's prompt is left-padded by 3: its pad keys stay hidden.
  seen = np.asarray(full.prompt[1, P - 1]).nonzero()[0]
  assert seen.tolist() == [3, 4, 5]


@pytest.mark.parametrize("name", ["llama3_tiny", "gemma2_tiny", "gemma3_tiny"])
def test_gathered_rows_equal_their_own_sequences_hidden_states(name):
  """A last layer on a few gathered rows (a prompt slot, response slots)
  runs on their plain mask, not the blocks: the same hidden states as
  each row's own sequence, for a range too (slots P - 1 .. L - 1).
  Gemma 3's last layer is a sliding one (window 3), so the plain mask's
  window is tested on virtual slots."""
  config, params = models.load_hf_checkpoint(FIX / name)
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)
  # Packed slots: prompt slot P - 1, response 0's token 3, response 2's 1.
  rows = jnp.asarray([[P - 1, P + 3, P + 2 * T + 1]] * 3, jnp.int32)
  got = sp.shared_prompt_hidden(
    params, prompt, pmask, resp, rmask, config=config, rows=rows
  )
  span = sp.shared_prompt_hidden(
    params, prompt, pmask, resp, rmask, config=config, rows=(P - 1, P + K * T)
  )

  def own(k, slot):  # f32[B, D]: [prompt | response_k]'s hidden at slot
    ids = jnp.concatenate([prompt, resp[:, k]], axis=1)
    mask = jnp.concatenate([pmask, rmask[:, k]], axis=1)
    return models.hidden_forward(params, ids, mask, config=config)[:, slot]

  want = jnp.stack([own(0, P - 1), own(0, P + 3), own(2, P + 1)], axis=1)
  real = np.stack([pmask[:, -1], rmask[:, 0, 3], rmask[:, 2, 1]], axis=1)
  np.testing.assert_allclose(
    np.asarray(got)[real], np.asarray(want)[real], atol=2e-5
  )
  picked = np.asarray(span)[:, [0, 1 + 3, 1 + 2 * T + 1]]
  np.testing.assert_allclose(picked[real], np.asarray(want)[real], atol=2e-5)
  with pytest.raises(ValueError, match=r"start >= P - 1"):
    sp.shared_prompt_hidden(
      params, prompt, pmask, resp, rmask, config=config, rows=(0, P + K * T)
    )


@pytest.mark.parametrize("variant", ["lora", "remat", "unstacked"])
def test_packed_logprobs_and_gradients_in_every_layout(variant):
  config, params = models.load_hf_checkpoint(FIX / "llama3_tiny")
  if variant == "lora":
    config = lora.configure(
      config, lora.LoraConfig(rank=4, targets=("q", "v", "down"))
    )
    params = lora.add_adapters(params, config, jax.random.key(2))
    params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if str(p[-1].key).endswith("_lora_b") else x,
      params,
    )
  if variant == "remat":
    config = dataclasses.replace(config, remat=True)
  if variant == "unstacked":
    params = models.unstack_layers(params, config)
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)

  def loss(p, packed):
    if packed:
      logits = sp.shared_prompt_logits(
        p, prompt, pmask, resp, rmask, config=config
      )
    else:
      logits = _separate(p, config, prompt, pmask, resp, rmask)
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, resp[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(rmask, picked, 0.0))

  want, g_want = jax.value_and_grad(loss)(params, False)
  got, g_got = jax.value_and_grad(loss)(params, True)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  leaves = jax.tree.leaves(g_want)
  assert any(float(jnp.max(jnp.abs(g))) > 1e-3 for g in leaves)
  for a, b in zip(leaves, jax.tree.leaves(g_got), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)


def test_positions_continue_from_each_prompt():
  config, _ = models.load_hf_checkpoint(FIX / "llama3_tiny")
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)
  ids, pos, _ = sp.packed_inputs(prompt, pmask, resp, rmask, config)
  assert ids.shape == pos.shape == (3, P + K * T)
  # Row 1: a 3-token prompt; its responses start at position 3.
  assert pos[1, :P].tolist() == [0, 0, 0, 0, 1, 2]
  assert pos[1, P : P + 5].tolist() == [3, 4, 5, 6, 7]
  assert pos[1, P + 2 * T : P + 2 * T + 3].tolist() == [3, 4, 5]


def test_response_rows():
  assert sp.response_rows(3, 4, 2).tolist() == [2, 3, 4, 5, 2, 7, 8, 9]
  with pytest.raises(ValueError, match="response length 0, 2 responses"):
    sp.response_rows(5, 0, 2)


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _flop_ratio(prompt_len: int, response_len: int) -> float:
  """XLA's flops of the packed logits over those of two separate rows
  (llama3_tiny, 2 prompts, K = 2, every token real)."""
  config, params = models.load_hf_checkpoint(FIX / "llama3_tiny")
  config = dataclasses.replace(config, max_position_embeddings=128)
  rng = np.random.default_rng(1)
  prompt = jnp.asarray(rng.integers(1, 100, (2, prompt_len)))
  resp = jnp.asarray(rng.integers(1, 100, (2, 2, response_len)))
  pmask, rmask = jnp.ones(prompt.shape, bool), jnp.ones(resp.shape, bool)

  def packed(p):
    return sp.shared_prompt_logits(p, prompt, pmask, resp, rmask, config=config)

  def separate(p):
    return _separate_long(p, config, prompt, pmask, resp, rmask)

  assert sp.sharing_saves_work(config, prompt_len, response_len, 2)
  return _flops(packed, params) / _flops(separate, params)


def test_the_prompt_runs_once():
  """A long prompt (P = 48, T = 8): the packed forward runs 64 tokens
  against 112."""
  assert _flop_ratio(48, 8) < 0.75


def test_the_blocks_score_fewer_entries_than_separate_rows():
  """Short prompts and long responses (P = 4, T = 32; a wide attention):
  the whole packed square, (4 + 64)^2 entries, would cost more than
  2 (4 + 32)^2 (1.25x the separate flops); the blocks score 4^2 + 64 * 36
  and run 68 tokens against 72."""
  assert _flop_ratio(4, 32) < 1.05


def _separate_long(params, config, prompt, pmask, resp, rmask):
  p = prompt.shape[1]
  out = []
  for k in range(resp.shape[1]):
    ids = jnp.concatenate([prompt, resp[:, k]], axis=1)
    mask = jnp.concatenate([pmask, rmask[:, k]], axis=1)
    rows = (p - 1, ids.shape[1] - 1)
    out.append(
      models.forward(params, ids, mask, config=config, logits_range=rows)
    )
  return jnp.stack(out, axis=1)


TINYSTORIES = models.ModelConfig(  # TinyStories-656K's shapes
  model_type="llama",
  vocab_size=2048,
  hidden_size=128,
  num_layers=2,
  num_heads=8,
  num_kv_heads=4,
  head_dim=16,
  intermediate_size=384,
  max_position_embeddings=512,
)


@pytest.mark.parametrize(
  "config, p, t, packs",
  [
    # Measured (benchmarks/README.md, bench_shared_prompt.py, DPO / reward
    # model, separate / packed): P = 8 before T = 64 0.97x / 1.02x, 16
    # 0.99x / 1.04x, 32 1.23x / 1.11x, 96 1.25x / 1.93x; 24 before 32 (the
    # default run) 1.04x / 1.15x.
    (TINYSTORIES, 8, 64, False),
    (TINYSTORIES, 16, 64, True),
    (TINYSTORIES, 32, 64, True),
    (TINYSTORIES, 96, 64, True),
    (TINYSTORIES, 24, 32, True),
    # The 25M config: 1.07x DPO at P = 16, T = 64.
    (
      dataclasses.replace(
        TINYSTORIES,
        hidden_size=512,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=1536,
      ),
      16,
      64,
      True,
    ),
    (TINYSTORIES, 0, 64, False),
  ],
)
def test_sharing_saves_work(config, p, t, packs):
  assert sp.sharing_saves_work(config, p, t, 2) is packs


def test_an_empty_prompt_is_an_error():
  config, params = models.load_hf_checkpoint(FIX / "llama3_tiny")
  empty = jnp.zeros((1, 0), jnp.int32)
  resp = jnp.ones((1, 2, 3), jnp.int32)
  with pytest.raises(ValueError, match="prompt length 0"):
    sp.shared_prompt_logits(
      params, empty, empty.astype(bool), resp, resp > 0, config=config
    )
  rm = models.from_policy_params(params, config, jax.random.key(0))
  with pytest.raises(ValueError, match="shared_prompt_rewards: prompt len"):
    models.shared_prompt_rewards(
      rm, empty, empty.astype(bool), resp, resp > 0, config=config
    )
  prompt = jnp.ones((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="pooling='max'"):
    models.shared_prompt_rewards(
      rm, prompt, prompt > 0, resp, resp > 0, config=config, pooling="max"
    )


@pytest.mark.parametrize("name", ["llama3_tiny", "gemma2_tiny", "gemma3_tiny"])
def test_packed_rewards_equal_each_responses_own(name):
  """Both poolings, an empty response included ("last" then reads the
  prompt's last token, "mean" gives 0), and a fully empty pair row."""
  config, params = models.load_hf_checkpoint(FIX / name)
  rm = models.from_policy_params(params, config, jax.random.key(4))
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)
  pmask = pmask.at[2].set(False)  # row 2: no prompt token
  rmask = rmask.at[2, 0].set(False)  # ... and response 0 empty too
  for pooling in ("last", "mean"):
    got = models.shared_prompt_rewards(
      rm, prompt, pmask, resp, rmask, config=config, pooling=pooling
    )
    assert got.shape == (3, K)
    for k in range(K):
      ids = jnp.concatenate([prompt, resp[:, k]], axis=1)
      mask = jnp.concatenate([pmask, rmask[:, k]], axis=1)
      if pooling == "last":
        want = models.reward_forward(rm, ids, mask, config=config)
      else:
        v = models.values_forward(rm, ids, mask, config=config)[:, P:]
        n = jnp.sum(rmask[:, k], axis=-1)
        want = jnp.where(n > 0, jnp.sum(v, -1) / jnp.maximum(n, 1), 0.0)
      np.testing.assert_allclose(
        np.asarray(got[:, k]), np.asarray(want), atol=2e-5, err_msg=pooling
      )
    assert float(got[2, 0]) == 0.0
    assert float(got[1, 1]) != 0.0 if pooling == "last" else True


def _shape_cases():
  p, pm = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), bool)
  r, rm = jnp.ones((2, 2, 3), jnp.int32), jnp.ones((2, 2, 3), bool)
  return [
    ((p, pm, r[:, 0], rm[:, 0]), "response_ids shape (2, 3): expected"),
    ((p, pm, r, rm[:, :, :2]), "response_mask shape (2, 2, 2): expected"),
    ((p, pm[:, :3], r, rm), "prompt_mask shape (2, 3): expected"),
    ((p[:1], pm[:1], r, rm), "1 prompts but 2 rows of responses"),
    ((p[0], pm[0], r, rm), "prompt_ids shape (4,): expected [B, P]"),
    ((p, pm, r[:, :0], rm[:, :0]), "0 responses per prompt: expected each"),
    ((p[:0], pm[:0], r[:0], rm[:0]), "batch size 0: expected at least one"),
    ((p * 1.5, pm, r, rm), "prompt_ids dtype float32: expected integer"),
    ((p, pm, r > 0, rm), "response_ids dtype bool: expected integer"),
  ]


@pytest.mark.parametrize(
  "fn", ["shared_prompt_logits", "shared_prompt_rewards"]
)
def test_bad_shapes_are_errors_naming_the_argument(fn):
  config, params = models.load_hf_checkpoint(FIX / "llama3_tiny")
  if fn == "shared_prompt_rewards":
    params = models.from_policy_params(params, config, jax.random.key(0))
  for args, message in _shape_cases():
    with pytest.raises(ValueError, match=f"{fn}: .*{re.escape(message)}"):
      getattr(models, fn)(params, *args, config=config)


@pytest.mark.parametrize(
  "args, message",
  [
    ((-1, 4, 2), "prompt_len=-1: expected an integer >= 0"),
    ((4, 5.5, 2), "response_len=5.5: expected an integer >= 0"),
    ((4, 4, 0), "num_responses=0: expected an integer >= 1"),
    (("4", 4, 2), "prompt_len='4'"),
  ],
)
def test_sharing_saves_work_checks_its_lengths(args, message):
  with pytest.raises(ValueError, match=message):
    sp.sharing_saves_work(TINYSTORIES, *args)


def test_sharing_saves_work_takes_numpy_integers():
  """Fixed-width numpy lengths would overflow the estimate's products
  (int32 at T = 60000, uint8 at once): they count as Python ints."""
  for p, t in ((4, 60000), (np.uint8(64), 16), (200, 60000)):
    got = sp.sharing_saves_work(TINYSTORIES, np.int32(p), np.int32(t), 2)
    assert got is sp.sharing_saves_work(TINYSTORIES, int(p), int(t), 2)
  assert sp.sharing_saves_work(TINYSTORIES, np.uint8(64), np.uint8(16), 2)


@pytest.mark.parametrize(
  "rows, message",
  [
    ((P - 1, P + K * T + 5), r"rows=\(5, 32\): expected \(start, stop\)"),
    ((P, P), r"rows=\(6, 6\): expected \(start, stop\)"),
    ((0, P + K * T), r"expected a start >= P - 1 = 5"),
    ([P - 1, P + K * T], r"rows: shape \(2,\), dtype None"),
    (np.zeros((2, 3), np.int32), r"rows: shape \(2, 3\)"),
    (np.zeros((3, 3), np.float32), r"dtype float32: expected"),
  ],
)
def test_shared_prompt_hidden_checks_its_rows(rows, message):
  config, params = models.load_hf_checkpoint(FIX / "llama3_tiny")
  prompt, pmask, resp, rmask = _inputs(config.vocab_size)
  with pytest.raises(ValueError, match=message):
    sp.shared_prompt_hidden(
      params, prompt, pmask, resp, rmask, config=config, rows=rows
    )


def test_gpt2_packed_rows_past_its_position_table_are_named():
  """Packed rows pass explicit positions (prompt + its response, up to
  P + T - 1), so the forward's own check never sees them: P + T above
  GPT-2's 32 learned positions read NaN there until this check. P + T =
  32 is finite; 33 is an error naming both, for logits and rewards."""
  config, params = models.load_hf_checkpoint(FIX / "gpt2_tiny")
  limit = config.max_position_embeddings
  prompt = jnp.ones((1, 8), jnp.int32)
  fits = jnp.ones((1, 2, limit - 8), jnp.int32)
  got = sp.shared_prompt_logits(
    params, prompt, prompt > 0, fits, fits > 0, config=config
  )
  assert np.isfinite(np.asarray(got)).all()
  longer = jnp.ones((1, 2, limit - 7), jnp.int32)
  message = f"8 prompt slots \\+ {limit - 7} response tokens exceed the"
  with pytest.raises(ValueError, match=message):
    sp.shared_prompt_logits(
      params, prompt, prompt > 0, longer, longer > 0, config=config
    )
  rm = models.from_policy_params(params, config, jax.random.key(0))
  with pytest.raises(ValueError, match=f"{limit} learned positions"):
    models.shared_prompt_rewards(
      rm, prompt, prompt > 0, longer, longer > 0, config=config
    )
