"""`rlhf-jax kto`: KTO on accept/reject feedback (Ethayarajh et al. 2024).

With ``--data FILE``: {prompt, completion, label} rows (``label`` true =
accepted), a tenth of the distinct rows (at least 2) held out,
``train.make_kto_step`` on the mesh of ``--mesh.*`` with the runner's
checkpoints and ``--resume``;
the reference is the initial policy (with ``--lora.rank > 0`` the frozen
base, adapters off). Held-out evaluation reports the loss, the KL estimate
and the accuracy of the implicit reward's side of the reference point
(``train.kto.kto_eval_stats``). Bad rows stop the run with one line naming
the file, the line and the field (exit 2).

Without ``--data``: the accept-rate task (stages/kto_online.py).
"""

import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.data import (
  BatchIterator,
  DataError,
  HFTokenizerAdapter,
  TokenizedDataset,
  UnpairedExample,
  detected,
  load_examples,
  row_kind,
  tokenize_unpaired,
)
from rlhf_jax.data.errors import prompt_room_as
from rlhf_jax.models import lora
from rlhf_jax.runner import runtime
from rlhf_jax.runner.loop import TrainLoop
from rlhf_jax.runner.mesh import Placement, spec_str
from rlhf_jax.stages import continuation, environment
from rlhf_jax.stages.common import (
  data_source,
  finished_summary,
  host_tree,
  load_policy,
  open_run_dir,
  optimizer,
  policy_tokenizer,
)
from rlhf_jax.stages.configs import KTOStageConfig
from rlhf_jax.stages.continuation import steps_growable
from rlhf_jax.stages.report import print_summary, write_policy_outputs
from rlhf_jax.stages.unread import unread_fields
from rlhf_jax.stages.user_data import (
  capped_batch,
  check_dropped,
  check_max_dropped_frac,
  data_counts,
  fit_to_data,
  held_data_warnings,
  kept_examples,
  split_distinct,
  template_of,
)
from rlhf_jax.train import TrainState, make_kto_step
from rlhf_jax.train.kto import kto_eval_stats

_SHOW = ("kto/loss", "kto/kl", "rewards/chosen")


def read_unpaired(config: KTOStageConfig, tok: Any):
  """The rows of --data, checked, tokenized and split.

  Returns:
    (train dataset, held-out dataset, counts): rows read, kept and dropped
    per reason, accepted and rejected rows, truncations.

  Raises:
    DataError: a bad file (file, line and field named), rows that are not
      {prompt, completion, label}, fewer than 4 rows.
    UserError: more than --data-max-dropped-frac of the rows dropped.
  """
  check_max_dropped_frac(config.data_max_dropped_frac)
  path = config.data
  with held_data_warnings(replay=True):
    loaded = load_examples(
      path, strict=config.strict, chat_template=template_of(tok)
    )
    check_dropped(path, loaded.drops, config.data_max_dropped_frac)
  first = loaded.examples[0]
  if not isinstance(first, UnpairedExample):
    raise DataError(
      f"{path}: expected {{prompt, completion, label}} rows (accept/reject "
      f"feedback), got {row_kind(first)}{detected(loaded, path)}"
    )
  if len(loaded.examples) < 4:
    raise DataError(f"{path}: need at least 4 rows, got {len(loaded.examples)}")
  with prompt_room_as("--max-prompt-length"):
    ds = tokenize_unpaired(
      loaded.examples,
      HFTokenizerAdapter.wrap(tok),
      max_prompt_length=config.max_prompt_length,
      max_response_length=config.max_response_length,
    )
  # A tenth of the distinct rows (at least 2) held out: a repeated row's
  # copies, and a (prompt, completion) labelled both ways, on one side
  # (held out, the other was trained on); the contradictions are counted.
  keys = [(e.prompt, e.completion, e.label) for e in kept_examples(loaded, ds)]
  groups = [k[:2] for k in keys]
  if len(set(groups)) < 4:
    raise DataError(
      f"{path}: need at least 4 distinct rows (prompt and completion), got "
      f"{len(set(groups))}"
    )
  train, held = split_distinct(groups, config.seed, least=2)
  labels = ds.arrays["labels"]
  counts = {
    "data/examples": len(ds),
    "data/accepted": int(labels.sum()),
    "data/rejected": int((~labels).sum()),
    "data/conflicting_labels": _conflicting(keys, path),
    **data_counts("data", loaded.drops, ds.truncation),
  }
  return ds.subset(train), ds.subset(held), counts


