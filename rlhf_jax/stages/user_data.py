"""The user's own data: prompt files for PPO, preference files for rm/dpo.

Prompts (``--prompts FILE``): JSONL, JSONL.gz or Parquet (what Hugging Face
datasets write), plain ``{"prompt": str}`` or conversational
``{"prompt": [messages]}`` rows rendered with the tokenizer's chat template
and its generation prompt; preference, ranked or unpaired rows are also
accepted and their prompts used. Duplicate prompts are dropped and counted;
prompts longer than ``--task.max-prompt-length`` tokens keep their last
tokens (counted as truncated). A tenth of the prompts (at least one) is held
out for evaluation.

Preference pairs (``--data``, ``--eval-data``) whose chosen and rejected
texts differ but whose token ids do not (``tokens_identical``), or do not
once cut to ``--max-response-length`` tokens
(``identical_after_truncation``), are dropped and counted like the
loader's own drop reasons.

Every count (rows read, kept and dropped per reason, prompts and responses
truncated) goes into summary.json and report.md. A file with more than
``--data-max-dropped-frac`` of its rows dropped stops the run with one line
naming the file, the counts and the threshold: ``check_user_data`` reads
every file whole before the run directory is opened.
"""

import collections
import contextlib
import hashlib
import math
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from rlhf_jax import models
from rlhf_jax.data import (
  DROP_REASONS,
  TIE_REASONS,
  DataError,
  DropReport,
  HFTokenizerAdapter,
  LoadedExamples,
  PreferencePair,
  PromptExample,
  RankedExample,
  TokenizedDataset,
  TruncationReport,
  load_examples,
  row_kind,
  tokenize_preferences,
  train_eval_split,
  trim_padding,
)
from rlhf_jax.runner import runtime
from rlhf_jax.stages.common import Context
from rlhf_jax.stages.sampling import tokenize_prompt_texts

HELDOUT_FRACTION = 0.1
# Fewer held-out prompts than this and the evaluation's figures are
# warned about: they rest on so few prompts (the k1 KL can come out < 0).
FEW_HELDOUT = 4
MAX_DROPPED_FLAG = "--data-max-dropped-frac"
# Reasons always listed (zeros too) in the counts of preference files.
PAIR_DROP_REASONS = ("chosen_equals_rejected", "prompt_differs", *TIE_REASONS)


def drop_reasons(loaded: LoadedExamples) -> tuple[str, ...]:
  """The reasons the loader can drop rows of this kind for (listed in the
  counts even when zero)."""
  if not loaded.examples:
    return ()
  first = loaded.examples[0]
  if isinstance(first, PreferencePair):
    return PAIR_DROP_REASONS[:2]
  if isinstance(first, RankedExample):
    return ("duplicate_responses",)
  return ()


def data_counts(
  prefix: str,
  drops: DropReport,
  truncation: TruncationReport,
  reasons: tuple[str, ...] = (),
) -> dict[str, int]:
  """Flat counts for summaries: rows read, kept and dropped, drops per
  reason (``reasons`` listed even when zero), truncations per field, and
  the tokens lost to the tokenizer's unknown token with the rows holding
  them (``prefix`` e.g. "data", "eval_data" or "prompts")."""
  counts = drops.counts()
  out = {
    f"{prefix}/rows_read": drops.total_read,
    f"{prefix}/rows_kept": drops.total_kept,
    f"{prefix}/rows_dropped": drops.total_dropped,
  }
  for k in dict.fromkeys([*reasons, *counts]):
    out[f"{prefix}/dropped_{k}"] = counts.get(k, 0)
  truncated = truncation.truncated
  out.update({f"{prefix}/truncated_{k}": v for k, v in truncated.items()})
  out[f"{prefix}/unknown_tokens"] = truncation.unknown_tokens
  out[f"{prefix}/rows_with_unknown_tokens"] = truncation.unknown_rows
  return out


