"""GRPO on TinyStories-656K with a reward written in plain Python, in one file.

A research script in the cleanrl style: every setting is a field of ``Args``
(parsed by tyro, ``--help`` lists them) and the loop is visible below. The
reward is any Python function

  def reward(prompts: list[str], completions: list[str], **columns)
      -> list[float | None]

named as ``module:function`` or ``path/to/file.py:function`` (default: the
VADER sentiment of the story, ``rlhf_jax.tasks.rewards:sentiment``), so it
cannot run inside a compiled program. Each iteration is therefore

  1. the jitted rollout program (``train.make_grpo_rollout``): G samples
     per prompt, their logprobs and the reference's, sharded by rows;
  2. ``rewards.score_on_host``: each process decodes and scores only the
     rows it holds; the scores come back as a global f32[B] array;
  3. the jitted update program (``train.make_grpo_update``, state donated):
     group-relative advantages (Shao et al. 2024) and clipped updates.

No program calls back into Python, so nothing can deadlock on a mesh.

  python scripts/grpo_python_reward.py --iterations 20
  python scripts/grpo_python_reward.py --smoke          # a few seconds
  python scripts/grpo_python_reward.py --mesh.data 8    # 8 devices
  python scripts/grpo_python_reward.py \
      --reward my_rewards.py:length --reward rlhf_jax.tasks.rewards:sentiment \
      --reward-weights 0.1 1.0

The mesh puts every device on the 'data' axis by default (the batch is
split, params replicated); ``--prompts-per-iteration`` must be a multiple of
the batch axes' size. The first line printed is the mesh, then one line per
iteration (mean reward, KL, ...), and the held-out mean reward (one sample
per held-out prompt, fixed key) before and after training.
"""

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from rlhf_jax import models, parallel, rewards
from rlhf_jax.data import HFTokenizerAdapter, tokenize_prompts
from rlhf_jax.rollout import generate
from rlhf_jax.runner.mesh import MeshConfig, Placement
from rlhf_jax.stages.environment import resolve_model
from rlhf_jax.tasks import STORY_OPENINGS
from rlhf_jax.train import (
  GRPOConfig,
  init_grpo_state,
  make_grpo_rollout,
  make_grpo_update,
)
from rlhf_jax.types import PromptBatch

PRINTED = (
  "objective/scores",
  "objective/kl",
  "objective/frac_reward_zero_std",
  "ppo/clipfrac",
  "rollout/response_length_mean",
)


@dataclasses.dataclass(frozen=True)
class Args:
  """GRPO on TinyStories with a plain-Python reward scored on the host."""

  model: str | None = None
  """checkpoint directory; default $RLHF_JAX_MODEL_DIR, else the shared copy"""
  seed: int = 0
  """seed of the prompt order, sampling and held-out samples"""
  iterations: int = 20
  """GRPO iterations (each: rollout, host scoring, update)"""
  prompts_per_iteration: int = 8
  """prompts per iteration (a multiple of the batch axes' devices)"""
  group_size: int = 4
  """G responses sampled per prompt"""
  max_prompt_length: int = 24
  """prompt tokens (left-padded, left-truncated)"""
  max_new_tokens: int = 32
  """response tokens sampled per prompt"""
  temperature: float = 1.0
  """sampling temperature (also used for training logprobs)"""
  learning_rate: float = 5e-4
  """Adam learning rate"""
  max_grad_norm: float = 1.0
  """global-norm gradient clipping"""
  advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
  """group-relative advantage: grpo, dr_grpo or rloo"""
  kl_coef: float = 0.04
  """KL coefficient (k3 estimator in the loss, as GRPO)"""
  ppo_epochs: int = 1
  """passes over each iteration's samples"""
  num_minibatches: int = 1
  """minibatches per pass"""
  reward: tuple[str, ...] = ("rlhf_jax.tasks.rewards:sentiment",)
  """reward functions, module:function or path/to/file.py:function"""
  reward_weights: tuple[float, ...] = ()
  """one weight per --reward (default 1 each)"""
  heldout_prompts: int = 16
  """story openings held out of training for the before/after reward"""
  smoke: bool = False
  """a run of a few seconds: 2 iterations at tiny sizes"""
  mesh: MeshConfig = MeshConfig()
  """device mesh: --mesh.data (default: all devices), --mesh.fsdp, ..."""


def smoke_args(args: Args, divisor: int) -> Args:
  """``args`` shrunk to a run of a few seconds (``--smoke``)."""
  return dataclasses.replace(
    args,
    iterations=2,
    prompts_per_iteration=divisor,
    group_size=2,
    max_prompt_length=16,
    max_new_tokens=8,
    heldout_prompts=divisor,
  )


def make_decode(tok: HFTokenizerAdapter) -> rewards.Decode:
  """decode(ids i32[N, T], mask bool[N, T]) -> N texts (EOS dropped)."""

  def decode(ids: np.ndarray, mask: np.ndarray) -> list[str]:
    keep = mask & (ids != tok.eos_id)
    return [tok.decode(row[m]) for row, m in zip(ids, keep, strict=True)]

  return decode


