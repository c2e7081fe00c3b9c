"""A reward model and DPO on Anthropic HH-RLHF pairs, in one file.

A research script in the cleanrl style: every setting is a field of
``Args`` (parsed by tyro, ``--help`` lists them), both training loops are
visible below, and the compiled steps are the library's
(``rlhf_jax.train.make_reward_model_step``, ``make_dpo_step``).

Data: human preference pairs of HH-RLHF (Bai et al. 2022) from every
``*.jsonl.gz`` file of ``--data-dir``. Rows 0 .. heldout_rows-1 of
``--heldout-file`` (original indices, before dropping) are held out; a
seeded random ``--max-train-pairs`` of the others train. Prompts keep their
last P tokens, responses their first T (``data.tokenize_preferences``).

Model: the TinyStories-656K checkpoint (``--model``, else
$RLHF_JAX_MODEL_DIR, else the shared copy), loaded straight into its shards
on the mesh of ``--mesh.*`` (``rlhf_jax.runner.mesh.Placement``).

1. Reward model: the backbone plus a fresh scalar head r(x, y), read at the
   last real token, trained with the Bradley-Terry loss (Ouyang et al.
   2022, eq. 1)

     loss = -mean_b log sigma(r(x_b, y_b^+) - r(x_b, y_b^-)).

2. DPO (Rafailov et al. 2023) from the same checkpoint against it, frozen,
   as the reference; implicit reward r(x, y) = beta (log pi(y|x) -
   log pi_ref(y|x)) with sequence-summed logprobs, and

     loss = -mean_b log sigma(r(x_b, y_b^+) - r(x_b, y_b^-)).

Held-out evaluation (docs/conventions.md, convention 11): accuracy =
#(r+ > r-) / n, strict, ties count as wrong and are reported; its binomial
standard error sqrt(p (1 - p) / n). Beside it, on the same pairs, the
length baseline: predict the response with more characters (untruncated),
equal lengths wrong. Before any DPO step pi = pi_ref, so every pair is a tie.

  python scripts/rm_dpo_hh.py
  python scripts/rm_dpo_hh.py --max-train-pairs 64 --rm-steps 4 \\
      --dpo-steps 4 --heldout-rows 32                      # smoke test
  python scripts/rm_dpo_hh.py --mesh.data 2 --mesh.fsdp 4  # 8 devices

Printed lines: the mesh, the data counts, ``rm step i/N`` and ``dpo step
i/M`` with the step metrics (means since the last line), and one
``rm heldout:`` / ``dpo heldout:`` line each.
"""

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
import tyro

from rlhf_jax import models
from rlhf_jax.data import (
  BatchIterator,
  HFTokenizerAdapter,
  PreferencePair,
  TokenizedDataset,
  load_hh_rlhf,
  split_by_rows,
  tokenize_preferences,
)
from rlhf_jax.runner.mesh import MeshConfig, Placement, spec_str
from rlhf_jax.stages.environment import resolve_model
from rlhf_jax.train import (
  DPOConfig,
  RewardModelConfig,
  TrainState,
  make_dpo_step,
  make_reward_model_step,
  pair_rewards,
  preference_logprobs,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RM_PRINTED = ("rm/loss", "rm/accuracy", "rm/margin")
DPO_PRINTED = ("dpo/loss", "rewards/accuracies", "rewards/margins")


@dataclasses.dataclass(frozen=True)
class Args:
  """Reward model, then DPO, on HH-RLHF with TinyStories-656K."""

  model: str | None = None
  """checkpoint directory; default $RLHF_JAX_MODEL_DIR, else the shared copy"""
  data_dir: str | None = None
  """HH-RLHF directory of *.jsonl.gz files; default the shared copy"""
  seed: int = 0
  """seed of the head, the training subset and the batch order"""
  heldout_file: str = "helpful-base-test.jsonl.gz"
  """file whose first rows are held out"""
  heldout_rows: int = 256
  """rows 0 .. N-1 of heldout_file (before dropping) are held out"""
  max_train_pairs: int = 256
  """training pairs: a seeded random subset of the other pairs"""
  max_prompt_length: int = 48
  """prompt tokens P (longer prompts keep their last P)"""
  max_response_length: int = 48
  """response tokens T, EOS included (longer ones keep their first T)"""
  batch_size: int = 16
  """pairs per step (a multiple of the mesh's batch axes)"""
  eval_batch_size: int = 64
  """pairs per held-out scoring batch"""
  rm_steps: int = 16
  """reward-model steps"""
  rm_learning_rate: float = 1e-3
  """reward-model Adam learning rate"""
  dpo_steps: int = 16
  """DPO steps"""
  dpo_learning_rate: float = 3e-4
  """DPO Adam learning rate"""
  beta: float = 0.1
  """DPO inverse temperature of the implicit reward"""
  max_grad_norm: float = 1.0
  """global-norm gradient clipping"""
  log_every: int = 4
  """steps per printed line of training metrics"""
  mesh: MeshConfig = MeshConfig()
  """device mesh: --mesh.data, --mesh.fsdp, --mesh.tensor, --mesh.rules"""


# ----------------------------------------------------------------- metrics


def accuracy_stderr(accuracy: float, n: int) -> float:
  """Binomial standard error sqrt(p (1 - p) / n) of an accuracy."""
  return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / max(n, 1))


