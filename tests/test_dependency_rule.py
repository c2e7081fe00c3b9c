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
