"""Sampling continuations in batches of one compiled shape."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.data import DataError, PromptTooLongError, tokenize_prompts
from rlhf_jax.data.errors import prompt_room_as
from rlhf_jax.rollout import generate
from rlhf_jax.runner.progress import ProgressBar
from rlhf_jax.runner.runtime import visible
from rlhf_jax.stages.common import Context


def _sample(params, prompt_ids, prompt_mask, key, start, temperature, **kw):
  """One generate call (static shapes); row r of the call uses the key
  fold_in(key, start + r), so results do not depend on the batching."""
  rows = start + jnp.arange(prompt_ids.shape[0], dtype=jnp.uint32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)
  return generate(
    params,
    prompt_ids,
    prompt_mask,
    keys,
    config=kw["config"],
    max_new_tokens=kw["max_new_tokens"],
    temperature=temperature,
    greedy=kw.get("greedy", False),
    eos_token_id=kw["eos"],
    pad_token_id=kw["pad"],
  )


def sampler(ctx: Context):
  """The run's jitted sampler: prompts split over the batch axes, samples
  gathered back (every process reads them)."""
  if "sampler" not in ctx.cache:
    ctx.cache["sampler"] = ctx.placement.jit_gather(
      _sample, static_argnames=("config", "max_new_tokens", "eos", "pad")
    )
  return ctx.cache["sampler"]


def jitted_unstack():
  """A new jitted `models.unstack_layers`: the decode layout that
  `generate` would otherwise make, a copy of every weight, per call."""
  return jax.jit(
    models.unstack_layers, static_argnames=("config", "transpose_min_size")
  )


def split_layers(ctx: Context):
  """The run's `jitted_unstack` (its compile cache the run's own)."""
  if "split_layers" not in ctx.cache:
    ctx.cache["split_layers"] = jitted_unstack()
  return ctx.cache["split_layers"]


def chunks(n: int, size: int):
  """(start, stop) ranges of at most ``size`` rows."""
  for start in range(0, n, size):
    yield start, min(start + size, n)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
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
  if "layers" in params:  # split once for every batch
    params = split_layers(ctx)(params, config=ctx.model_config)
  with ProgressBar(-(-n // size), what, show=ctx.placement.is_primary) as bar:
    for start, stop in chunks(n, size):
      ctx.stop.check(what, checkpoint=False)  # sampling restarts on --resume
      ids, mask = ctx.placement.batch(
        (
          pad_rows(prompt_ids[start:stop], size),
          pad_rows(prompt_mask[start:stop], size),
        )
      )
      roll = sampler(ctx)(
        params,
        ids,
        mask,
        key,
        jnp.uint32(start),
        jnp.float32(ctx.config.sampling.temperature),
        config=ctx.model_config,
        max_new_tokens=ctx.config.sampling.max_new_tokens,
        eos=ctx.eos,
        pad=ctx.pad,
      )
      for k in names:
        out[k].append(np.asarray(getattr(roll, k))[: stop - start])
      bar.update(1)
  return {k: np.concatenate(v) for k, v in out.items()}


def decode(ctx: Context, ids: np.ndarray, mask: np.ndarray) -> list[str]:
  """Response texts (special tokens dropped)."""
  return [
    ctx.tokenizer.decode(row[m]) for row, m in zip(ids, mask, strict=True)
  ]


def tokenize_prompt_texts(
  ctx: Context, texts: Sequence[Any], *, warn_unknown: bool = False
):
  """Left-padded prompt arrays; a task prompt longer than P is a
  DataError, a --prompts prompt keeps its last P tokens. Characters lost
  to the tokenizer's unknown token are warned about with
  ``warn_unknown`` only: where the prompts file is read, not each time
  a stage tokenizes its prompts again."""
  try:
    with prompt_room_as("--task.max-prompt-length"):
      return tokenize_prompts(
        list(texts),
        ctx.adapter,
        max_prompt_length=ctx.config.task.max_prompt_length,
        # The user's prompts keep their last P tokens (counted); the task's
        # own prompts must fit.
        truncate_prompts=ctx.config.prompts is not None,
        warn_unknown=warn_unknown,
      )
  except PromptTooLongError as e:  # a task prompt (the user's are cut)
    what = e.where
    if e.index is not None:
      what = f"the task's prompt {visible(repr(texts[e.index]))}"
    raise task_prompt_too_long(e.max_prompt_length, what, e.length) from None


def task_prompt_too_long(limit: int, what: str, length: int) -> DataError:
  """The error of a task prompt (``what``) of ``length`` tokens with the
  BOS, past --task.max-prompt-length ``limit`` (`pipeline.check_prompt_room`
  names the longest before any work)."""
  return DataError(
    f"--task.max-prompt-length {limit}: {what} has {length} tokens (with "
    f"the BOS); raise it to at least {length}"
  )