def pair_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> dict:
  """Strict accuracy (ties wrong), its standard error, ties, n."""
  n = len(chosen)
  acc = float(np.mean(chosen > rejected))
  return {
    "accuracy": acc,
    "stderr": accuracy_stderr(acc, n),
    "ties": float(np.mean(chosen == rejected)),
    "n": n,
  }


def length_baseline(pairs: list[PreferencePair]) -> dict:
  """The longer response (characters, untruncated) predicted preferred."""
  return pair_accuracy(
    np.array([len(p.chosen) for p in pairs]),
    np.array([len(p.rejected) for p in pairs]),
  )


def heldout_line(name: str, model: dict, base: dict) -> str:
  return (
    f"{name} heldout: accuracy={model['accuracy']:.4f} "
    f"stderr={model['stderr']:.4f} ties={model['ties']:.4f} "
    f"n={model['n']} | length baseline: accuracy={base['accuracy']:.4f} "
    f"stderr={base['stderr']:.4f} ties={base['ties']:.4f}"
  )


def score_pairs(
  placement: Placement,
  score: Callable,
  dataset: TokenizedDataset,
  batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
  """(chosen f32[n], rejected f32[n]) of ``score(batch)`` over the dataset
  in static-shape batches; padding rows (index -1) fill the last one."""
  size = -(-batch_size // placement.batch_divisor) * placement.batch_divisor
  chosen, rejected = [], []
  for start in range(0, len(dataset), size):
    idx = np.arange(start, start + size)
    idx = np.where(idx < len(dataset), idx, -1)
    c, r = score(placement.batch(dataset.take(idx)))
    chosen.append(np.asarray(c)[idx >= 0])
    rejected.append(np.asarray(r)[idx >= 0])
  return np.concatenate(chosen), np.concatenate(rejected)


# -------------------------------------------------------------------- main


def train(
  name: str,
  step: Callable,
  state: TrainState,
  batches: BatchIterator,
  placement: Placement,
  *,
  steps: int,
  log_every: int,
  printed: tuple[str, ...],
  extra: tuple = (),
) -> TrainState:
  """``steps`` jitted steps; prints window means every ``log_every``."""
  window: list[dict] = []
  t0 = time.perf_counter()
  for i in range(1, steps + 1):
    state, metrics = step(state, placement.batch(next(batches).batch), *extra)
    window.append(metrics)
    if i % log_every == 0 or i == steps:
      host = jax.device_get(window)
      line = " ".join(
        f"{k}={np.mean([m[k] for m in host]):.4g}" for k in printed
      )
      secs = time.perf_counter() - t0
      print(f"{name} step {i}/{steps} ({secs:.1f}s) {line}", flush=True)
      window, t0 = [], time.perf_counter()
  return state


def adam(args: Args, learning_rate: float) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate)
  )


