"""The tools around a run: generate, eval and export."""

import dataclasses
import functools
import json
import os
import pathlib
import secrets
import shutil
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jinja2
import numpy as np

from rlhf_jax import models
from rlhf_jax.runner import runtime
from rlhf_jax.runner.config_json import config_from_dict, shown
from rlhf_jax.runner.mesh import MeshConfig, Placement
from rlhf_jax.stages import configs as C
from rlhf_jax.stages import environment
from rlhf_jax.stages.validate import problems

if typing.TYPE_CHECKING:
  from rlhf_jax.data import HFTokenizerAdapter, TokenizedDataset

# The policies of a run, as --policy names them ("initial" is the model
# the run started from; the others are outputs/<name>).
POLICIES = typing.get_args(typing.get_type_hints(C.EvalConfig)["policy"])
TRAINED = tuple(p for p in POLICIES if p != "initial")
# The HH-RLHF reward-model job (`rlhf-jax rm --preset hh-rlhf*`,
# stages.hh_rm) writes its settings at the top level of config.json.
_HH_KEYS = ("heldout_file", "backbone", "pooling")


def _hh_settings(path: pathlib.Path) -> dict[str, Any] | None:
  """The settings in the config.json of an HH-RLHF reward-model run, or
  None when it is not one.

  Raises:
    UserError: the file cannot be read (permission; names it).
  """
  try:
    with runtime.reading(path):
      data = runtime.read_json(path)
  except ValueError:  # JSONDecodeError, UnicodeDecodeError
    return None
  if isinstance(data, dict) and "config" not in data:
    if all(k in data for k in _HH_KEYS):
      return data
  return None


def _run_record(run_dir: pathlib.Path) -> dict[str, Any]:
  """The run's config.json (``runtime.load_run_record``) with its
  "model_dir"; that of an HH-RLHF reward-model run as
  ``{"command": "rm", "hh_rlhf": True, "config": ...}``.

  Raises:
    UserError: no such directory, or no run's config.json (names --run-dir
      or the file).
  """
  if run_dir.exists() and not run_dir.is_dir():
    raise runtime.UserError(f"--run-dir {run_dir}: is a file, not a directory")
  if not run_dir.is_dir():
    raise runtime.UserError(f"--run-dir {run_dir}: no such directory")
  path = run_dir / runtime.CONFIG_FILE
  if not path.is_file():
    raise runtime.UserError(
      f"{run_dir} is not a run directory (no config.json)"
    )
  try:
    record = runtime.with_resolved_paths(runtime.load_run_record(path), run_dir)
  except runtime.UserError:
    hh = _hh_settings(path)
    if hh is None:
      raise
    return {"command": "rm", "hh_rlhf": True, "config": hh, "model_dir": None}
  model_dir = record.get("model_dir")
  if model_dir is not None and not isinstance(model_dir, str):
    raise runtime.UserError(
      f"{path}: model_dir: expected a string, got {shown(model_dir)}"
    )
  if model_dir is None:
    if isinstance(record.get("command"), str):
      raise runtime.UserError(
        f"{run_dir} holds the output of `rlhf-jax {record['command']}`, not "
        f'a training run ({path} has no "model_dir")'
      )
    raise runtime.UserError(
      f'{path}: not a run\'s config.json (no "model_dir")'
    )
  environment.check_cache_outside(model_dir, "the run's model folder")
  return record


def _no_policy(run_dir: pathlib.Path, to: str, who: str) -> runtime.UserError:
  """The error for a run that trained no policy (an HH-RLHF reward model):
  "it has no policy<to>; <who> needs ..."."""
  return runtime.UserError(
    f"{run_dir} is a reward-model-only run (`rlhf-jax rm --preset "
    f"hh-rlhf...`): it has no policy{to}; {who} needs the run directory of "
    "`rlhf-jax run`, `ppo`, `dpo` or `grpo`"
  )


def _trained(run_dir: pathlib.Path, names: Sequence[str]) -> list[str]:
  """Those of ``names`` the run has trained (outputs/<name>/config.json)."""
  return [
    n for n in names if (run_dir / "outputs" / n / "config.json").is_file()
  ]


def _policy_dir(
  run_dir: pathlib.Path,
  record: dict[str, Any],
  policy: str,
  flag: str = "--policy",
) -> pathlib.Path:
  """The checkpoint directory of the run's ``policy``.

  Raises:
    UserError: the run has no such policy (lists those it has, for
      ``flag``).
  """
  if record.get("hh_rlhf"):
    raise _no_policy(run_dir, "", f"{flag} {policy}")
  if policy == "initial":
    return pathlib.Path(record["model_dir"])
  out = run_dir / "outputs" / policy
  if not (out / "config.json").is_file():
    # export's --what takes the reward model too.
    names = (*TRAINED, "rm") if flag == "--what" else TRAINED
    has = ["initial"] if flag == "--policy" else []
    has += _trained(run_dir, names)
    raise runtime.UserError(
      f"{run_dir} has no trained {policy} policy ({out}); its "
      f"{'models' if flag == '--what' else 'policies'}: "
      f"{', '.join(has) or 'none'} (choose with {flag})"
    )
  return out


