"""Achieved FLOP/s of the reward-model step and of the PPO update.

Both as a fraction of this machine's f32 matmul rate, measured in the
same run.

  .venv/bin/python benchmarks/bench_train_flops.py [--repeats 3]

Model: a ~25M-parameter Llama (hidden 512, 6 layers, 8 heads, MLP 1536,
vocab 8192, tied embeddings) with random weights, float32.

* Peak: a jitted ``jnp.dot`` of two f32[2048, 2048] matrices (2 * 2048^3
  FLOPs), the fastest of 3 back-to-back calls, in every round just before
  the work it is compared with; a row's share divides its rate by the
  median of its own rounds' peaks, so both sides of the ratio see the same
  host load (one peak measured at the start swung the share from 51% to
  86% between two runs minutes apart).
* Reward-model step (``make_reward_model_step``, Adam): one compiled step
  on B pairs, two rows per pair (``share_prompt=False``); FLOPs = forward
  + backward of 2B sequences of length L, scored at their last token.
* PPO update: the optimisation part of ``make_ppo_step``. The iteration is
  one compiled program (sampling, scoring, reference, values, GAE, then
  ppo_epochs x num_minibatches updates in lax.scan), so the update is timed
  by difference: t(ppo_epochs=4) - t(ppo_epochs=2) = two epochs of updates
  on the same rollout shapes (sampling cost cancels; each update is a policy
  and a critic forward + backward on every sequence; not from 1 epoch,
  whose program folds phase 3's forwards into its one update,
  ``train.ppo_fused``); and directly: one
  ``ppo_update.make_update`` call on a minibatch of the same shapes (the
  difference of two noisy timings swings the most).

FLOP counts: the work the implementation does (Kaplan et al. 2020;
Hoffmann et al. 2022 app. F): a matmul with N weights costs 2 N per row
forward and 4 N backward (6 N for training); attention costs 2 * 2 Lq L D
per layer forward (scores q k^T and the weighted sum p v over every
query-key pair: the implementation computes the full square with a causal
mask), x 3 for training. The last layer computes its queries, attention
output and MLP only on the rows the head reads (``models.hidden_forward``'s
rows): one row per sequence for the reward model, the T response rows for
the PPO policy (with the LM head, the tied embedding, on those T rows) and
critic; its keys and values run on all L rows. XLA's own count
(``compiled.cost_analysis()["flops"]``) is printed beside it; XLA counts
the body of a while loop (lax.scan) once, not times its trip count, so it
undercounts scanned programs.

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
from bench_args import positive_int  # benchmarks/, beside this script

from rlhf_jax import models
from rlhf_jax.train import (
  PPOConfig,
  RewardModelConfig,
  TrainState,
  init_ppo_state,
  make_ppo_step,
  make_reward_model_step,
)
from rlhf_jax.train.ppo_update import Learner, make_update
from rlhf_jax.types import PPOBatch, PreferenceBatch, PromptBatch

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


def _timed(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


class Peak:
  """The f32 matmul rate: a jitted ``jnp.dot`` of two f32[n, n] matrices
  (2 n^3 FLOPs), timed once per round beside the work it is compared
  with, so both see the same host load."""

  def __init__(self, n: int = 2048):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    self.flops = 2 * n**3
    self.call = lambda: dot(a, b)
    _timed(self.call)  # compile and warm up
    self.rates: list[float] = []

  def measure(self, calls: int = 3) -> float:
    """The best rate of ``calls`` back-to-back calls: the ceiling under
    the load of the moment (a single call right after other work runs
    below it)."""
    rate = self.flops / min(_timed(self.call) for _ in range(calls))
    self.rates.append(rate)
    return rate


def _median_time(fn, repeats: int, peak: Peak) -> tuple[float, float]:
  """(median seconds of ``fn``, median matmul rate of the same rounds):
  each round times the peak matmul, then one call."""
  jax.block_until_ready(fn())  # warm-up
  times, rates = [], []
  for _ in range(repeats):
    rates.append(peak.measure())
    times.append(_timed(fn))
  return statistics.median(times), statistics.median(rates)


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


def _train_flops(seqs: int, length: int, rows: int, lm_head: bool) -> float:
  """Forward + backward FLOPs of `seqs` sequences of `length` whose head
  reads `rows` rows each (module docstring)."""
  d, f = CFG.hidden_size, CFG.intermediate_size
  q_o = 2 * d * CFG.num_heads * CFG.head_dim  # q and o weights
  kv = 2 * d * CFG.num_kv_heads * CFG.head_dim
  mlp = 3 * d * f
  attn = 2 * CFG.num_heads * CFG.head_dim  # per query-key pair
  full_layer = length * (q_o + kv + mlp) + length * length * attn
  last_layer = rows * (q_o + mlp) + length * kv + rows * length * attn
  macs = (CFG.num_layers - 1) * full_layer + last_layer
  if lm_head:
    macs += rows * d * CFG.vocab_size
  return 6 * seqs * macs


def _random_rows(rng, batch, length, left):
  ids = rng.integers(3, CFG.vocab_size, (batch, length)).astype(np.int32)
  lens = rng.integers(length // 2, length + 1, batch)
  pos = np.arange(length)[None]
  mask = pos >= length - lens[:, None] if left else pos < lens[:, None]
  return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def bench_reward_model(repeats, peak, pairs, prompt_len, resp_len):
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
  # Two rows per pair: the FLOP count below is of 2B separate sequences,
  # and a packed step (prefix sharing, the default at these shapes) does
  # less work, which the rate would count as speed.
  config = RewardModelConfig(share_prompt=False)
  step = make_reward_model_step(CFG, opt, config)
  compiled, compile_s = _compile(step, state, batch, donate=True)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics

  seconds, rate = _median_time(run, repeats, peak)
  seqs, length = 2 * pairs, prompt_len + resp_len
  flops = _train_flops(seqs, length, rows=1, lm_head=False)
  return {
    "name": f"reward-model step ({pairs} pairs, L={length})",
    "params": _param_count(params),
    "compile_s": compile_s,
    "step_s": seconds,
    "peak": rate,
    "flops": flops,
    "xla_flops": _xla_flops(compiled),
  }


def bench_ppo(repeats, peak, prompts, group, prompt_len, new_tokens):
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
  for epochs in (2, 4):  # both phased (train.ppo_fused needs 1 update)
    cfg = dataclasses.replace(base, ppo_epochs=epochs)
    state = init_ppo_state(policy, value, opt, opt, jax.random.key(3), cfg)
    step = make_ppo_step(CFG, opt, opt, cfg)
    compiled, compile_s = _compile(step, state, batch, frozen)
    call = functools.partial(compiled, state, batch, frozen)
    seconds, rate = _median_time(call, repeats, peak)
    results[epochs] = (compile_s, seconds, _xla_flops(compiled), rate)
  seqs, length = prompts * group, prompt_len + new_tokens
  n_policy = _param_count(policy)
  epoch_flops = _train_flops(seqs, length, rows=new_tokens, lm_head=True)
  epoch_flops += _train_flops(seqs, length, rows=new_tokens, lm_head=False)
  update_s = (results[4][1] - results[2][1]) / 2
  return [
    {
      "name": f"PPO iteration, 2 epochs ({seqs} seqs, L={length})",
      "params": n_policy + _param_count(value),
      "compile_s": results[2][0],
      "step_s": results[2][1],
      "peak": results[2][3],
      "flops": float("nan"),
      "xla_flops": results[2][2],
    },
    {
      "name": f"PPO iteration, 4 epochs ({seqs} seqs, L={length})",
      "params": n_policy + _param_count(value),
      "compile_s": results[4][0],
      "step_s": results[4][1],
      "peak": results[4][3],
      "flops": float("nan"),
      "xla_flops": results[4][2],
    },
    {
      "name": "PPO update, 1 epoch (difference / 2)",
      "params": n_policy + _param_count(value),
      "compile_s": float("nan"),
      "step_s": update_s,
      "peak": (results[2][3] + results[4][3]) / 2,
      "flops": epoch_flops,
      "xla_flops": (results[4][2] - results[2][2]) / 2,
    },
  ]


def bench_ppo_update(repeats, peak, seqs, prompt_len, new_tokens):
  """One PPO update (``ppo_update.make_update``: policy and critic forward
  + backward, both Adam steps) on a minibatch of `seqs` rollouts, timed
  directly: the ratio, advantages and value targets are random, which
  changes no shape and no FLOP."""
  rng = np.random.default_rng(2)
  p, pm = _random_rows(rng, seqs, prompt_len, left=True)
  shape = (seqs, new_tokens)

  def draw(scale, shift=0.0):
    return jnp.asarray(rng.normal(size=shape) * scale + shift, jnp.float32)

  batch = PPOBatch(
    prompt_ids=p,
    prompt_mask=pm,
    response_ids=jnp.asarray(rng.integers(3, CFG.vocab_size, shape)),
    response_mask=jnp.ones(shape, jnp.bool_),
    old_logprobs=draw(0.1, -9.0),  # ~ log(1 / V): ratios near 1
    ref_logprobs=draw(0.1, -9.0),
    old_values=draw(0.1),
    advantages=draw(1.0),
    returns=draw(1.0),
  )
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-6))
  policy = models.init_params(CFG, jax.random.key(0))
  value = models.from_policy_params(policy, CFG, jax.random.key(1))
  learner = Learner(
    policy, value, opt.init(policy), opt.init(value), jnp.zeros((), jnp.int32)
  )
  cfg = PPOConfig(
    eos_token_id=CFG.vocab_size + 1, pad_token_id=0, max_new_tokens=new_tokens
  )
  update = make_update(CFG, cfg, opt, opt)

  def step(learner, batch):
    return update(learner, (batch, jnp.asarray(False)))

  compiled, compile_s = _compile(step, learner, batch, donate=True)
  holder = [learner]

  def run():
    holder[0], stats = compiled(holder[0], batch)
    return stats

  seconds, rate = _median_time(run, max(repeats, 5), peak)
  length = prompt_len + new_tokens
  flops = _train_flops(seqs, length, rows=new_tokens, lm_head=True)
  flops += _train_flops(seqs, length, rows=new_tokens, lm_head=False)
  return {
    "name": f"PPO update, one minibatch ({seqs} seqs, L={length})",
    "params": _param_count(policy) + _param_count(value),
    "compile_s": compile_s,
    "step_s": seconds,
    "peak": rate,
    "flops": flops,
    "xla_flops": _xla_flops(compiled),
  }


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--repeats",
    type=positive_int,
    default=3,
    help="timed calls per row (median)",
  )
  parser.add_argument(
    "--pairs",
    type=positive_int,
    default=4,
    help="reward-model preference pairs",
  )
  parser.add_argument(
    "--prompts", type=positive_int, default=4, help="PPO prompts per iteration"
  )
  args = parser.parse_args()

  print(f"devices: {jax.devices()}")
  peak = Peak()
  rows = [bench_reward_model(args.repeats, peak, args.pairs, 32, 96)]
  rows += bench_ppo(args.repeats, peak, args.prompts, 2, 32, 32)
  rows.append(bench_ppo_update(args.repeats, peak, args.prompts * 2, 32, 32))
  lo, hi = min(peak.rates) / 1e9, max(peak.rates) / 1e9
  print(
    f"f32 matmul peak (jnp.dot 2048^3, best of 3 per round): median"
    f" {statistics.median(peak.rates) / 1e9:.1f} GFLOP/s, range {lo:.1f}-"
    f"{hi:.1f}; each row's share uses the median of its own rounds"
  )
  n = _param_count(models.init_params(CFG, jax.random.key(0)))
  print(f"model: {n / 1e6:.2f}M policy params (tied embeddings)")
  header = (
    f"{'benchmark':48s} {'compile s':>9s} {'step s':>8s} {'GFLOP':>8s} "
    f"{'XLA GFLOP':>9s} {'GFLOP/s':>8s} {'peak':>6s} {'of peak':>7s}"
    f" {'XLA/peak':>8s}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    rate = r["flops"] / r["step_s"]
    print(
      f"{r['name']:48s} {r['compile_s']:9.1f} {r['step_s']:8.3f} "
      f"{r['flops'] / 1e9:8.1f} {r['xla_flops'] / 1e9:9.1f} "
      f"{rate / 1e9:8.1f} {r['peak'] / 1e9:6.1f} {rate / r['peak']:7.1%} "
      f"{r['xla_flops'] / r['step_s'] / r['peak']:8.1%}"
    )


if __name__ == "__main__":
  main()