def main(args: Args) -> dict[str, float]:
  t_start = time.perf_counter()
  placement = Placement.create(args.mesh)
  if args.smoke:
    args = smoke_args(args, placement.batch_divisor)
  placement.check_batch(args.prompts_per_iteration, "--prompts-per-iteration")
  placement.check_batch(args.heldout_prompts, "--heldout-prompts")
  print(placement.describe(), flush=True)
  reward = rewards.RewardFunctions.load(args.reward, args.reward_weights)
  # --model, else $RLHF_JAX_MODEL_DIR, else the shared copy (as the CLI).
  model_dir = resolve_model(args.model)
  cfg, ref_params = placement.load_model(model_dir)
  tok = HFTokenizerAdapter.wrap(models.load_tokenizer(model_dir))
  decode = make_decode(tok)

  # The last story openings are held out; training draws from the rest.
  texts = list(STORY_OPENINGS)
  heldout_texts = texts[-args.heldout_prompts :]
  train_texts = texts[: -args.heldout_prompts]
  if len(train_texts) < args.prompts_per_iteration:
    raise SystemExit(
      f"--prompts-per-iteration {args.prompts_per_iteration} exceeds the "
      f"{len(train_texts)} training prompts"
    )
  tokenize = lambda t: tokenize_prompts(  # noqa: E731
    t, tok, max_prompt_length=args.max_prompt_length
  )
  train_prompts, heldout = tokenize(train_texts), tokenize(heldout_texts)
  order_rng = np.random.default_rng(args.seed)

  config = GRPOConfig(
    eos_token_id=tok.eos_id,
    pad_token_id=tok.pad_id,
    group_size=args.group_size,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    advantage_estimator=args.advantage_estimator,
    kl_coef=args.kl_coef,
    ppo_epochs=args.ppo_epochs,
    num_minibatches=args.num_minibatches,
  )
  opt = optax.chain(
    optax.clip_by_global_norm(args.max_grad_norm),
    optax.adam(args.learning_rate),
  )
  state_key, heldout_key = jax.random.split(jax.random.key(args.seed))
  # init_state writes new buffers: donating the state never frees the
  # loaded params, which stay as the frozen reference.
  state, state_sh = placement.init_state(
    lambda p, k: init_grpo_state(p, opt, k),
    ref_params,
    state_key,
    param_axes=[models.param_logical_axes(cfg)],
  )
  frozen = {"ref": ref_params}
  rows_sh = placement.batch_sharding()
  rollout = jax.jit(
    make_grpo_rollout(cfg, config),
    in_shardings=(
      state_sh,
      rows_sh,
      jax.tree.map(lambda x: x.sharding, frozen),
    ),
    out_shardings=rows_sh,
  )
  update = parallel.jit_step(
    make_grpo_update(cfg, opt, config),
    state_sh,
    rows_sh,
    extra_shardings=(rows_sh,),
  )
  heldout_batch = placement.batch(heldout.take(np.arange(len(heldout))))
  heldout_key = placement.replicate(heldout_key)

  @jax.jit
  def sample_heldout(params, prompts: PromptBatch, key):
    return generate(
      params,
      prompts.prompt_ids,
      prompts.prompt_mask,
      key,
      config=cfg,
      max_new_tokens=args.max_new_tokens,
      temperature=args.temperature,
      eos_token_id=tok.eos_id,
      pad_token_id=tok.pad_id,
    )

  mean = placement.jit_gather(jnp.mean)

  def heldout_reward(params) -> float:
    """Mean reward of one sample per held-out prompt (fixed key)."""
    r = sample_heldout(params, heldout_batch, heldout_key)
    scores, _ = rewards.score_on_host(
      r.response_ids,
      r.response_mask,
      reward,
      decode=decode,
      prompts=heldout_texts,
      group_size=1,
    )
    return float(mean(scores).addressable_data(0))

  before = heldout_reward(ref_params)
  print(f"heldout reward before: {before:.4f}", flush=True)

  metrics = {}
  for it in range(args.iterations):
    t0 = time.perf_counter()
    idx = order_rng.choice(
      len(train_prompts), args.prompts_per_iteration, replace=False
    )
    prompts = placement.batch(train_prompts.take(idx))
    samples = rollout(state, prompts, frozen)
    scores, host_metrics = rewards.score_on_host(
      samples.rollout.response_ids,
      samples.rollout.response_mask,
      reward,
      decode=decode,
      prompts=[train_texts[i] for i in idx],
      group_size=args.group_size,
    )
    state, metrics = update(state, samples, scores)
    metrics = {
      k: float(v.addressable_data(0)) for k, v in metrics.items()
    } | host_metrics
    line = " ".join(f"{k}={metrics[k]:.4g}" for k in PRINTED)
    secs = time.perf_counter() - t0
    print(f"iter {it + 1}/{args.iterations} ({secs:.1f}s) {line}", flush=True)

  after = heldout_reward(state.params)
  print(f"heldout reward after: {after:.4f}", flush=True)
  print(f"done in {time.perf_counter() - t_start:.1f}s", flush=True)
  return metrics | {"heldout/before": before, "heldout/after": after}


if __name__ == "__main__":
  main(tyro.cli(Args))
