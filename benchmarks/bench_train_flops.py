"""Achieved FLOP/s of the reward-model step and of the PPO update (issue 5,
acceptance 8), as a fraction of this machine's measured f32 matmul rate.

  .venv/bin/python benchmarks/bench_train_flops.py [--repeats 3]

Model: a ~25M-parameter Llama (hidden 512, 6 layers, 8 heads, MLP 1536,
vocab 8192, tied embeddings) with random weights, float32.

* Peak: median time of a jitted ``jnp.dot`` of two f32[2048, 2048]
  matrices (2 * 2048^3 FLOPs), in the same process.
* Reward-model step (``make_reward_model_step``, Adam): one compiled step
  on B pairs; FLOPs = forward + backward of 2B sequences of length L.
* PPO update: the optimisation part of ``make_ppo_step``. The iteration is
  one compiled program (sampling, scoring, reference, values, GAE, then
  ppo_epochs x num_minibatches updates in lax.scan), so the update is timed
  by difference: t(ppo_epochs=3) - t(ppo_epochs=1) = two epochs of updates
  on the same rollout shapes (sampling cost cancels; each update is a policy
  and a critic forward + backward on every sequence).

FLOP counts, per sequence of length L (Kaplan et al. 2020; Hoffmann et al.
2022 app. F): a matmul with N weights costs 2 N per token forward and 4 N
backward, so training costs 6 N L; attention adds 2 * 2 L^2 D per layer
forward (scores q k^T and the weighted sum p v over all L x L pairs: the
implementation computes the full square with a causal mask), x 3 for
training. N counts matmul weights only: the tied embedding counts once, as
the LM head (the reward model and critic have no LM head, only a D -> 1
scalar head). XLA's own count (``compiled.cost_analysis()["flops"]``) is
printed beside it; XLA counts the body of a while loop (lax.scan) once, not
times its trip count, so it undercounts scanned programs.

Times are medians of ``--repeats`` runs after one warm-up call; compile time
is ``jit(...).lower(...).compile()``. Nothing is asserted.
"""

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax.train import (
  PPOConfig,
  RewardModelConfig,
  TrainState,
  init_ppo_state,
  make_ppo_step,
  make_reward_model_step,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch

CFG = models.ModelConfig(
  model_type="llama",
  vocab_size=8192,
  hidden_size=512,
  num_layers=6,
  num_heads=8,
  num_kv_heads=8,
  head_dim=64,
  intermediate_size=1536,
  max_position_embeddings=512,
  tie_word_embeddings=True,
)


def _param_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _median_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _compile(fn, *args, donate=False):
  t = time.perf_counter()
  jitted = jax.jit(fn, donate_argnums=0 if donate else ())
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t


def matmul_peak(repeats: int, n: int = 2048) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  seconds = _median_time(lambda: dot(a, b), max(repeats, 5))
  return 2 * n**3 / seconds


def _attention_train_flops(seqs: int, length: int) -> float:
  d = CFG.num_heads * CFG.head_dim
  return 3 * seqs * CFG.num_layers * 2 * 2 * length**2 * d


def _random_rows(rng, batch, length, left):
  ids = rng.integers(3, CFG.vocab_size, (batch, length)).astype(np.int32)
  lens = rng.integers(length // 2, length + 1, batch)
  pos = np.arange(length)[None]
  mask = pos >= length - lens[:, None] if left else pos < lens[:, None]
  return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def bench_reward_model(repeats, pairs, prompt_len, resp_len):
  rng = np.random.default_rng(0)
  p, pm = _random_rows(rng, pairs, prompt_len, left=True)
  c, cm = _random_rows(rng, pairs, resp_len, left=False)
  r, rm = _random_rows(rng, pairs, resp_len, left=False)
  batch = PreferenceBatch(p, pm, c, cm, r, rm)
  opt = optax.adam(1e-5)
  params = models.from_policy_params(
    models.init_params(CFG, jax.random.key(0)), CFG, jax.random.key(1)
  )
  state = TrainState.create(params, opt, jax.random.key(2))
  step = make_reward_model_step(CFG, opt, RewardModelConfig())
  compiled, compile_s = _compile(step, state, batch, donate=True)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics

  seconds = _median_time(run, repeats)
  n_backbone = (
    _param_count(params["backbone"]) - CFG.vocab_size * CFG.hidden_size
  )
  seqs, length = 2 * pairs, prompt_len + resp_len
  flops = 6 * n_backbone * seqs * length + _attention_train_flops(seqs, length)
  return {
    "name": f"reward-model step ({pairs} pairs, L={length})",
    "params": _param_count(params),
    "compile_s": compile_s,
    "step_s": seconds,
    "flops": flops,
    "xla_flops": _xla_flops(compiled),
  }


def bench_ppo(repeats, prompts, group, prompt_len, new_tokens):
  rng = np.random.default_rng(1)
  p, pm = _random_rows(rng, prompts, prompt_len, left=True)
  batch = PromptBatch(p, pm)
  base = PPOConfig(
    eos_token_id=CFG.vocab_size + 1,  # never sampled: fixed length T
    pad_token_id=0,
    group_size=group,
    max_new_tokens=new_tokens,
    num_minibatches=1,
    shuffle_minibatches=False,
  )
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-6))
  policy = models.init_params(CFG, jax.random.key(0))
  value = models.from_policy_params(policy, CFG, jax.random.key(1))
  frozen = {
    "ref": jax.tree.map(jnp.copy, policy),
    "reward": models.from_policy_params(policy, CFG, jax.random.key(2)),
  }
  results = {}
  for epochs in (1, 3):
    cfg = dataclasses.replace(base, ppo_epochs=epochs)
    state = init_ppo_state(policy, value, opt, opt, jax.random.key(3), cfg)
    step = make_ppo_step(CFG, opt, opt, cfg)
    compiled, compile_s = _compile(step, state, batch, frozen)
    call = functools.partial(compiled, state, batch, frozen)
    seconds = _median_time(call, repeats)
    results[epochs] = (compile_s, seconds, _xla_flops(compiled))
  seqs, length = prompts * group, prompt_len + new_tokens
  n_policy = _param_count(policy)  # tied: embedding counted as LM head
  n_value = _param_count(value["backbone"]) - CFG.vocab_size * CFG.hidden_size
  epoch_flops = 6 * (n_policy + n_value) * seqs * length
  epoch_flops += 2 * _attention_train_flops(seqs, length)
  update_s = (results[3][1] - results[1][1]) / 2
  return [
    {
      "name": f"PPO iteration, 1 epoch ({seqs} seqs, L={length})",
      "params": n_policy + _param_count(value),
      "compile_s": results[1][0],
      "step_s": results[1][1],
      "flops": float("nan"),
      "xla_flops": results[1][2],
    },
    {
      "name": f"PPO iteration, 3 epochs ({seqs} seqs, L={length})",
      "params": n_policy + _param_count(value),
      "compile_s": results[3][0],
      "step_s": results[3][1],
      "flops": float("nan"),
      "xla_flops": results[3][2],
    },
    {
      "name": "PPO update, 1 epoch (difference / 2)",
      "params": n_policy + _param_count(value),
      "compile_s": float("nan"),
      "step_s": update_s,
      "flops": epoch_flops,
      "xla_flops": (results[3][2] - results[1][2]) / 2,
    },
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--pairs", type=int, default=4)
  parser.add_argument("--prompts", type=int, default=4)
  args = parser.parse_args()

  print(f"devices: {jax.devices()}")
  peak = matmul_peak(args.repeats)
  print(f"f32 matmul peak (jnp.dot 2048^3, median): {peak / 1e9:.1f} GFLOP/s")
  rows = [bench_reward_model(args.repeats, args.pairs, 32, 96)]
  rows += bench_ppo(args.repeats, args.prompts, 2, 32, 32)
  n = _param_count(models.init_params(CFG, jax.random.key(0)))
  print(f"model: {n / 1e6:.2f}M policy params (tied embeddings)")
  header = (
    f"{'benchmark':48s} {'compile s':>9s} {'step s':>8s} {'GFLOP':>8s} "
    f"{'XLA GFLOP':>9s} {'GFLOP/s':>8s} {'of peak':>7s} {'XLA/peak':>8s}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    rate = r["flops"] / r["step_s"]
    print(
      f"{r['name']:48s} {r['compile_s']:9.1f} {r['step_s']:8.3f} "
      f"{r['flops'] / 1e9:8.1f} {r['xla_flops'] / 1e9:9.1f} "
      f"{rate / 1e9:8.1f} {rate / peak:7.1%} "
      f"{r['xla_flops'] / r['step_s'] / peak:8.1%}"
    )


if __name__ == "__main__":
  main()
