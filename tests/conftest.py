"""Test configuration shared by every test.

* 8 fake CPU devices (XLA flag set before jax is imported) for the tests
  that ask for them through the ``devices8`` fixture; the rest run on
  device 0 as usual.
* ``jax_numpy_rank_promotion='raise'`` so implicit broadcasting bugs fail.
* The persistent compilation cache, kept outside the repository, cuts the
  suite's time about 3x on a 2-core machine.
* Only test_*.py files are collected here, also under --doctest-modules
  (the doctests are rlhf_jax/'s own).
"""

import os

from fake_devices import xla_flags

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TINYSTORIES_DIR = SHARED_DATA / "models" / "tinystories-656k"

_CACHE_DIR = os.environ.get(
  "RLHF_JAX_TEST_CACHE",
  str(pathlib.Path.home() / ".cache" / "rlhf_jax" / "jax_test_cache"),
)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_ignore_collect(collection_path: pathlib.Path, config):
  """With --doctest-modules (pyproject's addopts) pytest would import every
  .py file here: helpers that set up worker processes or need the side
  environment (torch) are not doctest modules. Only test_*.py and
  conftest.py files are collected under tests/."""
  del config
  if collection_path.suffix == ".py" and not (
    collection_path.name.startswith("test_")
    or collection_path.name == "conftest.py"
  ):
    return True
  return None


@pytest.fixture(scope="session")
def devices8():
  """Eight fake CPU devices."""
  devs = jax.devices()
  assert len(devs) >= 8, "conftest must set the XLA device count flag"
  return devs[:8]


@pytest.fixture(scope="session")
def tinystories_dir():
  """The real TinyStories-656K checkpoint in ../shared/data."""
  if not TINYSTORIES_DIR.exists():
    pytest.fail(f"missing shared data: {TINYSTORIES_DIR}")
  return TINYSTORIES_DIR


@pytest.fixture(scope="session")
def shared_data():
  return SHARED_DATA
