"""The mean-pooled reward the default pipeline trains and scores with.

r(x, y) = (1/|y|) sum_t v(x, y_<=t) over the response tokens
(train.supervised.response_mean_reward, RewardModelConfig.pooling="mean").
"""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.train import pair_rewards
from rlhf_jax.train.supervised import response_mean_reward
from rlhf_jax.types import PreferenceBatch


def _setup(tinystories_dir):
  config, params = models.load_hf_checkpoint(tinystories_dir)
  rm = models.from_policy_params(params, config, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompt_ids = rng.integers(3, 2048, (3, 4)).astype(np.int32)
  prompt_mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], bool)
  resp_ids = rng.integers(3, 2048, (3, 5)).astype(np.int32)
  resp_mask = np.array(
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool
  )
  return config, rm, prompt_ids, prompt_mask, resp_ids, resp_mask


def test_mean_reward_is_the_mean_value_over_response_tokens(tinystories_dir):
  config, rm, p_ids, p_mask, r_ids, r_mask = _setup(tinystories_dir)
  ids = np.concatenate([p_ids, r_ids], 1)
  attn = np.concatenate([p_mask, r_mask], 1)
  got = response_mean_reward(
    rm,
    jnp.asarray(ids),
    jnp.asarray(attn),
    jnp.asarray(r_mask),
    model_config=config,
  )
  values = np.asarray(
    models.values_forward(
      rm, jnp.asarray(ids), jnp.asarray(attn), config=config
    ),
    np.float64,
  )
  want = []
  for b in range(3):  # float64 loop: positions P .. P+T-1 that are valid
    vs = [values[b, 4 + t] for t in range(5) if r_mask[b, t]]
    want.append(sum(vs) / len(vs) if vs else 0.0)
  # Row 2 has an empty response: 0, not NaN (a last-token reward would
  # read the prompt's last token instead).
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert float(got[2]) == 0.0
  # Garbage ids after the response end change nothing.
  ids2 = ids.copy()
  ids2[0, 4 + 3 :] = 7
  got2 = response_mean_reward(
    rm,
    jnp.asarray(ids2),
    jnp.asarray(attn),
    jnp.asarray(r_mask),
    model_config=config,
  )
  np.testing.assert_array_equal(np.asarray(got2)[0], np.asarray(got)[0])


def test_pair_rewards_mean_pooling_scores_chosen_and_rejected(tinystories_dir):
  config, rm, p_ids, p_mask, r_ids, r_mask = _setup(tinystories_dir)
  rej_ids = np.roll(r_ids, 1, axis=0)
  rej_mask = np.roll(r_mask, 1, axis=0)
  batch = PreferenceBatch(
    prompt_ids=jnp.asarray(p_ids),
    prompt_mask=jnp.asarray(p_mask),
    chosen_ids=jnp.asarray(r_ids),
    chosen_mask=jnp.asarray(r_mask),
    rejected_ids=jnp.asarray(rej_ids),
    rejected_mask=jnp.asarray(rej_mask),
  )
  rc, rr = pair_rewards(rm, batch, model_config=config, pooling="mean")

  def one(resp, mask):
    ids = jnp.asarray(np.concatenate([p_ids, resp], 1))
    attn = jnp.asarray(np.concatenate([p_mask, mask], 1))
    return response_mean_reward(
      rm, ids, attn, jnp.asarray(mask), model_config=config
    )

  np.testing.assert_allclose(rc, one(r_ids, r_mask), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rr, one(rej_ids, rej_mask), rtol=1e-5, atol=1e-6)
  last_c, _ = pair_rewards(rm, batch, model_config=config)
  assert not np.allclose(np.asarray(last_c), np.asarray(rc))
