"""Stages 1-2: prompts and simulated feedback; preference datasets."""

import itertools
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from rlhf_jax import audit
from rlhf_jax.data import (
  TokenizedDataset,
  TruncationReport,
)
from rlhf_jax.data.tokenize import prompt_lengths
from rlhf_jax.runner import runtime
from rlhf_jax.stages.common import Context
from rlhf_jax.stages.eval_metrics import length_baseline
from rlhf_jax.stages.sampling import (
  decode,
  sample_continuations,
  tokenize_prompt_texts,
)
from rlhf_jax.stages.user_data import (
  PAIR_DROP_REASONS,
  capped_batch,
  chat_template,
  check_pairs_to_split,
  data_counts,
  fit_to_data,
  kept_examples,
  load_pairs,
  pairs_also_in,
  repeated_pairs,
  reversed_pairs,
  split_pairs,
)
from rlhf_jax.tasks import (
  STORY_OPENINGS,
  SimulatedAnnotator,
  split_prompts,
  story_prefixes,
)
from rlhf_jax.tasks.annotator import bradley_terry_prob
from rlhf_jax.types import PreferenceBatch

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
  prefixes, too_long = _fitting(ctx, prefixes)
  openings = list(STORY_OPENINGS)  # they fit: `pipeline.check_prompt_room`
  prompts = openings + [p for p in prefixes if p not in set(openings)]
  train, held = split_prompts(
    prompts, eval_fraction=cfg.eval_fraction, seed=ctx.config.seed
  )
  result = {
    "train": train,
    "heldout": held,
    "num_openings": len(openings),
    "num_sampled_prefixes": len(prompts) - len(openings),
    "num_prefixes_too_long": too_long,
  }
  if too_long:  # into summary.json beside the warning
    result["counts"] = {"prompts/prefixes_too_long": too_long}
  if ctx.primary:
    runtime.write_json(ctx.run_dir / "data" / "prompts.json", result)
  return result


def _fitting(ctx: Context, prefixes: list[str]) -> tuple[list[str], int]:
  """The sampled story prefixes that fit --task.max-prompt-length (with the
  BOS), and how many did not: left out, with a warning (a prefix of up to
  --task.prefix-max-words words can take more tokens than that)."""
  cfg = ctx.config.task
  lengths = prompt_lengths(prefixes, ctx.adapter)
  kept = [
    t
    for t, n in zip(prefixes, lengths, strict=True)
    if n <= cfg.max_prompt_length
  ]
  dropped = len(prefixes) - len(kept)
  if dropped and ctx.primary:
    sys.stderr.write(
      f"rlhf-jax: warning: {dropped} of {len(prefixes)} sampled story "
      f"prefixes take more than --task.max-prompt-length "
      f"{cfg.max_prompt_length} tokens (with the BOS) and were left out; "
      "raise it, or lower --task.prefix-max-words "
      f"({cfg.prefix_max_words}), to keep them\n"
    )
  return kept, dropped


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


def label_audit(pairs: list[dict], *, beta: float) -> dict[str, float]:
  """The audit of the annotator's labels beside the noise it was given.

  Every pair within each group of K continuations is labelled once, so
  each group is a complete round of ``rlhf_jax.audit.noise``: the audit
  estimates the label noise from the judgements the best ordering must
  drop, without the gold scores, and the gold scores give the truth.

  Args:
    pairs: the labelled pairs (``_label_pairs`` rows).
    beta: the annotator's Bradley-Terry inverse temperature.

  Returns:
    ``annotator/noise_known``: the realised fraction of labels against the
    gold order, a gold tie counting 1/2; ``annotator/noise_expected``: its
    expectation mean(min(p, 1 - p)) under the annotator's model;
    ``annotator/noise_estimate`` (and ``_low``, ``_high``: 2 standard
    errors) from the labels alone; ``annotator/rationalisability``,
    ``annotator/min_fas``, ``annotator/cycles`` of the preference graphs.
    Estimates are left out when no group has 3 or more continuations.
  """
  g_c = np.array([p["gold_chosen"] for p in pairs], np.float64)
  g_r = np.array([p["gold_rejected"] for p in pairs], np.float64)
  out = {
    "annotator/noise_known": float(
      (np.sum(g_c < g_r) + 0.5 * np.sum(g_c == g_r)) / max(len(pairs), 1)
    ),
    "annotator/noise_expected": float(
      np.mean(0.5 - np.abs(bradley_terry_prob(g_c, g_r, beta=beta) - 0.5))
    ),
  }
  x = audit.intern_pairs(
    [p["prompt"] for p in pairs],
    [p["chosen"] for p in pairs],
    [p["rejected"] for p in pairs],
  )
  graph = audit.audit_judgements(x.judgements, len(x.responses))
  s = graph.summary
  if s["checkable"]:
    out["annotator/rationalisability"] = s["rationalisability"]
    out["annotator/min_fas"] = float(s["min_fas"])
    out["annotator/cycles"] = float(s["cycles"])
  est = audit.label_noise(graph)
  if est["noise"] is not None:
    out["annotator/noise_estimate"] = est["noise"]
    out["annotator/noise_estimate_low"] = est["noise_low"]
    out["annotator/noise_estimate_high"] = est["noise_high"]
  return out


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
  if ctx.primary:
    _write_jsonl(ctx.run_dir / "data" / "pairs_train.jsonl", train)
    _write_jsonl(ctx.run_dir / "data" / "pairs_eval.jsonl", held)
  stats = annotator.stats()
  stats["annotator/train_pairs"] = float(len(train))
  stats["annotator/eval_pairs"] = float(len(held))
  stats |= label_audit(train + held, beta=cfg.annotator_beta)
  ctx.log_record("feedback", stats)
  # Kept in memory too: other processes must not read files process 0
  # may still be writing.
  ctx.cache["pairs"] = (train, held)
  return {"stats": stats}


