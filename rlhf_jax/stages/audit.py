"""`rlhf-jax audit`: consistency audit of a preference file (and a reward
model), written as report.md, results.json and plots/ into --out.

The data are read with the project's readers (rlhf_jax.data: explicit,
HH-RLHF, conversational or ranked rows; bad rows named by file, line and
field), an optional annotator column is taken from the same rows, and the
judgements go through ``rlhf_jax.audit`` (cycles, minimum feedback arc
set, rationalisability, label noise, annotators). With --reward-model the
pairs are scored by the model (a `rlhf-jax rm` run or export, or a
*ForSequenceClassification directory, loaded as `ppo --reward-model` does)
and the model is audited too (agreement, calibration, length buckets, how
it breaks the cycles).

--out follows the run directories' rules: it is created with the
``.rlhf_jax_run`` marker; a folder of the user's is never written into;
an earlier audit is replaced only with --overwrite, which deletes only
what rlhf-jax wrote.
"""

import contextlib
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from rlhf_jax import audit
from rlhf_jax.data import (
  DataError,
  PreferencePair,
  RankedExample,
  load_examples,
  read_rows,
  row_kind,
)
from rlhf_jax.data.errors import check_bos_room, prompt_room_as
from rlhf_jax.runner import runtime
from rlhf_jax.stages.configs import AuditConfig

PLOTS = "plots"
# Shown per example cycle / per response in report.md.
MAX_TEXT = 80
MAX_ANNOTATOR_ROWS = 30


@dataclasses.dataclass(frozen=True)
class _OutDir:
  """The view of an audit that ``runtime.prepare_run_dir`` reads."""

  DIR_FLAG: ClassVar[str] = "--out"  # its messages name audit's option
  preset: str
  run_dir: str
  audit: AuditConfig
  resume: bool = False
  overwrite: bool = False


def plain_template(messages: Sequence[Any], *, add_generation_prompt: bool):
  """Messages as "role: content" lines (conversational rows without a
  model's chat template: the audit only needs the texts to compare)."""
  text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
  return text + ("assistant:" if add_generation_prompt else "")


def _saved_command(path: pathlib.Path) -> str | None:
  """The command recorded in a run's config.json (None if unreadable)."""
  try:
    return json.loads(path.read_text()).get("command")
  except (OSError, ValueError, AttributeError):
    return None


# The most cycles --max-cycles may ask for: the enumeration keeps every
# cycle it finds (10^6 of 24 responses: 26 s and 0.8 GB here).
MAX_CYCLES = 1_000_000


def _check_out(config: AuditConfig) -> pathlib.Path:
  """--out, checked before any work; creates nothing.

  Raises:
    UserError: --out is a file, in the --reward-model directory, a folder
      of the user's, another command's run, an earlier audit without
      --overwrite, or cannot be written.
  """
  out = pathlib.Path(config.out or f"runs/audit-{config.preset}")
  if (model := config.reward_model) is not None:
    where = f"the --reward-model directory {model} it scores with"
    runtime.check_outside(out, model, "--out", where, "choose another --out")
  view = _OutDir(config.preset, str(out), config, overwrite=config.overwrite)
  if problem := runtime.foreign_run_dir(out, view):
    raise runtime.UserError(problem)
  runtime.check_folder_writable(out, "--out", out, "nothing was read")
  names = [p.name for p in out.iterdir()] if out.is_dir() else []
  bookkeeping = (runtime.CONFIG_FILE, runtime.RUN_MARKER, runtime.LOCK_FILE)
  if any(n.removesuffix(".tmp") not in bookkeeping for n in names):
    command = _saved_command(out / runtime.CONFIG_FILE)
    if command not in (None, "audit"):
      raise runtime.UserError(
        f"--out {out}: holds a `rlhf-jax {command}` run, not an audit; "
        "nothing was changed. Choose another --out"
      )
    if not config.overwrite:
      raise runtime.UserError(
        f"--out {out}: already holds an audit; pass --overwrite to replace "
        "it, or choose another --out"
      )
  return out


def _out_dir(config: AuditConfig) -> pathlib.Path:
  """Creates (or, with --overwrite, empties) --out; see the module doc.

  Raises:
    UserError: as `_check_out`.
  """
  out = _check_out(config)
  view = _OutDir(config.preset, str(out), config, overwrite=config.overwrite)
  return runtime.prepare_run_dir("audit", view)


# ------------------------------------------------------------------- data


