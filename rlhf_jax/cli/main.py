"""Entry point of the `rlhf-jax` command.

  rlhf-jax <subcommand> [--preset NAME] [--field value ...]

The subcommand picks a typed config class (configs.py), ``--preset`` a
function returning its starting values (presets.py), and tyro parses the
remaining flags into field overrides. User errors (unknown subcommand,
preset or option, bad data, missing model directory) print ONE line on
stderr and exit with status 2, as does a lean install (``pip install
rlhf_jax`` without the ``cli`` extra): this module imports without the
extra's packages, and ``main`` names the extra before anything else runs.
SIGINT or SIGTERM saves the running stage and exits with 130 or 143 (128
+ the signal), saying whether to rerun with --resume (`_then`).
"""

import contextlib
import dataclasses
import io
import itertools
import logging
import os
import re
import shlex
import sys
import traceback
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Any, get_type_hints

from rlhf_jax._environment import bad_device_count
from rlhf_jax._optional import CLI_EXTRA_INSTALL, missing_cli_modules
from rlhf_jax.cli import presets as P
from rlhf_jax.runner import precompile, runtime
from rlhf_jax.runner.mesh import DistributedConfig, MeshConfig

COMMANDS = {
  "run": "the whole default pipeline: prompts, simulated feedback, reward "
  "model, PPO and DPO, evaluation, report.md",
  "sft": "supervised fine-tuning on demonstrations (--data FILE)",
  "rm": "train a reward model (the task's simulated feedback, --data FILE, "
  "or --preset hh-rlhf: Anthropic HH-RLHF)",
  "ppo": "PPO against the reward model (runs the stages it needs)",
  "dpo": "DPO on preference pairs (simulated feedback or --data FILE)",
  "grpo": "GRPO / Dr. GRPO / RLOO against reward functions in plain Python "
  "(--reward module:function)",
  "kto": "KTO on accept/reject feedback (--data FILE of {prompt, completion, "
  "label} rows; without it the accept-rate task, beside GRPO)",
  "generate": "sample continuations from a model or a run's policy",
  "eval": "evaluate a run's policy on the held-out prompts",
  "export": "write a run's policy or reward model as a Hugging Face dir",
  "audit": "consistency audit of preference data (--data FILE): cycles, "
  "rationalisability, label noise; with --reward-model, its calibration",
}

_HELP = """\
usage: rlhf-jax <subcommand> [--preset NAME] [OPTIONS]

Pure-JAX RLHF. With no options, `rlhf-jax run` makes TinyStories happier:
simulated preferences, a reward model, PPO and DPO, and a report.

subcommands:
{commands}

`rlhf-jax <subcommand> --help` lists every option with its meaning;
`rlhf-jax --version` (or -V) prints the versions of rlhf-jax and jax.
--debug (or RLHF_JAX_DEBUG=1), with any subcommand, also prints the
traceback of an error (the exit status stays the same).
"""

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
# --debug (or this variable set to 1) shows the traceback of any error.
DEBUG_ENV = "RLHF_JAX_DEBUG"
_DEBUG_HELP = (
  f"--debug (or {DEBUG_ENV}=1) also prints the traceback of an error."
)


def _version() -> str:
  """This package's installed version (its metadata; "unknown" when run
  from a tree that was never installed)."""
  from importlib import metadata

  try:
    return metadata.version("rlhf_jax")
  except metadata.PackageNotFoundError:
    return "unknown"


def _jax_version() -> str:
  import jax

  return jax.__version__


def _error(message: str) -> int:
  sys.stderr.write(f"rlhf-jax: error: {message}\n")
  sys.stderr.flush()
  return EXIT_USAGE


def _debug(args: list[str]) -> tuple[bool, list[str]]:
  """(whether tracebacks are wanted, args without --debug)."""
  value = os.environ.get(DEBUG_ENV, "").strip().lower()
  wanted = value not in ("", "0", "false", "no", "off")
  return wanted or "--debug" in args, [a for a in args if a != "--debug"]


