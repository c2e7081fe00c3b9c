"""The default pipeline: "make TinyStories happier" (Ziegler et al. 2019).

Stages (each checkpointed, each skipped on ``--resume`` once finished):

  prompts   STORY_OPENINGS + opening words of stories sampled from the
            initial policy; deterministic train / held-out split.
  feedback  pairs of continuations sampled from the initial policy, labelled
            by the SimulatedAnnotator (VADER gold + Bradley-Terry noise).
  rm        reward model = policy backbone + scalar head, Bradley-Terry loss;
            held-out accuracy against the annotator and the gold order.
  initial   evaluation of the initial policy on the held-out prompts.
  ppo       make_ppo_step (one compiled RLHF iteration): critic initialised
            from the reward model, adaptive KL penalty to the reference.
  dpo       make_dpo_step on the same pairs, a second arm.
  report    report.md, plots, summary.json.

Determinism: every random choice derives from ``config.seed``: sampling
keys are ``fold_in(fold_in(key(seed), stage), global_row)``, train steps use
``fold_in(state.rng, state.step)``, data order is ``BatchIterator(seed)``.
An interrupted stage restarts from its last checkpoint (state + iterator
position), finished stages are read back from run_dir, so a resumed run
ends with the same numbers as an uninterrupted one.

Run directory::

  config.json  metrics.jsonl  tensorboard/<stage>/  report.md  plots/
  summary.json data/{prompts.json, pairs_train.jsonl, pairs_eval.jsonl}
  checkpoints/<stage>/  stages/<stage>.json (finished-stage results)
  outputs/{rm, ppo, dpo}/ (Hugging Face directories; rm/reward_head/)
"""

import dataclasses
import functools
import itertools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax.checkpoint import CheckpointManager, abstract_like
from rlhf_jax.cli import runtime
from rlhf_jax.cli.configs import PipelineConfig
from rlhf_jax.cli.eval_metrics import distinct_n, win_rate
from rlhf_jax.cli.metrics import MetricsWriter
from rlhf_jax.cli.progress import ProgressBar
from rlhf_jax.cli.report import write_report
from rlhf_jax.data import (
  BatchIterator,
  DataError,
  HFTokenizerAdapter,
  PreferencePair,
  TokenizedDataset,
  TruncationReport,
  load_examples,
  tokenize_preferences,
  tokenize_prompts,
  train_eval_split,
)
from rlhf_jax.logprobs import response_logprobs
from rlhf_jax.tasks import (
  STORY_OPENINGS,
  GoldScorer,
  SimulatedAnnotator,
  split_prompts,
  story_prefixes,
)
from rlhf_jax.train import (
  DPOConfig,
  PPOConfig,
  RewardModelConfig,
  TrainState,
  init_ppo_state,
  make_dpo_step,
  make_ppo_step,
  make_reward_model_step,
  pair_rewards,
)
from rlhf_jax.train.common import concat_prompt_response
from rlhf_jax.train.supervised import response_mean_reward
from rlhf_jax.types import PreferenceBatch, PromptBatch

# Stage ids folded into the seed key (stable: changing them changes runs).
_STAGE_KEYS = {
  "prompts": 1,
  "feedback": 2,
  "rm": 3,
  "eval": 4,
  "ppo": 5,
  "dpo": 6,
}
STAGES_BY_COMMAND = {
  "run": ("prompts", "feedback", "rm", "initial", "ppo", "dpo", "report"),
  "rm": ("prompts", "feedback", "rm", "report"),
  "ppo": ("prompts", "feedback", "rm", "initial", "ppo", "report"),
  "dpo": ("prompts", "feedback", "rm", "initial", "dpo", "report"),
}
DATA_STAGES_BY_COMMAND = {"rm": ("rm", "report"), "dpo": ("dpo", "report")}
POLICIES = ("initial", "ppo", "dpo")
# The reward head beside the backbone's HF files (a subdirectory, so that
# loaders globbing *.safetensors read only the backbone).
HEAD_DIR = "reward_head"
HEAD_FILE = f"{HEAD_DIR}/model.safetensors"


# ------------------------------------------------------------------ context


@dataclasses.dataclass
class Context:
  """Everything a stage needs; built once per invocation."""

  command: str
  config: PipelineConfig
  run_dir: pathlib.Path
  model_dir: pathlib.Path
  model_config: models.ModelConfig
  ref_params: Any
  tokenizer: models.Tokenizer
  adapter: HFTokenizerAdapter
  stop: runtime.StopFlag
  timer: runtime.Timer
  compile_s0: float
  gold: GoldScorer = dataclasses.field(default_factory=GoldScorer)
  stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  # Wall and compile seconds of stages finished by an earlier process and
  # read back on --resume, so the report's timings cover the whole run.
  resumed_seconds: float = 0.0
  resumed_compile_s: float = 0.0
  cache: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def eos(self) -> int:
    return self.tokenizer.eos_id

  @property
  def pad(self) -> int:
    return self.adapter.pad_id

  def key(self, stage: str) -> jax.Array:
    return jax.random.fold_in(
      jax.random.key(self.config.seed), _STAGE_KEYS[stage]
    )

  def stage_file(self, name: str) -> pathlib.Path:
    return self.run_dir / "stages" / f"{name}.json"

  def finished(self, name: str) -> dict | None:
    path = self.stage_file(name)
    return json.loads(path.read_text()) if path.is_file() else None

  def writer(self, stage: str, start: int = 0) -> MetricsWriter:
    """Metrics of ``stage``; its records after step ``start`` are dropped
    first (all of them when 0: the stage runs again from its beginning)."""
    return MetricsWriter(
      self.run_dir,
      tensorboard=self.config.tensorboard,
      resume_step=start if start > 0 else -1,
      resume_stage=stage,
      tensorboard_dir=f"tensorboard/{stage}",
    )


