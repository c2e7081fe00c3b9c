"""Issue 5 acceptance 6: PPO on the real TinyStories-656K model learns a
programmatic reward while the adaptive KL controller holds the KL near its
target.

Reward: the number of times the token "and " (id 100 in this vocabulary)
appears in the response region (response_mask positions), passed to
``make_ppo_step`` as ``score_fn``. The pretrained model emits it about 0.3
times per 24-token response.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.train import PPOConfig, init_ppo_state, make_ppo_step
from rlhf_jax.types import PromptBatch

WORD, WORD_ID = "and ", 100
PROMPTS = [
  "Once upon a time, ",
  "One day, a little ",
  "Tom and Sue ",
  "The cat ",
  "There was a big ",
  "Lily wanted to ",
  "In the park, ",
  "The sun was ",
]
ITERATIONS = 30
TARGET_KL = 4.0


def _prompt_batch(tok) -> PromptBatch:
  enc = [tok.encode(p) for p in PROMPTS]  # BOS added by the tokenizer
  width = max(map(len, enc))
  ids = np.full((len(enc), width), tok.pad_token_id, np.int32)
  mask = np.zeros((len(enc), width), bool)
  for i, e in enumerate(enc):
    ids[i, width - len(e) :] = e
    mask[i, width - len(e) :] = True
  return PromptBatch(jnp.asarray(ids), jnp.asarray(mask))


def _word_counter(token_id: int):
  def score(reward_params, input_ids, attention_mask, response_mask):
    del reward_params, attention_mask
    resp = input_ids[:, -response_mask.shape[1] :]
    hits = (resp == token_id) & response_mask
    return jnp.sum(hits, axis=-1).astype(jnp.float32)

  return score


@pytest.mark.slow
@pytest.mark.parametrize("exact_sampling", [False, True])
def test_ppo_raises_word_count_with_kl_near_target(
  tinystories_dir, exact_sampling
):
  config, params = models.load_hf_checkpoint(tinystories_dir)
  tok = models.load_tokenizer(tinystories_dir)
  word_id = WORD_ID
  assert tok.decode([word_id]) == WORD

  ppo = PPOConfig(
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
    group_size=2,
    max_new_tokens=24,
    kl_coef=0.5,
    adaptive_kl=True,
    target_kl=TARGET_KL,
    # n_steps = 16 sequences per iteration, horizon 32: kl_coef moves <= 10%
    # per iteration. At horizon 16 (20%) the coefficient wound down to 0.03
    # while the KL was still below target and the KL then overshot to 2-3x
    # the target; with a 2x smaller LR it wound down to 0.003 and the KL ran
    # to 40 nats (integral windup of the multiplicative controller).
    kl_horizon=32,
    ppo_epochs=4,
    num_minibatches=1,
    exact_sampling=exact_sampling,
  )
  popt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  vopt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  value = models.from_policy_params(params, config, jax.random.key(1))
  state = init_ppo_state(params, value, popt, vopt, jax.random.key(0), ppo)
  step = jax.jit(
    make_ppo_step(config, popt, vopt, ppo, score_fn=_word_counter(word_id))
  )
  frozen = {"ref": jax.tree.map(jnp.copy, params), "reward": None}
  prompts = _prompt_batch(tok)

  history = []
  for i in range(ITERATIONS):
    state, metrics = step(state, prompts, frozen)
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    history.append(m)
    print(
      f"iter {i:2d} score {m['objective/scores']:.3f} "
      f"kl {m['objective/kl']:.3f} kl_coef {m['objective/kl_coef']:.4f} "
      f"first_ratio_dev {m['ppo/first_ratio_dev_max']:.2e} "
      f"mismatch {m['rollout/logprob_mismatch_max']:.2e}"
    )
  scores = np.array([m["objective/scores"] for m in history])
  kls = np.array([m["objective/kl"] for m in history])
  coefs = np.array([m["objective/kl_coef"] for m in history])

  # Learning. Per-iteration means over 16 responses have a standard error of
  # ~0.18 (count std ~0.7); the difference of a 10- and a 3-iteration mean
  # has ~0.12, so +0.4 is over 3 standard errors above "no learning"
  # (measured: 0.25 -> 0.83, best iteration 1.31).
  start, end = scores[:3].mean(), scores[-10:].mean()
  assert end > start + 0.4, (start, end)
  assert scores.max() >= 4 * max(start, 0.25)

  # KL held near the target: the second-half mean within [0.5, 2] x target
  # (target 4: measured 5.6 in an earlier environment and 6.5 with jax /
  # jaxlib 0.12.0.1 for the same code, whose float rounding draws other
  # samples; without the controller it runs away: 40-80 nats at the same
  # learning rate).
  late_kl = kls[ITERATIONS // 2 :].mean()
  assert TARGET_KL / 2 < late_kl < 2 * TARGET_KL, late_kl
  # The controller acted in both directions: down while KL < target at the
  # start, up once the KL exceeded it.
  assert coefs.min() < coefs[0] and coefs[-1] > coefs.min() * 2

  # First update on the sampling params: ratio exactly 1 (by construction,
  # the step uses that update's own logprobs as the old ones; recomputing
  # them in a second forward pass would differ by ~1 ulp, 9.5e-7).
  first = np.array([m["ppo/first_ratio_dev_max"] for m in history])
  assert first.max() == 0.0, first.max()
  # Sampler (KV-cache decode) vs trainer (full forward) logprobs: below 1e-5
  # on the pretrained params; later iterations give up to ~1.2e-5 of
  # float32 rounding (XLA:CPU picks shape-dependent matmul kernels for the
  # one-token decode step and the full forward; see benchmarks/README.md).
  mismatch = np.array([m["rollout/logprob_mismatch_max"] for m in history])
  if exact_sampling:
    # Sampled with the training forward: the same logits, bitwise.
    assert mismatch.max() == 0.0, mismatch
  else:
    assert mismatch[0] < 1e-5, mismatch[0]
    assert mismatch.max() < 3e-5, mismatch.max()
  assert all(m["train/skipped_steps"] == 0 for m in history)