def _annotators(path: str, examples: list, field: str) -> list[str] | None:
  """The annotator id of each example's row, or None without the column.

  Raises:
    DataError: the column is in some rows but missing in another, or holds
      something other than a string or an integer (names file and line); a
      field named by --annotator-field that no row has.
  """
  rows = {r.row: r for r in read_rows(path)}
  present = [field in (rows[e.row].data or {}) for e in examples]
  if not any(present):
    if field != AuditConfig.annotator_field:  # named by the user
      raise DataError(
        f"--annotator-field {field}: no row of {path} has that field; "
        "expected the name of the rows' annotator id field (or leave the "
        "option out)"
      )
    return None
  out = []
  for e, has in zip(examples, present, strict=True):
    where = rows[e.row].where
    if not has:
      raise DataError(
        f"{where}: missing field '{field}' (other rows have it; give every "
        "row an annotator id, or none)"
      )
    value = rows[e.row].data[field]
    if isinstance(value, bool) or not isinstance(value, str | int):
      raise DataError(
        f"{where}: field '{field}' must be a string or an integer "
        f"annotator id, got {type(value).__name__}"
      )
    out.append(str(value))
  return out


def read_judgements(
  config: AuditConfig, template: Any = None, *, scoring: bool = False
) -> tuple[audit.Interned, list[PreferencePair], dict[str, Any]]:
  """--data as interned judgements, the pairs (for scoring), and counts.

  ``template`` is the scored model's chat template (None: it has none).
  When a model is scored (``scoring``), rows are rendered exactly as that
  model was trained on them: HH-RLHF text stays raw without a template;
  otherwise conversations fall back to a plain "role: content" rendering.

  Raises:
    DataError: a bad file (file, line, field), rows that are neither
      preference pairs nor ranked, a bad annotator column.
  """
  loaded = load_examples(
    config.data,
    strict=config.strict,
    chat_template=template if scoring else (template or plain_template),
  )
  first = loaded.examples[0]
  ties = 0
  if isinstance(first, PreferencePair):
    pairs = list(loaded.examples)
    sources = list(loaded.examples)
  elif isinstance(first, RankedExample):
    rows, win, lose, ties = audit.ranked_pairs(
      [e.ranks for e in loaded.examples]
    )
    pairs, sources = [], []
    for r, w, l_ in zip(rows, win, lose, strict=True):
      e = loaded.examples[r]
      pairs.append(
        PreferencePair(
          e.prompt, e.responses[w], e.responses[l_], e.source, e.row, e.where
        )
      )
      sources.append(e)
  else:
    raise DataError(
      f"{config.data}: expected preference pairs (prompt/chosen/rejected, "
      "HH-RLHF transcripts or conversational) or ranked rows, got "
      f"{row_kind(first)}"
    )
  names = _annotators(config.data, sources, config.annotator_field)
  interned = audit.intern_pairs(
    [p.prompt for p in pairs],
    [p.chosen for p in pairs],
    [p.rejected for p in pairs],
    names,
  )
  drops = loaded.drops
  counts = {
    "file": config.data,
    "format": next(iter(loaded.formats.values())),
    "rows_read": drops.total_read,
    "rows_kept": drops.total_kept,
    "rows_dropped": drops.total_dropped,
    **{f"dropped_{k}": v for k, v in drops.counts().items()},
    # Identical responses (dropped by the reader) and equal ranks: ties.
    "ties": drops.counts().get("chosen_equals_rejected", 0) + ties,
    "annotator_field": config.annotator_field if names else None,
  }
  return interned, pairs, counts


# ----------------------------------------------------------- reward model


def _tokenizer_dir(path: pathlib.Path) -> pathlib.Path:
  for d in (path, path / "outputs" / "rm"):
    if (d / "tokenizer.json").is_file():
      return d
  raise runtime.UserError(  # named by `_named_reward_model`, as the rest
    f"{path}: no tokenizer.json in it or in its outputs/rm"
  )


@contextlib.contextmanager
def _named_reward_model() -> Iterator[None]:
  """Errors of the reading inside, named as the --reward-model's."""
  from rlhf_jax import models

  try:
    yield
  except (models.ModelLoadError, runtime.UserError) as e:
    raise runtime.UserError(f"--reward-model {e}") from None


