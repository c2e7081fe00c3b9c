"""The user's own data: prompt files for PPO, preference files for rm/dpo.

Prompts (``--prompts FILE``): JSONL, JSONL.gz or Parquet (what Hugging Face
datasets write), plain ``{"prompt": str}`` or conversational
``{"prompt": [messages]}`` rows rendered with the tokenizer's chat template
and its generation prompt; preference, ranked or unpaired rows are also
accepted and their prompts used. Duplicate prompts are dropped and counted;
prompts longer than ``--task.max-prompt-length`` tokens keep their last
tokens (counted as truncated). A tenth of the prompts (at least one) is held
out for evaluation.
"""

from typing import Any

from rlhf_jax.data import DataError, load_examples, train_eval_split
from rlhf_jax.runner import runtime
from rlhf_jax.stages.common import Context
from rlhf_jax.stages.sampling import tokenize_prompt_texts

HELDOUT_FRACTION = 0.1


def data_counts(prefix: str, drops: Any, truncated: dict) -> dict[str, int]:
  """Flat counts for summaries: rows read and kept, drops per reason,
  truncations per field (``prefix`` e.g. "data" or "eval_data")."""
  out = {
    f"{prefix}/rows_read": drops.total_read,
    f"{prefix}/rows_kept": drops.total_kept,
  }
  out.update({f"{prefix}/dropped_{k}": v for k, v in drops.counts().items()})
  out.update({f"{prefix}/truncated_{k}": v for k, v in truncated.items()})
  return out


def chat_template(ctx: Context):
  """The tokenizer's chat template as load_examples wants it (or None)."""
  if ctx.tokenizer.chat_template is None:
    return None
  return ctx.tokenizer.apply_chat_template


def stage_user_prompts(ctx: Context) -> dict[str, Any]:
  """Train / held-out prompts from ``--prompts``; counts what was dropped.

  Raises:
    DataError: an unreadable file, or fewer than 2 distinct prompts.
  """
  path = ctx.config.prompts
  loaded = load_examples(
    path, strict=ctx.config.strict, chat_template=chat_template(ctx)
  )
  prompts, seen = [], set()
  for e in loaded.examples:
    if e.prompt not in seen:
      seen.add(e.prompt)
      prompts.append(e.prompt)
  if len(prompts) < 2:
    raise DataError(f"{path}: need at least 2 distinct prompts")
  n_held = max(1, round(HELDOUT_FRACTION * len(prompts)))
  train_idx, held_idx = train_eval_split(
    len(prompts), eval_size=n_held, seed=ctx.config.seed
  )
  ds = tokenize_prompt_texts(ctx, prompts)
  result = {
    "train": [prompts[i] for i in train_idx],
    "heldout": [prompts[i] for i in held_idx],
    "source": str(path),
    "counts": {
      **data_counts("prompts", loaded.drops, ds.truncation.truncated),
      # Rows kept by the loader, then repeats of a prompt dropped.
      "prompts/dropped_duplicate": len(loaded.examples) - len(prompts),
      "prompts/distinct": len(prompts),
    },
  }
  if ctx.primary:
    runtime.write_json(ctx.run_dir / "data" / "prompts.json", result)
  return result
