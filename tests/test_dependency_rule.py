"""The dependency rule (docs/conventions.md, Layout and dependency rule): the
core math imports only jax, numpy, chex, a few standard-library modules and
the shared core modules (ALLOWED_TOP, ALLOWED_LOCAL); imports point down."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "rlhf_jax"
CORE = [
  "masked",
  "stats",
  "logprobs",
  "kl",
  "advantages",
  "preference",
  "ppo",
  "sft",
]
ALLOWED_TOP = {
  "jax",
  "numpy",
  "chex",
  "typing",
  "functools",
  "math",
  "dataclasses",
  "collections",
}
ALLOWED_LOCAL = {
  "rlhf_jax.checks",
  "rlhf_jax.types",
  "rlhf_jax.masked",
  "rlhf_jax.stats",
  "rlhf_jax.kl",
}


def _imports(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        raise AssertionError(f"{path.name}: use absolute imports")
      if node.module == "rlhf_jax":  # from rlhf_jax import stats
        names += [f"rlhf_jax.{a.name}" for a in node.names]
      else:
        names.append(node.module or "")
  return names


@pytest.mark.parametrize("module", CORE)
def test_core_math_imports_only_allowed(module):
  path = PKG / f"{module}.py"
  assert path.exists(), f"missing core module {path}"
  bad = [
    n
    for n in _imports(path)
    if n.split(".")[0] not in ALLOWED_TOP and n not in ALLOWED_LOCAL
  ]
  assert not bad, f"{module}.py imports {bad}; allowed: {sorted(ALLOWED_TOP)}"


def test_rule_detects_violation(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import optax\nfrom flax import linen\nimport jax\n")
  names = _imports(bad)
  assert [n for n in names if n.split(".")[0] not in ALLOWED_TOP] == [
    "optax",
    "flax",
  ]


# Arrows point down: cli -> stages -> runner -> train -> the rest. A package
# may import the ones listed after it here, never one before it.
LAYERS = ["cli", "stages", "runner", "train"]


def _package_files(name: str) -> list[pathlib.Path]:
  return sorted((PKG / name).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downward(layer):
  above = LAYERS[: LAYERS.index(layer)]
  bad = []
  for path in _package_files(layer):
    for name in _imports(path):
      parts = name.split(".")
      if parts[0] == "rlhf_jax" and len(parts) > 1 and parts[1] in above:
        bad.append(f"{path.relative_to(PKG)} imports {name}")
  assert not bad, bad


def test_below_the_runner_nothing_imports_the_application():
  app = {"cli", "stages", "runner"}
  bad = []
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG)
    # __main__.py is the command's entry point (`python -m rlhf_jax`), above
    # the application, not below it.
    if rel.parts[0] in app or str(rel) == "__main__.py":
      continue
    for name in _imports(path):
      parts = name.split(".")
      if parts[0] == "rlhf_jax" and len(parts) > 1 and parts[1] in app:
        bad.append(f"{rel} imports {name}")
  assert not bad, bad


# The exceptions: a hub id resolves in the local Hugging Face cache the
# way transformers finds it (HF_HUB_CACHE, HF_HOME), never downloading;
# the package's first import checks the $JAX_NUM_CPU_DEVICES that `import
# jax` parses, before jax raises on it.
ENV_EXCEPTIONS = {
  pathlib.Path("models/hf_io.py"),
  pathlib.Path("_environment.py"),
}


def test_only_cli_and_stages_read_the_environment():
  readers = []
  for path in sorted(PKG.rglob("*.py")):
    text = path.read_text()
    rel = path.relative_to(PKG)
    if ("os.environ" in text or "os.getenv" in text) and (
      rel not in ENV_EXCEPTIONS
    ):
      readers.append(rel.parts[0])
  assert readers, "the check found no reader at all (stages read the env)"
  assert set(readers) <= {"cli", "stages"}, readers


# Train steps read as a composition of named pieces: no function in the
# train layer (docstring excluded) runs over one screen.
MAX_FUNCTION_LINES = 60


def _long_functions(path: pathlib.Path, limit: int) -> list[str]:
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      continue
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(
      first.value, ast.Constant
    )
    start = node.body[1].lineno if docstring and node.body[1:] else node.lineno
    if node.end_lineno - start + 1 > limit:
      out.append(f"{path.name}:{node.name} {node.end_lineno - start + 1}")
  return out


def test_train_step_functions_fit_one_screen():
  long = []
  for path in _package_files("train"):
    long += _long_functions(path, MAX_FUNCTION_LINES)
  assert not long, long


def test_function_length_rule_detects_a_long_function(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(61))
  path = tmp_path / "long.py"
  path.write_text(f'def f():\n  """Doc."""\n{body}\n')
  assert _long_functions(path, MAX_FUNCTION_LINES) == ["long.py:f 61"]


# The audit (rlhf_jax.audit) is low-level host math: numpy, the standard
# library, rlhf_jax.types and its own modules; matplotlib only in its plots
# module. Stages import it, never the reverse.
AUDIT_ALLOWED_TOP = {"numpy", "typing", "functools", "itertools", "math"}
AUDIT_ALLOWED_TOP |= {"dataclasses", "collections", "pathlib"}


def test_audit_is_low_level_math():
  bad = []
  for path in _package_files("audit"):
    allowed = AUDIT_ALLOWED_TOP | (
      {"matplotlib"} if path.name == "plots.py" else set()
    )
    for name in _imports(path):
      parts = name.split(".")
      if parts[0] == "rlhf_jax":
        ok = name == "rlhf_jax.types" or parts[1:2] == ["audit"]
      else:
        ok = parts[0] in allowed
      if not ok:
        bad.append(f"audit/{path.name} imports {name}")
  assert _package_files("audit"), "rlhf_jax/audit is missing"
  assert not bad, bad
