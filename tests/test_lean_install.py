"""`pip install rlhf_jax` without extras: the library, not the application.

A fresh virtual environment (uv, this interpreter's Python version) gets the
repository installed as a wheel (not editable, no extras), pinned to the
versions of the test environment so uv's cache serves every package. The
application's packages (the ``cli`` extra) must be absent, the library must
import and compute there (GAE values checked by hand, one jitted DPO step),
and the ``rlhf-jax`` command must stop with one line naming the extra.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[1]
# [project].dependencies of pyproject.toml.
CORE = {
  "jax",
  "flax",
  "optax",
  "chex",
  "orbax-checkpoint",
  "numpy",
  "safetensors",
  "tokenizers",
  "jinja2",
}
# Packages of the ``cli`` extra that nothing in the core pulls in. rich is
# in the extra too, but flax depends on it, so a lean install has it anyway;
# the metadata check below proves rlhf_jax itself does not require it.
ABSENT = ("matplotlib", "tyro", "vaderSentiment", "tensorboardX", "pyarrow")
UV_TIMEOUT_S = 300
SCRIPT_TIMEOUT_S = 300

_LIBRARY_SCRIPT = r"""
import importlib.metadata
import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rlhf_jax
from rlhf_jax import checkpoint, data, models, parallel, rollout, tasks, train
from rlhf_jax.runner import loop, mesh, metrics, progress  # noqa: F401

site = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(rlhf_jax.__file__).resolve()
assert site in where.parents, f"rlhf_jax imported from {where}, not {site}"

absent = json.loads(sys.argv[2])
found = [m for m in absent if importlib.util.find_spec(m) is not None]
assert not found, f"installed without the extra: {found}"
for m in absent:
  assert m not in sys.modules, f"importing the library imported {m}"

requires = importlib.metadata.requires("rlhf_jax") or []
core = sorted(r for r in requires if "extra ==" not in r)
print("CORE", json.dumps(core))

# GAE, gamma = 0.9, lam = 0.5. Row 0 (all valid):
#   t=2: d = 1 - .5 = .5,                 A = .5,                 R = 1
#   t=1: d = 0 + .9 * .5 - .5 = -.05,     A = -.05 + .45 * .5,    R = A + .5
#   t=0: d = -.05,                        A = -.05 + .45 * .175,  R = A + .5
# Row 1 (t=2 masked; its garbage never enters):
#   t=1: d = 2 + 0 - 0 = 2,               A = 2,                  R = 2
#   t=0: d = 1 + .9 * 0 - 1 = 0,          A = .45 * 2 = .9,       R = 1.9
rewards = jnp.array([[0.0, 0.0, 1.0], [1.0, 2.0, 99.0]])
values = jnp.array([[0.5, 0.5, 0.5], [1.0, 0.0, 7.0]])
mask = jnp.array([[True, True, True], [True, True, False]])
gae = jax.jit(lambda r, v, m: rlhf_jax.gae_advantages(r, v, m, gamma=0.9,
                                                       lam=0.5))
adv, ret = gae(rewards, values, mask)
np.testing.assert_allclose(
  adv, [[0.02875, 0.175, 0.5], [0.9, 2.0, 0.0]], rtol=1e-6, atol=1e-7
)
np.testing.assert_allclose(
  ret, [[0.52875, 0.675, 1.0], [1.9, 2.0, 0.0]], rtol=1e-6, atol=1e-7
)