def _validated(command: str, config: Any, args: Sequence[str]) -> Any:
  """The config, once every option passed ``stages.validate`` and a
  pipeline's input options `pipeline.check_inputs` (then its advisories
  are printed as warnings).

  Raises:
    UserError: the problems, one per line; an input option the command
      does not read, or one missing its companion.
    DataError: an input file that does not exist.
  """
  from rlhf_jax.stages.configs import PipelineConfig
  from rlhf_jax.stages.pipeline import check_inputs
  from rlhf_jax.stages.validate import advisories, problems

  bad = problems(command, config)
  if bad:
    raise runtime.UserError("\nrlhf-jax: error: ".join(bad))
  if isinstance(config, PipelineConfig):  # no warning before its refusal
    check_inputs(command, config)
  given = _option_names(args, _switches(type(config)))
  for line in advisories(command, config, given):
    sys.stderr.write(f"rlhf-jax: warning: {line}\n")
  return config


def _split_preset(args: list[str]) -> tuple[str | None, list[str]]:
  """Removes ``--preset NAME`` / ``--preset=NAME`` from args.

  Raises:
    UserError: --preset without a name, or given twice (the later one would
      silently win, as no other option may).
  """
  out, names, i = [], [], 0
  while i < len(args):
    a = args[i]
    if a == "--preset":
      names.append(args[i + 1] if i + 1 < len(args) else "")
      i += 2
      continue
    if a.startswith("--preset="):
      names.append(a.split("=", 1)[1])
    else:
      out.append(a)
    i += 1
  if len(names) > 1:
    raise runtime.UserError(f"--preset is given twice ({', '.join(names)})")
  if names and not names[0]:
    raise runtime.UserError("--preset needs a name")
  return (names[0] if names else None), out


# Box-drawing characters of tyro's error panels (unicode, or ASCII when the
# output is not a terminal).
_BOX_EDGE = re.compile(r"^[\s│╭╮╰╯─┤├|+\-]+|[\s│╭╮╰╯─┤├|+\-]+$")


# tyro's suggestions for unrecognized options: a heading ("Perhaps you
# meant:", or "Arguments similar to --x:" when several are unrecognized),
# then each suggested flag indented 4 more than the heading, its help text
# 8 more (inside a box, or without one when the output has no colours).
_HINT_HEAD = re.compile(r"^(?:Perhaps you meant|Arguments similar to (\S+)):$")
_HINT_FLAG = re.compile(r"^(--[a-z][\w.\-]*)")


def _suggestions(text: str) -> list[tuple[str | None, list[str]]]:
  """[(the unrecognized flag or None, the flags tyro suggests for it)]."""
  groups: list[tuple[str | None, list[str]]] = []
  flag_indent = -1
  for raw in text.splitlines():
    body = re.sub(r"^[│|]", "", raw).rstrip(" │|")
    indent = len(body) - len(body.lstrip())
    head = _HINT_HEAD.match(body.strip())
    flag = _HINT_FLAG.match(body.strip())
    if head:
      groups.append((head.group(1), []))
      flag_indent = indent + 4
    elif flag and groups and indent == flag_indent:
      groups[-1][1].append(flag.group(1))
  return [(bad, flags) for bad, flags in groups if flags]


def _hint(text: str) -> str:
  """'; perhaps you meant --a or --b' (per unrecognized flag when tyro
  names it), or ''."""
  parts = [
    (f"for {bad} " if bad else "") + "perhaps you meant " + " or ".join(fl)
    for bad, fl in _suggestions(text)
  ]
  return "".join(f"; {p}" for p in parts)


def _one_line(text: str) -> str:
  """The message of tyro's boxed error, on one line."""
  lines = []
  for raw in text.splitlines():
    line = _BOX_EDGE.sub("", raw)
    if not line or line.startswith("For full helptext"):
      continue
    lines.append(line)
  # The first line is the box title ("Unrecognized options", "Value
  # error"); the next holds the specifics, wrapped over more lines until
  # the sentence ends (e.g. "Expected one of" / "('a', 'b').").
  rest = (
    lines[1 : lines.index("Argument helptext:")]
    if ("Argument helptext:" in lines)
    else lines[1:]
  )
  heads = [i for i, line in enumerate(rest) if _HINT_HEAD.match(line)]
  if heads:  # "Unrecognized options: ..." and tyro's suggestions
    return " ".join(rest[: heads[0]]) + _hint(text)
  body = rest[:1]
  for line in rest[1:]:
    if body[-1].endswith((".", ":")):
      break
    body.append(line)
  return " ".join(body or lines[:1]) or "invalid arguments"