def main(args: Args) -> dict[str, dict]:
  t_start = time.perf_counter()
  placement = Placement.create(args.mesh)
  placement.check_batch(args.batch_size, "--batch-size")
  print(placement.describe(), flush=True)
  # --model, else $RLHF_JAX_MODEL_DIR, else the shared copy (as the CLI).
  model_dir = resolve_model(args.model)
  cfg, policy_params = placement.load_model(model_dir)
  tok = HFTokenizerAdapter.wrap(models.load_tokenizer(model_dir))

  # Data: held-out rows by original index; a random subset of the rest.
  loaded = load_hh_rlhf(args.data_dir or SHARED_DATA / "hh-rlhf")
  rest, held_pairs = split_by_rows(
    loaded.examples,
    source_name=args.heldout_file,
    rows=range(args.heldout_rows),
  )
  pick = np.random.default_rng(args.seed).permutation(len(rest))
  train_pairs = [rest[i] for i in pick[: args.max_train_pairs]]
  lengths = dict(
    max_prompt_length=args.max_prompt_length,
    max_response_length=args.max_response_length,
  )
  train_ds = tokenize_preferences(train_pairs, tok, **lengths)
  held_ds = tokenize_preferences(held_pairs, tok, **lengths)
  cut = " ".join(f"{k}={v}" for k, v in train_ds.truncation.truncated.items())
  print(
    f"data: {len(train_ds)} train pairs (truncated {cut}), "
    f"{len(held_ds)} held-out pairs (rows 0-{args.heldout_rows - 1} of "
    f"{args.heldout_file})",
    flush=True,
  )
  base = length_baseline(held_pairs)
  key = jax.random.key(args.seed)
  head_key, rm_key, dpo_key = jax.random.split(key, 3)
  results = {"length_baseline": base}

  # 1. Reward model: backbone + new head, Bradley-Terry loss.
  rm_opt = adam(args, args.rm_learning_rate)
  state, shardings = placement.init_state(
    lambda p, k: TrainState.create(p, rm_opt, k),
    models.from_policy_params(policy_params, cfg, head_key),
    rm_key,
    param_axes=[models.scalar_model_logical_axes(cfg)],
  )
  path, spec = placement.sharded_leaf(state.params)
  print(f"reward model{path}: {spec_str(spec)}", flush=True)
  rm_step = placement.jit_step(
    make_reward_model_step(cfg, rm_opt, RewardModelConfig()), shardings
  )
  batches = BatchIterator(
    train_ds, global_batch_size=args.batch_size, seed=args.seed
  )
  state = train(
    "rm",
    rm_step,
    state,
    batches,
    placement,
    steps=args.rm_steps,
    log_every=args.log_every,
    printed=RM_PRINTED,
  )
  rewards = placement.jit_gather(
    lambda p, b: pair_rewards(p, b, model_config=cfg)
  )
  rc, rr = score_pairs(
    placement,
    lambda b: rewards(state.params, b),
    held_ds,
    args.eval_batch_size,
  )
  results["rm"] = pair_accuracy(rc, rr)
  print(heldout_line("rm", results["rm"], base), flush=True)
  del state  # free the reward model before DPO

  # 2. DPO from the checkpoint; the loaded params are the frozen reference
  # (init_state copies them into the state, so donation never frees them).
  dpo_opt = adam(args, args.dpo_learning_rate)
  state, shardings = placement.init_state(
    lambda p, k: TrainState.create(p, dpo_opt, k),
    policy_params,
    dpo_key,
    param_axes=[models.param_logical_axes(cfg)],
  )
  dpo_step = placement.jit_step(
    make_dpo_step(cfg, dpo_opt, DPOConfig(beta=args.beta)),
    shardings,
    extra=(policy_params,),
  )
  batches = BatchIterator(
    train_ds, global_batch_size=args.batch_size, seed=args.seed + 1
  )
  state = train(
    "dpo",
    dpo_step,
    state,
    batches,
    placement,
    steps=args.dpo_steps,
    log_every=args.log_every,
    printed=DPO_PRINTED,
    extra=(policy_params,),
  )

  def implicit_rewards(params, ref_params, batch):
    pc, pr = preference_logprobs(params, batch, model_config=cfg)
    rc, rr = preference_logprobs(ref_params, batch, model_config=cfg)
    return args.beta * (pc - rc), args.beta * (pr - rr)

  implicit = placement.jit_gather(implicit_rewards)
  rc, rr = score_pairs(
    placement,
    lambda b: implicit(state.params, policy_params, b),
    held_ds,
    args.eval_batch_size,
  )
  results["dpo"] = pair_accuracy(rc, rr)
  print(heldout_line("dpo", results["dpo"], base), flush=True)
  print(f"done in {time.perf_counter() - t_start:.1f}s", flush=True)
  return results


if __name__ == "__main__":
  main(tyro.cli(Args))
