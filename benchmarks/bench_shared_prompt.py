"""Prefix sharing: the DPO and reward-model steps with the prompt run once
per pair (``share_prompt=True``) against two rows per pair (False), the
best-of-K reward model ("bok") with the prompt run once for its K
responses, and the GRPO iteration with each group's prompt run once
against one row per response.

  .venv/bin/python benchmarks/bench_shared_prompt.py [--rounds 9]
      [--steps dpo rm bok grpo prefill]

Each row compiles both steps on the same batch (random ids; prompts
left-padded to P with lengths drawn in [P/2, P], responses right-padded
to T likewise), checks that their metrics agree (the loss, or for GRPO
the KL to the reference and the update's gradient norm, within 1e-4 +
1e-3 relative), then times them in alternating calls (one untimed call
of a side before each timed one). It prints the medians, the median of
the per-round ratios (separate / packed, > 1 = packing is faster), XLA's
flop counts, and what the default (``share_prompt=None``,
``models.sharing_saves_work``) picks. A GRPO row times the whole
iteration (``make_grpo_step``: sampling T tokens for K responses per
prompt, the reference's logprobs, a jittable score of the tokens, one
update); only its teacher-forced forwards change. The prefill rows time
``rollout.generate`` on G copies of each prompt against
``num_samples=G`` (each prompt prefilled once). Models:
TinyStories-656K (../shared/data) and the ~25M Llama of
bench_train_flops.py (random weights). Nothing is asserted.
"""

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_args import positive_int  # benchmarks/, beside this script
from bench_train_flops import CFG as CFG_25M