def load_scorer(
  path: str, max_length: int | None = None
) -> tuple[Any, Any, tuple[Any, Any]]:
  """(tokenizer adapter, its chat template or None, (params, jitted
  pair_rewards)) of a reward-model directory (``stages.rm.load_rm``).

  A warning on stderr when ``max_length`` (prompt + response tokens the
  pairs are scored at) exceeds the model's max_position_embeddings; an
  error for learned positions (GPT-2), which have no row past them.

  Raises:
    UserError: each naming --reward-model: no reward model or no
      tokenizer there, a config.json, tokenizer or weight file that cannot
      be read (or weights that are not finite), or max_length past a
      GPT-2 model's learned positions.
    ModelLoadError: a tokenizer with ids past the reward model's
      vocabulary (its message names --reward-model).
  """
  import jax

  from rlhf_jax import models
  from rlhf_jax.data import HFTokenizerAdapter
  from rlhf_jax.stages.rm import backbone_dir, load_rm
  from rlhf_jax.stages.user_data import template_of
  from rlhf_jax.train import pair_rewards

  root = pathlib.Path(path)
  # The checks read config.json and the tokenizer, before any weights.
  with _named_reward_model():
    model_config = models.load_hf_config(backbone_dir(root))
  limit = model_config.max_position_embeddings
  if max_length is not None and max_length > limit:
    what = f"--max-prompt-length + --max-response-length = {max_length} tokens"
    try:  # learned positions (GPT-2): a position past them reads NaN
      models.check_position_table(max_length, model_config, what, "lower them")
    except ValueError as e:
      raise runtime.UserError(f"--reward-model {path}: {e}") from None
    sys.stderr.write(
      f"rlhf-jax: warning: --reward-model {path} has "
      f"max_position_embeddings {limit}, below the {max_length} tokens of "
      "--max-prompt-length + --max-response-length; lower them to the "
      "lengths it was trained at\n"
    )
  with _named_reward_model():
    tok_dir = _tokenizer_dir(root)
    tok = models.load_tokenizer(tok_dir)
  # The tokenizer may sit beside the run, not the model's config.json.
  models.check_vocab_fits(
    tok,
    model_config.vocab_size,
    f"--reward-model {path}",
    size_from="the reward model's vocab_size",
    ids_from=str((tok_dir / "tokenizer.json").relative_to(root)),
  )
  with _named_reward_model():
    model_config, params, pooling = load_rm(root)
  adapter = HFTokenizerAdapter.wrap(tok)
  fn = jax.jit(
    lambda p, b: pair_rewards(p, b, model_config=model_config, pooling=pooling)
  )
  return adapter, template_of(tok), (params, fn)


def score_pairs(
  pairs: list[PreferencePair],
  adapter: Any,
  model: tuple[Any, Any],
  config: AuditConfig,
) -> dict[str, Any]:
  """Reward-model scores and token lengths of every pair (in order).

  Returns:
    {chosen, rejected: f32[N] scores; chosen_len, rejected_len: i64[N]
    response tokens (after truncation); truncated: counts per field;
    unknown_tokens: tokens lost to the tokenizer's unknown token}.
  """
  from rlhf_jax.data import tokenize_preferences, trim_padding
  from rlhf_jax.types import PreferenceBatch

  params, fn = model
  with prompt_room_as("--max-prompt-length"):
    ds = tokenize_preferences(
      pairs,
      adapter,
      max_prompt_length=config.max_prompt_length,
      max_response_length=config.max_response_length,
      truncate_prompts=True,
    )
  # The forward runs at the data's lengths, not the caps.
  (ds,), _ = trim_padding(ds)
  a = ds.arrays
  n, b = len(pairs), config.batch_size
  rc, rr = np.zeros(n, np.float32), np.zeros(n, np.float32)
  for start in range(0, n, b):
    idx = np.arange(start, start + b) % n  # the last batch wraps: one shape
    batch = PreferenceBatch(**{k: v[idx] for k, v in a.items()})
    c, r = fn(params, batch)
    k = min(b, n - start)
    rc[start : start + k] = np.asarray(c)[:k]
    rr[start : start + k] = np.asarray(r)[:k]
  return {
    "chosen": rc,
    "rejected": rr,
    "chosen_len": a["chosen_mask"].sum(1),
    "rejected_len": a["rejected_mask"].sum(1),
    "truncated": dict(ds.truncation.truncated),
    "unknown_tokens": ds.truncation.unknown_tokens,
  }


# ----------------------------------------------------------------- audit


