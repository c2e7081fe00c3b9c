"""Where stages read the environment: the model directory and the
persistent compilation cache (only cli/, stages/ and scripts/ read flags or
environment variables)."""

import dataclasses
import os
import pathlib
import sys

from rlhf_jax.runner.mesh import DistributedConfig, start_distributed
from rlhf_jax.runner.runtime import (
  CompileClock,
  UserError,
  check_folder_writable,
  is_primary_process,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_MODEL_DIR = SHARED_DATA / "models" / "tinystories-656k"
HUB_ID = "raincandy-u/TinyStories-656K"
MODEL_ENV = "RLHF_JAX_MODEL_DIR"
CACHE_ENV = "RLHF_JAX_CACHE_DIR"


MODELS_CACHE_ENV = "RLHF_JAX_MODELS_CACHE"
SMOLLM2_NAME = "smollm2-135m-instruct"


def smollm2_dir() -> pathlib.Path:
  """Where scripts/setup_smollm2.py puts SmolLM2-135M-Instruct:
  $RLHF_JAX_MODELS_CACHE/smollm2-135m-instruct, by default under
  ~/.cache/rlhf_jax/models (outside the repository)."""
  cache = os.environ.get(MODELS_CACHE_ENV)
  root = (
    pathlib.Path(cache).expanduser()
    if cache
    else pathlib.Path.home() / ".cache" / "rlhf_jax" / "models"
  )
  return root / SMOLLM2_NAME


def resolve_model(model: str | None) -> pathlib.Path:
  """The policy checkpoint directory (`_model_dir`), which
  $RLHF_JAX_CACHE_DIR may not lie in (the compilation cache would write
  into the user's model folder).

  Raises:
    UserError: as `_model_dir`, or the cache in that folder.
  """
  where = "--model" if model is not None else f"${MODEL_ENV}"
  if model is None and MODEL_ENV not in os.environ:
    where = "the default model"
  path = _model_dir(model)
  check_cache_outside(path, where)
  return path


def _model_dir(model: str | None) -> pathlib.Path:
  """The policy checkpoint directory.

  Order: ``model`` (a directory, or a hub id already in the local Hugging
  Face cache), else $RLHF_JAX_MODEL_DIR, else
  ``<repo>/../shared/data/models/tinystories-656k`` when it exists.

  Raises:
    UserError: the directory does not exist, or nothing was found; an
      empty $RLHF_JAX_MODEL_DIR.
  """
  where = "--model"
  if model is None and MODEL_ENV in os.environ:
    model, where = os.environ[MODEL_ENV], f"${MODEL_ENV}"
    if not model.strip():  # set by mistake: not silently the default model
      raise UserError(
        f"${MODEL_ENV} is set but empty; unset it, or set it to a "
        "checkpoint directory"
      )
  if model is None:
    if DEFAULT_MODEL_DIR.is_dir():
      return DEFAULT_MODEL_DIR
    raise UserError(
      f"no model given and {DEFAULT_MODEL_DIR} does not exist; pass --model "
      f"DIR or set {MODEL_ENV} to a Hugging Face checkpoint directory (e.g. "
      f"`huggingface-cli download {HUB_ID} --local-dir DIR` on a machine "
      "with network access)"
    )
  path = pathlib.Path(model).expanduser()
  if path.is_dir():
    return path
  from rlhf_jax.models import looks_like_hub_id, resolve_model_dir

  # "org/name" only: a bare word is taken for a directory that is missing.
  if "/" in model and looks_like_hub_id(model) and not path.exists():
    try:
      return resolve_model_dir(model)
    except FileNotFoundError as e:
      raise UserError(f"{where}: {e}") from None
  if path.exists():
    hint = ""
    if path.suffix.lower() == ".gguf":
      from rlhf_jax.models.hf_io import gguf_hint

      hint = f" (a GGUF file: {gguf_hint(model)})"
    raise UserError(f"{where} {model}: not a directory{hint}")
  raise UserError(f"model directory {model} does not exist ({where})")


def cache_inside(folder: str | os.PathLike, flag: str) -> str:
  """Why $RLHF_JAX_CACHE_DIR may not lie in ``folder`` (a run, output or
  model folder the command names with ``flag``; links resolved), "" when
  it does not: the cache's files would mix with the user's there (and
  block a later --overwrite of the run)."""
  cache = os.environ.get(CACHE_ENV, "").strip()
  if not cache or cache.lower() == "off":
    return ""
  inside = pathlib.Path(cache).expanduser().resolve()
  if not inside.is_relative_to(pathlib.Path(folder).expanduser().resolve()):
    return ""
  return (
    f"${CACHE_ENV}={cache}: lies in {flag} {folder}, where the compilation "
    "cache would write its files; set it to a folder outside it (or off)"
  )


def check_cache_outside(folder: str | os.PathLike, flag: str) -> None:
  """Raises UserError when $RLHF_JAX_CACHE_DIR lies in ``folder``
  (`cache_inside`)."""
  problem = cache_inside(folder, flag)
  if problem:
    raise UserError(problem)


def setup_jax() -> None:
  """Persistent compilation cache in a user cache dir (outside the repo).

  $RLHF_JAX_CACHE_DIR overrides the location; "off" (any case) disables
  it.

  Raises:
    UserError: $RLHF_JAX_CACHE_DIR is set but empty, names a file, or a
      folder that cannot be written (`runtime.check_folder_writable`; an
      unwritable default folder is a warning: the run goes on without the
      cache).
  """
  import jax

  explicit = CACHE_ENV in os.environ
  cache = os.environ.get(
    CACHE_ENV, str(pathlib.Path.home() / ".cache" / "rlhf_jax" / "jax_cache")
  )
  if not cache.strip():
    raise UserError(
      f"${CACHE_ENV} is set but empty; unset it, or set it to a folder for "
      "the compilation cache, or to off"
    )
  if cache.strip().lower() == "off":
    cache = "off"
  elif pathlib.Path(cache).exists() and not pathlib.Path(cache).is_dir():
    raise UserError(
      f"${CACHE_ENV}={cache}: is a file; expected a folder for the "
      "compilation cache (or off)"
    )
  if cache != "off" and explicit:  # creating nothing
    check_folder_writable(
      cache, f"${CACHE_ENV}", cache, "set it to a folder you can write (or off)"
    )
  elif cache != "off":
    try:
      check_folder_writable(
        cache,
        "the compilation cache folder",
        cache,
        f"running without it (set ${CACHE_ENV} to a folder you can write)",
      )
    except UserError as e:
      sys.stderr.write(f"rlhf-jax: warning: {e}\n")
      cache = "off"
  if cache != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  CompileClock.get()


# The variables jax.distributed's own launchers set.
_DISTRIBUTED_ENV = {
  "coordinator_address": ("JAX_COORDINATOR_ADDRESS", str),
  "num_processes": ("JAX_NUM_PROCESSES", int),
  "process_id": ("JAX_PROCESS_ID", int),
}


def start(config: DistributedConfig) -> None:
  """Joins a multi-process job from --distributed.* flags, each unset flag
  read from its environment variable (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID); a single host needs none.

  Raises:
    UserError: an incomplete setting or a variable that is not a number.
  """
  values = {}
  for field, (var, kind) in _DISTRIBUTED_ENV.items():
    value = getattr(config, field)
    if value is None and os.environ.get(var):
      try:
        value = kind(os.environ[var])
      except ValueError:
        raise UserError(
          f"${var}={os.environ[var]!r} is not a {kind.__name__}"
        ) from None
    values[field] = value
  start_distributed(dataclasses.replace(config, **values))


def check_lora(lora_config, model_dir: pathlib.Path) -> None:
  """--lora.* fits the model (its family's projections, rank <= D), read
  from config.json alone, before any work starts.

  Raises:
    UserError: one line naming the option.
  """
  from rlhf_jax import models  # noqa: PLC0415 (jax only when needed)
  from rlhf_jax.models import lora  # noqa: PLC0415

  if not lora_config.enabled:
    return
  try:
    lora.configure(models.load_hf_config(model_dir), lora_config)
  except models.ModelLoadError:
    return  # the model loader names a bad model directory in its words
  except ValueError as e:
    raise UserError(f"--lora.{e}") from None


def check_positions(config, model_dir: pathlib.Path) -> None:
  """The pipeline's longest rows fit a model with learned positions
  (`check_lengths`): with --data (rm, dpo: nothing is sampled) the
  preference rows, --task.max-prompt-length + --max-response-length;
  otherwise the sampled ones, --task.max-prompt-length +
  --sampling.max-new-tokens.

  Raises:
    UserError: one line naming both options and the model's limit.
  """
  prompt = ("--task.max-prompt-length", config.task.max_prompt_length)
  if config.data is not None:
    rest = ("--max-response-length", config.max_response_length)
  else:
    rest = ("--sampling.max-new-tokens", config.sampling.max_new_tokens)
  check_lengths(model_dir, prompt, rest)


def check_data_lengths(config, model_dir: pathlib.Path) -> None:
  """sft and kto on --data: rows of --max-prompt-length +
  --max-response-length tokens fit the model (`check_lengths`).

  Raises:
    UserError: one line naming both options and the model's limit.
  """
  check_lengths(
    model_dir,
    ("--max-prompt-length", config.max_prompt_length),
    ("--max-response-length", config.max_response_length),
  )


def check_lengths(
  model_dir: pathlib.Path, prompt: tuple[str, int], rest: tuple[str, int]
) -> None:
  """Rows of P prompt + T further tokens fit a model with learned
  positions (GPT-2), read from config.json alone, before any work starts
  (the forward and `rollout.generate` would refuse them later, and a
  position past the table reads NaN). Past a rotary model's
  max_position_embeddings (no rope_scaling) a warning goes to stderr.

  Args:
    model_dir: the model directory.
    prompt: (option, P), e.g. ("--max-prompt-length", 64).
    rest: (option, T) of the tokens after the prompt.

  Raises:
    UserError: one line naming both options and the model's limit.
  """
  from rlhf_jax import models  # noqa: PLC0415 (jax only when needed)

  try:
    model_config = models.load_hf_config(model_dir)
  except models.ModelLoadError:
    return  # the model loader names a bad model directory in its words
  (p_option, p), (t_option, t) = prompt, rest
  what = f"{p_option} {p} + {t_option} {t} = {p + t} tokens"
  try:
    models.check_position_table(p + t, model_config, what)
  except ValueError as e:
    raise UserError(f"{e} of {model_dir}; lower them") from None
  limit = model_config.max_position_embeddings
  # Rotary without a scaling made to reach further: it runs, at positions
  # past the lengths it was trained at.
  if (
    p + t > limit and model_config.rope_scaling is None and is_primary_process()
  ):
    sys.stderr.write(
      f"rlhf-jax: warning: {what} exceed the max_position_embeddings "
      f"({limit}) of {model_dir}; positions past it are ones the model "
      "never saw\n"
    )