def _conflicting(keys: list[tuple[str, str, bool]], path: Any) -> int:
  """How many rows repeat an earlier (prompt, completion) with the other
  label; a warning on stderr when any do."""
  first: dict[tuple[str, str], bool] = {}
  n = 0
  for prompt, completion, label in keys:
    n += first.setdefault((prompt, completion), label) != label
  if n and runtime.is_primary_process():
    sys.stderr.write(
      f"rlhf-jax: warning: --data {path}: {n} rows give a (prompt, "
      "completion) of an earlier row the other label: contradicting "
      "labels; they are kept, each with the other on one side of the "
      "held-out split\n"
    )
  return n


def heldout_metrics(placement, params, ref, ds, config, model_config):
  """kto_eval_stats over the held-out rows (batches of --batch-size, the
  last padded), merged; keys ``kto/eval_*``. The reward gap (accepted
  minus rejected mean reward) only when the rows hold both labels: a
  side with no rows has no mean."""
  size = config.batch_size
  fn = jax.jit(kto_eval_stats, static_argnames=("model_config", "config"))
  merged = None
  for start in range(0, len(ds), size):
    idx = np.arange(start, start + size)
    batch = ds.take(np.where(idx < len(ds), idx, -1))
    stats = fn(
      params,
      ref,
      placement.batch(batch),
      model_config=model_config,
      config=config.loss,
    )
    merged = stats if merged is None else st.merge(merged, stats)
  values = {k: float(v) for k, v in st.values(merged).items()}
  keep = ("kto/loss", "kto/kl", "kto/accuracy")
  out = {k.replace("kto/", "kto/eval_"): values[k] for k in keep}
  labels = ds.arrays["labels"]
  if labels.any() and not labels.all():
    out["kto/eval_reward_gap"] = (
      values["rewards/chosen"] - values["rewards/rejected"]
    )
  return out


def say_one_label(
  path: str,
  train: TokenizedDataset,
  held: TokenizedDataset,
  primary: bool,
  log: Callable[[str], Any],
) -> None:
  """When a side has no rows, says so. A warning on stderr (from the
  primary process) when the training rows all have one label (the whole
  file, or what is left once the held-out tenth is taken): KTO then
  trains one term of its loss only (Ethayarajh et al. 2024, eq. 7-8). A
  log line when the held-out rows do: kto/eval_reward_gap, a difference
  of the two sides' means, is then not reported."""
  labels = train.arrays["labels"]
  if (labels.all() or not labels.any()) and primary:
    said = "true, none rejected" if labels.all() else "false, none accepted"
    sys.stderr.write(
      f"rlhf-jax: warning: --data {path}: all {len(labels)} training rows "
      f"are labelled {said}: only one term of the KTO loss trains\n"
    )
  labels = held.arrays["labels"]
  if labels.all() or not labels.any():
    side = "accepted" if labels.all() else "rejected"
    log(
      f"kto: the {len(labels)} held-out rows are all {side}: "
      "kto/eval_reward_gap is not reported"
    )


def _policy(config, model_config, params):
  """(model_config, params, optimizer); LoRA adapters when asked."""
  opt = optimizer(
    config.learning_rate, config.warmup_steps, config.max_grad_norm
  )
  if not config.lora.enabled:
    return model_config, params, opt
  model_config = lora.configure(model_config, config.lora)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  params = lora.add_adapters(params, model_config, key)
  return model_config, params, lora.trainable_optimizer(opt)


def _batch_size(config, placement, rows: int, log) -> int:
  """--batch-size, cut to the training rows (an even number of them:
  batches hold pairs of rows) and checked before the run directory.

  Raises:
    MeshError, UserError: it does not split over the mesh or the
      micro-batches.
  """
  even = rows - rows % 2
  what = "training rows" if even == rows else f"usable rows (of {rows})"
  size = capped_batch(
    "kto", "--batch-size", config.batch_size, even, log, placement, what
  )
  if size % config.loss.num_micro_batches:
    raise runtime.UserError(
      f"--batch-size {config.batch_size}: {rows} training rows give "
      f"batches of {size}, not divisible by --loss.num-micro-batches "
      f"{config.loss.num_micro_batches}"
    )
  return size