def audit_data(
  interned: audit.Interned, config: AuditConfig
) -> tuple[audit.GraphAudit, dict[str, Any]]:
  """The consistency, noise and annotator sections of results.json."""
  x = interned
  g = audit.audit_judgements(
    x.judgements,
    len(x.responses),
    exact_max_nodes=config.exact_max_nodes,
    max_cycles=config.max_cycles,
  )
  examples = [
    {
      "prompt": x.prompts[p],
      "cycle": [x.responses[r] for r in cyc],
    }
    for p, cyc in g.examples
  ]
  out = {
    "consistency": g.summary,
    "cycle_examples": examples,
    "noise": audit.label_noise(g),
    "annotators": None,
  }
  if x.annotators is not None:
    out["annotators"] = audit.annotator_consistency(
      x.judgements, g, x.annotators, num_responses=len(x.responses)
    )
  return g, out


def audit_reward_model(
  interned: audit.Interned, g: audit.GraphAudit, scores: dict[str, Any]
) -> dict[str, Any]:
  """The reward-model section of results.json (token lengths)."""
  rm = audit.reward_model_audit(
    scores["chosen"],
    scores["rejected"],
    scores["chosen_len"],
    scores["rejected_len"],
  )
  per_response = audit.response_scores(
    interned.judgements,
    scores["chosen"],
    scores["rejected"],
    len(interned.responses),
  )
  rm["graph"] = audit.reward_model_graph_audit(
    interned.judgements, g, per_response
  )
  rm["length_unit"] = "tokens"
  rm["truncated"] = scores["truncated"]
  rm["unknown_tokens"] = scores["unknown_tokens"]
  return rm


# ---------------------------------------------------------------- report


def _md(text: str, limit: int = MAX_TEXT) -> str:
  """One escaped line of at most ``limit`` characters."""
  t = " ".join(str(text).split())
  if len(t) > limit:
    t = t[: limit - 1] + "…"
  return runtime.visible(
    "".join("\\" + c if c in "\\`*_[]<>|#" else c for c in t)
  )


