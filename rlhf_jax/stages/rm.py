"""Stage 3: the Bradley-Terry reward model (Ouyang et al. 2022, eq. 1)."""

import pathlib
from typing import Any

import jax
import numpy as np

from rlhf_jax import audit, models
from rlhf_jax.data import BatchIterator, TokenizedDataset
from rlhf_jax.runner import runtime
from rlhf_jax.runner.mesh import MeshConfig, Placement
from rlhf_jax.runner.precompile import StepProgram
from rlhf_jax.stages import environment
from rlhf_jax.stages.common import (
  HEAD_DIR,
  HEAD_FILE,
  Context,
  host_tree,
  optimizer,
)
from rlhf_jax.stages.configs import PipelineConfig
from rlhf_jax.stages.eval_metrics import accuracy_stderr
from rlhf_jax.stages.feedback import preference_data, train_batch_size
from rlhf_jax.train import (
  TrainState,
  make_reward_model_step,
  pair_rewards,
)


def _pair_scores(params, batch, *, config, pooling, share_prompt):
  return pair_rewards(
    params,
    batch,
    model_config=config,
    pooling=pooling,
    share_prompt=share_prompt,
  )


def _score_kwargs(ctx: Context) -> dict:
  loss = ctx.config.rm.loss
  return {
    "config": ctx.model_config,
    "pooling": loss.pooling,
    "share_prompt": loss.share_prompt,
  }


def _scorer(ctx: Context):
  if "pair_scores" not in ctx.cache:
    ctx.cache["pair_scores"] = ctx.placement.jit_gather(
      _pair_scores, static_argnames=("config", "pooling", "share_prompt")
    )
  return ctx.cache["pair_scores"]


def _heldout_scores(
  ctx: Context, params: Any, ds: TokenizedDataset
) -> tuple[np.ndarray, np.ndarray]:
  """(chosen f32[N], rejected f32[N]) reward-model scores of ``ds``."""
  ctx.programs.wait(PAIR_SCORES)
  return ctx.placement.map_rows(
    lambda batch: _scorer(ctx)(params, batch, **_score_kwargs(ctx)),
    ds,
    ctx.config.rm.batch_size * 2,
  )


# ``ctx.programs``' key of the held-out scorer.
PAIR_SCORES = "pair_scores"


def heldout_scores_program(
  ctx: Context, params: Any, rows: TokenizedDataset, n: int
) -> StepProgram:
  """``_heldout_scores``' program for ``n`` held-out pairs like ``rows``.

  Args:
    ctx: the run.
    params: the reward model's params (abstract).
    rows: pairs like the held-out ones.
    n: the number of held-out pairs (the batch is ``map_rows``').

  Returns:
    The program (``runner.precompile.StepProgram``, no ``init``).
  """
  size = ctx.placement.rows_per_call(ctx.config.rm.batch_size * 2, n)
  batch = ctx.placement.abstract_batch(rows.pad_row, rows.batch_type, size)
  return StepProgram(_scorer(ctx), None, (params, batch), _score_kwargs(ctx))