def capped_batch(
  stage: str,
  flag: str,
  requested: int,
  rows: int,
  log: Callable[[str], Any],
  placement: Any,
  what: str = "training rows",
) -> int:
  """min(``flag``'s batch size, the training rows). A cut size is checked
  against the mesh (`Placement.check_batch`; the callers checked the
  requested one) and said in the log, not made silently; the stage
  reports the size it used.

  Raises:
    MeshError: the cut batch does not split over the batch axes.
  """
  if requested <= rows:
    return requested
  placement.check_batch(rows, f"{flag} (cut to the {rows} {what})")
  log(
    f"{stage}: {flag} {requested} is more than the {rows} {what}; each "
    f"step takes {rows}"
  )
  return rows


def fit_to_data(
  stage: str, log: Callable[[str], Any], *datasets: TokenizedDataset
) -> tuple[list[TokenizedDataset], dict[str, int]]:
  """The datasets with their padding cut to their longest rows
  (`data.trim_padding`: one static shape for the run, no token cut), said
  in the log.

  Returns:
    ([datasets], counts data/padded_prompt_length and
    data/padded_response_length: the slots each batch row holds).
  """
  out, (prompt, response) = trim_padding(*datasets)
  log(
    f"{stage}: rows padded to {prompt} prompt + {response} response "
    "tokens (the longest rows, after truncation to the max lengths)"
  )
  return out, {
    "data/padded_prompt_length": prompt,
    "data/padded_response_length": response,
  }


def check_max_dropped_frac(value: float) -> None:
  """Raises UserError unless ``value`` is a fraction in [0, 1]."""
  if not (isinstance(value, int | float) and 0 <= value <= 1):
    raise runtime.UserError(
      f"{MAX_DROPPED_FLAG} {value!r}: expected a fraction in [0, 1]"
    )


def check_dropped(path: Any, drops: DropReport, max_frac: float) -> None:
  """Stops a run whose file is mostly dropped (ties included).

  Raises:
    UserError: more than ``max_frac`` of the rows read were dropped; one
      line with the file, the counts per reason and the threshold.
  """
  frac = drops.dropped_frac()
  if frac <= max_frac or math.isclose(frac, max_frac):
    return
  counts = collections.Counter(drops.counts()).most_common()
  detail = ", ".join(f"{k} {v}" for k, v in counts)
  raise runtime.UserError(
    f"{path}: {drops.total_dropped} of {drops.total_read} rows dropped "
    f"({frac:.0%}: {detail}), more than {MAX_DROPPED_FLAG} {max_frac:g}; "
    f"most often {DROP_REASONS[counts[0][0]]}: fix the file or raise "
    f"{MAX_DROPPED_FLAG}"
  )


def template_of(tokenizer: Any):
  """A tokenizer's chat template as load_examples wants it (or None)."""
  if getattr(tokenizer, "chat_template", None) is None:
    return None
  return tokenizer.apply_chat_template


def chat_template(ctx: Context):
  """The run tokenizer's chat template as load_examples wants it."""
  return template_of(ctx.tokenizer)


def load_pairs(
  path: Any,
  tokenizer: Any,
  *,
  template: Any,
  max_prompt_length: int,
  max_response_length: int,
  strict: bool,
  max_dropped_frac: float,
) -> tuple[LoadedExamples, TokenizedDataset]:
  """A preference file read, checked and tokenized; pairs that tie once
  tokenized are dropped and counted in ``loaded.drops``.

  Returns:
    (loaded, ds): ``ds.example_index`` maps its rows to
    ``loaded.examples``.

  Raises:
    DataError: a bad file (file, line and field named), rows that are not
      preference pairs, a tie with ``strict``.
    UserError: more than ``max_dropped_frac`` of the rows dropped.
  """
  loaded = load_examples(path, strict=strict, chat_template=template)
  if not isinstance(loaded.examples[0], PreferencePair):
    kind = row_kind(loaded.examples[0])
    raise DataError(
      f"{path}: expected preference pairs (prompt/chosen/rejected, "
      f"HH-RLHF transcripts or conversational), got {kind}"
    )
  ds = tokenize_preferences(
    loaded.examples,
    tokenizer,
    max_prompt_length=max_prompt_length,
    max_response_length=max_response_length,
    truncate_prompts=True,
    drop_ties=not strict,
  )
  if strict and ds.ties:
    t = ds.ties[0]
    raise DataError(
      f"{t.where}: {DROP_REASONS[t.reason]} (--strict; without it the row "
      f"is dropped and counted as '{t.reason}')"
    )
  loaded.drops.extend(ds.ties)
  check_dropped(path, loaded.drops, max_dropped_frac)
  return loaded, ds


