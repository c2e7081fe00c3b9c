"""Value and reward heads; backbone sharing; logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from rlhf_jax import models

CONFIG = models.ModelConfig(
  model_type="llama",
  vocab_size=40,
  hidden_size=16,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  intermediate_size=24,
  max_position_embeddings=32,
  tie_word_embeddings=True,
  initializer_range=0.3,
  eos_token_id=2,
  pad_token_id=2,
)
EOS = PAD = 2


def _model():
  policy = models.init_params(CONFIG, jax.random.key(0))
  return models.from_policy_params(policy, CONFIG, jax.random.key(1))


def test_reward_reads_last_mask_position_left_and_right_padded():
  params = _model()
  # Real sequences (eos inside the prompt at index 2, eos at the end):
  seqs = [[5, 6, EOS, 7, 8, EOS], [9, EOS, 10, 11]]
  # Right padded with pad == eos, and left padded.
  right = np.full((2, 8), PAD, np.int32)
  rmask = np.zeros((2, 8), bool)
  left = np.full((2, 8), PAD, np.int32)
  lmask = np.zeros((2, 8), bool)
  for b, s in enumerate(seqs):
    right[b, : len(s)] = s
    rmask[b, : len(s)] = True
    left[b, 8 - len(s) :] = s
    lmask[b, 8 - len(s) :] = True
  r_right = models.reward_forward(params, right, rmask, config=CONFIG)
  r_left = models.reward_forward(params, left, lmask, config=CONFIG)
  # Reference: each row alone, unpadded; reward = value at its last token.
  want, first_eos = [], []
  for s in seqs:
    ids = jnp.asarray([s], jnp.int32)
    v = models.values_forward(
      params, ids, jnp.ones(ids.shape, bool), config=CONFIG
    )
    want.append(float(v[0, -1]))
    first_eos.append(float(v[0, s.index(EOS)]))
  np.testing.assert_allclose(np.asarray(r_right), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(r_left), want, atol=1e-5)
  # Plausible bugs give different numbers: reading at the first eos token
  # (eos inside the prompt), or at the last column (a pad when right padded;
  # row 1 only: row 0 ends in eos == pad, so its trailing pad query has the
  # same token, position and visible keys as its last real token).
  assert np.abs(np.asarray(r_right) - np.array(first_eos)).min() > 1e-3
  v_right = models.values_forward(params, right, rmask, config=CONFIG)
  hidden_last = models.hidden_forward(
    params["backbone"], right, rmask, config=CONFIG
  )[:, -1]
  h = params["head"]
  last_col = hidden_last @ h["kernel"] + h["bias"]
  assert abs(float(r_right[1] - last_col[1])) > 1e-3
  # Values at masked slots are 0; at real slots they agree with the reward
  # at the last real position.
  assert np.all(np.asarray(v_right)[~rmask] == 0.0)
  np.testing.assert_allclose(
    np.asarray(v_right[[0, 1], [5, 3]]), want, atol=1e-5
  )


def test_all_false_row_gets_zero_reward():
  params = _model()
  ids = jnp.full((2, 4), PAD, jnp.int32)
  mask = jnp.asarray([[False] * 4, [True] * 4])
  r = models.reward_forward(params, ids, mask, config=CONFIG)
  assert float(r[0]) == 0.0 and np.isfinite(np.asarray(r)).all()
  np.testing.assert_array_equal(
    np.asarray(models.last_valid_index(mask)), [-1, 3]
  )


def test_value_head_hand_computed():
  # head kernel = e_0 (first unit vector), bias 0.5: value = h[..., 0] + 0.5.
  params = _model()
  params["head"] = {
    "kernel": jnp.zeros(16).at[0].set(1.0),
    "bias": jnp.asarray(0.5),
  }
  ids = jnp.asarray([[3, 4, 5]], jnp.int32)
  mask = jnp.ones(ids.shape, bool)
  h = models.hidden_forward(params["backbone"], ids, mask, config=CONFIG)
  v = models.values_forward(params, ids, mask, config=CONFIG)
  np.testing.assert_allclose(
    np.asarray(v), np.asarray(h[..., 0] + 0.5), atol=1e-6
  )


def test_from_policy_params_copies_backbone_and_new_head():
  policy = models.init_params(CONFIG, jax.random.key(0))
  critic = models.from_policy_params(policy, CONFIG, jax.random.key(1))
  for a, b in zip(
    jax.tree.leaves(policy), jax.tree.leaves(critic["backbone"]), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert critic["head"]["kernel"].shape == (16,)
  assert critic["head"]["bias"].shape == ()
  # kernel std 1/sqrt(D + 1) = 0.243 (lm-human-preferences init).
  assert 0.05 < float(jnp.std(critic["head"]["kernel"])) < 0.6
  # Backbone logits are the policy's logits.
  ids = jnp.asarray([[3, 4, 5]], jnp.int32)
  mask = jnp.ones(ids.shape, bool)
  np.testing.assert_array_equal(
    np.asarray(models.forward(policy, ids, mask, config=CONFIG)),
    np.asarray(models.forward(critic["backbone"], ids, mask, config=CONFIG)),
  )


ALLOWED = {"vocab", "embed", "mlp", "heads", "kv", "layers", None}


def test_logical_axes_cover_every_param():
  for config in (
    CONFIG,
    CONFIG.replace(
      model_type="qwen2", attention_bias=True, tie_word_embeddings=False
    ),
    models.ModelConfig(
      model_type="gpt2",
      vocab_size=40,
      hidden_size=16,
      num_layers=2,
      num_heads=2,
      num_kv_heads=2,
      head_dim=8,
      intermediate_size=64,
      max_position_embeddings=32,
      attention_bias=True,
      attention_out_bias=True,
      mlp_bias=True,
      tie_word_embeddings=True,
    ),
  ):
    params = models.init_params(config, jax.random.key(0))
    axes = models.param_logical_axes(config)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    assert jax.tree.structure(params) == jax.tree.structure(
      axes, is_leaf=is_spec
    )
    for p, spec in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(axes, is_leaf=is_spec),
      strict=True,
    ):
      assert len(spec) == p.ndim and set(spec) <= ALLOWED
    layer_specs = jax.tree.leaves(axes["layers"], is_leaf=is_spec)
    assert all(s[0] == "layers" for s in layer_specs)
    assert axes["embed"] == PartitionSpec("vocab", "embed")
  full = models.scalar_model_logical_axes(CONFIG)
  assert full["head"] == {
    "kernel": PartitionSpec("embed"),
    "bias": PartitionSpec(),
  }


def test_init_params_distribution_and_determinism():
  config = CONFIG.replace(model_type="qwen2", attention_bias=True)
  p = models.init_params(config, jax.random.key(3))
  assert np.all(np.asarray(p["final_norm"]["scale"]) == 1.0)
  assert np.all(np.asarray(p["layers"]["mlp_norm"]["scale"]) == 1.0)
  assert np.all(np.asarray(p["layers"]["attn"]["q_bias"]) == 0.0)
  # std of N(0, 0.3^2) over 40 * 16 = 640 draws: 0.3 +- ~0.01.
  assert abs(float(jnp.std(p["embed"])) - 0.3) < 0.03
  # Leaves are independent draws (a shared key would repeat values).
  assert not np.allclose(
    np.asarray(p["layers"]["attn"]["q"][0, :, 0, :]),
    np.asarray(p["layers"]["attn"]["q"][1, :, 0, :]),
  )
  again = models.init_params(config, jax.random.key(3))
  other = models.init_params(config, jax.random.key(4))
  np.testing.assert_array_equal(
    np.asarray(p["embed"]), np.asarray(again["embed"])
  )
  assert not np.allclose(np.asarray(p["embed"]), np.asarray(other["embed"]))