def _with_values(message: str, args: list[str]) -> str:
  """tyro's "Unrecognized options: --num-sample, 3" as "Unrecognized
  option: --num-sample 3": a value is shown with the option before it,
  not as an option of its own."""
  head = re.match(r"Unrecognized options?: (.*?)(;.*)?$", message)
  if head is None:
    return message
  nexts = set(itertools.pairwise(args))
  merged: list[str] = []
  for item in _items(head.group(1), args):
    shown = _quoted(item)
    if _is_value(item) and merged and _takes_value(merged[-1], item, nexts):
      merged[-1] += f" {shown}"
    else:
      merged.append(shown)
  s = "s" if len(merged) > 1 else ""
  return f"Unrecognized option{s}: {', '.join(merged)}{head.group(2) or ''}"


def _items(listed: str, args: list[str]) -> list[str]:
  """tyro's ", "-joined list of arguments, split back into the arguments
  given (one of them may hold ", " itself: `--foo "a, b"`)."""
  parts, given, out = listed.split(", "), set(args), []
  while parts:
    k = next(
      (k for k in range(len(parts), 1, -1) if ", ".join(parts[:k]) in given),
      1,
    )
    out.append(", ".join(parts[:k]))
    parts = parts[k:]
  return out


def _quoted(item: str) -> str:
  """An argument as a shell would take it back: quoted when empty or
  holding spaces, commas or quotes."""
  return shlex.quote(item) if not item or re.search(r"[\s,'\"]", item) else item


def _is_value(item: str) -> bool:
  """Not an option: a word, or a number such as -1, -1e-3 or -inf."""
  if not item.startswith("-"):
    return True
  try:
    float(item)
  except ValueError:
    return False
  return True


def _takes_value(option: str, item: str, nexts: set) -> bool:
  """``item`` followed ``option`` in the arguments, and ``option`` is an
  option that has no value yet (not a word, not --x=1, not --x 1)."""
  bare = option.startswith("-") and not re.search(r"[= ]", option)
  return bare and (option, item) in nexts


def _switches(cls: type, prefix: str = "") -> set[str]:
  """tyro's flags of the bool fields of ``cls`` and its nested configs
  (``--strict``, ``--ppo.algo.adaptive-kl``)."""
  out = set()
  for name, hint in get_type_hints(cls).items():
    while typing.get_origin(hint) is typing.Annotated:  # tyro.conf markers
      hint = typing.get_args(hint)[0]
    flag = prefix + name.replace("_", "-")
    if hint is bool:
      out.add("--" + flag)
    elif dataclasses.is_dataclass(hint):
      out |= _switches(hint, flag + ".")
  return out


def _switch_hint(cls: type, args: list[str], text: str) -> str:
  """'; --x is a switch ...' for each --x=VALUE of a bool field whose VALUE
  tyro left over as an unrecognized option, or ''."""
  head = re.search(r"Unrecognized options?: (.*)", text)
  if head is None:
    return ""
  left = {_BOX_EDGE.sub("", w) for w in head.group(1).split(",")}
  switches = _switches(cls)
  hints = []
  for arg, after in zip(args, [*args[1:], None], strict=True):
    flag, eq, value = arg.partition("=")
    given = arg
    if not eq and after is not None:  # --greedy true
      value, given = after, f"{arg} {after}"
    group, dot, name = flag[2:].rpartition(".")
    flag = f"--{group}{dot}{name.removeprefix('no-')}"  # --no-x: --x's
    if flag in switches and value in left:
      no = f"--{group}{dot}no-{name.removeprefix('no-')}"  # tyro's form
      hints.append(f"; {flag} is a switch: pass {flag} or {no}, not {given}")
  return "".join(hints)


@contextlib.contextmanager
def _wide_errors(args: list[str]):
  """tyro renders its error box at a very wide width (not --help): one
  line per sentence, so `_one_line` keeps the bad value ("could not
  convert string to float: 'abc'") and the choices that wrapped away."""
  if "-h" in args or "--help" in args:
    yield
    return
  old = os.environ.get("COLUMNS")
  os.environ["COLUMNS"] = "10000"
  try:
    yield
  finally:
    if old is None:
      os.environ.pop("COLUMNS", None)
    else:
      os.environ["COLUMNS"] = old