def read_prompts(
  path: Any, *, strict: bool, template: Any, max_dropped_frac: float
) -> tuple[LoadedExamples, list[str]]:
  """The distinct prompts of a prompt file, in reading order.

  Repeated prompts are not drops (a file of pairs repeats its prompts);
  rows the loader drops are, against ``max_dropped_frac``.

  Raises:
    DataError: a bad file, or fewer than 2 distinct prompts.
    UserError: more than ``max_dropped_frac`` of the rows dropped.
  """
  loaded = load_examples(path, strict=strict, chat_template=template)
  check_dropped(path, loaded.drops, max_dropped_frac)
  prompts = list(dict.fromkeys(e.prompt for e in loaded.examples))
  if len(prompts) < 2:
    raise DataError(f"{path}: need at least 2 distinct prompts")
  return loaded, prompts


def first_rows(loaded: LoadedExamples, prompts: list[str]) -> list[Any]:
  """Each distinct prompt's first example (its line, and its other fields
  such as a reference answer for reward columns), aligned with
  ``prompts``."""
  first: dict[str, Any] = {}
  for e in loaded.examples:
    first.setdefault(e.prompt, e)
  return [first[p] for p in prompts]


@contextlib.contextmanager
def held_data_warnings(*, replay: bool) -> Iterator[None]:
  """Holds the data loader's log records back while files are checked: on
  an error its one-line message says it all (nothing else on stderr);
  otherwise they are logged after the block (``replay``) or dropped (a
  stage reads the file again and logs them then)."""
  with runtime.held_log("rlhf_jax.data") as held:
    yield
  if replay:
    runtime.replay_log("rlhf_jax.data", held)


def check_pairs_to_split(path: Any, pairs: list[Any]) -> None:
  """Without --eval-data a tenth of --data is held out: at least 2 usable
  pairs are needed (one to train on, one to evaluate), and 2 distinct ones
  (a repeated or reversed pair stays on one side).

  Raises:
    DataError: fewer, naming the file.
  """
  if len(pairs) < 2:
    raise DataError(f"{path}: need at least 2 usable pairs, got {len(pairs)}")
  distinct = len({_pair_group(p) for p in pairs})
  if distinct < 2:
    raise DataError(
      f"{path}: need at least 2 distinct pairs to hold one out, got one "
      f"pair {len(pairs)} times (repeated or reversed)"
    )


def kept_examples(loaded: LoadedExamples, ds: Any) -> list[Any]:
  """The examples of ``ds``'s rows (a ``TokenizedDataset`` of ``loaded``),
  in its order."""
  if ds.example_index is None:
    return list(loaded.examples)
  return [loaded.examples[i] for i in ds.example_index]


def _pair_key(pair: Any) -> tuple[str, str, str]:
  return (pair.prompt, pair.chosen, pair.rejected)


def _pair_group(pair: Any) -> tuple[str, str, str]:
  """A pair and its reverse (chosen and rejected swapped) alike."""
  return (pair.prompt, *sorted((pair.chosen, pair.rejected)))


