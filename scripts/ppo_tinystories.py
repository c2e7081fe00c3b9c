"""PPO on TinyStories-656K with a programmatic sentiment reward, in one file.

A research script in the cleanrl / lm-human-preference-details style: every
setting is a field of ``Args`` (parsed by tyro, ``--help`` lists them), the
training loop is visible below, and the heavy lifting is the library's
compiled RLHF iteration (``rlhf_jax.train.make_ppo_step``: sample, score,
KL-shaped rewards, GAE, PPO epochs, KL controller; Ziegler et al. 2019).

Reward (jittable, no reward model): every token of the 2,048-token
TinyStories vocabulary gets the VADER compound sentiment of its text
(``rlhf_jax.tasks.GoldScorer``; e.g. "happy " -> 0.57, "bad " -> -0.54), and
a response scores the mean of its tokens' values:

  score(y) = sum_t table[y_t] m_t / max(sum_t m_t, 1),   m = response mask,

so the policy is pushed toward positive words, held back by the KL penalty
kl_coef * (log pi - log pi_ref) per token.

  python scripts/ppo_tinystories.py --iterations 30
  python scripts/ppo_tinystories.py --iterations 2   # smoke test
  python scripts/ppo_tinystories.py --mesh.data 2 --mesh.fsdp 4  # 8 devices

The step runs on a device mesh (``rlhf_jax.runner.mesh.Placement``; one
device by default): params and optimizer states are sharded by their
logical axes, the jitted step takes the state's shardings and donates it,
and each prompt batch is split over the batch axes ('data', 'fsdp'), so
``--batch-size`` must be a multiple of their size. The first lines printed
are the mesh and the sharding of the largest parameter.

Each iteration prints one line of metrics: objective/scores (mean reward of
the rollouts), objective/kl (mean sequence KL to the reference),
ppo/clipfrac, ppo/approx_kl, val/error.
"""

import dataclasses
import time

import jax
import numpy as np
import optax
import tyro

from rlhf_jax import models
from rlhf_jax.data import HFTokenizerAdapter, tokenize_prompts
from rlhf_jax.masked import masked_mean
from rlhf_jax.rollout import generate
from rlhf_jax.runner.mesh import MeshConfig, Placement, spec_str
from rlhf_jax.stages.environment import resolve_model
from rlhf_jax.tasks import STORY_OPENINGS, GoldScorer
from rlhf_jax.train import PPOConfig, init_ppo_state, make_ppo_step
from rlhf_jax.types import PromptBatch

PRINTED = (
  "objective/scores",
  "objective/kl",
  "objective/kl_coef",
  "ppo/clipfrac",
  "ppo/approx_kl",
  "val/error",
  "rollout/response_length_mean",
)


@dataclasses.dataclass(frozen=True)
class Args:
  """PPO on TinyStories with a token-level sentiment reward."""

  model: str | None = None
  """checkpoint directory; default $RLHF_JAX_MODEL_DIR, else the shared copy"""
  seed: int = 0
  """seed of initialisation, prompt order and sampling"""
  iterations: int = 30
  """PPO iterations (each: sample, score, ppo_epochs x num_minibatches)"""
  batch_size: int = 16
  """prompts per iteration"""
  group_size: int = 2
  """responses sampled per prompt"""
  max_prompt_length: int = 24
  """prompt tokens (left-padded, left-truncated)"""
  max_new_tokens: int = 32
  """response tokens sampled per prompt"""
  temperature: float = 1.0
  """sampling temperature (also used for training logprobs)"""
  learning_rate: float = 5e-4
  """policy Adam learning rate"""
  value_learning_rate: float = 1e-3
  """critic Adam learning rate"""
  max_grad_norm: float = 1.0
  """global-norm gradient clipping of both optimizers"""
  kl_coef: float = 0.05
  """initial KL penalty coefficient"""
  adaptive_kl: bool = True
  """adapt kl_coef toward target_kl (Ziegler et al. 2019)"""
  target_kl: float = 2.0
  """target sequence KL of the adaptive controller (nats)"""
  ppo_epochs: int = 2
  """passes over each iteration's rollouts"""
  num_minibatches: int = 2
  """minibatches per pass"""
  cliprange: float = 0.2
  """PPO ratio clip"""
  vf_coef: float = 0.1
  """value loss coefficient"""
  num_samples: int = 2
  """stories printed before and after training (0: none)"""
  mesh: MeshConfig = MeshConfig()
  """device mesh: --mesh.data, --mesh.fsdp, --mesh.tensor, --mesh.rules"""


def sentiment_table(tok: HFTokenizerAdapter, vocab_size: int) -> np.ndarray:
  """f32[V]: VADER compound score of each token's text (0 for special)."""
  inner = tok.tokenizer
  texts = [
    (inner.id_to_token(i) or "").replace("\u2581", " ")
    for i in range(vocab_size)
  ]
  table = GoldScorer().score(texts).astype(np.float32)
  for special in (tok.bos_id, tok.eos_id, tok.pad_id):
    if special is not None:
      table[special] = 0.0
  return table


