"""Prefix sharing: the DPO and reward-model steps with the prompt run once
per pair (``share_prompt=True``) against two rows per pair (False).

  .venv/bin/python benchmarks/bench_shared_prompt.py [--rounds 9]

Each row compiles both steps on the same batch (random ids; prompts
left-padded to P with lengths drawn in [P/2, P], responses right-padded
to T likewise), checks that their metrics agree, then times them in
alternating calls (one untimed call of a side before each timed one).
It prints the medians, the median of the per-round ratios
(separate / packed, > 1 = packing is faster), XLA's flop counts, and
what the default (``share_prompt=None``, ``models.sharing_saves_work``)
picks. Models: TinyStories-656K (../shared/data) and the ~25M Llama of
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
from rlhf_jax.train import (
  DPOConfig,
  RewardModelConfig,
  TrainState,
  make_dpo_step,
  make_reward_model_step,
)
from rlhf_jax.types import PreferenceBatch

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TINYSTORIES = DATA / "models" / "tinystories-656k"
# (model, step, pairs, P, T)
ROWS = [
  ("656K", "dpo", 8, 8, 64),
  ("656K", "dpo", 8, 16, 64),
  ("656K", "dpo", 8, 32, 64),  # Tunix's DPO example shapes (bench_peers)
  ("656K", "rm", 8, 32, 64),
  ("656K", "dpo", 8, 96, 64),
  ("656K", "rm", 8, 96, 64),
  ("656K", "dpo", 8, 24, 32),  # the default run's shapes
  ("656K", "rm", 8, 24, 32),
  ("25M", "dpo", 4, 16, 64),
  ("25M", "dpo", 4, 64, 64),
  ("25M", "dpo", 4, 128, 64),
  ("25M", "rm", 4, 64, 64),
  ("25M", "rm", 4, 128, 64),
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


def _step(kind: str, config, params, share: bool, batch):
  opt = optax.adam(1e-5)
  if kind == "dpo":
    step = make_dpo_step(config, opt, DPOConfig(share_prompt=share))
    extra = (jax.tree.map(jnp.copy, params),)
  else:
    params = models.from_policy_params(params, config, jax.random.key(1))
    cfg = RewardModelConfig(share_prompt=share)
    step = make_reward_model_step(config, opt, cfg)
    extra = ()
  state = TrainState.create(params, opt, jax.random.key(0))
  compiled = jax.jit(step).lower(state, batch, *extra).compile()
  flops = compiled.cost_analysis().get("flops", float("nan"))

  def run():
    _, metrics = compiled(state, batch, *extra)
    return jax.block_until_ready(metrics)

  return run, flops


def _row(name, kind, pairs, p, t, models_by_name, rounds):
  config, params = models_by_name[name]
  batch = _batch(config.vocab_size, pairs, p, t)
  sides = [_step(kind, config, params, s, batch) for s in (False, True)]
  first = [run() for run, _ in sides]
  key = "dpo/loss" if kind == "dpo" else "rm/loss"
  agree = abs(float(first[0][key]) - float(first[1][key])) < 1e-4
  times = [[], []]
  for _ in range(rounds):
    for i, (run, _) in enumerate(sides):
      run()
      start = time.perf_counter()
      run()
      times[i].append(time.perf_counter() - start)
  ratio = statistics.median(a / b for a, b in zip(*times, strict=True))
  auto = models.sharing_saves_work(config, p, t, 2)
  sep, pk = (statistics.median(x) * 1e3 for x in times)
  gflops = [f / 1e9 for _, f in sides]
  print(
    f"| {name} | {kind} | {pairs} | {p} | {t} | {sep:.1f} | {pk:.1f} | "
    f"**{ratio:.2f}x** | {gflops[0]:.2f} / {gflops[1]:.2f} | "
    f"{'packed' if auto else 'separate'} | {'yes' if agree else 'NO'} |",
    flush=True,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=positive_int, default=9)
  args = parser.parse_args()
  models_by_name = {
    "656K": models.load_hf_checkpoint(TINYSTORIES),
    "25M": (CFG_25M, models.init_params(CFG_25M, jax.random.key(0))),
  }
  print(
    "| model | step | pairs | P | T | separate ms | packed ms | "
    "separate / packed | GFLOP (XLA) | default picks | same loss |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
  for row in ROWS:
    _row(*row, models_by_name, args.rounds)


if __name__ == "__main__":
  main()