def pair_counts(ctx: Context, prompts: dict) -> tuple[int, int]:
  """(train, held-out) pairs ``stage_feedback`` labels from ``prompts``:
  every pair within each group of --feedback.group-size continuations."""
  cfg = ctx.config.feedback
  per_group = cfg.group_size * (cfg.group_size - 1) // 2
  return (
    len(prompts["train"]) * cfg.groups_per_prompt * per_group,
    len(prompts["heldout"]) * cfg.eval_groups_per_prompt * per_group,
  )


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


def train_batch_size(ctx: Context, size: int, prefs: dict, flag: str) -> int:
  """``size``, or all training pairs when fewer; checked against the mesh
  before the first step.

  Raises:
    MeshError: the batch does not split over the batch axes.
  """
  log = runtime.primary_log(print)
  stage = flag.removeprefix("--").split(".")[0]
  n = len(prefs["train"])
  return capped_batch(
    stage, flag, size, n, log, ctx.placement, "training pairs"
  )


def preference_data(ctx: Context) -> dict:
  """Train / held-out preference datasets: simulated feedback or --data."""
  if "prefs" in ctx.cache:
    return ctx.cache["prefs"]
  cfg = ctx.config
  if cfg.data is None:
    train, held = ctx.cache.get("pairs") or (
      _read_jsonl(ctx.run_dir / "data" / "pairs_train.jsonl"),
      _read_jsonl(ctx.run_dir / "data" / "pairs_eval.jsonl"),
    )
    out = {
      "train": pairs_dataset(ctx, train),
      "eval": pairs_dataset(ctx, held),
      "eval_noiseless": np.array([p["noiseless_label"] for p in held]),
      "counts": {},
    }
  else:
    out = _file_preferences(ctx)
  ctx.cache["prefs"] = out
  return out


def _load_pairs(ctx: Context, path: str) -> tuple[Any, TokenizedDataset]:
  cfg = ctx.config
  return load_pairs(
    path,
    ctx.adapter,
    template=chat_template(ctx),
    max_prompt_length=cfg.task.max_prompt_length,
    max_response_length=cfg.max_response_length,
    strict=cfg.strict,
    max_dropped_frac=cfg.data_max_dropped_frac,
  )


def _file_preferences(ctx: Context) -> dict:
  """--data (and --eval-data) pairs; drops and truncations counted."""
  cfg = ctx.config
  loaded, ds = _load_pairs(ctx, cfg.data)
  counts = data_counts("data", loaded.drops, ds.truncation, PAIR_DROP_REASONS)
  pairs = kept_examples(loaded, ds)
  repeats = repeated_pairs(pairs)
  counts["data/repeated_pairs"] = len(repeats)
  warn = runtime.primary_log(lambda m: sys.stderr.write(m + "\n"))
  if repeats:
    warn(
      f"rlhf-jax: warning: --data {cfg.data}: {len(repeats)} pairs repeat "
      f"an earlier one (first at {repeats[0].where}); they are kept, so "
      "those pairs weigh more"
    )
  flipped = reversed_pairs(pairs)
  counts["data/reversed_pairs"] = len(flipped)
  if flipped:
    warn(
      f"rlhf-jax: warning: --data {cfg.data}: {len(flipped)} pairs reverse "
      f"an earlier one, chosen and rejected swapped (first at "
      f"{flipped[0].where}): contradicting labels; they are kept, each "
      "with its reverse on one side of the held-out split"
    )
  if cfg.eval_data is None:
    check_pairs_to_split(cfg.data, pairs)
    # A tenth of the distinct pairs (at least one) is held out.
    tr, ev = split_pairs(pairs, cfg.seed)
    train, held = ds.subset(tr), ds.subset(ev)
    held_pairs = kept_examples(loaded, held)
  else:
    held_loaded, held = _load_pairs(ctx, cfg.eval_data)
    train, held_pairs = ds, kept_examples(held_loaded, held)
    counts.update(
      data_counts(
        "eval_data",
        held_loaded.drops,
        held.truncation,
        PAIR_DROP_REASONS,
      )
    )
    shared = pairs_also_in(held_pairs, pairs)
    counts["eval_data/pairs_in_data"] = len(shared)
    if shared:
      warn(
        f"rlhf-jax: warning: --eval-data {cfg.eval_data}: {len(shared)} of "
        f"its {len(held_pairs)} pairs are also in --data, as they are or "
        f"reversed (first at {shared[0].where}): the held-out figures are "
        "partly measured on pairs trained on"
      )
  log = runtime.primary_log(print)
  (train, held), padded = fit_to_data(ctx.command, log, train, held)
  counts.update(padded)
  return {
    "train": train,
    "eval": held,
    "eval_noiseless": None,
    "eval_length_baseline": length_baseline(held_pairs),
    "counts": counts,
  }