# --------------------------------------------------------------- generate


def _say_initial(run_dir: pathlib.Path) -> None:
  """Warns that ``generate --run-dir`` samples the run's initial
  (untrained) policy, the default, and names its trained ones."""
  trained = _trained(run_dir, TRAINED)
  has = "it has no trained policy yet"
  if trained:
    has = f"its trained policies: {', '.join(trained)} (choose with --policy)"
  sys.stderr.write(
    f"rlhf-jax: warning: sampling the initial policy of {run_dir} (the "
    f"untrained model); {has}\n"
  )


def _model_part(path: pathlib.Path) -> str | None:
  """Why --output must not write ``path``: it lies in a model directory
  (config.json beside safetensors, or an export); None otherwise."""
  folder = path.resolve().parent
  if (folder / EXPORT_MARKER).is_file() or (
    (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
  ):
    return f"it lies in the model directory {folder}"
  return None


def _check_output(output: str, overwrite: bool) -> pathlib.Path:
  """--output as a path, checked before any sampling.

  Raises:
    runtime.UserError: it is a directory, a symbolic link, a device or
      pipe, an existing file without --overwrite, under a path that is a
      file, a run's own file, or in a folder that cannot be written.
  """
  out = pathlib.Path(output)
  why = runtime.run_part(out) or _model_part(out)
  if why is not None:
    raise runtime.UserError(f"--output {out}: {why}; choose another file")
  if out.is_dir() or output.endswith(os.sep):
    raise runtime.UserError(f"--output {output}: is a directory, not a file")
  # The file is written beside and renamed over the path: a link itself
  # would be replaced (/dev/stdout, a link into /proc, for the whole
  # machine when run as root), and so would a device, pipe or socket.
  if out.is_symlink():
    raise runtime.UserError(
      f"--output {output}: is a symbolic link (to {os.readlink(out)}), "
      "which the samples' file would replace; the samples are printed on "
      "stdout anyway: give the file it points to, or another path"
    )
  if out.exists() and not out.is_file():
    raise runtime.UserError(
      f"--output {output}: is not a regular file (a device, pipe or socket, "
      "which the samples' file would replace); the samples are printed on "
      "stdout anyway: choose a file"
    )
  if out.exists() and not overwrite:
    raise runtime.UserError(
      f"--output {out}: exists; pass --overwrite to replace it"
    )
  runtime.check_folder_writable(
    out.parent, "--output", out, "nothing was sampled"
  )
  if (run := runtime.enclosing_run(out)) is not None:  # allowed, but say so
    sys.stderr.write(
      f"rlhf-jax: warning: --output {out.parent.resolve() / out.name} lies "
      "inside the run "
      f"directory {run}; that run's --overwrite refuses to clear it until "
      "it is moved out\n"
    )
  return out


def _check_not_files(prompts: list[str]) -> None:
  """Raises UserError for a --prompts value that is the path of a file
  (one word, and it exists): ppo and grpo read --prompts from a file, and
  generate took the path itself as the text to continue."""
  for i, p in enumerate(prompts, 1):
    if p.strip() and len(p.split()) == 1 and pathlib.Path(p).is_file():
      raise runtime.UserError(
        f"--prompts value {i} {p!r} names a file; generate's --prompts are "
        "the texts to continue themselves (ppo and grpo take a file of them)"
      )


def _check_language_model(model_dir: pathlib.Path) -> None:
  """generate samples from a language model: not a run directory, nor a
  reward model's export.

  Raises:
    UserError: a run directory (its config.json read as a model's with
      no model_type), a *ForSequenceClassification directory (it read as
      "tensors not used ... score.weight") or rlhf_jax's reward-model
      format (its backbone was sampled from without a word).
  """
  from rlhf_jax.stages.rm import is_reward_model_dir

  if (model_dir / runtime.RUN_MARKER).is_file():  # config.json is the run's
    trained = _trained(model_dir, TRAINED)
    policy = f" --policy {trained[0]}" if trained else ""
    raise runtime.UserError(
      f"--model {model_dir}: a run directory, not a model; sample its "
      f"policy with --run-dir {model_dir}{policy}"
    )
  if is_reward_model_dir(model_dir):
    raise runtime.UserError(
      f"--model {model_dir}: a reward model (it scores texts and has no "
      "language-model head to sample from); pass a policy model, or a run "
      "with --run-dir and --policy"
    )


def _chat_turns(tok: Any, model_dir: pathlib.Path, prompts: list[str]):
  """Each prompt as one user turn rendered by the tokenizer's chat
  template, ending in the assistant's generation prompt.

  Raises:
    UserError: the tokenizer has no chat template, or it failed.
  """
  if getattr(tok, "chat_template", None) is None:
    raise runtime.UserError(
      f"--chat: the tokenizer of {model_dir} has no chat template "
      "(tokenizer_config.json 'chat_template'); drop --chat to continue the "
      "prompts as given"
    )
  try:
    return [
      tok.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True
      )
      for p in prompts
    ]
  except jinja2.TemplateError as e:
    raise runtime.UserError(f"--chat: {e}") from None