def _parse(cls: type, default: Any, args: list[str], prog: str, doc: str):
  """tyro parse; a usage error becomes CLIError with one line."""
  import tyro

  buf = io.StringIO()
  try:
    with contextlib.redirect_stderr(buf), _wide_errors(args):
      return tyro.cli(
        cls, default=default, args=args, prog=prog, description=doc
      )
  except SystemExit as e:
    if e.code in (0, None):
      raise
    text = buf.getvalue()
    message = _with_values(_one_line(text), args) + _switch_hint(
      cls, args, text
    )
    raise runtime.UserError(f"{message} (see `{prog} --help`)") from None
  except (ValueError, TypeError, ZeroDivisionError) as e:
    # A config class that checks itself when built (__post_init__).
    raise runtime.UserError(f"{e} (see `{prog} --help`)") from None


def _description(command: str, cls: type) -> str:
  names = ", ".join(P.PRESETS[command])
  return (
    f"{COMMANDS[command]}.\n\n{cls.__doc__}\n\nPresets (--preset): {names}."
    f"\n\n{_DEBUG_HELP}"
  )


# Option groups of the pipeline config that a subcommand never reads (their
# stages do not run); hidden from its --help and its flags.
_NOT_GRPO = ("grpo", "reward", "reward_weights")
_UNUSED_GROUPS = {
  "run": _NOT_GRPO,
  "rm": ("ppo", "dpo", "eval", *_NOT_GRPO),
  "ppo": ("dpo", *_NOT_GRPO),
  "dpo": ("ppo", *_NOT_GRPO),
  "grpo": ("feedback", "rm", "ppo", "dpo", "reward_model", "data", "eval_data"),
}


def _suppressed(cls: type, default: Any, paths: set[tuple[str, ...]]):
  """(class, default) with the fields at ``paths`` (relative to ``cls``)
  hidden from tyro: a subclass whose fields are ``tyro.conf.Suppress``."""
  import tyro

  hints = get_type_hints(cls)
  spec, values = [], {}
  for name in sorted({p[0] for p in paths}):
    value = getattr(default, name)
    if (name,) in paths:
      typ = tyro.conf.Suppress[hints[name]]
    else:
      rest = {p[1:] for p in paths if p[0] == name and len(p) > 1}
      typ, value = _suppressed(hints[name], value, rest)
    spec.append((name, typ, dataclasses.field(default=value)))
    values[name] = value
  sub = dataclasses.make_dataclass(
    cls.__name__, spec, bases=(cls,), frozen=True
  )
  sub.__doc__ = cls.__doc__
  fields = {f.name: getattr(default, f.name) for f in dataclasses.fields(cls)}
  return sub, sub(**{**fields, **values})


def _hidden_paths(command: str, default: Any) -> set[tuple[str, ...]]:
  """Option groups the command never reads, and library-config fields the
  stages fill in themselves (stages.configs.DERIVED_FIELDS)."""
  from rlhf_jax.stages.configs import (
    DERIVED_FIELDS,
    KTOStageConfig,
    PipelineConfig,
  )

  if isinstance(default, KTOStageConfig):
    # The accept-rate task sets the GRPO arm's sizes from --accept.*, and
    # its report shows no samples.
    return {
      ("loss", "axis_name"),
      ("eval", "report_samples"),
      *(("grpo", n) for n in ("iterations", "batch_size", "eval_every")),
      ("grpo", "algo", "group_size"),
      *(("grpo", "algo", n) for n in DERIVED_FIELDS[("grpo", "algo")]),
    }
  if not isinstance(default, PipelineConfig):
    return set()
  paths = {(g,) for g in _UNUSED_GROUPS.get(command, ())}
  if command in ("rm", "dpo"):  # no PPO/GRPO rollouts
    paths.add(("sampling", "exact_sampling"))
  for group, names in DERIVED_FIELDS.items():
    if group[:1] not in paths:
      paths |= {(*group, n) for n in names}
  return paths