def split_distinct(
  keys: list[Any], seed: int, least: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) indices of rows with hashable ``keys``: a tenth of
  the distinct keys (at least ``least``) held out
  (`data.train_eval_split`), every repeat of a key on its first row's
  side, so no held-out row is also trained on. Without repeats, the split
  of the rows themselves. Rows that must stay together (a pair and its
  reverse) share a key."""
  ids: dict[Any, int] = {}
  group = np.array([ids.setdefault(k, len(ids)) for k in keys])
  n = len(ids)
  _, held = train_eval_split(
    n, eval_size=max(least, round(HELDOUT_FRACTION * n)), seed=seed
  )
  is_held = np.isin(group, held)
  return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def split_pairs(pairs: list[Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`split_distinct` of preference pairs (prompt, chosen, rejected), a
  pair and its reverse on one side (a held-out pair was trained on with
  the opposite label)."""
  return split_distinct([_pair_group(p) for p in pairs], seed)


def _reverse_key(key: tuple[str, str, str]) -> tuple[str, str, str]:
  prompt, chosen, rejected = key
  return (prompt, rejected, chosen)


def reversed_pairs(pairs: list[Any]) -> list[Any]:
  """The pairs that reverse an earlier one (its chosen and rejected
  swapped: the two labels contradict), in order."""
  earlier: set[tuple[str, str, str]] = set()
  out = []
  for p in pairs:
    if _reverse_key(_pair_key(p)) in earlier:
      out.append(p)
    earlier.add(_pair_key(p))
  return out


def repeated_pairs(pairs: list[Any]) -> list[Any]:
  """The pairs that repeat an earlier one (same prompt, chosen and
  rejected), in order."""
  seen: set[tuple[str, str, str]] = set()
  out = []
  for p in pairs:
    key = _pair_key(p)
    if key in seen:
      out.append(p)
    seen.add(key)
  return out


def pairs_also_in(held: list[Any], train: list[Any]) -> list[Any]:
  """The pairs of ``held`` that ``train`` also holds, as they are or
  reversed."""
  trained = {_pair_group(p) for p in train}
  return [p for p in held if _pair_group(p) in trained]


def row_columns(example: Any) -> dict:
  """A --prompts row's other fields, which grpo passes to the reward
  functions: those of prompt-only rows; none of a file of pairs or of
  {prompt, completion} rows, whose responses are not the policy's."""
  return getattr(example, "columns", {})


def check_reward_columns(path: Any, columns: list[dict]) -> None:
  """The --prompts file's other fields (``columns``, one dict per row) can
  be passed to the --reward functions as keyword arguments.

  Raises:
    UserError: a field named like the functions' own arguments.
  """
  clash = sorted({k for r in columns for k in r} & {"prompts", "completions"})
  if clash:
    raise runtime.UserError(
      f"--prompts {path}: field {clash[0]!r} would collide with the reward "
      "functions' own argument; rename it"
    )


def check_user_data(config: Any, tok: models.Tokenizer) -> None:
  """Pre-flight: --data, --eval-data and --prompts read whole, checked and
  tokenized with the policy's tokenizer as the stages will, before the run
  directory is opened.

  Raises:
    DataError, UserError: as ``load_pairs`` and ``read_prompts``; a
      --data-max-dropped-frac outside [0, 1].
  """
  if config.data is None and config.prompts is None:
    return
  check_max_dropped_frac(config.data_max_dropped_frac)
  adapter = HFTokenizerAdapter.wrap(tok)
  template = template_of(tok)
  with held_data_warnings(replay=False):
    for path in (config.data, config.eval_data):
      if path is not None:
        loaded, ds = load_pairs(
          path,
          adapter,
          template=template,
          max_prompt_length=config.task.max_prompt_length,
          max_response_length=config.max_response_length,
          strict=config.strict,
          max_dropped_frac=config.data_max_dropped_frac,
        )
        if path == config.data and config.eval_data is None:
          check_pairs_to_split(path, kept_examples(loaded, ds))
    if config.prompts is not None:
      loaded, _ = read_prompts(
        config.prompts,
        strict=config.strict,
        template=template,
        max_dropped_frac=config.data_max_dropped_frac,
      )
      if getattr(config, "reward", None):  # grpo passes the columns on
        check_reward_columns(
          config.prompts, [row_columns(e) for e in loaded.examples]
        )