def rm_heldout(
  ctx: Context,
  params: Any,
  prefs: dict,
  scores: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
  """Held-out accuracy vs the annotator labels and vs the gold order
  (``scores``: the held-out scores when already computed)."""
  ds: TokenizedDataset = prefs["eval"]
  n = len(ds)
  rc, rr = scores or _heldout_scores(ctx, params, ds)
  acc = float(np.mean(rc > rr))
  out = {
    "rm/eval_accuracy": acc,
    "rm/eval_accuracy_stderr": accuracy_stderr(acc, n),
    "rm/eval_ties": float(np.mean(rc == rr)),
    "rm/eval_margin": float(np.mean(rc - rr)),
  }
  base = prefs.get("eval_length_baseline")
  if base is not None:
    out["rm/eval_length_baseline_accuracy"] = base["accuracy"]
  noiseless = prefs["eval_noiseless"]
  if noiseless is not None:
    agree = np.where(noiseless, rc > rr, rr > rc)
    out["rm/eval_gold_accuracy"] = float(np.mean(agree))
  return out


def heldout_audit(
  ds: TokenizedDataset, chosen: np.ndarray, rejected: np.ndarray
) -> dict[str, Any]:
  """Calibration and length-bucket accuracy of the held-out scores
  (``audit.reward_model_audit``; lengths in response tokens)."""
  out = audit.reward_model_audit(
    chosen,
    rejected,
    ds.arrays["chosen_mask"].sum(1),
    ds.arrays["rejected_mask"].sum(1),
  )
  out["length_unit"] = "tokens"
  return out


def _save_rm(ctx: Context, params: Any) -> None:
  params = host_tree(params)
  if ctx.primary:
    write_reward_model(
      ctx.run_dir,
      params,
      ctx.model_config,
      ctx.model_dir,
      ctx.config.rm.loss.pooling,
    )


def write_reward_model(
  run_dir: pathlib.Path,
  params: Any,
  model_config: models.ModelConfig,
  tokenizer_dir: pathlib.Path | None,
  pooling: str,
) -> pathlib.Path:
  """Writes ``<run_dir>/outputs/rm`` (atomically), which ``load_rm`` reads.

  Args:
    run_dir: the run directory.
    params: host {"backbone", "head"} params (``host_tree``; call it on
      every process, write on the primary one).
    model_config: the backbone's config.
    tokenizer_dir: its tokenizer files (tokenizer.json, tokenizer_config.json,
      ...) are copied alongside; None copies none.
    pooling: "last" or "mean", kept in the head file's metadata.

  Returns:
    the outputs/rm directory: the backbone as a causal LM in the
    transformers format plus reward_head/model.safetensors.

  Raises:
    UserError: outputs/rm cannot be written (names the path and why).
  """

  with runtime.atomic_dir(run_dir / "outputs" / "rm") as out:
    models.export_hf_checkpoint(
      params["backbone"], model_config, out, tokenizer_dir=tokenizer_dir
    )
    (out / HEAD_DIR).mkdir(exist_ok=True)
    models.write_safetensors(
      params["head"], out / HEAD_FILE, metadata={"pooling": pooling}
    )
  return run_dir / "outputs" / "rm"


def load_rm(
  path: pathlib.Path, placement: Placement | None = None
) -> tuple[models.ModelConfig, Any, str]:
  """A reward model: (config, {"backbone", "head"} params, pooling).

  Args:
    path: a run directory (its outputs/rm), an exported reward-model
      directory in the rlhf_jax format (a causal LM plus
      reward_head/model.safetensors), or a Hugging Face
      *ForSequenceClassification directory (config.json architectures;
      written by `rlhf-jax export --what rm` or by transformers).
    placement: lay the params out on this mesh (default: one device).

  Returns:
    pooling: "last" or "mean", where the head reads the sequence (saved
    with the head; "last" when the file does not say, and always for a
    sequence-classification directory).

  Raises:
    UserError: no reward model there; a head file that is not readable or
      not {"kernel" [D], "bias" []} (`_check_rm_head`).
    ModelLoadError: a sequence-classification directory that cannot be
      read (names the file and tensor).
  """
  from safetensors import safe_open

  from rlhf_jax.models import seq_cls

  path = pathlib.Path(path)
  placement = placement or Placement.create(
    MeshConfig(data=1), jax.devices()[:1]
  )
  out = backbone_dir(path)
  if out == path and seq_cls.is_sequence_classification(path):
    config, params = seq_cls.load_sequence_classification(
      path, shardings=placement.scalar_model_shardings
    )
    return config, params, "last"
  # A readable head of the expected shapes, before the backbone's weights.
  _check_rm_head(out, models.load_hf_config(out))
  config, backbone = placement.load_model(out)
  with safe_open(str(out / HEAD_FILE), "numpy") as h:
    head = {k: h.get_tensor(k) for k in h.keys()}
    pooling = (h.metadata() or {}).get("pooling", "last")
  head_sh = placement.scalar_model_shardings(config)["head"]
  params = {"backbone": backbone, "head": placement.put(head, head_sh)}
  return config, params, pooling


def is_reward_model_dir(path: pathlib.Path) -> bool:
  """A reward model's directory: a *ForSequenceClassification config, or
  rlhf_jax's own format (a causal LM beside ``HEAD_FILE``)."""
  from rlhf_jax.models import seq_cls

  return (
    seq_cls.is_sequence_classification(path) or (path / HEAD_FILE).is_file()
  )


def backbone_dir(path: pathlib.Path) -> pathlib.Path:
  """The directory whose config.json describes a reward model's backbone.

  Args:
    path: a *ForSequenceClassification directory or an export of
      `rlhf-jax rm` (returned as is), or a run directory of `rlhf-jax rm`
      (its outputs/rm is returned).

  Raises:
    UserError: no reward model there.
  """
  if path.is_file():
    raise runtime.UserError(
      f"{path}: a file; expected a reward-model directory (a run or an "
      "export of `rlhf-jax rm`, or a *ForSequenceClassification directory)"
    )
  if is_reward_model_dir(path):
    return path
  if (path / "outputs" / "rm" / HEAD_FILE).is_file():
    return path / "outputs" / "rm"
  raise runtime.UserError(
    f"{path}: no reward model here (expected a *ForSequenceClassification "
    f"config.json, or {HEAD_FILE} in the directory or in its outputs/rm: "
    "a run or an export of `rlhf-jax rm`)"
  )


def check_reward_model(
  config: PipelineConfig, model_dir: pathlib.Path, *, values: bool
) -> None:
  """--reward-model, before any work starts: a reward model is there, it
  is the policy's architecture (`_check_same_architecture`), its learned
  positions, if any, hold the rows it will score (the same lengths as the
  policy's, `environment.check_positions`), and its weight and head files
  are readable with the expected tensors, the weights finite.

  Args:
    config: the PipelineConfig; nothing is checked without --reward-model.
    model_dir: the policy's model directory.
    values: read the backbone's weights for NaN and inf (False: headers
      only, for ``--dry-run``).

  Raises:
    UserError: one line naming --reward-model and what is wrong.
  """
  from rlhf_jax.models import seq_cls

  if config.reward_model is None:
    return
  source = pathlib.Path(config.reward_model)
  try:
    rm_dir = backbone_dir(source)
    # config.json, the safetensors headers and finite weights.
    rm_config = models.check_hf_checkpoint(
      rm_dir,
      sequence_classification=seq_cls.is_sequence_classification(rm_dir),
      values=values,
    )
  except (runtime.UserError, models.ModelLoadError) as e:
    raise runtime.UserError(f"--reward-model {e}") from None
  except OSError as e:
    raise runtime.UserError(
      f"--reward-model {source}: cannot read {e.filename}: {e.strerror}"
    ) from None
  try:
    policy_config = models.load_hf_config(model_dir)
  except models.ModelLoadError:
    return  # the policy's loader names it in its words, next
  _check_same_architecture(source, rm_config, policy_config)
  try:
    environment.check_positions(config, rm_dir)
    _check_rm_head(rm_dir, rm_config)
  except runtime.UserError as e:
    raise runtime.UserError(f"--reward-model {source}: {e}") from None


# Float head dtypes (safetensors' numpy reader gives bfloat16 through
# ml_dtypes); `rlhf-jax rm` writes F32, or BF16 with a bf16 param_dtype.
_HEAD_DTYPES = ("F32", "BF16", "F16", "F64")


def _check_rm_head(rm_dir: pathlib.Path, config: models.ModelConfig) -> None:
  """In the rlhf_jax layout, the reward model's head file: "kernel" f32[D]
  and "bias" f32[] (what `write_reward_model` writes), floating point and
  finite (D + 1 numbers, read whole).

  Raises:
    UserError: names the file and what is wrong.
  """
  import numpy as np
  from safetensors import SafetensorError, safe_open

  from rlhf_jax.models import seq_cls

  if seq_cls.is_sequence_classification(rm_dir):
    return  # its head is a tensor of the weights, checked when loaded
  head = rm_dir / HEAD_FILE
  want = {"kernel": (config.hidden_size,), "bias": ()}
  bad, values = {}, {}
  try:
    with safe_open(str(head), "numpy") as f:
      got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
      if got == want:
        kinds = {k: f.get_slice(k).get_dtype() for k in want}
        bad = {k: d for k, d in kinds.items() if d not in _HEAD_DTYPES}
        values = {} if bad else {k: f.get_tensor(k) for k in want}
  except (OSError, SafetensorError) as e:
    raise runtime.UserError(
      f"{head}: not a readable safetensors file ({e})"
    ) from None
  if got != want:
    raise runtime.UserError(
      f"{head}: tensors {got}; expected {want} (kernel [hidden_size], "
      "bias [], as `rlhf-jax rm` writes them)"
    )
  if bad:
    raise runtime.UserError(
      f"{head}: tensor dtypes {bad}; expected floating point (F32 or BF16 "
      "as `rlhf-jax rm` writes them, F16, F64)"
    )
  for k, v in values.items():
    if not np.isfinite(np.asarray(v, np.float64)).all():
      raise runtime.UserError(
        f"{head}: tensor {k!r} holds non-finite values (NaN or inf); "
        "expected the finite weights of a trained head"
      )


# The fields that make two checkpoints the same network (dtypes aside).
_ARCHITECTURE = (
  "model_type",
  "vocab_size",
  "hidden_size",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "intermediate_size",
  "tie_word_embeddings",
)


def _check_same_architecture(source, rm_config, policy_config) -> None:
  """The critic starts from the reward model and both score with the
  policy's config, so they must be the same network.

  Raises:
    UserError: names the first field that differs.
  """
  for field in _ARCHITECTURE:
    a, b = getattr(rm_config, field), getattr(policy_config, field)
    if a != b:
      raise runtime.UserError(
        f"--reward-model {source}: {field} = {a!r}, the policy's is {b!r}; "
        "the reward model must be the policy's architecture with its "
        "tokenizer (train it with `rlhf-jax rm --model <policy>`)"
      )


def reward_model_for_eval(ctx: Context) -> Any | None:
  """The reward model on the mesh: --reward-model, else the run's trained
  one (None before stage rm). Its pooling goes to ctx.cache["rm_pooling"].

  Raises:
    UserError: a --reward-model whose vocabulary differs from the policy's.
  """
  if "rm_params" not in ctx.cache:
    rm, pooling, source = (
      None,
      ctx.config.rm.loss.pooling,
      ctx.config.reward_model,
    )
    if source is None and (ctx.run_dir / "outputs" / "rm" / HEAD_FILE).exists():
      source = ctx.run_dir
    if source is not None:
      config, rm, saved = load_rm(source, ctx.placement)
      # This run's own head reads the sequence as its config says.
      pooling = pooling if source == ctx.run_dir else saved
      _check_same_architecture(source, config, ctx.model_config)
    ctx.cache["rm_params"], ctx.cache["rm_pooling"] = rm, pooling
  return ctx.cache["rm_params"]


def rm_program(ctx: Context, rows: TokenizedDataset, batch: int) -> StepProgram:
  """The reward-model step, built without weights.

  Args:
    ctx: the run.
    rows: pairs like the first call's (``pairs_dataset(ctx, [])`` before
      the feedback exists).
    batch: the first call's number of pairs.

  Returns:
    The program (``runner.precompile.StepProgram``).
  """
  cfg = ctx.config.rm
  init, opt, state, shardings = _abstract_train_state(ctx)
  step = ctx.placement.jit_step(
    make_reward_model_step(ctx.model_config, opt, cfg.loss), shardings
  )
  batch_abstract = ctx.placement.abstract_batch(
    rows.pad_row, rows.batch_type, batch
  )
  return StepProgram(step=step, init=init, args=(state, batch_abstract))


def _abstract_train_state(ctx: Context) -> tuple[Any, Any, Any, Any]:
  # (init, optimizer, abstract state, state shardings) of the rm stage.
  cfg = ctx.config.rm
  opt = optimizer(
    cfg.learning_rate,
    cfg.warmup_steps,
    cfg.max_grad_norm,
    decay_steps=cfg.steps,
    weight_decay=cfg.weight_decay,
  )

  def init(p: Any, r: jax.Array) -> TrainState:
    return TrainState.create(p, opt, r)

  key = ctx.key("rm")
  params = jax.eval_shape(
    lambda p, k: models.from_policy_params(p, ctx.model_config, k),
    ctx.ref_params,
    key,
  )
  state, shardings = ctx.placement.abstract_state(
    init,
    params,
    key,
    param_axes=[models.scalar_model_logical_axes(ctx.model_config)],
  )
  return init, opt, state, shardings


def abstract_reward_model(ctx: Context) -> Any:
  """The trained reward model's params as the rm stage lays them out
  (``jax.ShapeDtypeStruct``s with shardings), computing nothing."""
  return _abstract_train_state(ctx)[2].params


# The Precompiler gate the reward-model stage opens once its state exists.
RM_TRAINING = "rm-training"


def rm_key(ctx: Context) -> tuple:
  """``ctx.programs``' key of the reward-model step."""
  return ("rm", ctx.model_config)


def stage_rm(ctx: Context) -> dict:
  """Bradley-Terry reward model from the policy checkpoint + a new head."""
  cfg = ctx.config.rm
  prefs = preference_data(ctx)
  key = ctx.key("rm")
  params = models.from_policy_params(
    ctx.ref_params, ctx.model_config, jax.random.fold_in(key, 0)
  )
  batch = train_batch_size(ctx, cfg.batch_size, prefs, "--rm.batch-size")
  prog = ctx.programs.get(
    rm_key(ctx), lambda: rm_program(ctx, prefs["train"], batch)
  )
  state, _ = ctx.placement.init_state(
    prog.init,
    params,
    jax.random.fold_in(key, 1),
    shardings=prog.state_shardings,
  )
  step = prog.step
  # The step is compiled by now (unless the batch was cut): PPO's turn.
  ctx.programs.release(RM_TRAINING)
  it = BatchIterator(
    prefs["train"], global_batch_size=batch, seed=ctx.config.seed
  )
  loop = ctx.loop("rm", cfg.steps, show=("rm/loss", "rm/accuracy"))
  state, start = loop.restore(state, it)

  def evaluate(step_index: int, state: Any, record: dict) -> None:
    del step_index
    record.update(rm_heldout(ctx, state.params, prefs))

  state, final = loop.run(
    state,
    start,
    lambda s: step(s, ctx.placement.batch(next(it).batch)),
    iterator=it,
    evaluate=evaluate,
    eval_every=cfg.eval_every,
  )
  loop.close()
  _save_rm(ctx, state.params)
  # Later stages use the trained params as they are (other processes must
  # not read outputs/rm while process 0 may still be writing it).
  ctx.cache["rm_params"] = state.params
  ctx.cache["rm_pooling"] = cfg.loss.pooling
  scores = _heldout_scores(ctx, state.params, prefs["eval"])
  heldout = rm_heldout(ctx, state.params, prefs, scores)
  return {
    "final_train": {k: v for k, v in final.items() if "eval" not in k},
    "heldout": heldout,
    "audit": heldout_audit(prefs["eval"], *scores),
    "train_pairs": len(prefs["train"]),
    "eval_pairs": len(prefs["eval"]),
    "counts": prefs["counts"],
  }