def _plain(config: Any, cls: type) -> Any:
  """The parsed config rebuilt from the plain classes (the library gets
  its own config classes, not the help-only subclasses)."""
  from rlhf_jax.runner.config_json import config_from_dict

  return config_from_dict(cls, runtime.config_dict(config))


def _hh_command_class(hh_cls: type) -> type:
  @dataclasses.dataclass(frozen=True)
  class HHCommand:
    """HH-RLHF reward model: trains on every file but helpful-base rows
    0-499 and reports accuracy on those 500 pairs beside the length
    baseline."""

    preset: str = "hh-rlhf"
    """Named preset."""
    run_dir: str | None = None
    """Output directory. Default: runs/rm-<preset>."""
    resume: bool = False
    """Continue the run in run_dir from its checkpoints."""
    overwrite: bool = False
    """Delete an existing run in run_dir and start again."""
    hh: hh_cls = dataclasses.field(default_factory=hh_cls)
    """Settings of the HH-RLHF job."""
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

  return HHCommand


def _run_hh(config: Any) -> int:
  from rlhf_jax.runner.mesh import Placement
  from rlhf_jax.stages.environment import setup_jax, start
  from rlhf_jax.stages.hh_rm import check_inputs, run_hh_reward_model

  # The HH job writes (and checks on resume) its own config.json.
  setup_jax()
  start(config.distributed)
  placement = Placement.create(config.mesh)
  try:
    check_inputs(config.hh)  # before the run directory is made
  except FileNotFoundError as e:
    raise runtime.UserError(str(e)) from None
  run_dir = runtime.run_dir_for("rm", config)
  if placement.is_primary:
    runtime.prepare_run_dir("rm", config, write_config=False)
  print(placement.describe())
  try:
    results = run_hh_reward_model(
      config.hh, run_dir, resume=config.resume, placement=placement
    )
  except FileNotFoundError as e:
    raise runtime.UserError(str(e)) from None
  for k in (
    "heldout/accuracy",
    "heldout/stderr",
    "baseline/length_chars_accuracy",
  ):
    if k in results:
      print(f"{k} = {results[k]:.4f}")
  print(f"report: {run_dir / 'report.md'}")
  return 0


def _dispatch(command: str, config: Any) -> int:
  if command in P.PIPELINE_COMMANDS:
    if command == "rm" and config.preset in P.HH_PRESETS:
      return _run_hh(config)
    from rlhf_jax.stages.pipeline import dry_run_pipeline, run_pipeline

    if config.dry_run:
      dry_run_pipeline(command, config)
      return 0
    out = run_pipeline(command, config)
    for k, v in out["summary"].items():
      print(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}")
    from rlhf_jax.stages.report import time_line

    print(time_line(out))
    return 0
  if command == "kto":
    from rlhf_jax.stages.kto import run_kto

    return run_kto(config)
  if command == "audit":
    from rlhf_jax.stages.audit import run_audit

    return run_audit(config)
  if command == "sft":
    from rlhf_jax.stages.report import print_summary
    from rlhf_jax.stages.sft import run_sft

    summary = run_sft(config)
    if not config.dry_run:
      print_summary("sft", config, summary)
    return 0
  from rlhf_jax.stages import tools

  fn: Callable[[Any], int] = getattr(tools, f"run_{command}")
  return fn(config)


def _option_names(
  args: Sequence[str], switches: Collection[str] = ()
) -> list[str]:
  """The options among ``args`` as `--help` spells them (tyro also takes
  ``_`` for ``-``): ``--rm.steps`` for ``--rm_steps=3``, and ``--strict``
  for ``--no-strict`` when ``--strict`` is one of ``switches`` (tyro's
  off switch of a bool flag; `_switches`)."""
  out = []
  for arg in args:
    if not arg.startswith("--") or arg == "--":
      continue
    group, _, leaf = arg[2:].split("=", 1)[0].replace("_", "-").rpartition(".")
    prefix = f"--{group}." if group else "--"
    on = prefix + leaf.removeprefix("no-")
    out.append(
      on if leaf.startswith("no-") and on in switches else prefix + leaf
    )
  return out