def _warn_repeats(path: str, loaded: LoadedExamples, rows: list[Any]) -> None:
  """Says how many rows repeat an earlier prompt (merged into its first
  row: each distinct prompt is drawn alike), and where a repeat's other
  fields differ, which the --reward functions then do not see."""
  repeats = len(loaded.examples) - len(rows)
  if not repeats:
    return
  first = {e.prompt: row_columns(e) for e in rows}
  other = [e for e in loaded.examples if row_columns(e) != first[e.prompt]]
  text = (
    f"rlhf-jax: warning: --prompts {path}: {repeats} rows repeat an "
    "earlier prompt and are merged into its first row (each distinct "
    f"prompt is drawn alike; {len(rows)} distinct)"
  )
  if other:
    verb = "differs" if len(other) == 1 else "differ"
    text += (
      f"; {len(other)} of them {verb} from that row in other fields (first "
      f"at {other[0].where}), which the --reward functions do not see"
    )
  sys.stderr.write(text + "\n")


def _sha256(path: Any) -> str:
  with runtime.reading(pathlib.Path(path)):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def warn_if_prompts_changed(path: Any, done: dict[str, Any]) -> None:
  """On --resume, a warning when the --prompts file differs from the one
  the finished prompts stage read (``done``): the run goes on with the
  prompts it read then."""
  saved = done.get("source_sha256")  # none in runs of before 2026-12-08
  if saved is None or not pathlib.Path(path).is_file():
    return
  if _sha256(path) != saved and runtime.is_primary_process():
    sys.stderr.write(
      f"rlhf-jax: warning: --prompts {path} changed since this run read "
      "it; the run goes on with the prompts it read then (data/"
      "prompts.json); start a new --run-dir to use the file as it is\n"
    )


def stage_user_prompts(ctx: Context) -> dict[str, Any]:
  """Train / held-out prompts from ``--prompts``; counts what was dropped.

  Raises:
    DataError: an unreadable file, or fewer than 2 distinct prompts.
    UserError: more than --data-max-dropped-frac of the rows dropped.
  """
  path = ctx.config.prompts
  loaded, prompts = read_prompts(
    path,
    strict=ctx.config.strict,
    template=chat_template(ctx),
    max_dropped_frac=ctx.config.data_max_dropped_frac,
  )
  n_held = max(1, round(HELDOUT_FRACTION * len(prompts)))
  if n_held < FEW_HELDOUT and ctx.primary:
    sys.stderr.write(
      f"rlhf-jax: warning: --prompts {path}: {n_held} of its "
      f"{len(prompts)} distinct prompts held out (a tenth); the held-out "
      "reward and KL rest on so few (the KL estimate can come out below 0)\n"
    )
  train_idx, held_idx = train_eval_split(
    len(prompts), eval_size=n_held, seed=ctx.config.seed
  )
  rows = first_rows(loaded, prompts)
  if ctx.primary:
    _warn_repeats(path, loaded, rows)
  # At each prompt's first line, which a warning names.
  at_rows = [PromptExample(e.prompt, where=e.where) for e in rows]
  ds = tokenize_prompt_texts(ctx, at_rows, warn_unknown=True)
  columns = [row_columns(e) for e in rows]
  result = {
    "train": [prompts[i] for i in train_idx],
    "heldout": [prompts[i] for i in held_idx],
    # Each prompt's other fields, passed to --reward functions.
    "train_columns": [columns[i] for i in train_idx],
    "heldout_columns": [columns[i] for i in held_idx],
    "source": str(path),
    "source_sha256": _sha256(path),
    "counts": {
      **data_counts(
        "prompts",
        loaded.drops,
        ds.truncation,
        drop_reasons(loaded),
      ),
      # Rows kept by the loader, then repeats of a prompt merged.
      "prompts/repeats_merged": len(loaded.examples) - len(prompts),
      "prompts/distinct": len(prompts),
    },
  }
  if ctx.primary:
    runtime.write_json(ctx.run_dir / "data" / "prompts.json", result)
  return result