cfg = models.ModelConfig(
  model_type="llama",
  vocab_size=32,
  hidden_size=16,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  intermediate_size=32,
  max_position_embeddings=64,
)
params = models.init_params(cfg, jax.random.key(0))
optimizer = optax.sgd(0.1)
state = train.TrainState.create(params, optimizer, jax.random.key(1))
step = jax.jit(train.make_dpo_step(cfg, optimizer, train.DPOConfig(beta=0.1)))
rng = np.random.default_rng(0)
ids = lambda n: jnp.asarray(rng.integers(3, cfg.vocab_size, (4, n)), jnp.int32)
ones = lambda n: jnp.ones((4, n), bool)
batch = rlhf_jax.PreferenceBatch(
  prompt_ids=ids(5),
  prompt_mask=ones(5),
  chosen_ids=ids(6),
  chosen_mask=ones(6),
  rejected_ids=ids(6),
  rejected_mask=ones(6),
)
state, out = step(state, batch, params)
loss = float(out["dpo/loss"])
assert math.isfinite(loss), out
# The policy is its own reference at step 1: every margin is 0.
assert abs(loss - math.log(2)) < 1e-5, loss
assert int(state.step) == 1, state.step
print("OK", loss)
"""


def _works(uv: str | None) -> bool:
  if not uv or not os.path.exists(uv):
    return False
  try:
    done = subprocess.run(
      [uv, "--version"], capture_output=True, timeout=60, check=False
    )
  except OSError:
    return False
  return done.returncode == 0


def _find_uv() -> str:
  """uv as scripts/setup_env.sh finds it: next to the interpreter (here,
  and python3's on PATH), else on PATH."""
  candidates = [os.path.join(sysconfig.get_path("scripts"), "uv")]
  python3 = shutil.which("python3")
  if python3:
    done = subprocess.run(
      [python3, "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"],
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
    )
    if done.returncode == 0 and done.stdout.strip():
      candidates.append(os.path.join(done.stdout.strip(), "uv"))
  candidates.append(shutil.which("uv"))
  for uv in candidates:
    if _works(uv):
      return uv
  pytest.fail(
    "uv not found (looked next to this Python, python3's scripts and on "
    "PATH); install it with `python3 -m pip install uv` or rerun "
    "scripts/setup_env.sh"
  )


def _run(cmd, *, timeout, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(
    cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw
  )


def _check(done: subprocess.CompletedProcess) -> str:
  assert done.returncode == 0, (
    f"{' '.join(map(str, done.args))} exited {done.returncode}\n"
    f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
  )
  return done.stdout


def test_lean_install_has_the_library_only(tmp_path):
  uv = _find_uv()
  venv = tmp_path / "venv"
  python = venv / "bin" / "python"
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
  env.pop("VIRTUAL_ENV", None)
  env["JAX_PLATFORMS"] = "cpu"
  version = f"{sys.version_info.major}.{sys.version_info.minor}"

  _check(
    _run(
      [uv, "venv", "-q", "--python", sys.executable, str(venv)],
      timeout=UV_TIMEOUT_S,
      env=env,
    )
  )
  # The test environment's versions as constraints: the same jax as the
  # suite, and every wheel comes from uv's cache.
  constraints = tmp_path / "constraints.txt"
  frozen = _check(
    _run(
      [uv, "pip", "freeze", "--python", sys.executable, "--exclude-editable"],
      timeout=UV_TIMEOUT_S,
      env=env,
    )
  )
  constraints.write_text(
    "".join(
      f"{ln}\n"
      for ln in frozen.splitlines()
      if not ln.lower().startswith(("rlhf-jax", "rlhf_jax"))
    )
  )
  _check(
    _run(
      [
        *(uv, "pip", "install", "-q", "--python", str(python)),
        *("-c", str(constraints)),
        # A directory's build is cached by its pyproject.toml only: rebuild.
        *("--refresh-package", "rlhf_jax"),
        str(REPO),
      ],
      timeout=UV_TIMEOUT_S,
      env=env,
    )
  )
  site = venv / "lib" / f"python{version}" / "site-packages"
  assert (site / "rlhf_jax" / "__init__.py").is_file(), "not a wheel install"

  # -I: no current directory or PYTHONPATH, so the repository's checkout
  # cannot stand in for the installed package.
  script = tmp_path / "lean_check.py"
  script.write_text(textwrap.dedent(_LIBRARY_SCRIPT))
  out = _check(
    _run(
      [str(python), "-I", str(script), str(site), json.dumps(ABSENT)],
      timeout=SCRIPT_TIMEOUT_S,
      env=env,
      cwd=tmp_path,
    )
  )
  assert "\nOK " in f"\n{out}", out
  core_line = next(ln for ln in out.splitlines() if ln.startswith("CORE "))
  names = {_dist_name(r) for r in json.loads(core_line[5:])}
  assert names == CORE, f"core requirements {sorted(names)} != {sorted(CORE)}"

  # The console script without the extra: one line, exit 2, no traceback.
  done = _run(
    [str(venv / "bin" / "rlhf-jax"), "run"],
    timeout=SCRIPT_TIMEOUT_S,
    env=env,
    cwd=tmp_path,
  )
  assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
  assert done.stdout == "", done.stdout
  lines = done.stderr.splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith("rlhf-jax: error: "), lines
  assert 'pip install "rlhf_jax[cli]"' in lines[0], lines


def _dist_name(requirement: str) -> str:
  """'orbax-checkpoint>=0.12' -> 'orbax-checkpoint' (lowercase)."""
  name = requirement
  for stop in "<>=!~;[ (":
    name = name.split(stop)[0]
  return name.strip().lower()