def token_sentiment_score(table, input_ids, attention_mask, response_mask):
  """Mean token sentiment of each response: f32[B] (the PPO score_fn)."""
  del attention_mask
  response_ids = input_ids[:, input_ids.shape[1] - response_mask.shape[1] :]
  return masked_mean(table[response_ids], response_mask, axis=-1)


def sample_stories(params, prompts, rng, *, cfg, args, tok) -> list[str]:
  rollout = generate(
    params,
    prompts.prompt_ids,
    prompts.prompt_mask,
    rng,
    config=cfg,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    eos_token_id=tok.eos_id,
    pad_token_id=tok.pad_id,
  )
  ids = np.asarray(rollout.response_ids)
  mask = np.asarray(rollout.response_mask)
  return [tok.decode(row[m]) for row, m in zip(ids, mask, strict=True)]


def main(args: Args) -> dict[str, float]:
  t_start = time.perf_counter()
  placement = Placement.create(args.mesh)
  placement.check_batch(args.batch_size, "--batch-size")
  print(placement.describe(), flush=True)
  # --model, else $RLHF_JAX_MODEL_DIR, else the shared copy (as the CLI).
  model_dir = resolve_model(args.model)
  # Each device reads only its own shard of every weight.
  cfg, policy_params = placement.load_model(model_dir)
  tok = HFTokenizerAdapter.wrap(models.load_tokenizer(model_dir))
  table = placement.replicate(sentiment_table(tok, cfg.vocab_size))

  # Prompts: the project's story openings, left-padded to a static length.
  prompts = tokenize_prompts(
    list(STORY_OPENINGS), tok, max_prompt_length=args.max_prompt_length
  )
  order_rng = np.random.default_rng(args.seed)

  ppo_config = PPOConfig(
    eos_token_id=tok.eos_id,
    pad_token_id=tok.pad_id,
    group_size=args.group_size,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    kl_coef=args.kl_coef,
    adaptive_kl=args.adaptive_kl,
    target_kl=args.target_kl,
    kl_horizon=10 * args.batch_size * args.group_size,
    ppo_epochs=args.ppo_epochs,
    num_minibatches=args.num_minibatches,
    cliprange=args.cliprange,
    vf_coef=args.vf_coef,
    # Token sentiments are small (mean ~0.02); without normalisation the KL
    # penalty would swamp them. Gain and bias are fitted on the first
    # iteration's samples (Ziegler et al. 2019, sec. 2.2).
    normalize_reward=True,
  )
  policy_opt = optax.chain(
    optax.clip_by_global_norm(args.max_grad_norm),
    optax.adam(args.learning_rate),
  )
  value_opt = optax.chain(
    optax.clip_by_global_norm(args.max_grad_norm),
    optax.adam(args.value_learning_rate),
  )
  key = jax.random.key(args.seed)
  value_key, state_key, sample_key = jax.random.split(key, 3)
  # Critic: the policy backbone plus a fresh scalar head.
  value_params = models.from_policy_params(policy_params, cfg, value_key)
  # The loaded params stay untouched as the frozen reference: init_state
  # writes the state into new buffers, so donating it never frees them.
  ref_params = policy_params
  state, shardings = placement.init_state(
    lambda p, v, k: init_ppo_state(p, v, policy_opt, value_opt, k, ppo_config),
    policy_params,
    value_params,
    state_key,
    param_axes=[
      models.param_logical_axes(cfg),
      models.scalar_model_logical_axes(cfg),
    ],
  )
  frozen = {"ref": ref_params, "reward": table}
  step = placement.jit_step(
    make_ppo_step(
      cfg, policy_opt, value_opt, ppo_config, score_fn=token_sentiment_score
    ),
    shardings,
    extra=(frozen,),
  )
  path, spec = placement.sharded_leaf(state.policy_params)
  print(f"policy{path}: {spec_str(spec)}", flush=True)

  show = prompts.take(np.arange(args.num_samples))
  if args.num_samples:
    before = sample_stories(
      ref_params, show, sample_key, cfg=cfg, args=args, tok=tok
    )

  metrics = {}
  for it in range(args.iterations):
    idx = order_rng.choice(len(prompts), args.batch_size, replace=False)
    # numpy, static shapes -> global arrays split over the batch axes
    batch: PromptBatch = placement.batch(prompts.take(idx))
    t0 = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    line = " ".join(f"{k}={metrics[k]:.4g}" for k in PRINTED)
    secs = time.perf_counter() - t0
    print(f"iter {it + 1}/{args.iterations} ({secs:.1f}s) {line}", flush=True)

  if args.num_samples:
    after = sample_stories(
      state.policy_params, show, sample_key, cfg=cfg, args=args, tok=tok
    )
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
      print(f"prompt: {STORY_OPENINGS[i]}\n  before: {b}\n  after:  {a}")
  print(f"done in {time.perf_counter() - t_start:.1f}s", flush=True)
  return metrics


if __name__ == "__main__":
  main(tyro.cli(Args))