def _tokenized_prompts(
  texts: list[str],
  prompts: list[str],
  *,
  given: bool,
  adapter: "HFTokenizerAdapter",
  config: C.GenerateConfig,
) -> "TokenizedDataset":
  """The texts (the prompts, or with --chat their rendered chat turns)
  left-padded to --max-prompt-length, before any weights load; the
  command does not cut a longer one.

  Raises:
    UserError: a prompt longer than --max-prompt-length (names it, 1-based,
      and its start).
    DataError: no room for a token beside the BOS; an empty prompt with no
      BOS.
  """
  from rlhf_jax.data import PromptExample, PromptTooLongError, tokenize_prompts
  from rlhf_jax.data.errors import prompt_room_as

  what = "--prompts value" if given else "built-in prompt"
  rows = [
    PromptExample(t, where=f"{what} {i + 1}") for i, t in enumerate(texts)
  ]
  try:
    with prompt_room_as("--max-prompt-length"):
      return tokenize_prompts(
        rows,
        adapter,
        max_prompt_length=config.max_prompt_length,
        truncate_prompts=False,
      )
  except PromptTooLongError as e:
    # The user's words, not the chat template around them.
    text = prompts[e.index]
    text = text if len(text) <= 40 else text[:37] + "..."
    fix = "shorten it" if given else "pass shorter --prompts"
    turn = " as a chat turn" if config.chat else ""
    raise runtime.UserError(
      f"{e.where} ({text!r}) has {e.length} tokens{turn}, more than "
      f"--max-prompt-length {e.max_prompt_length}; raise "
      f"--max-prompt-length or {fix}"
    ) from None


def run_generate(config: C.GenerateConfig) -> int:
  """Samples continuations and prints them (and writes --output)."""
  from rlhf_jax.data import HFTokenizerAdapter, trim_padding
  from rlhf_jax.tasks import STORY_OPENINGS

  given = config.prompts is not None
  _check_not_files(list(config.prompts) if given else [])  # before jax
  out = None
  if config.output is not None:
    out = _check_output(config.output, config.overwrite)
  environment.setup_jax()
  if config.run_dir is not None:
    run_dir = pathlib.Path(config.run_dir)
    model_dir = _policy_dir(run_dir, _run_record(run_dir), config.policy)
    if config.policy == "initial":
      _say_initial(run_dir)
  else:
    model_dir = environment.resolve_model(config.model)
    _check_language_model(model_dir)
  models.load_hf_config(model_dir)  # a missing config.json named first
  if out is not None:
    where = f"the model directory {model_dir} it samples from"
    runtime.check_outside(
      out, model_dir, "--output", where, "choose another file"
    )
  tok = models.load_tokenizer(model_dir)
  adapter = HFTokenizerAdapter.wrap(tok)
  prompts = list(config.prompts) if given else list(STORY_OPENINGS[:4])
  texts = _chat_turns(tok, model_dir, prompts) if config.chat else prompts
  ds = _tokenized_prompts(
    texts, prompts, given=given, adapter=adapter, config=config
  )
  # Left-padded to the longest prompt, not to --max-prompt-length (which
  # only bounds them): the positions checked and the cache are the real
  # ones.
  (ds,), (longest, _) = trim_padding(ds)
  environment.check_lengths(
    model_dir,
    ("the longest prompt:", longest),
    ("--max-new-tokens", config.max_new_tokens),
  )
  model_config, params = models.load_hf_checkpoint(model_dir)
  sample = _generate_batch(config, model_config, params, tok, adapter)
  try:
    records = _sampled_records(config, ds, prompts, sample, tok)
  except KeyboardInterrupt:  # what was made is on stdout; say so
    if out is not None:
      sys.stderr.write(
        f"generate: interrupted; --output {out} was not written (the "
        "samples made so far are printed above)\n"
      )
    raise
  if out is not None:
    with runtime.atomic_file(out) as f:
      f.write("".join(json.dumps(x) + "\n" for x in records))
    sys.stderr.write(f"generate: {len(records)} samples written to {out}\n")
  return 0