def _num(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _table(rows: Sequence[tuple[str, Any]]) -> list[str]:
  return ["| | |", "|---|---|", *(f"| {k} | {_num(v)} |" for k, v in rows)]


def _consistency_lines(c: dict[str, Any], examples: list) -> list[str]:
  lines = ["## Consistency (revealed preference)", ""]
  if not c["checkable"]:
    lines += [
      f"**{c['message']}.** Every prompt has at most 2 responses, so no "
      "intransitive cycle can be observed: this is not a finding of 0 "
      "inconsistency.",
      "",
    ]
  else:
    exact = (
      "exact"
      if c["min_fas_exact"]
      else (
        f"approximate, Eades-Lin-Smyth + local search on "
        f"{c['approx_components']} components; lower bound "
        f"{c['min_fas_lower_bound']}"
      )
    )
    cycles = c["cycles"]
    if c["cycles_capped"]:
      cycles = f"at least {cycles} (enumeration capped)"
    lengths = ", ".join(f"{k}: {v}" for k, v in c["cycle_lengths"].items())
    lines += _table(
      [
        ("prompts with >= 3 responses", c["prompts_checkable"]),
        ("judgements on them", c["judgements_checkable"]),
        ("intransitive cycles (simple, length >= 3)", cycles),
        ("cycles by length", lengths or "-"),
        ("cyclic triangles", c["cyclic_triangles"]),
        ("prompts with a cycle", c["prompts_with_cycles"]),
        (f"minimum judgements to drop ({exact})", c["min_fas"]),
        (
          "rationalisability (1 - dropped / judgements)",
          c["rationalisability"],
        ),
      ]
    )
    lines.append("")
  lines += _table(
    [
      ("judgements", c["judgements"]),
      ("prompts", c["prompts"]),
      ("responses", c["responses"]),
      ("most responses of one prompt", c["max_responses_per_prompt"]),
      ("pairs judged both ways", c["contradictory_pairs"]),
      ("their minority judgements", c["contradictory_judgements"]),
      ("pairs judged more than once", c["repeated_pairs"]),
    ]
  )
  if examples:
    lines += [
      "",
      "Shortest cycles (each response preferred to the next, "
      "the last to the first):",
      "",
    ]
    for e in examples:
      chain = " > ".join(f"«{_md(t, 40)}»" for t in e["cycle"])
      lines.append(f"- {_md(e['prompt'], 50)}: {chain} > (the first)")
  return [*lines, ""]


def _noise_lines(n: dict[str, Any]) -> list[str]:
  lines = ["## Label noise", ""]
  if n["noise"] is None:
    return [
      *lines,
      "No estimate: the data has no complete round (3 to 5 responses of a "
      "prompt with every pair judged exactly once).",
      "",
    ]
  return [
    *lines,
    f"Estimated label noise **{n['noise']:.4f}** (2-sigma range "
    f"{n['noise_low']:.4f} to {n['noise_high']:.4f}) from "
    f"{n['rounds']} complete rounds: {n['detected']:.4f} of their "
    f"{n['judgements']} judgements contradict the best ordering; flips of "
    "adjacent responses are invisible, so the noise is larger "
    "(rlhf_jax.audit.noise: Bradley-Terry judge on Gaussian utilities).",
    "",
  ]


def _annotator_lines(a: dict[str, Any] | None) -> list[str]:
  if a is None:
    return []
  n, shared = a["annotators"], a["shared_pairs"]
  agreement = (
    f"{shared} pairs judged by several, on which labels of different "
    f"annotators agree {_num(a['shared_pair_agreement'])}"
    if shared
    else "no pair was judged by several, so their agreement is not measured"
  )
  lines = [
    "## Annotators",
    "",
    f"{n} annotator{'s' if n != 1 else ''}; {agreement}.",
    "",
    "| annotator | judgements | agreement with the best ordering | "
    "pairs judged both ways | own rationalisability |",
    "|---|---|---|---|---|",
  ]
  per = sorted(a["per_annotator"].items(), key=lambda kv: -kv[1]["judgements"])
  for name, s in per[:MAX_ANNOTATOR_ROWS]:
    lines.append(
      f"| {_md(name, 30)} | {s['judgements']} | "
      f"{_num(s['consensus_agreement'])} | {s['self_contradictory_pairs']} | "
      f"{_num(s['rationalisability'])} |"
    )
  if len(per) > MAX_ANNOTATOR_ROWS:
    lines.append(f"\n({len(per) - MAX_ANNOTATOR_ROWS} more in results.json)")
  return [*lines, ""]


def reward_model_lines(rm: dict[str, Any], plots: dict[str, str]) -> list[str]:
  """report.md lines of a ``reward_model_audit`` (also used by `rm`)."""
  cal = rm["calibration"]
  rows = [
    ("pairs", rm["pairs"]),
    ("accuracy (strict; ties count wrong)", rm["accuracy"]),
    ("ties", rm["ties"]),
    ("calibration ECE (10 bins)", cal["ece"]),
    ("log loss of sigmoid(r_c - r_r)", cal["log_loss"]),
    ("Brier score", cal["brier"]),
    ("mean confidence", cal["mean_confidence"]),
  ]
  length = rm.get("length")
  if length is not None:
    unit = rm.get("length_unit", "tokens")
    rows += [
      (f"accuracy, length-matched pairs ({unit})", length["matched_accuracy"]),
      (
        "accuracy chosen longer - chosen shorter",
        length["longer_minus_shorter"],
      ),
      ("model prefers the longer response", length["prefers_longer"]),
      ("labels prefer the longer response", length["labels_prefer_longer"]),
    ]
  lines = _table(rows)
  if length is not None:
    lines += ["", "| length bucket | pairs | accuracy |", "|---|---|---|"]
    lines += [
      f"| {b['name']} | {b['pairs']} | {_num(b['accuracy'])} |"
      for b in length["buckets"]
    ]
  for key, title in (("calibration", "Calibration"), ("length", "Length")):
    if key in plots:
      lines += ["", f"![{title}]({plots[key]})"]
  return [*lines, ""]


def _graph_rm_lines(g: dict[str, Any]) -> list[str]:
  if g["contradicted"] is None:
    return []
  return [
    "The model's ordering on the prompts with >= 3 responses:",
    "",
    *_table(
      [
        ("judgements it contradicts", g["contradicted"]),
        ("fewest any ordering must (minimum FAS)", g["min_fas"]),
        (
          "agreement with the judgements the best ordering keeps",
          g["agreement_kept"],
        ),
        ("agreement with the judgements it drops", g["agreement_dropped"]),
        ("cyclic triangles", g["triangles"]),
        (
          "broken by contradicting one judgement (minimal)",
          g["triangles_broken_minimally"],
        ),
        (
          "cyclic components at the minimum FAS",
          f"{g['components_at_min_fas']} of {g['cyclic_components']}",
        ),
      ]
    ),
    "",
  ]


def write_report(
  out: pathlib.Path, results: dict[str, Any], plots: dict[str, str]
) -> None:
  """Writes ``out/report.md`` from results.json's sections and the plots
  drawn (name -> path relative to ``out``)."""
  d = results["data"]
  lines = [
    f"# Preference-data audit: {_md(d['file'], 120)}",
    "",
    "## Data",
    "",
    f"- format {d['format']}: {d['rows_kept']} of {d['rows_read']} rows "
    f"kept, {d['rows_dropped']} dropped"
    + "".join(
      f", {k.removeprefix('dropped_')} {v}"
      for k, v in d.items()
      if k.startswith("dropped_")
    ),
    f"- ties (identical responses, equal ranks): {d['ties']}",
    f"- annotator column: {d['annotator_field'] or 'none'}",
    "",
  ]
  lines += _consistency_lines(results["consistency"], results["cycle_examples"])
  if "cycles" in plots:
    lines += [f"![Cycles]({plots['cycles']})", ""]
  lines += _noise_lines(results["noise"])
  lines += _annotator_lines(results["annotators"])
  rm = results.get("reward_model")
  if rm is not None:
    lines += ["## Reward model", "", f"`{_md(rm['path'], 120)}`", ""]
    lines += _graph_rm_lines(rm["graph"])
    lines += reward_model_lines(rm, plots)
  with runtime.atomic_file(out / "report.md") as f:
    f.write("\n".join(lines))


def run_audit(config: AuditConfig) -> int:
  """The `rlhf-jax audit` command (module docstring)."""
  if not config.data:
    raise runtime.UserError("rlhf-jax audit needs --data FILE")
  if not 2 <= config.exact_max_nodes <= 20:
    raise runtime.UserError(
      f"--exact-max-nodes {config.exact_max_nodes}: expected 2..20"
    )
  if not 1 <= config.max_cycles <= MAX_CYCLES:
    raise runtime.UserError(
      f"--max-cycles {config.max_cycles}: expected 1..{MAX_CYCLES} (each "
      "cycle found is held in memory: a million took 0.8 GB)"
    )
  if not config.annotator_field.strip():
    raise runtime.UserError(
      "--annotator-field is empty: expected the name of the rows' annotator "
      "id field (default: annotator)"
    )
  _check_out(config)  # before the data and the model are read
  template, adapter, model = None, None, None
  if config.reward_model is not None:
    from rlhf_jax.stages.environment import setup_jax

    setup_jax()
    adapter, template, model = load_scorer(
      config.reward_model, config.max_prompt_length + config.max_response_length
    )
    # Before --overwrite clears --out (`_out_dir`) and the pairs are read.
    check_bos_room(
      "--max-prompt-length",
      config.max_prompt_length,
      adapter.bos_id is not None,
    )
  interned, pairs, counts = read_judgements(
    config, template, scoring=model is not None
  )
  out = _out_dir(config)
  g, results = audit_data(interned, config)
  results = {"data": counts, **results}
  if model is not None:
    scores = score_pairs(pairs, adapter, model, config)
    results["reward_model"] = {
      "path": config.reward_model,
      **audit_reward_model(interned, g, scores),
    }
  from rlhf_jax.audit import plots as P

  plots: dict[str, str] = {}
  (out / PLOTS).mkdir(exist_ok=True)
  if P.plot_cycles(g.summary, g.prompt_fas, out / PLOTS / "cycles.png"):
    plots["cycles"] = f"{PLOTS}/cycles.png"
  if "reward_model" in results:
    drawn = P.plot_reward_model_audit(results["reward_model"], out / PLOTS)
    plots |= {k: f"{PLOTS}/{v}" for k, v in drawn.items()}
  results["plots"] = plots
  runtime.write_json(out / "results.json", results)
  write_report(out, results, plots)
  c = results["consistency"]
  if c["checkable"]:
    print(f"rationalisability = {c['rationalisability']:.4f}")
    how = "exact" if c["min_fas_exact"] else "approximate"
    print(f"min_fas = {c['min_fas']} ({how})")
    capped = " (at least: enumeration capped)" if c["cycles_capped"] else ""
    print(f"cycles = {c['cycles']}{capped}")
  else:
    print(c["message"])
  if results["noise"]["noise"] is not None:
    print(f"label_noise = {results['noise']['noise']:.4f}")
  if "reward_model" in results:
    rm = results["reward_model"]
    print(f"rm/accuracy = {rm['accuracy']:.4f}")
    print(f"rm/calibration_ece = {rm['calibration']['ece']:.4f}")
  print(f"report: {out / 'report.md'}")
  return 0
