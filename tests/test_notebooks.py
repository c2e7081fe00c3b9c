"""Executes every notebooks/*.ipynb; any cell error fails the test.

The notebooks assert their own values. The kernel is the interpreter running
the tests (a kernelspec written into a temporary JUPYTER_PATH), so this works
in a fresh virtual environment without a system-wide Jupyter install.
"""

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "rlhf-jax-tests"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec that launches ipykernel on this interpreter."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [
      sys.executable,
      "-m",
      "ipykernel_launcher",
      "-f",
      "{connection_file}",
    ],
    "display_name": "rlhf_jax tests",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # Keep the kernel's runtime files out of the user's home directory.
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  return KERNEL_NAME


def test_notebooks_exist():
  assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, kernel_name):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb,
    kernel_name=kernel_name,
    timeout=300,
    resources={"metadata": {"path": str(REPO_ROOT)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  errors = [
    out
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.get("outputs", [])
    if out.get("output_type") == "error"
  ]
  assert not errors, errors