def _copy(tree: Any) -> Any:
  """Fresh buffers, so donating one state never invalidates another."""
  return jax.tree.map(jnp.copy, tree)


def _host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


# --------------------------------------------------------------- sampling


@functools.partial(
  jax.jit, static_argnames=("config", "max_new_tokens", "eos", "pad")
)
def _sample(params, prompt_ids, prompt_mask, keys, temperature, **kw):
  """One generate call (static shapes) with per-row keys."""
  from rlhf_jax.rollout import generate

  return generate(
    params,
    prompt_ids,
    prompt_mask,
    keys,
    config=kw["config"],
    max_new_tokens=kw["max_new_tokens"],
    temperature=temperature,
    eos_token_id=kw["eos"],
    pad_token_id=kw["pad"],
  )


def _row_keys(key: jax.Array, start: int, size: int) -> jax.Array:
  rows = jnp.arange(start, start + size, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


def _chunks(n: int, size: int):
  """(start, stop) ranges of at most ``size`` rows."""
  for start in range(0, n, size):
    yield start, min(start + size, n)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to ``size`` by repeating row 0 (outputs are discarded)."""
  if len(x) == size:
    return x
  reps = np.repeat(x[:1], size - len(x), axis=0)
  return np.concatenate([x, reps], axis=0)


def sample_continuations(
  ctx: Context,
  params: Any,
  prompt_ids: np.ndarray,
  prompt_mask: np.ndarray,
  key: jax.Array,
  *,
  what: str,
) -> dict[str, np.ndarray]:
  """Samples one continuation per row, in batches of one static shape.

  Every call uses [sampling.batch_size, task.max_prompt_length] prompts and
  sampling.max_new_tokens, so the sampler compiles once per run. Row r uses
  the key fold_in(key, r), so results do not depend on the batching.

  Returns:
    numpy response_ids i32[N, T], response_mask bool[N, T], logprobs
    f32[N, T] (sampling distribution, 0 at masked slots), truncated bool[N].
  """
  n = len(prompt_ids)
  size = ctx.config.sampling.batch_size
  names = ("response_ids", "response_mask", "logprobs", "truncated")
  out: dict[str, list] = {k: [] for k in names}
  bar = ProgressBar(-(-n // size), what)
  for start, stop in _chunks(n, size):
    ctx.stop.check(what)
    roll = _sample(
      params,
      jnp.asarray(_pad_rows(prompt_ids[start:stop], size)),
      jnp.asarray(_pad_rows(prompt_mask[start:stop], size)),
      _row_keys(key, start, size),
      jnp.float32(ctx.config.sampling.temperature),
      config=ctx.model_config,
      max_new_tokens=ctx.config.sampling.max_new_tokens,
      eos=ctx.eos,
      pad=ctx.pad,
    )
    for k in names:
      out[k].append(np.asarray(getattr(roll, k))[: stop - start])
    bar.update(1)
  bar.close()
  return {k: np.concatenate(v) for k, v in out.items()}


def decode(ctx: Context, ids: np.ndarray, mask: np.ndarray) -> list[str]:
  """Response texts (special tokens dropped)."""
  return [
    ctx.tokenizer.decode(row[m]) for row, m in zip(ids, mask, strict=True)
  ]


def tokenize_prompt_texts(ctx: Context, texts: Sequence[str]):
  """Left-padded prompt arrays; a prompt longer than P is a DataError."""
  ds = tokenize_prompts(
    list(texts),
    ctx.adapter,
    max_prompt_length=ctx.config.task.max_prompt_length,
    truncate_prompts=False,
  )
  return ds


# ------------------------------------------------------------ 1. prompts


def stage_prompts(ctx: Context) -> dict:
  """Story openings + prefixes of sampled stories, split train/held-out."""
  cfg = ctx.config.task
  n = cfg.sampled_stories
  # Stories from BOS alone, left-padded to the one compiled prompt shape.
  ids = np.full((n, cfg.max_prompt_length), ctx.pad, np.int32)
  ids[:, -1] = ctx.tokenizer.bos_id
  mask = np.zeros(ids.shape, bool)
  mask[:, -1] = True
  roll = sample_continuations(
    ctx, ctx.ref_params, ids, mask, ctx.key("prompts"), what="prompts"
  )
  stories = decode(ctx, roll["response_ids"], roll["response_mask"])
  prefixes = story_prefixes(
    stories,
    min_words=cfg.prefix_min_words,
    max_words=cfg.prefix_max_words,
    seed=ctx.config.seed,
  )
  openings = list(STORY_OPENINGS)
  prompts = openings + [p for p in prefixes if p not in set(openings)]
  train, held = split_prompts(
    prompts, eval_fraction=cfg.eval_fraction, seed=ctx.config.seed
  )
  tokenize_prompt_texts(ctx, prompts)  # fails early on a too-long prompt
  result = {
    "train": train,
    "heldout": held,
    "num_openings": len(openings),
    "num_sampled_prefixes": len(prompts) - len(openings),
  }
  runtime.write_json(ctx.run_dir / "data" / "prompts.json", result)
  return result


# ----------------------------------------------------------- 2. feedback


def _label_pairs(
  ctx: Context,
  annotator: SimulatedAnnotator,
  prompts: list[str],
  groups: int,
  key: jax.Array,
  what: str,
) -> list[dict]:
  """Labels every pair within groups of K continuations of one prompt.

  Rows g*K .. g*K+K-1 are group g (prompt g // groups); each of its
  K (K - 1) / 2 pairs (i < j) is shown to the annotator as (a=i, b=j).
  """
  k = ctx.config.feedback.group_size
  ds = tokenize_prompt_texts(ctx, prompts)
  rows = np.repeat(np.arange(len(prompts)), groups * k)
  p_ids = ds.arrays["prompt_ids"][rows]
  p_mask = ds.arrays["prompt_mask"][rows]
  roll = sample_continuations(
    ctx, ctx.ref_params, p_ids, p_mask, key, what=what
  )
  texts = decode(ctx, roll["response_ids"], roll["response_mask"])
  gold = ctx.gold.score(texts)
  within = np.array(list(itertools.combinations(range(k), 2)), np.int64)
  starts = np.arange(0, len(texts), k)
  ia = (starts[:, None] + within[None, :, 0]).reshape(-1)
  ib = (starts[:, None] + within[None, :, 1]).reshape(-1)
  a_wins = annotator.choose(gold[ia], gold[ib])
  ids, msk = roll["response_ids"], roll["response_mask"]
  pairs = []
  for a, b, w in zip(ia, ib, a_wins, strict=True):
    c, r = (a, b) if w else (b, a)
    pairs.append(
      {
        "prompt": prompts[rows[a]],
        "chosen": texts[c],
        "rejected": texts[r],
        "gold_chosen": float(gold[c]),
        "gold_rejected": float(gold[r]),
        "noiseless_label": bool(gold[c] >= gold[r]),
        "prompt_ids": p_ids[a][p_mask[a]].tolist(),
        "chosen_ids": ids[c][msk[c]].tolist(),
        "rejected_ids": ids[r][msk[r]].tolist(),
      }
    )
  return pairs


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  tmp.replace(path)


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def stage_feedback(ctx: Context, prompts: dict) -> dict:
  """Pairs of initial-policy continuations labelled by the annotator."""
  cfg = ctx.config.feedback
  annotator = SimulatedAnnotator(
    ctx.gold, beta=cfg.annotator_beta, seed=ctx.config.seed
  )
  key = ctx.key("feedback")
  train = _label_pairs(
    ctx,
    annotator,
    prompts["train"],
    cfg.groups_per_prompt,
    jax.random.fold_in(key, 0),
    "feedback: train pairs",
  )
  held = _label_pairs(
    ctx,
    annotator,
    prompts["heldout"],
    cfg.eval_groups_per_prompt,
    jax.random.fold_in(key, 1),
    "feedback: held-out pairs",
  )
  _write_jsonl(ctx.run_dir / "data" / "pairs_train.jsonl", train)
  _write_jsonl(ctx.run_dir / "data" / "pairs_eval.jsonl", held)
  stats = annotator.stats()
  stats["annotator/train_pairs"] = float(len(train))
  stats["annotator/eval_pairs"] = float(len(held))
  with ctx.writer("feedback") as w:
    w.log(0, stats, stage="feedback")
  return {"stats": stats}


def pairs_dataset(ctx: Context, pairs: list[dict]) -> TokenizedDataset:
  """PreferenceBatch arrays from the SAMPLED token ids (no re-tokenizing)."""
  p_len = ctx.config.task.max_prompt_length
  t_len = ctx.config.sampling.max_new_tokens
  n = len(pairs)
  arrays = {
    "prompt_ids": np.full((n, p_len), ctx.pad, np.int32),
    "prompt_mask": np.zeros((n, p_len), bool),
  }
  for f in ("chosen", "rejected"):
    arrays[f"{f}_ids"] = np.full((n, t_len), ctx.pad, np.int32)
    arrays[f"{f}_mask"] = np.zeros((n, t_len), bool)
  for i, p in enumerate(pairs):
    k = len(p["prompt_ids"])
    arrays["prompt_ids"][i, p_len - k :] = p["prompt_ids"]
    arrays["prompt_mask"][i, p_len - k :] = True
    for f in ("chosen", "rejected"):
      k = len(p[f"{f}_ids"])
      arrays[f"{f}_ids"][i, :k] = p[f"{f}_ids"]
      arrays[f"{f}_mask"][i, :k] = True
  pad_row = {k: np.full(a.shape[1:], 0, a.dtype) for k, a in arrays.items()}
  for k in pad_row:
    if k.endswith("_ids"):
      pad_row[k][...] = ctx.pad
  return TokenizedDataset(
    arrays=arrays,
    pad_row=pad_row,
    batch_type=PreferenceBatch,
    truncation=TruncationReport(
      n, p_len, t_len, {"prompt": 0, "chosen": 0, "rejected": 0}
    ),
    sources=["feedback"] * n,
    rows=np.arange(n),
  )


def preference_data(ctx: Context) -> dict:
  """Train / held-out preference datasets: simulated feedback or --data."""
  if "prefs" in ctx.cache:
    return ctx.cache["prefs"]
  cfg = ctx.config
  if cfg.data is None:
    train = _read_jsonl(ctx.run_dir / "data" / "pairs_train.jsonl")
    held = _read_jsonl(ctx.run_dir / "data" / "pairs_eval.jsonl")
    out = {
      "train": pairs_dataset(ctx, train),
      "eval": pairs_dataset(ctx, held),
      "eval_noiseless": np.array([p["noiseless_label"] for p in held]),
      "drops": {},
    }
  else:
    loaded = load_examples(cfg.data, strict=cfg.strict)
    if not isinstance(loaded.examples[0], PreferencePair):
      kind = type(loaded.examples[0]).__name__
      raise DataError(
        f"{cfg.data}: expected preference pairs (prompt/chosen/rejected or "
        f"HH-RLHF transcripts), got {kind} rows"
      )
    ds = tokenize_preferences(
      loaded.examples,
      ctx.adapter,
      max_prompt_length=cfg.task.max_prompt_length,
      max_response_length=cfg.max_response_length,
      truncate_prompts=False,
    )
    if len(ds) < 2:
      raise DataError(
        f"{cfg.data}: need at least 2 usable pairs, got {len(ds)}"
      )
    # 10% of the pairs (at least one) are held out for accuracy.
    n_eval = max(1, round(0.1 * len(ds)))
    tr, ev = train_eval_split(len(ds), eval_size=n_eval, seed=cfg.seed)
    out = {
      "train": ds.subset(tr),
      "eval": ds.subset(ev),
      "eval_noiseless": None,
      "drops": loaded.drops.to_dict(),
      "truncation": ds.truncation.truncated,
    }
  ctx.cache["prefs"] = out
  return out


# ------------------------------------------------------ training helpers


def _optimizer(
  lr: float,
  warmup: int,
  clip: float,
  *,
  decay_steps: int | None = None,
  weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Adam(W) with linear warmup (and optional cosine decay to 10%).

  ``weight_decay`` > 0 gives AdamW (Loshchilov & Hutter 2019): the decay
  term ``weight_decay * params`` is added to the Adam direction before the
  learning-rate scaling, so parameters shrink by ``lr * weight_decay``.
  """
  if decay_steps is None:
    sched = optax.join_schedules(
      [
        optax.linear_schedule(0.0, lr, max(warmup, 1)),
        optax.constant_schedule(lr),
      ],
      [max(warmup, 1)],
    )
  else:
    sched = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(warmup, 1), max(decay_steps, warmup + 1), end_value=0.1 * lr
    )
  if weight_decay:
    inner = optax.adamw(sched, weight_decay=weight_decay)
  else:
    inner = optax.adam(sched)
  return optax.chain(optax.clip_by_global_norm(clip), inner)


class StageLoop:
  """Checkpointed loop of one training stage (state + iterator + step).

  ``start(state, iterator)`` restores the latest in-stage checkpoint when
  there is one; ``after_step`` saves every ``checkpoint_every`` steps and,
  when SIGINT/SIGTERM was received, saves and raises Interrupted.
  """

  def __init__(self, ctx: Context, stage: str):
    self.ctx = ctx
    self.stage = stage
    self.ckpt = CheckpointManager(
      ctx.run_dir / "checkpoints" / stage, max_to_keep=1
    )

  def start(self, state: Any, iterator: BatchIterator | None) -> tuple:
    step = self.ckpt.latest_step()
    if step is None:
      return state, 0
    state, meta = self.ckpt.restore(step, abstract_state=abstract_like(state))
    if iterator is not None:
      iterator.load_state_dict(meta["iterator"])
    return state, step

  def save(self, step: int, state: Any, iterator, *, wait: bool) -> None:
    meta = {"iterator": None if iterator is None else iterator.state_dict()}
    self.ckpt.save(step, state, metadata=meta, force=True)
    if wait:
      self.ckpt.wait_until_finished()

  def after_step(self, step: int, state: Any, iterator) -> None:
    every = self.ctx.config.checkpoint_every
    if self.ctx.stop.requested:
      self.save(step, state, iterator, wait=True)
      raise runtime.Interrupted(f"{self.stage} at step {step}")
    if every > 0 and step % every == 0:
      self.save(step, state, iterator, wait=False)

  def close(self) -> None:
    self.ckpt.close()


def _scalars(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _show(metrics: dict, keys: Sequence[str]) -> dict:
  return {k.split("/")[-1]: metrics[k] for k in keys if k in metrics}


# ------------------------------------------------------------------ 3. rm


@functools.partial(jax.jit, static_argnames=("config", "pooling"))
def _pair_scores(params, batch, *, config, pooling):
  return pair_rewards(params, batch, model_config=config, pooling=pooling)


def rm_heldout(ctx: Context, params: Any, prefs: dict) -> dict[str, float]:
  """Held-out accuracy vs the annotator labels and vs the gold order."""
  ds: TokenizedDataset = prefs["eval"]
  n = len(ds)
  size = min(ctx.config.rm.batch_size * 2, n)
  rc, rr = [], []
  for start, stop in _chunks(n, size):
    idx = np.arange(start, start + size)
    idx = np.where(idx < stop, idx, -1)
    batch = jax.tree.map(jnp.asarray, ds.take(idx))
    c, r = _pair_scores(
      params, batch, config=ctx.model_config, pooling=ctx.config.rm.pooling
    )
    rc.append(np.asarray(c)[: stop - start])
    rr.append(np.asarray(r)[: stop - start])
  rc, rr = np.concatenate(rc), np.concatenate(rr)
  out = {
    "rm/eval_accuracy": float(np.mean(rc > rr)),
    "rm/eval_ties": float(np.mean(rc == rr)),
    "rm/eval_margin": float(np.mean(rc - rr)),
  }
  noiseless = prefs["eval_noiseless"]
  if noiseless is not None:
    agree = np.where(noiseless, rc > rr, rr > rc)
    out["rm/eval_gold_accuracy"] = float(np.mean(agree))
  return out


def _save_rm(ctx: Context, params: Any) -> None:
  from safetensors.numpy import save_file

  out = ctx.run_dir / "outputs" / "rm"
  models.export_hf_checkpoint(
    params["backbone"], ctx.model_config, out, tokenizer_dir=ctx.model_dir
  )
  (out / HEAD_DIR).mkdir(exist_ok=True)
  save_file(
    {k: np.asarray(v) for k, v in params["head"].items()},
    str(out / HEAD_FILE),
  )


def load_rm(run_dir: pathlib.Path) -> tuple[models.ModelConfig, Any]:
  """The reward model of a run: {"backbone", "head"} params."""
  from safetensors.numpy import load_file

  out = run_dir / "outputs" / "rm"
  if not (out / HEAD_FILE).is_file():
    raise runtime.CLIError(f"{run_dir} has no trained reward model ({out})")
  config, backbone = models.load_hf_checkpoint(out)
  head = {k: jnp.asarray(v) for k, v in load_file(str(out / HEAD_FILE)).items()}
  return config, {"backbone": backbone, "head": head}


def stage_rm(ctx: Context) -> dict:
  """Bradley-Terry reward model from the policy checkpoint + a new head."""
  cfg = ctx.config.rm
  prefs = preference_data(ctx)
  key = ctx.key("rm")
  params = models.from_policy_params(
    ctx.ref_params, ctx.model_config, jax.random.fold_in(key, 0)
  )
  opt = _optimizer(
    cfg.learning_rate,
    cfg.warmup_steps,
    cfg.max_grad_norm,
    decay_steps=cfg.steps,
    weight_decay=cfg.weight_decay,
  )
  state = TrainState.create(params, opt, jax.random.fold_in(key, 1))
  step_fn = jax.jit(
    make_reward_model_step(
      ctx.model_config,
      opt,
      RewardModelConfig(
        center_rewards_coef=cfg.center_rewards_coef, pooling=cfg.pooling
      ),
    ),
    donate_argnums=0,
  )
  it = BatchIterator(
    prefs["train"],
    global_batch_size=min(cfg.batch_size, len(prefs["train"])),
    seed=ctx.config.seed,
  )
  loop = StageLoop(ctx, "rm")
  state, start = loop.start(state, it)
  final: dict[str, float] = {}
  with ctx.writer("rm", start) as w:
    bar = ProgressBar(cfg.steps, "rm")
    bar.update(start)
    for step in range(start + 1, cfg.steps + 1):
      batch = jax.tree.map(jnp.asarray, next(it).batch)
      state, metrics = step_fn(state, batch)
      m = _scalars(metrics)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        m.update(rm_heldout(ctx, state.params, prefs))
      w.log(step, m, stage="rm")
      final.update(m)
      bar.update(1, _show(m, ("rm/loss", "rm/accuracy", "rm/eval_accuracy")))
      loop.after_step(step, state, it)
    bar.close()
  loop.close()
  _save_rm(ctx, state.params)
  heldout = rm_heldout(ctx, state.params, prefs)
  return {
    "final_train": {k: v for k, v in final.items() if "eval" not in k},
    "heldout": heldout,
    "train_pairs": len(prefs["train"]),
    "eval_pairs": len(prefs["eval"]),
    "drops": prefs["drops"],
  }


# ------------------------------------------------------------ evaluation


@functools.partial(jax.jit, static_argnames=("config", "with_rm", "pooling"))
def _score_batch(ref, rm, prompt_ids, prompt_mask, roll, temp, **kw):
  """Sequence k1 KL to the reference and reward-model score of samples."""
  config = kw["config"]
  mask = roll["response_mask"]
  ids, attn = concat_prompt_response(
    prompt_ids, prompt_mask, roll["response_ids"], mask
  )
  ref_lp = response_logprobs(
    models.forward(ref, ids, attn, config=config),
    ids,
    prompt_length=prompt_ids.shape[1],
    temperature=temp,
    response_mask=mask,
  )
  # k1 per sampled sequence: sum_t log pi(y_t) - log pi_ref(y_t).
  kl = jnp.sum(jnp.where(mask, roll["logprobs"] - ref_lp, 0.0), axis=-1)
  if kw["with_rm"] and kw["pooling"] == "mean":
    proxy = response_mean_reward(rm, ids, attn, mask, model_config=config)
  elif kw["with_rm"]:
    proxy = models.reward_forward(rm, ids, attn, config=config)
  else:
    proxy = jnp.zeros((ids.shape[0],), jnp.float32)
  return kl, proxy


def heldout_rows(ctx: Context, heldout: list[str], samples: int):
  """(prompt arrays, prompt index) of rows i*samples + s."""
  ds = tokenize_prompt_texts(ctx, heldout)
  rows = np.repeat(np.arange(len(heldout)), samples)
  return ds.arrays["prompt_ids"][rows], ds.arrays["prompt_mask"][rows], rows


def evaluate_policy(
  ctx: Context,
  params: Any,
  rm_params: Any | None,
  *,
  heldout: list[str],
  samples: int,
  key: jax.Array,
  baseline_gold: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
  """Held-out evaluation of one policy.

  Every policy sees the same rows with the same keys (common random
  numbers), so row i of two policies is a fair pair for the win rate.

  Returns:
    (metrics: eval/gold_score, eval/proxy_score, eval/kl (mean sampled-
    sequence k1, nats), eval/kl_k1_per_token, eval/response_length
    (tokens), eval/truncated_frac, eval/distinct_1, eval/distinct_2 and,
    with ``baseline_gold``, eval/gold_win_rate; details: texts, gold f64[N]).
  """
  p_ids, p_mask, _ = heldout_rows(ctx, heldout, samples)
  roll = sample_continuations(ctx, params, p_ids, p_mask, key, what="eval")
  n = len(p_ids)
  size = ctx.config.sampling.batch_size
  kls, proxies = [], []
  for start, stop in _chunks(n, size):
    part = {
      k: jnp.asarray(_pad_rows(v[start:stop], size))
      for k, v in roll.items()
      if k != "truncated"
    }
    kl, proxy = _score_batch(
      ctx.ref_params,
      rm_params,
      jnp.asarray(_pad_rows(p_ids[start:stop], size)),
      jnp.asarray(_pad_rows(p_mask[start:stop], size)),
      part,
      jnp.float32(ctx.config.sampling.temperature),
      config=ctx.model_config,
      with_rm=rm_params is not None,
      pooling=ctx.config.rm.pooling,
    )
    kls.append(np.asarray(kl)[: stop - start])
    proxies.append(np.asarray(proxy)[: stop - start])
  kl, proxy = np.concatenate(kls), np.concatenate(proxies)
  ids, mask, trunc = (
    roll["response_ids"],
    roll["response_mask"],
    roll["truncated"],
  )
  texts = decode(ctx, ids, mask)
  gold = ctx.gold.score(texts)
  lengths = mask.sum(-1)
  metrics = {
    "eval/gold_score": float(gold.mean()),
    "eval/kl": float(kl.mean()),
    "eval/kl_k1_per_token": float(kl.sum() / max(lengths.sum(), 1)),
    "eval/response_length": float(lengths.mean()),
    "eval/truncated_frac": float(trunc.mean()),
    "eval/distinct_1": distinct_n(texts, 1),
    "eval/distinct_2": distinct_n(texts, 2),
  }
  if rm_params is not None:
    metrics["eval/proxy_score"] = float(proxy.mean())
  if baseline_gold is not None:
    metrics["eval/gold_win_rate"] = win_rate(gold, baseline_gold)
  # Report samples: the continuation as it reads after its prompt (the
  # gold scores above keep the response-only text they were tuned on).
  shown = [
    ctx.tokenizer.decode_continuation(p[pm], r[m])
    for p, pm, r, m in zip(p_ids, p_mask, ids, mask, strict=True)
  ]
  return metrics, {"texts": texts, "shown": shown, "gold": gold.tolist()}


def _rm_for_eval(ctx: Context) -> Any | None:
  if "rm_params" not in ctx.cache:
    rm = None
    if (ctx.run_dir / "outputs" / "rm" / HEAD_FILE).is_file():
      rm = load_rm(ctx.run_dir)[1]
    ctx.cache["rm_params"] = rm
  return ctx.cache["rm_params"]


def _evaluate_into(m, ctx, params, rm, base_gold, prompts) -> dict:
  """evaluate_policy of a training stage's policy: its metrics are merged
  into the step's metrics ``m``; returns {"metrics": ..., **details}."""
  em, details = evaluate_policy(
    ctx, params, rm, baseline_gold=base_gold, **_eval_kwargs(ctx, prompts)
  )
  m.update(em)
  return {"metrics": em, **details}


def _eval_kwargs(ctx: Context, prompts: dict) -> dict:
  return dict(
    heldout=prompts["heldout"],
    samples=ctx.config.eval.samples_per_prompt,
    key=ctx.key("eval"),
  )


def stage_initial(ctx: Context, prompts: dict) -> dict:
  """The initial policy (= reference) on the held-out prompts."""
  metrics, details = evaluate_policy(
    ctx, ctx.ref_params, _rm_for_eval(ctx), **_eval_kwargs(ctx, prompts)
  )
  with ctx.writer("initial") as w:
    w.log(0, metrics, stage="initial")
  return {"metrics": metrics, **details}


# ------------------------------------------------------------------ 4. ppo


def _prompt_iterator(ctx: Context, prompts: list[str], batch: int):
  ds = tokenize_prompt_texts(ctx, prompts)
  if len(ds) < batch:  # tiny runs: cycle the prompts to fill a batch
    idx = np.arange(batch) % len(ds)
    ds = ds.subset(idx)
  return BatchIterator(ds, global_batch_size=batch, seed=ctx.config.seed)


def stage_ppo(ctx: Context, prompts: dict, initial: dict) -> dict:
  """RLHF with make_ppo_step; periodic held-out evaluation."""
  cfg = ctx.config.ppo
  rm = _rm_for_eval(ctx)
  if rm is None:
    raise runtime.CLIError("PPO needs a trained reward model (stage rm)")
  key = ctx.key("ppo")
  ppo_config = PPOConfig(
    eos_token_id=ctx.eos,
    pad_token_id=ctx.pad,
    group_size=cfg.group_size,
    max_new_tokens=ctx.config.sampling.max_new_tokens,
    temperature=ctx.config.sampling.temperature,
    exact_sampling=ctx.config.sampling.exact_sampling,
    kl_coef=cfg.init_kl_coef,
    adaptive_kl=cfg.adaptive_kl,
    target_kl=cfg.target_kl,
    kl_horizon=cfg.kl_horizon,
    normalize_reward=cfg.normalize_reward,
    gamma=cfg.gamma,
    lam=cfg.lam,
    ppo_epochs=cfg.ppo_epochs,
    num_minibatches=cfg.num_minibatches,
    cliprange=cfg.cliprange,
    cliprange_value=cfg.cliprange_value,
    vf_coef=cfg.vf_coef,
  )
  p_opt = _optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.max_grad_norm)
  v_opt = _optimizer(
    cfg.value_learning_rate, cfg.warmup_steps, cfg.max_grad_norm
  )
  state = init_ppo_state(
    _copy(ctx.ref_params),
    _copy(rm),  # critic initialised from the reward model
    p_opt,
    v_opt,
    key,
    ppo_config,
  )
  score_fn = None  # "last": models.reward_forward, make_ppo_step's default
  if ctx.config.rm.pooling == "mean":
    score_fn = functools.partial(
      response_mean_reward, model_config=ctx.model_config
    )
  step_fn = jax.jit(
    make_ppo_step(
      ctx.model_config, p_opt, v_opt, ppo_config, score_fn=score_fn
    ),
    donate_argnums=0,
  )
  frozen = {"ref": ctx.ref_params, "reward": rm}
  it = _prompt_iterator(ctx, prompts["train"], cfg.batch_size)
  loop = StageLoop(ctx, "ppo")
  state, start = loop.start(state, it)
  base_gold = np.asarray(initial["gold"])
  last: dict[str, Any] = {}
  with ctx.writer("ppo", start) as w:
    if start == 0:
      w.log(0, initial["metrics"], stage="ppo")
    bar = ProgressBar(cfg.iterations, "ppo")
    bar.update(start)
    for step in range(start + 1, cfg.iterations + 1):
      b = next(it).batch
      batch = PromptBatch(jnp.asarray(b.prompt_ids), jnp.asarray(b.prompt_mask))
      state, metrics = step_fn(state, batch, frozen)
      m = _scalars(metrics)
      if step % cfg.eval_every == 0 or step == cfg.iterations:
        last = _evaluate_into(
          m, ctx, state.policy_params, rm, base_gold, prompts
        )
      w.log(step, m, stage="ppo")
      bar.update(
        1,
        _show(
          m,
          (
            "objective/scores",
            "objective/kl",
            "objective/kl_coef",
            "eval/gold_score",
          ),
        ),
      )
      loop.after_step(step, state, it)
    bar.close()
  loop.close()
  models.export_hf_checkpoint(
    _host(state.policy_params),
    ctx.model_config,
    ctx.run_dir / "outputs" / "ppo",
    tokenizer_dir=ctx.model_dir,
  )
  if not last:  # resumed after the last iteration's evaluation was logged
    em, details = evaluate_policy(
      ctx,
      state.policy_params,
      rm,
      baseline_gold=base_gold,
      **_eval_kwargs(ctx, prompts),
    )
    last = {"metrics": em, **details}
  last["final_kl_coef"] = float(state.kl_state.kl_coef)
  return last


# ------------------------------------------------------------------ 5. dpo


def stage_dpo(ctx: Context, prompts: dict | None, initial: dict | None) -> dict:
  """DPO on the same preference pairs; periodic held-out evaluation."""
  cfg = ctx.config.dpo
  prefs = preference_data(ctx)
  key = ctx.key("dpo")
  opt = _optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.max_grad_norm)
  state = TrainState.create(_copy(ctx.ref_params), opt, key)
  step_fn = jax.jit(
    make_dpo_step(ctx.model_config, opt, DPOConfig(beta=cfg.beta)),
    donate_argnums=0,
  )
  it = BatchIterator(
    prefs["train"],
    global_batch_size=min(cfg.batch_size, len(prefs["train"])),
    seed=ctx.config.seed,
  )
  rm = _rm_for_eval(ctx)
  evaluate = prompts is not None and initial is not None
  base_gold = np.asarray(initial["gold"]) if evaluate else None
  loop = StageLoop(ctx, "dpo")
  state, start = loop.start(state, it)
  last: dict[str, Any] = {}
  with ctx.writer("dpo", start) as w:
    if start == 0 and evaluate:
      w.log(0, initial["metrics"], stage="dpo")
    bar = ProgressBar(cfg.steps, "dpo")
    bar.update(start)
    for step in range(start + 1, cfg.steps + 1):
      batch = jax.tree.map(jnp.asarray, next(it).batch)
      state, metrics = step_fn(state, batch, ctx.ref_params)
      m = _scalars(metrics)
      # Implicit-reward pair accuracy under the name report.py plots.
      m["dpo/accuracy"] = m["rewards/accuracies"]
      if evaluate and (step % cfg.eval_every == 0 or step == cfg.steps):
        last = _evaluate_into(m, ctx, state.params, rm, base_gold, prompts)
      w.log(step, m, stage="dpo")
      bar.update(
        1, _show(m, ("dpo/loss", "rewards/accuracies", "eval/gold_score"))
      )
      loop.after_step(step, state, it)
    bar.close()
  loop.close()
  models.export_hf_checkpoint(
    _host(state.params),
    ctx.model_config,
    ctx.run_dir / "outputs" / "dpo",
    tokenizer_dir=ctx.model_dir,
  )
  if evaluate and not last:
    em, details = evaluate_policy(
      ctx,
      state.params,
      rm,
      baseline_gold=base_gold,
      **_eval_kwargs(ctx, prompts),
    )
    last = {"metrics": em, **details}
  return last


# --------------------------------------------------------------- 6. report


_POLICY_ROWS = {
  "eval/gold_score": "gold score (VADER)",
  "eval/proxy_score": "reward-model score",
  "eval/kl": "KL to reference (nats/seq)",
  "eval/gold_win_rate": "gold win rate vs initial",
  "eval/distinct_1": "distinct-1",
  "eval/distinct_2": "distinct-2",
  "eval/response_length": "mean length (tokens)",
  "eval/truncated_frac": "truncated (no EOS)",
}


def build_summary(ctx: Context, results: dict[str, dict]) -> dict[str, Any]:
  """Flat summary numbers (also summary.json)."""
  s: dict[str, Any] = {}
  if "prompts" in results:
    p = results["prompts"]
    s["data/train_prompts"] = len(p["train"])
    s["data/heldout_prompts"] = len(p["heldout"])
  if "feedback" in results:
    st = results["feedback"]["stats"]
    s["annotator/train_pairs"] = st["annotator/train_pairs"]
    s["annotator/gold_agreement"] = st["annotator/gold_agreement"]
    s["annotator/gold_ties"] = st["annotator/gold_ties"]
    s["annotator/beta"] = ctx.config.feedback.annotator_beta
  if "rm" in results:
    h = results["rm"]["heldout"]
    s["rm/heldout_accuracy_annotator"] = h["rm/eval_accuracy"]
    if "rm/eval_gold_accuracy" in h:
      s["rm/heldout_accuracy_gold"] = h["rm/eval_gold_accuracy"]
    s["rm/heldout_ties"] = h["rm/eval_ties"]
    s["rm/eval_pairs"] = results["rm"]["eval_pairs"]
  for name in POLICIES:
    m = results.get(name, {}).get("metrics")
    if not m:
      continue
    for k in (
      "eval/gold_score",
      "eval/proxy_score",
      "eval/kl",
      "eval/gold_win_rate",
      "eval/distinct_2",
      "eval/response_length",
    ):
      if k in m:
        s[f"{name}/{k.split('/', 1)[1]}"] = m[k]
  if "ppo" in results:
    s["ppo/target_kl"] = ctx.config.ppo.target_kl
    s["ppo/final_kl_coef"] = results["ppo"]["final_kl_coef"]
  return s


def stage_report(ctx: Context, results: dict[str, dict]) -> dict:
  """summary.json and report.md (metrics table, samples, plots)."""
  summary = build_summary(ctx, results)
  total = ctx.timer.elapsed() + ctx.resumed_seconds
  compile_s = (
    runtime.CompileClock.get().seconds - ctx.compile_s0 + ctx.resumed_compile_s
  )
  timing = {
    "time/total_s": total,
    "time/compile_s": compile_s,
    "time/compile_share": compile_s / max(total, 1e-9),
  }
  timing.update({f"time/{k}_s": v for k, v in ctx.stage_seconds.items()})
  policies = {
    name: {
      label: results[name]["metrics"][k]
      for k, label in _POLICY_ROWS.items()
      if k in results[name]["metrics"]
    }
    for name in POLICIES
    if results.get(name, {}).get("metrics")
  }
  n_show = ctx.config.eval.report_samples
  samples, shown_prompts = {}, None
  if policies:
    rows = np.arange(n_show) * ctx.config.eval.samples_per_prompt
    held = results["prompts"]["heldout"]
    rows = rows[rows < len(results["initial"]["texts"])]
    per = ctx.config.eval.samples_per_prompt
    shown_prompts = [held[r // per] for r in rows]
    for name in policies:
      shown = results[name].get("shown", results[name]["texts"])
      samples[name] = [shown[r] for r in rows]
  runtime.write_json(ctx.run_dir / "summary.json", {**summary, **timing})
  write_report(
    ctx.run_dir,
    summary={**summary, **timing},
    samples=samples,
    prompts=shown_prompts,
    metrics_path=ctx.run_dir / "metrics.jsonl",
    policies=policies or None,
    kl_target=ctx.config.ppo.target_kl if "ppo" in results else None,
    title=f"rlhf-jax {ctx.command}: make TinyStories happier",
  )
  return {"summary": summary, **timing}


# -------------------------------------------------------------- pipeline


def run_pipeline(
  command: str,
  config: PipelineConfig,
  *,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs (or resumes) the stages of ``command``; returns summary numbers.

  Raises:
    CLIError, DataError: bad inputs (one-line messages).
    Interrupted: SIGINT/SIGTERM; the current stage saved a checkpoint.
  """
  runtime.setup_jax()
  timer = runtime.Timer()
  compile0 = runtime.CompileClock.get().seconds
  if config.data is not None and command not in DATA_STAGES_BY_COMMAND:
    raise runtime.CLIError(
      f"--data is not used by `rlhf-jax {command}` (rm and dpo accept it)"
    )
  model_dir = runtime.resolve_model(config.model)
  if config.data is not None and not pathlib.Path(config.data).exists():
    raise DataError(f"{config.data}: no such file")
  run_dir = runtime.prepare_run_dir(
    command, config, extra={"model_dir": str(model_dir)}
  )
  model_config, params = models.load_hf_checkpoint(model_dir)
  tok = models.load_tokenizer(model_dir)
  adapter = HFTokenizerAdapter.wrap(tok)
  stages = (
    STAGES_BY_COMMAND[command]
    if config.data is None
    else DATA_STAGES_BY_COMMAND[command]
  )
  log(
    f"rlhf-jax {command}: run directory {run_dir}; stages {', '.join(stages)}"
  )
  with runtime.StopFlag() as stop:
    ctx = Context(
      command=command,
      config=config,
      run_dir=run_dir,
      model_dir=model_dir,
      model_config=model_config,
      ref_params=params,
      tokenizer=tok,
      adapter=adapter,
      stop=stop,
      timer=timer,
      compile_s0=compile0,
    )
    results: dict[str, dict] = {}
    for name in stages:
      if name == "report":
        out = stage_report(ctx, results)
        log(f"report: {run_dir / 'report.md'}")
        return out
      done = ctx.finished(name)
      if done is not None and config.resume:
        log(f"{name}: finished earlier, read from {ctx.stage_file(name)}")
        results[name] = done
        timing = done.get("_timing", {})
        ctx.stage_seconds[name] = timing.get("seconds", 0.0)
        ctx.resumed_seconds += timing.get("seconds", 0.0)
        ctx.resumed_compile_s += timing.get("compile_s", 0.0)
        continue
      t = runtime.Timer()
      c0 = runtime.CompileClock.get().seconds
      log(f"{name}: starting")
      if name == "prompts":
        res = stage_prompts(ctx)
      elif name == "feedback":
        res = stage_feedback(ctx, results["prompts"])
      elif name == "rm":
        res = stage_rm(ctx)
      elif name == "initial":
        res = stage_initial(ctx, results["prompts"])
      elif name == "ppo":
        res = stage_ppo(ctx, results["prompts"], results["initial"])
      elif name == "dpo":
        res = stage_dpo(ctx, results.get("prompts"), results.get("initial"))
      else:  # pragma: no cover - stage tables are fixed above
        raise AssertionError(name)
      ctx.stage_seconds[name] = t.elapsed()
      res["_timing"] = {
        "seconds": t.elapsed(),
        "compile_s": runtime.CompileClock.get().seconds - c0,
      }
      runtime.write_json(ctx.stage_file(name), res)
      results[name] = res
      log(f"{name}: done in {t.elapsed():.1f}s {_headline(name, res)}")
  raise AssertionError("every command ends with the report stage")


def _headline(name: str, res: dict) -> str:
  if name == "rm":
    return " ".join(f"{k}={v:.3f}" for k, v in res["heldout"].items())
  if name in POLICIES and "metrics" in res:
    keys = ("eval/gold_score", "eval/kl", "eval/gold_win_rate")
    return " ".join(
      f"{k}={res['metrics'][k]:.3f}" for k in keys if k in res["metrics"]
    )
  return ""