def _train(config, placement, model_config, params, data, run_dir, size):
  """The KTO steps in the runner's loop; returns (state, last record,
  model config, the step it started from)."""
  train, held = data
  ref_params = params
  model_config, params, opt = _policy(config, model_config, params)
  state, shardings = placement.init_state(
    lambda p, k: TrainState.create(p, opt, k),
    params,
    jax.random.key(config.seed),
    param_axes=[models.param_logical_axes(model_config)],
  )
  ref = () if config.lora.enabled else (ref_params,)
  step = placement.jit_step(
    make_kto_step(model_config, opt, config.loss), shardings, extra=ref
  )
  it = BatchIterator(train, global_batch_size=size, seed=config.seed)

  def evaluate(step_index, state, record):
    del step_index
    ref_eval = None if config.lora.enabled else ref_params
    record.update(
      heldout_metrics(
        placement, state.params, ref_eval, held, config, model_config
      )
    )

  with runtime.StopFlag() as stop:
    loop = TrainLoop(
      "kto",
      run_dir,
      config.steps,
      stop,
      checkpoint_every=config.checkpoint_every,
      tensorboard=config.tensorboard,
      show=_SHOW,
      write=placement.is_primary,
      keep=config.keep_checkpoints,
      max_skipped_fraction=config.max_skipped_fraction,
      data_source=data_source(config),
    )
    state, start = loop.restore(state, it)
    state, last = loop.run(
      state,
      start,
      lambda s: step(s, placement.batch(next(it).batch), *ref),
      iterator=it,
      evaluate=evaluate,
      eval_every=config.eval_every,
    )
    loop.close()
  return state, last, model_config, start


def _check_sizes(config: KTOStageConfig, placement: Placement) -> None:
  placement.check_batch(config.batch_size, "--batch-size")
  if config.batch_size % 2:
    raise runtime.UserError(
      f"--batch-size {config.batch_size}: expected an even number (adjacent "
      "rows are the KL estimate's mismatched pairs)"
    )


def run_kto_data(config: KTOStageConfig, log=print) -> dict[str, Any]:
  """KTO on --data; returns the summary (also summary.json).

  Raises:
    UserError, DataError: bad options or data (one-line messages).
    Interrupted: SIGINT/SIGTERM after a checkpoint was saved.
  """
  environment.setup_jax()
  environment.start(config.distributed)
  log = runtime.primary_log(log)  # each line once in a multi-host run
  timer = runtime.Timer()
  model_dir = environment.resolve_model(config.model)
  environment.check_lora(config.lora, model_dir)
  environment.check_data_lengths(config, model_dir)
  if not pathlib.Path(config.data).exists():
    raise DataError(f"--data {config.data}: no such file or directory")
  placement = Placement.create(config.mesh)
  _check_sizes(config, placement)
  tok = policy_tokenizer(model_dir)
  # The whole file read and tokenized before the run directory is opened.
  train, held, counts = read_unpaired(config, tok)
  size = _batch_size(config, placement, len(train), log)
  counts["kto/batch_size"] = size
  (train, held), padded = fit_to_data("kto", log, train, held)
  counts.update(padded)
  say_one_label(config.data, train, held, placement.is_primary, log)
  unread = unread_fields("kto", config)
  run_dir = open_run_dir(
    "kto", config, model_dir, unread, lambda d: steps_growable("kto", config, d)
  )
  log(f"rlhf-jax kto: run directory {run_dir}")
  model_config, params = load_policy(placement, model_dir)
  path, spec = placement.sharded_leaf(params)
  log(f"{placement.describe()}; params{path} sharded {spec_str(spec)}")
  state, last, model_config, start = _train(
    config, placement, model_config, params, (train, held), run_dir, size
  )
  done = finished_summary("kto", run_dir, start, config.steps, log)
  if done is not None:
    return done
  host = host_tree(state.params)
  summary = {
    "kto/final_loss": last.get("kto/loss", float("nan")),
    **{k: v for k, v in last.items() if k.startswith("kto/eval_")},
    "kto/steps": config.steps,  # a longer --resume goes on from here
    **counts,
    **continuation.with_earlier_time(timer.times(), run_dir),
  }
  if placement.is_primary:
    write_policy_outputs(run_dir, "kto", host, model_config, model_dir, summary)
  return summary


def run_kto(config: KTOStageConfig, log=print) -> int:
  """`rlhf-jax kto`: --data, or the accept-rate task; prints the summary.

  Returns:
    0 (errors are raised as UserError / DataError).
  """
  if config.data is None:
    from rlhf_jax.stages.kto_online import run_accept_rate

    summary = run_accept_rate(config, log)
  else:
    summary = run_kto_data(config, log)
  print_summary("kto", config, summary, log)
  return 0