from rlhf_jax import models
from rlhf_jax.rollout import generate
from rlhf_jax.train import (
  DPOConfig,
  GRPOConfig,
  RewardModelConfig,
  TrainState,
  init_grpo_state,
  make_dpo_step,
  make_grpo_step,
  make_reward_model_step,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch, RankedBatch

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TINYSTORIES = DATA / "models" / "tinystories-656k"
# (model, step, prompts, K responses per prompt, P, T)
ROWS = [
  ("656K", "dpo", 8, 2, 8, 64),
  ("656K", "dpo", 8, 2, 16, 64),
  ("656K", "dpo", 8, 2, 32, 64),  # Tunix's DPO example shapes (bench_peers)
  ("656K", "rm", 8, 2, 32, 64),
  ("656K", "dpo", 8, 2, 96, 64),
  ("656K", "rm", 8, 2, 96, 64),
  ("656K", "dpo", 8, 2, 24, 32),  # the default run's shapes
  ("656K", "rm", 8, 2, 24, 32),
  ("656K", "bok", 8, 4, 32, 64),  # best-of-K reward model (RankedBatch)
  ("656K", "bok", 4, 8, 64, 64),
  ("656K", "grpo", 4, 2, 32, 32),  # Tunix's GRPO example shapes
  ("656K", "grpo", 4, 8, 64, 32),
  ("656K", "grpo", 2, 16, 128, 32),
  ("25M", "dpo", 4, 2, 16, 64),
  ("25M", "dpo", 4, 2, 64, 64),
  ("25M", "dpo", 4, 2, 128, 64),
  ("25M", "rm", 4, 2, 64, 64),
  ("25M", "rm", 4, 2, 128, 64),
  ("25M", "grpo", 2, 8, 128, 16),
]


def _batch(vocab: int, pairs: int, p: int, t: int) -> PreferenceBatch:
  rng = np.random.default_rng(0)

  def rows(length: int, left: bool):
    ids = rng.integers(3, vocab - 1, (pairs, length)).astype(np.int32)
    n = rng.integers(length // 2, length + 1, pairs)
    slots = np.arange(length)[None]
    mask = slots >= length - n[:, None] if left else slots < n[:, None]
    return jnp.asarray(ids), jnp.asarray(mask)

  return PreferenceBatch(*rows(p, True), *rows(t, False), *rows(t, False))


def _token_score(frozen, input_ids, attention_mask, response_mask):
  """A jittable score that varies with the sampled tokens."""
  del frozen, attention_mask
  tokens = input_ids[:, -response_mask.shape[1] :] % 7
  return jnp.sum(jnp.where(response_mask, tokens, 0), -1).astype(jnp.float32)


def _grpo_step(config, params, share, prompts, k, t):
  opt = optax.adam(1e-5)
  cfg = GRPOConfig(
    eos_token_id=config.vocab_size,  # never sampled: T tokens every row
    pad_token_id=0,
    group_size=k,
    max_new_tokens=t,
    ppo_epochs=1,
    shuffle_minibatches=False,
    share_prompt=share,
  )
  step = make_grpo_step(config, opt, cfg, score_fn=_token_score)
  state = init_grpo_state(params, opt, jax.random.key(0))
  # A reference that is not the policy, so the KL term is not ~0.
  ref = jax.tree.map(lambda x: x * 0.98, params)
  return step, state, (prompts, {"ref": ref})


def _step(kind: str, config, params, share: bool, batch, k, t):
  opt = optax.adam(1e-5)
  if kind == "grpo":
    step, state, args = _grpo_step(config, params, share, batch, k, t)
  elif kind == "dpo":
    step = make_dpo_step(config, opt, DPOConfig(share_prompt=share))
    args = (batch, jax.tree.map(jnp.copy, params))
    state = TrainState.create(params, opt, jax.random.key(0))
  else:  # "rm" (pairs) or "bok" (best-of-K, RankedBatch)
    params = models.from_policy_params(params, config, jax.random.key(1))
    loss = "best_of_k" if kind == "bok" else "pairwise"
    step = make_reward_model_step(
      config, opt, RewardModelConfig(loss_type=loss, share_prompt=share)
    )
    args = (batch,)
    state = TrainState.create(params, opt, jax.random.key(0))
  compiled = jax.jit(step).lower(state, *args).compile()
  flops = compiled.cost_analysis().get("flops", float("nan"))

  def run():
    _, metrics = compiled(state, *args)
    return jax.block_until_ready(metrics)

  return run, flops


def _row(name, kind, n, k, p, t, models_by_name, rounds):
  config, params = models_by_name[name]
  batch = _batch(config.vocab_size, n, p, t)
  if kind == "grpo":
    batch = PromptBatch(batch.prompt_ids, batch.prompt_mask)
  if kind == "bok":  # K responses per prompt, random ranks
    rows = _batch(config.vocab_size, n * k, p, t)
    order = np.random.default_rng(1).random((n, k)).argsort(-1)
    batch = RankedBatch(
      batch.prompt_ids,
      batch.prompt_mask,
      rows.chosen_ids.reshape(n, k, t),
      rows.chosen_mask.reshape(n, k, t),
      jnp.asarray(order),
    )
  sides = [_step(kind, config, params, s, batch, k, t) for s in (False, True)]
  first = [run() for run, _ in sides]
  keys = {
    "dpo": ["dpo/loss"],
    "rm": ["rm/loss"],
    "bok": ["rm/loss"],
    # The reference's logprobs, and the update (its gradient).
    "grpo": ["objective/kl", "train/grad_norm"],
  }[kind]
  agree = all(
    abs(float(first[0][k]) - float(first[1][k]))
    < 1e-4 + 1e-3 * abs(float(first[0][k]))
    for k in keys
  )
  times = [[], []]
  for _ in range(rounds):
    for i, (run, _) in enumerate(sides):
      run()
      start = time.perf_counter()
      run()
      times[i].append(time.perf_counter() - start)
  ratio = statistics.median(a / b for a, b in zip(*times, strict=True))
  auto = models.sharing_saves_work(config, p, t, k)
  sep, pk = (statistics.median(x) * 1e3 for x in times)
  gflops = [f / 1e9 for _, f in sides]
  print(
    f"| {name} | {kind} | {n} | {k} | {p} | {t} | {sep:.1f} | {pk:.1f} | "
    f"**{ratio:.2f}x** | {gflops[0]:.2f} / {gflops[1]:.2f} | "
    f"{'packed' if auto else 'separate'} | {'yes' if agree else 'NO'} |",
    flush=True,
  )


# (model, prompts, G, P, T): the sampler's prefill, once per prompt or not
PREFILL_ROWS = [
  ("656K", 4, 8, 64, 32),
  ("656K", 2, 16, 128, 32),
  ("25M", 2, 8, 128, 16),
]


def _prefill_row(name, n, g, p, t, models_by_name, rounds):
  """generate on G copies of each prompt against num_samples=G (each
  prompt prefilled once), temperature 1, no EOS; paired ratio."""
  config, params = models_by_name[name]
  batch = _batch(config.vocab_size, n, p, t)
  ids, mask = batch.prompt_ids, batch.prompt_mask
  copies = (jnp.repeat(ids, g, 0), jnp.repeat(mask, g, 0))
  rng = jax.random.key(0)
  kw = dict(
    config=config,
    max_new_tokens=t,
    eos_token_id=config.vocab_size,  # never sampled
    pad_token_id=0,
    stop_at_all_eos=False,
  )
  sides = [
    (generate.lower(params, *copies, rng, **kw).compile(), copies),
    (
      generate.lower(params, ids, mask, rng, num_samples=g, **kw).compile(),
      (ids, mask),
    ),
  ]

  def run(side):
    compiled, prompts = side
    return jax.block_until_ready(compiled(params, *prompts, rng).response_ids)

  same = bool(np.array_equal(run(sides[0]), run(sides[1])))
  times = [[], []]
  for _ in range(rounds):
    for i, side in enumerate(sides):
      run(side)
      start = time.perf_counter()
      run(side)
      times[i].append(time.perf_counter() - start)
  ratio = statistics.median(a / b for a, b in zip(*times, strict=True))
  copies_ms, once_ms = (statistics.median(x) * 1e3 for x in times)
  print(
    f"| {name} | {n} | {g} | {p} | {t} | {copies_ms:.1f} | {once_ms:.1f} | "
    f"**{ratio:.2f}x** | {'yes' if same else 'NO'} |",
    flush=True,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=positive_int, default=9)
  parser.add_argument(
    "--steps",
    nargs="+",
    choices=("dpo", "rm", "bok", "grpo", "prefill"),
    default=("dpo", "rm", "bok", "grpo", "prefill"),
    help="which rows to run (default: all)",
  )
  args = parser.parse_args()
  models_by_name = {
    "656K": models.load_hf_checkpoint(TINYSTORIES),
    "25M": (CFG_25M, models.init_params(CFG_25M, jax.random.key(0))),
  }
  rows = [r for r in ROWS if r[1] in args.steps]
  if rows:
    print(
      "| model | step | prompts | K | P | T | separate ms | packed ms | "
      "separate / packed | GFLOP (XLA) | default picks | same loss |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
  for row in rows:
    _row(*row, models_by_name, args.rounds)
  if "prefill" in args.steps:
    print(
      "\n| model | prompts | G | P | T | G copies ms | prefill once ms | "
      "ratio | same tokens |\n|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for row in PREFILL_ROWS:
      _prefill_row(*row, models_by_name, args.rounds)


if __name__ == "__main__":
  main()
