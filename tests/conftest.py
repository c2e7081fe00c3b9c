"""Test configuration shared by every test.

* 8 fake CPU devices (XLA flag set before jax is imported) for the tests
  that ask for them through the ``devices8`` fixture; the rest run on
  device 0 as usual.
* ``jax_numpy_rank_promotion='raise'`` so implicit broadcasting bugs fail.
* The persistent compilation cache, kept outside the repository, cuts the
  suite's time about 3x on a 2-core machine.
* Only test_*.py files are collected here, also under --doctest-modules
  (the doctests are rlhf_jax/'s own).
* Each module's compiled programs are freed when it ends (a worker that
  kept them all ran out of memory mappings).
* The tiny parity checkpoints' weights (not in git) are written before
  any test, whichever file a worker starts with.
"""

import os

from child_procs import die_with_parent
from fake_devices import xla_flags

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import builtins  # noqa: E402
import errno  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "fixtures" / "models"))
import tiny_weights  # noqa: E402

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees a test module's compiled programs when it ends. XLA:CPU maps
  each executable's code into hundreds of memory regions (a generate
  program: ~300 per loop); a test worker that kept every program of a
  full run reached the kernel's limit (vm.max_map_count, 65530 here) and
  died in its next compile or cache read (abort or segfault inside
  deserialize_executable). Later modules reload theirs from the
  persistent cache."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session", autouse=True)
def _tiny_checkpoints():
  """Writes the tiny parity checkpoints' weights from their numpy seeds
  (tests/fixtures/models/tiny_weights.py; the repository keeps no weight
  files). Session-wide, not only under tests/models: tests/test_cli_errors
  and tests/audit copy or load gpt2_tiny too, and in a fresh clone they
  failed when no tests/models test had run before them. Each worker
  writes them (0.06 s) by write-then-rename, so a reader sees whole
  files."""
  for name in tiny_weights.SEEDS:
    tiny_weights.materialize(name)


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


@pytest.fixture(scope="session")
def tinystories_adapter(tinystories_dir):
  """TinyStories' tokenizer as the data pipeline wraps it (bos
  <|start_story|>, eos <|end_story|>, pad <unk>)."""
  from rlhf_jax.data import HFTokenizerAdapter  # noqa: PLC0415

  return HFTokenizerAdapter.from_file(
    tinystories_dir / "tokenizer.json",
    bos_token="<|start_story|>",
    eos_token="<|end_story|>",
    pad_token="<unk>",
  )


def _chmod_stops_writes(tmp_path) -> bool:
  """False when chmod does not stop this user's writes (root)."""
  probe = tmp_path / "probe"
  probe.mkdir()
  probe.chmod(0o555)
  try:
    (probe / "x").write_text("x")
    return False
  except PermissionError:
    return True
  finally:
    probe.chmod(0o755)


class _Denied:
  """Paths whose writes fail (read-only, EROFS) or whose reads fail
  (EACCES): chmod, or (as root, where chmod stops nothing) the file
  functions raising those errors for them and os.access refusing them."""

  def __init__(self, tmp_path, monkeypatch):
    self.real = _chmod_stops_writes(tmp_path)
    self.read_only: list[pathlib.Path] = []
    self.unreadable: list[pathlib.Path] = []
    self.modes: dict[pathlib.Path, int] = {}
    self._monkeypatch = monkeypatch
    self._patched = False

  @staticmethod
  def _under(path, roots) -> bool:
    if isinstance(path, int):
      return False
    p = pathlib.Path(os.fsdecode(path)).absolute()
    return any(p == r or r in p.parents for r in roots)

  def _error(self, path, writes: bool) -> OSError:
    code = errno.EROFS if writes else errno.EACCES
    return OSError(code, os.strerror(code), os.fsdecode(path))

  def _check(self, path, writes: bool) -> None:
    if writes and self._under(path, self.read_only):
      raise self._error(path, True)
    if not writes and self._under(path, self.unreadable):
      raise self._error(path, False)

  def _patch(self) -> None:
    if self._patched:
      return
    self._patched = True
    mp, check = self._monkeypatch, self._check

    def wrap_open(orig):
      def opener(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return orig(file, mode, *args, **kwargs)

      return opener

    def wrap_os_open(orig):
      def opener(path, flags, *args, **kwargs):
        check(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        return orig(path, flags, *args, **kwargs)

      return opener

    def wrap_path_op(orig):
      def op(path, *args, **kwargs):
        check(path, True)
        return orig(path, *args, **kwargs)

      return op

    def wrap_access(orig):
      def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and self._under(path, self.read_only):
          return False
        if self._under(path, self.unreadable):  # as chmod 000
          return False
        return orig(path, mode, *args, **kwargs)

      return access

    mp.setattr(os, "access", wrap_access(os.access))
    mp.setattr(builtins, "open", wrap_open(builtins.open))
    mp.setattr(io, "open", wrap_open(io.open))
    mp.setattr(os, "open", wrap_os_open(os.open))
    for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
      mp.setattr(os, name, wrap_path_op(getattr(os, name)))

  def make_read_only(self, root: pathlib.Path) -> None:
    self.read_only.append(root.absolute())
    if self.real:
      for p in [root, *root.rglob("*")]:
        self.modes.setdefault(p, p.stat().st_mode)
        p.chmod(0o555 if p.is_dir() else 0o444)
    else:
      self._patch()

  def make_unreadable(self, path: pathlib.Path) -> None:
    self.unreadable.append(path.absolute())
    if self.real:
      self.modes.setdefault(path, path.stat().st_mode)
      path.chmod(0o000)
    else:
      self._patch()

  def restore(self) -> None:
    for p, mode in self.modes.items():
      p.chmod(mode)


@pytest.fixture
def _denied(tmp_path, monkeypatch):
  denied = _Denied(tmp_path, monkeypatch)
  yield denied
  denied.restore()


@pytest.fixture
def read_only(_denied):
  """``read_only(root)`` makes a directory tree read-only: chmod, or (as
  root, where chmod stops nothing) the file functions raising EROFS for
  writes under it."""
  return _denied.make_read_only


@pytest.fixture
def unreadable(_denied):
  """``unreadable(path)`` makes a file or folder unreadable: chmod 000, or
  (as root) the file functions raising EACCES for reads of it and
  os.access refusing it, as chmod 000 does."""
  return _denied.make_unreadable


# Another process holding a run directory's lock, as a running rlhf-jax.
_HOLD_LOCK = (
  "import pathlib, sys, time\n"
  "from rlhf_jax.runner import runtime\n"
  "runtime.lock_run_dir(pathlib.Path(sys.argv[1]), sys.argv[2])\n"
  "print('locked', flush=True)\n"
  "time.sleep(120)\n"
)


@pytest.fixture
def lock_holder():
  """``lock_holder(run_dir, what)`` starts a process that holds the run
  directory's lock (named ``what``) and returns it once it does; killed
  at teardown (SIGKILL: the kernel drops its lock)."""
  procs: list[subprocess.Popen] = []

  def start(run_dir: pathlib.Path, what: str = "rlhf-jax run"):
    proc = subprocess.Popen(
      [*die_with_parent(), sys.executable, "-c", _HOLD_LOCK, str(run_dir)]
      + [what],
      stdout=subprocess.PIPE,
      text=True,
      cwd=REPO_ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    procs.append(proc)
    assert proc.stdout.readline().strip() == "locked"
    return proc

  yield start
  for proc in procs:
    proc.kill()
    proc.wait(timeout=60)