def _check_repeats(args: list[str], switches: Collection[str]) -> None:
  """tyro keeps only the last of a repeated option; say so instead.

  Raises:
    UserError: an option given twice (several values follow one flag;
      ``--x`` and ``--no-x`` of a switch are one option).
  """
  seen = set()
  for flag in _option_names(args, switches):
    if flag in seen:
      raise runtime.UserError(
        f"{flag} is given twice; give it once (an option with several "
        "values takes them after one flag: --reward A B)"
      )
    seen.add(flag)


def _config(command: str, rest: list[str]) -> Any:
  """The subcommand's config: its preset, then the flags in ``rest``.

  Raises:
    UserError: an unknown preset or a bad flag (one line).
  """
  from rlhf_jax.stages.unread import unread_option

  name, rest = _split_preset(rest)
  name = name or ("default" if command in P.PRESETS else None)
  table = P.PRESETS[command]
  if name not in table:
    raise runtime.UserError(
      f"unknown preset {name!r} for `rlhf-jax {command}`; choose from: "
      f"{', '.join(table)}"
    )
  default = table[name]()
  prog = f"rlhf-jax {command}"
  hh = command == "rm" and name in P.HH_PRESETS
  cls = _hh_command_class(type(default)) if hh else type(default)
  _check_repeats(rest, _switches(cls))
  if hh:
    if any(a.split("=", 1)[0] == "--dry-run" for a in rest):
      raise runtime.UserError(
        f"--dry-run is not available for the HH-RLHF job of --preset "
        f"{name} (it sizes the pipeline's steps: run, rm, ppo, dpo, sft)"
      )
    doc = (
      f"{cls.__doc__}\n\nPresets (--preset): {', '.join(table)}.\n\n"
      f"{_DEBUG_HELP}"
    )
    return _parse(cls, cls(preset=name, hh=default), rest, prog, doc)
  plain, paths = type(default), _hidden_paths(command, default)
  if paths:
    _, default = _suppressed(plain, default, paths)
  doc = _description(command, type(default))
  config = _parse(type(default), default, rest, prog, doc)
  given = _option_names(rest, _switches(plain))
  unread = unread_option(command, config, given)
  if unread:
    raise runtime.UserError(unread)
  return _plain(config, plain) if paths else config


def _not_utf8(args: Sequence[str]) -> str | None:
  """The message for the first argument that is not UTF-8 (Python keeps
  such bytes as lone surrogates, which tokenizers and report files then
  refuse deep inside a command), or None.

  Args:
    args: the command line after the program name.
  """
  for i, a in enumerate(args):
    try:
      a.encode("utf-8")
    except UnicodeEncodeError as e:
      try:
        raw = a.encode("utf-8", "surrogateescape")
        bad = f"byte 0x{a[e.start].encode('utf-8', 'surrogateescape').hex()}"
      except UnicodeEncodeError:  # a surrogate no OS byte maps to
        raw, bad = a.encode("utf-8", "backslashreplace"), "a lone surrogate"
      option = next((o for o in args[i - 1 :: -1] if o.startswith("--")), "")
      named = i and option and not a.startswith("--")
      what = f"{option.partition('=')[0]} value" if named else "argument"
      return (
        f"{what} {raw!r} is not UTF-8 text ({bad}); options, prompts and "
        "paths are read as UTF-8"
      )
  return None


def _backend_error(e: Exception) -> str | None:
  """A jax backend that $JAX_PLATFORMS asks for and this machine cannot
  start (e.g. 'tpu' without libtpu), as one line; None for other errors.
  The command has not started work then: no run directory exists yet."""
  message = str(e).split(" (set JAX_PLATFORMS")[0].splitlines()
  message = message[0].rstrip(".") if message else ""
  platforms = os.environ.get("JAX_PLATFORMS")
  named = (
    isinstance(e, RuntimeError) and "Unable to initialize backend" in message
  )
  if not named:
    if not (platforms and _raised_in_jax_backends(e)):
      return None
    # e.g. 'cuda' with no plugin installed: jax 0.12 fails an assert with
    # no message
    reason = f": {type(e).__name__}: {message}" if message else ""
    message = f"jax could not start a backend{reason}"
  if not platforms:
    return f"{message} (jax's default backends)"
  return (
    f"{message} ($JAX_PLATFORMS={platforms!r}); unset JAX_PLATFORMS, or "
    "name a backend this machine has whose jax support is installed (cpu; "
    "cuda with jax[cuda12], tpu with jax[tpu])"
  )


