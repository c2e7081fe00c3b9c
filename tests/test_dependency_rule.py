"""DESIGN.md dependency rule: the core math imports only jax, numpy, chex and
rlhf_jax.types (plus the standard library's typing helpers)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "rlhf_jax"
CORE = ["masked", "logprobs", "kl", "advantages", "preference", "ppo"]
ALLOWED_TOP = {"jax", "numpy", "chex", "typing", "functools", "math"}
ALLOWED_LOCAL = {"rlhf_jax.types", "rlhf_jax.masked"}


def _imports(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        raise AssertionError(f"{path.name}: use absolute imports")
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
    if rel.parts[0] in app:
      continue
    for name in _imports(path):
      parts = name.split(".")
      if parts[0] == "rlhf_jax" and len(parts) > 1 and parts[1] in app:
        bad.append(f"{rel} imports {name}")
  assert not bad, bad


# The one exception: a hub id resolves in the local Hugging Face cache the
# way transformers finds it (HF_HUB_CACHE, HF_HOME), never downloading.
ENV_EXCEPTIONS = {pathlib.Path("models/hf_io.py")}


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