_PROMPT = ("prompt_ids", "prompt_mask")


def _sampled_records(config, ds, prompts, sample, tok) -> list[dict]:
  """Samples the prompts x --num-samples rows (prompt-major) in batches of
  at most --batch-size, prints each continuation as it comes and returns
  the --output records; a progress bar on stderr for several batches."""
  from rlhf_jax.runner.progress import ProgressBar
  from rlhf_jax.stages.sampling import chunks, pad_rows

  n = len(prompts) * config.num_samples
  size = min(config.batch_size, n)  # one compile: every batch this size
  batches = -(-n // size)
  records = []
  with ProgressBar(batches, "generate", show=batches > 1) as progress:
    for start, stop in chunks(n, size):
      rows = np.arange(start, stop) // config.num_samples
      pid, pmask = (pad_rows(ds.arrays[k][rows], size) for k in _PROMPT)
      ids, mask = sample(pid, pmask, start)
      for i, p in enumerate(rows):
        got = ids[i][mask[i]]
        text = tok.decode_continuation(pid[i][pmask[i]], got)
        index = (start + i) % config.num_samples
        records.append({"prompt": prompts[p], "sample": index, "text": text})
        eos_first = got[:1].tolist() == [tok.eos_id]
        shown = "(nothing: EOS came first)" if eos_first else text
        print(runtime.visible(f"[{prompts[p]}] {shown}"))  # --output: raw
      progress.update(1)
  return records


def _generate_batch(config, model_config, params, tok, adapter) -> Callable:
  """(prompt ids, mask, first row) -> numpy (response ids, mask) of one
  batch. Row r of the command uses the key fold_in(seed key, r), so the
  samples do not depend on --batch-size; the weights are split per layer
  once for every batch."""
  from rlhf_jax.stages.sampling import _sample, jitted_unstack

  if "layers" in params:
    params = jitted_unstack()(params, config=model_config)
  temperature = 1.0 if config.temperature is None else config.temperature
  fn = jax.jit(
    functools.partial(
      _sample,
      config=model_config,
      max_new_tokens=config.max_new_tokens,
      eos=tok.eos_id,
      pad=adapter.pad_id,
      greedy=config.greedy,
    )
  )
  key = jax.random.key(config.seed)

  def sample(ids, mask, start):
    roll = fn(params, ids, mask, key, jnp.uint32(start), temperature)
    return np.asarray(roll.response_ids), np.asarray(roll.response_mask)

  return sample


# ------------------------------------------------------------------- eval


def _read_prompts(path: pathlib.Path) -> dict[str, Any]:
  """A run's data/prompts.json: a JSON object whose "heldout" is a
  non-empty list of prompt strings.

  Raises:
    UserError: it cannot be read, is not JSON or not such an object.
  """
  want = 'expected a JSON object with "heldout": a list of prompt strings'
  try:
    with runtime.reading(path):
      prompts = json.loads(path.read_text())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise runtime.UserError(f"{path}: not JSON ({e}); {want}") from None
  if not isinstance(prompts, dict):
    raise runtime.UserError(f"{path}: {want}, got {shown(prompts)}")
  held = prompts.get("heldout")
  if not (
    isinstance(held, list) and held and all(isinstance(p, str) for p in held)
  ):
    raise runtime.UserError(f'{path}: {want}, got "heldout": {shown(held)}')
  return prompts


def _eval_output(
  run_dir: pathlib.Path, policy: str, overwrite: bool
) -> pathlib.Path:
  """eval_<policy>.json in the run directory, checked before any work.

  Raises:
    UserError: it exists (without --overwrite) or is a directory, or the
      run directory cannot be written (names it and why).
  """
  out = run_dir / f"eval_{policy}.json"
  if out.is_dir():
    raise runtime.UserError(f"{out}: is a directory, not a file")
  if (out.exists() or out.is_symlink()) and not overwrite:
    raise runtime.UserError(
      f"{out} exists (an earlier `rlhf-jax eval --policy {policy}`); pass "
      "--overwrite to replace it"
    )
  reason = runtime.unwritable(run_dir)
  if reason is not None:
    full = "space" in reason or "quota" in reason  # runtime._DISK_ERRORS
    fix = "Free space" if full else "Make the folder writable"
    raise runtime.UserError(
      f"--run-dir {run_dir}: cannot write {out.name} there ({reason}); "
      f"nothing was evaluated. {fix}, or evaluate a copy of the run"
    )
  return out


def run_eval(config: C.EvalConfig) -> int:
  """Evaluates a run's policy on its held-out prompts; writes
  eval_<policy>.json in the run directory (an existing one only with
  --overwrite). The run, its policy, its prompts and the output are
  checked before any work.

  With the run's seed (--seed 0) and samples per prompt, the rows and keys
  are those of the run's own evaluation, so the numbers reproduce it.
  """

  if not config.run_dir:
    raise runtime.UserError("rlhf-jax eval needs --run-dir DIR")
  environment.setup_jax()
  run_dir = pathlib.Path(config.run_dir)
  record = _run_record(run_dir)
  if record.get("hh_rlhf"):
    raise _no_policy(run_dir, " to evaluate", "eval")
  # Not by its fields: a KTO run's config has a "task" too.
  if record.get("command") not in C.PIPELINE_COMMANDS:
    raise runtime.UserError(
      f"{run_dir} is a `rlhf-jax {record.get('command', '?')}` run, not a "
      "pipeline run: eval needs the held-out prompts, reference and reward "
      "model of a run of `rlhf-jax run`, `ppo` or `grpo` (or `rm`/`dpo` "
      "without --data)"
    )
  config_path = run_dir / runtime.CONFIG_FILE
  run_cfg = _checked_run_config(record, config_path)
  if run_cfg.data is not None:  # it trained on --data: nothing sampled
    raise runtime.UserError(
      f"{run_dir} is a `rlhf-jax {record['command']} --data` run: it sampled "
      "no prompts, so it has no held-out prompts or reward model to "
      "evaluate with; eval needs a run of `rlhf-jax run`, `ppo` or `grpo` "
      "(or `rm`/`dpo` without --data). To sample from its policy use "
      f"`rlhf-jax generate --run-dir {run_dir} --policy {record['command']}`"
    )
  samples = config.samples_per_prompt
  if samples is None:  # the run's own: its figures reproduce
    samples = run_cfg.eval.samples_per_prompt
  run_cfg = dataclasses.replace(
    run_cfg,
    eval=dataclasses.replace(run_cfg.eval, samples_per_prompt=samples),
  )
  out = _eval_output(run_dir, config.policy, config.overwrite)
  # A run still going may lack its policy yet, and eval writes beside it.
  locked = runtime.lock_run_dir(run_dir, "rlhf-jax eval")
  try:
    return _evaluate(config, run_dir, record, run_cfg, samples, out)
  finally:
    if locked:
      runtime.unlock_run_dir(run_dir)


def _check_same_model(
  policy_dir: pathlib.Path, model_dir: pathlib.Path, doing: str = "evaluate"
):
  """The policy is the run's model trained (eval samples it with the run's
  model config, and scores it against that model as the reference; export
  names it the run's policy).

  Raises:
    UserError: its config.json describes another model (names the fields).
  """
  policy, model = (
    models.load_hf_config(policy_dir),
    models.load_hf_config(model_dir),
  )
  differ = [
    f"{f.name} {getattr(policy, f.name)!r} against {getattr(model, f.name)!r}"
    for f in dataclasses.fields(model)
    if getattr(policy, f.name) != getattr(model, f.name)
  ]
  if differ:
    raise runtime.UserError(
      f"{policy_dir} is not a policy of the run's model {model_dir}: its "
      f"config.json differs ({'; '.join(differ[:3])}); restore the run's "
      f"own policy there (or the model's config.json, if it was edited), "
      f"or {doing} it in its own run"
    )


# The parts of a run's config that eval reads (the held-out task, its
# sampling and evaluation settings, the seed), as their options start.
_EVAL_READS = ("--task.", "--sampling.", "--eval.", "--seed ")


def _checked_run_config(
  record: dict[str, Any], path: pathlib.Path
) -> C.PipelineConfig:
  """The run's saved config, with the values eval reads checked as their
  command line was: one edited by hand (a temperature of 0, a batch size
  of 0) would fail deep in the evaluation or give NaN figures. Settings of
  stages eval does not run are not its concern.

  Raises:
    UserError: a value of the wrong type, or one eval reads out of range
      (names the file).
  """
  run_cfg = config_from_dict(
    C.PipelineConfig, record["config"], where=f"{path}: config"
  )
  bad = problems(str(record["command"]), run_cfg, files=False)
  bad = [line for line in bad if line.startswith(_EVAL_READS)]
  if bad:
    raise runtime.UserError(
      f"{path} holds values eval reads that its command refuses (edited "
      "by hand?): " + "; ".join(bad)
    )
  return run_cfg


def _evaluate(
  config: C.EvalConfig,
  run_dir: pathlib.Path,
  record: dict[str, Any],
  run_cfg: C.PipelineConfig,
  samples: int,
  out: pathlib.Path,
) -> int:
  """run_eval's work, once the run is checked and locked: ``samples``
  per held-out prompt, results to ``out`` (eval_<policy>.json)."""
  from rlhf_jax.data import HFTokenizerAdapter
  from rlhf_jax.stages.common import Context
  from rlhf_jax.stages.evaluate import eval_kwargs, evaluate_policy
  from rlhf_jax.stages.grpo import heldout_reward
  from rlhf_jax.stages.rm import reward_model_for_eval

  policy_dir = _policy_dir(run_dir, record, config.policy)
  prompts_path = run_dir / "data" / "prompts.json"
  if not prompts_path.is_file():
    raise runtime.UserError(
      f"{run_dir} has no held-out prompts: {prompts_path} is missing; "
      "restore it, or run the pipeline again in a new --run-dir"
    )
  prompts = _read_prompts(prompts_path)
  reward = _run_rewards(record, run_cfg)  # before any work: they load
  model_dir = pathlib.Path(record["model_dir"])
  tok = models.load_tokenizer(model_dir)  # before weights: checks the pair
  _check_same_model(policy_dir, model_dir)
  model_config, ref = models.load_hf_checkpoint(model_dir)
  _, params = models.load_hf_checkpoint(policy_dir)
  with runtime.StopFlag() as stop:
    ctx = Context(
      command="eval",
      config=run_cfg,
      run_dir=run_dir,
      model_dir=model_dir,
      model_config=model_config,
      ref_params=ref,
      tokenizer=tok,
      adapter=HFTokenizerAdapter.wrap(tok),
      stop=stop,
      placement=Placement.create(MeshConfig(data=1), jax.devices()[:1]),
      timer=runtime.Timer(),
    )
    key = ctx.key("eval")
    if config.seed:
      key = jax.random.fold_in(key, config.seed)
    kwargs = eval_kwargs(ctx, prompts)
    kwargs["key"] = key
    initial = ctx.finished("initial")
    baseline = None
    if (
      initial is not None
      and len(initial["gold"]) == len(prompts["heldout"]) * samples
      and not config.seed
    ):
      baseline = np.asarray(initial["gold"])
    rm = reward_model_for_eval(ctx)
    if rm is None and ctx.stage_file("rm").is_file():  # the run trained one
      sys.stderr.write(
        f"rlhf-jax: warning: {run_dir / 'outputs' / 'rm'} holds no reward "
        "model, though stage rm ran; eval leaves out proxy_score\n"
      )
    metrics, details = evaluate_policy(
      ctx, params, rm, baseline_gold=baseline, **kwargs
    )
    if reward is not None:  # the run's own figure of its --reward
      metrics["eval/reward"] = heldout_reward(
        reward, prompts, details["texts"], samples
      )
  settings = {
    "policy": config.policy,
    "seed": config.seed,
    "samples_per_prompt": samples,
  }
  runtime.write_json(out, {"settings": settings, "metrics": metrics, **details})
  for k, v in metrics.items():
    print(f"{k} = {v:.4g}")
  print(f"eval: written to {out}")
  return 0


def _run_rewards(record: dict[str, Any], run_cfg: C.PipelineConfig):
  """The --reward functions of a grpo run (eval reports their
  ``eval/reward``, as the run did), or None: not a grpo run, or they no
  longer load (a module moved, or a relative path from elsewhere), which
  a warning says."""
  if record.get("command") != "grpo":
    return None
  from rlhf_jax.rewards import RewardError
  from rlhf_jax.stages.grpo import reward_functions

  try:
    return reward_functions(run_cfg)
  except RewardError as e:
    sys.stderr.write(
      f"rlhf-jax: warning: {e}; eval leaves out eval/reward (the run's "
      "--reward, which it scores when they load)\n"
    )
    return None


# ----------------------------------------------------------------- export


# Written into every export: --overwrite replaces only a folder holding
# it, so it never deletes a folder of the user's.
EXPORT_MARKER = ".rlhf_jax_export"
EXPORT_MARKER_TEXT = (
  "Written by `rlhf-jax export`: `--overwrite` may replace this folder.\n"
)
# Then the files the export wrote, one relative path a line: --overwrite
# refuses a folder holding anything else (a model card added since).
_FILES_HEADER = "Files it wrote:\n"


def export_marker_text(folder: pathlib.Path) -> str:
  """The marker of an export written to ``folder``: the text and the
  files there."""
  files = sorted(
    p.relative_to(folder).as_posix()
    for p in folder.rglob("*")
    if p.is_file() and p.name != EXPORT_MARKER
  )
  return EXPORT_MARKER_TEXT + _FILES_HEADER + "".join(f"{f}\n" for f in files)


def _not_exported(out: pathlib.Path) -> list[str]:
  """Entries of the export folder ``out`` that its export did not write
  (the highest of each branch). An export whose marker lists no files
  (those before 2026-12-08) is judged by the names an export writes."""
  text = (out / EXPORT_MARKER).read_text(errors="replace")
  if _FILES_HEADER in text:
    files = set(text.split(_FILES_HEADER, 1)[1].splitlines())
  else:
    files = set(runtime.model_dir_files())
  ours = files | {
    parent.as_posix()
    for f in files
    for parent in pathlib.PurePosixPath(f).parents
  }
  foreign = []
  for p in sorted(out.rglob("*")):
    rel = p.relative_to(out).as_posix()
    if rel == EXPORT_MARKER or any(rel.startswith(f + "/") for f in foreign):
      continue
    written = rel in files and p.is_file() and not p.is_symlink()
    if not (written or rel in ours and p.is_dir() and not p.is_symlink()):
      foreign.append(rel)
  return foreign


def _check_export_out(
  out: pathlib.Path, run_dir: pathlib.Path, record: dict, overwrite: bool
) -> None:
  """Refuses an --out that export must not replace; touches nothing.

  Raises:
    UserError: --out is a file, or a directory this process cannot write
      (or write beside); it is, or holds, the run directory or the
      run's model directory; it lies in the run's outputs; it is a run
      directory or rlhf-jax's own part of one (``runtime.run_part``); or it
      is a non-empty directory and `overwrite` is False, or one that an
      export did not write (no ``EXPORT_MARKER``), or an export that holds
      what it did not write.
  """
  target = out.resolve()
  if out.exists() and not out.is_dir():
    raise runtime.UserError(f"--out {out}: is a file, not a directory")
  # The export is staged beside --out's target (a link's too).
  runtime.check_folder_writable(
    out.resolve().parent, "--out", out, "nothing was exported"
  )
  if out.is_dir():  # a read-only one is not replaced by a writable one
    runtime.check_folder_writable(target, "--out", out, "nothing was exported")
  protected = [(run_dir, "the run directory")]
  if record.get("model_dir"):
    protected.append((pathlib.Path(record["model_dir"]), "the run's model"))
  for path, what in protected:
    if path.resolve().is_relative_to(target):
      raise runtime.UserError(
        f"--out {out}: would replace {what} {path}; choose another directory"
      )
  if target.is_relative_to((run_dir / "outputs").resolve()):
    raise runtime.UserError(
      f"--out {out}: lies in the run's outputs ({run_dir / 'outputs'}), "
      "which export reads; choose a directory outside it"
    )
  why = runtime.run_part(out)
  if why is None and out.is_dir():
    held = next(out.rglob(runtime.RUN_MARKER), None)
    if held is not None:
      why = f"it holds the run directory {held.parent}"
  if why is not None:
    raise runtime.UserError(f"--out {out}: {why}; choose another directory")
  entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
  ours = (out / EXPORT_MARKER).is_file()
  if entries and not ours:
    flag = "--overwrite --out" if overwrite else "--out"
    raise runtime.UserError(
      f"{flag} {out}: holds files and no {EXPORT_MARKER} (an export "
      "writes it; those before 2026-12-06 did not), so it is not replaced; "
      "nothing was changed. Choose a new directory, or empty this one "
      "yourself"
    )
  if entries and overwrite:
    _check_only_exported(out)
  if entries and not overwrite:
    listed = _first_four([e for e in entries if e != EXPORT_MARKER])
    raise runtime.UserError(
      f"--out {out}: an earlier export (holds {listed}); pass --overwrite "
      "to replace it, or choose a new directory"
    )


def _first_four(names: list[str]) -> str:
  """ "a, b, c, d and 3 more"."""
  more = f" and {len(names) - 4} more" if len(names) > 4 else ""
  return ", ".join(names[:4]) + more


def _check_only_exported(out: pathlib.Path) -> None:
  """Raises UserError when the earlier export ``out`` holds what it did
  not write (--overwrite would delete it)."""
  foreign = _not_exported(out)
  if foreign:
    raise runtime.UserError(
      f"--overwrite --out {out}: holds what the earlier export did not "
      f"write ({_first_four(foreign)}); nothing was changed. Move "
      f"{'them' if len(foreign) > 1 else 'it'} out, or choose a new "
      "directory"
    )


def _write_then_swap(
  out: pathlib.Path, write: Callable[[pathlib.Path], None]
) -> None:
  """Calls `write(tmp)` on a new directory beside `out`, then renames it to
  `out`. An existing `out` is moved aside first and deleted only once the
  new directory is in place, so no file of it survives in the new one and
  a failure leaves it as it was.
  """
  out = out.resolve()
  out.parent.mkdir(parents=True, exist_ok=True)
  tag = f"{os.getpid()}-{secrets.token_hex(4)}"
  tmp = out.parent / f".{out.name}.export-{tag}"
  tmp.mkdir()
  try:
    write(tmp)
    (tmp / EXPORT_MARKER).write_text(export_marker_text(tmp))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if not out.exists():
    tmp.rename(out)
    return
  old = out.parent / f".{out.name}.replaced-{tag}"
  out.rename(old)
  try:
    tmp.rename(out)
  except BaseException:
    old.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(old)


def _pad_id(model_dir: pathlib.Path) -> int:
  """The pad id the run tokenised with (eos when the tokenizer has none)."""
  from rlhf_jax.data import HFTokenizerAdapter

  return HFTokenizerAdapter.wrap(models.load_tokenizer(model_dir)).pad_id


def run_export(config: C.ExportConfig) -> int:
  """Writes a Hugging Face directory (config.json, model.safetensors,
  tokenizer files). --what rm writes a *ForSequenceClassification
  directory (score.weight, pad_token_id) for a last-token head, else the
  rlhf_jax-only format (reward_head/model.safetensors).

  A non-empty --out is refused unless --overwrite, and even then unless an
  earlier export wrote it and all it holds (``EXPORT_MARKER`` lists the
  files); the export is written to a
  new directory beside --out and renamed into place, so an earlier
  export's files (e.g. a sharded checkpoint's index) never survive in it.
  """
  if not config.run_dir or not config.out:
    raise runtime.UserError("rlhf-jax export needs --run-dir DIR and --out DIR")
  run_dir = pathlib.Path(config.run_dir)
  record = _run_record(run_dir)
  out = pathlib.Path(config.out)
  _check_export_out(out, run_dir, record, config.overwrite)
  if config.what == "rm":
    from rlhf_jax.models import seq_cls
    from rlhf_jax.stages.common import HEAD_FILE, host_tree
    from rlhf_jax.stages.rm import load_rm

    model_config, params, pooling = load_rm(run_dir)
    src = run_dir / "outputs" / "rm"
    params = host_tree(params)
    bias = float(np.asarray(params["head"]["bias"]))
    # transformers' format for a last-token head (its bias, which
    # transformers has no place for, recorded in config.json); a
    # mean-pooled one: the rlhf_jax-only format, said in the log.
    why_not = None
    if pooling != "last":
      why_not = f"its head is {pooling}-pooled"

    def write(tmp: pathlib.Path) -> None:
      if why_not is None:
        seq_cls.export_sequence_classification(
          params,
          model_config,
          tmp,
          pad_token_id=_pad_id(src),
          tokenizer_dir=src,
          keep_bias=True,
        )
        return
      models.export_hf_checkpoint(
        params["backbone"], model_config, tmp, tokenizer_dir=src
      )
      (tmp / HEAD_FILE).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(src / HEAD_FILE, tmp / HEAD_FILE)

    if why_not is None:
      print(
        f"rm: {seq_cls.architecture(model_config)} (transformers' "
        "AutoModelForSequenceClassification reads it)"
      )
      if bias != 0:
        print(
          f"rm: head bias {bias:.6g} kept as config.json "
          f"{seq_cls.BIAS_FIELD}; transformers' scores are rlhf_jax's "
          "minus this constant"
        )
    else:
      print(
        f"rm: rlhf_jax-only format (causal LM + {HEAD_FILE}): {why_not}; "
        "transformers cannot score it, `--reward-model` here can"
      )

  else:
    from rlhf_jax.stages.common import ADAPTER_DIR

    src = _policy_dir(run_dir, record, config.what, "--what")
    try:
      _check_same_model(src, pathlib.Path(record["model_dir"]), "export")
    except models.ModelLoadError:  # the run's model: not needed to export
      pass
    model_config, params = models.load_hf_checkpoint(src)

    def write(tmp: pathlib.Path) -> None:
      # A LoRA policy's outputs/<policy> is already merged; its adapters
      # alone (adapter/) travel with it.
      models.export_hf_checkpoint(params, model_config, tmp, tokenizer_dir=src)
      if (src / ADAPTER_DIR).is_dir():
        shutil.copytree(src / ADAPTER_DIR, tmp / ADAPTER_DIR)

  _write_then_swap(out, write)
  print(f"exported {config.what} of {run_dir} to {out}")
  return 0