def _raised_in_jax_backends(e: BaseException) -> bool:
  """Whether ``e`` was raised in jax's backend set-up (xla_bridge.py)."""
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and os.path.basename(frames[-1].filename) == (
    "xla_bridge.py"
  )


def _line_buffered(stream: Any) -> None:
  """Each line of ``stream`` written as it ends: a piped stdout is block
  buffered, so its log lines came after every progress line on stderr
  (`run 2>&1 | tee log`) and only at exit."""
  reconfigure = getattr(stream, "reconfigure", None)  # not on a StringIO
  if reconfigure is not None and not getattr(stream, "line_buffering", True):
    reconfigure(line_buffering=True)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (default sys.argv[1:]) and runs the subcommand.

  Returns:
    0 on success, 2 on a user error (one line per problem on stderr), 1 on
    an internal error (one line; ``--debug`` or RLHF_JAX_DEBUG=1 shows the
    traceback), 130 when interrupted by SIGINT and 143 by SIGTERM (after
    saving a checkpoint).
  """
  missing = missing_cli_modules()
  if missing:
    return _error(
      f"the rlhf-jax command needs the 'cli' extra (missing: "
      f"{', '.join(missing)}): {CLI_EXTRA_INSTALL}"
    )
  args = list(sys.argv[1:] if argv is None else argv)
  _line_buffered(sys.stdout)
  if not args or args[0] in ("-h", "--help"):
    width = max(len(c) for c in COMMANDS)
    lines = "\n".join(f"  {c:<{width}}  {d}" for c, d in COMMANDS.items())
    sys.stdout.write(_HELP.format(commands=lines))
    return 0
  debug, args = _debug(args)
  if args in (["--version"], ["-V"]):
    sys.stdout.write(f"rlhf-jax {_version()} (jax {_jax_version()})\n")
    return 0
  if not args:
    return _error("--debug needs a subcommand (see `rlhf-jax --help`)")
  bad = _not_utf8(args) or bad_device_count()
  if bad:
    return _error(bad)
  try:
    return _main(args[0], args[1:], debug)
  except KeyboardInterrupt:  # a second Ctrl-C: stop at once
    sys.stderr.write("rlhf-jax: interrupted\n")
    if precompile.compiling():  # its native compile would crash the exit
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED
  except BrokenPipeError:  # `rlhf-jax dpo --help | head`: the reader left
    # Python would report the failed flush of stdout again at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except Exception as e:  # a bug: one line, the traceback with --debug
    if debug:  # the traceback first; the exit status stays the same
      traceback.print_exc()
    disk = runtime.disk_error(e, "the output")
    if disk:
      return _error(_advice(args[0], disk, args))
    from jax.errors import JaxRuntimeError  # loaded by now

    if isinstance(e, MemoryError) or (  # e.g. a huge --num-samples
      isinstance(e, JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)
    ):  # XLA's allocator (e.g. a huge --max-new-tokens)
      return _error(
        f"out of memory ({str(e).splitlines()[0] if str(e) else ''}); ask "
        "for less work at once (fewer samples, prompts or tokens, or a "
        "smaller batch)"
      )
    backend = _backend_error(e)
    if backend:
      return _error(backend)
    if isinstance(
      e, NotADirectoryError | FileNotFoundError | IsADirectoryError
    ):
      # A path option naming something that is not there (e.g. a --run-dir
      # under a file).
      return _error(f"{e.filename}: {e.strerror}")
    rerun = "" if debug else f"rerun with --debug or {DEBUG_ENV}=1 for the "
    sys.stderr.write(
      f"rlhf-jax: internal error: {type(e).__name__}: {e} ({rerun}"
      f"{'traceback above' if debug else 'traceback'}, and report it)\n"
    )
    return EXIT_INTERNAL


# Subcommands with no run of their own to continue (no --resume).
_NO_RESUME = ("generate", "eval", "export", "audit")


def _advice(command: str, message: str, args: Sequence[str] = ()) -> str:
  """A user error's message; the advice to rerun with --resume (a failed
  write) says to run the command again instead for a subcommand without
  --resume, or when --overwrite was asked (resuming would continue the
  run it meant to replace)."""
  if command not in _NO_RESUME and "--overwrite" not in args:
    return message
  return message.replace(
    runtime.RESUME_ADVICE, "then run the same command again"
  )


def _then(command: str, e: "runtime.Interrupted") -> str:
  """What to do after an interrupted ``command``."""
  if command in _NO_RESUME:
    return "it keeps no checkpoint: run the same command again to start over."
  if e.resumable and not e.checkpoint:
    return (
      "the finished stages and the last checkpoint saved are kept (the "
      "sampling it stopped starts over). Run the same command with --resume "
      "to continue."
    )
  if e.resumable:
    return (
      "the stage's checkpoint is saved. Run the same command with --resume "
      "to continue."
    )
  return (
    "this job runs from its start: run the same command with --overwrite "
    "to start it again."
  )


@contextlib.contextmanager
def _warnings_as_lines():
  """The library's logged warnings (rlhf_jax.data: unknown tokens, rows
  kept) as the command's own lines, "rlhf-jax: warning: ...", once in a
  multi-host run, instead of a logging format some dependency set."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setLevel(logging.WARNING)
  handler.setFormatter(logging.Formatter("rlhf-jax: warning: %(message)s"))
  handler.addFilter(lambda _: runtime.is_primary_process())
  log = logging.getLogger("rlhf_jax")
  propagate = log.propagate
  log.addHandler(handler)
  log.propagate = False
  try:
    yield
  finally:
    log.removeHandler(handler)
    log.propagate = propagate


@contextlib.contextmanager
def _quiet_tensorboard_nan():
  """tensorboardX logs "NaN or Inf found in input tensor" for each such
  scalar (e.g. the mean reward of a function that scored no row), in a
  format of its own; metrics.jsonl and TensorBoard record the value."""
  x2num = logging.getLogger("tensorboardX.x2num")
  level = x2num.level
  x2num.setLevel(logging.ERROR)
  try:
    yield
  finally:
    x2num.setLevel(level)


def _dispatch_quietly(command: str, config: Any, debug: bool) -> int:
  """`_dispatch`, with absl's records that carry a traceback (orbax's
  background save threads) held back: a full or read-only disk, which
  the command reports in one line, drops them (they repeat it in ~300
  lines); otherwise they are logged when the command ends. Other absl
  records, and all of them with ``debug``, come as logged."""
  if debug:
    return _dispatch(command, config)
  held: list[logging.LogRecord] = []
  try:
    with runtime.held_log("absl", lambda r: r.exc_info is not None) as held:
      return _dispatch(command, config)
  except BaseException as e:
    if runtime.disk_error(e, "the output"):
      held.clear()
    raise
  finally:
    runtime.replay_log("absl", held)


def _interrupted_status() -> int:
  """128 + the stopping signal this process received: 130 for SIGINT
  (also when another process of the job received it), 143 for SIGTERM."""
  received = runtime.StopFlag.received
  return EXIT_INTERRUPTED if received is None else 128 + received


def _main(command: str, rest: list[str], debug: bool) -> int:
  from rlhf_jax.data import DataError
  from rlhf_jax.models import MissingSpecialTokenError, ModelLoadError

  try:
    if command not in COMMANDS:
      raise runtime.UserError(
        f"unknown subcommand {command!r}; choose from: {', '.join(COMMANDS)}"
      )
    config = _validated(command, _config(command, rest), rest)
    with _warnings_as_lines(), _quiet_tensorboard_nan():
      return _dispatch_quietly(command, config, debug)
  except runtime.Interrupted as e:
    sys.stderr.write(f"rlhf-jax: interrupted ({e}); {_then(command, e)}\n")
    return _interrupted_status()
  except (
    runtime.UserError,
    DataError,
    MissingSpecialTokenError,
    ModelLoadError,
  ) as e:
    if debug:  # where it was raised; still exit 2
      traceback.print_exc()
    return _error(_advice(command, str(e), rest))


if __name__ == "__main__":
  raise SystemExit(main())
