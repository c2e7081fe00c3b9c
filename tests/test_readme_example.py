"""The README's "Library use" code block runs as written.

The block is extracted from README.md and executed in this process (on the
8 fake CPU devices of conftest.py), from the repository root, since its
model path is relative to it.
"""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.data import HFTokenizerAdapter, tokenize_prompts
from rlhf_jax.rollout import generate

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH_LINE = re.compile(
  r"^mesh data=(\d+) fsdp=(\d+) tensor=1 \(8 devices, 1 process\(es\)\), "
  r"rules (\w+) (\S+)$"
)


def library_use_block() -> str:
  """The first python block of the README's "## Library use" section."""
  text = (REPO_ROOT / "README.md").read_text()
  section = text.split("\n## Library use\n", 1)[1].split("\n## ", 1)[0]
  match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
  assert match, "no python block in the Library use section"
  return match.group(1)


@pytest.mark.parametrize(
  "mesh, expected",
  [
    # As written: every device on 'data'.
    (None, ("8", "1", "data")),
    # The mesh the comment names: params sharded over 'fsdp'.
    ("MeshConfig(data=2, fsdp=4)", ("2", "4", "fsdp")),
  ],
)
def test_library_use_block_runs(
  mesh, expected, devices8, tinystories_dir, monkeypatch, capsys
):
  del devices8, tinystories_dir  # the 8 devices and the model must exist
  code = library_use_block()
  if mesh is not None:
    assert "MeshConfig(data=-1)" in code
    code = code.replace("MeshConfig(data=-1)", mesh)
  monkeypatch.chdir(REPO_ROOT)
  namespace: dict = {"__name__": "readme_example"}
  exec(compile(code, "README.md:Library use", "exec"), namespace)
  lines = capsys.readouterr().out.strip().splitlines()
  match = MESH_LINE.match(lines[-1])
  assert match, lines
  assert match.groups()[:3] == expected
  # Step 1 of DPO: the policy IS the reference, so every margin is 0 and
  # the loss is -log sigma(0) = log 2.
  assert float(match[4]) == pytest.approx(math.log(2), abs=1e-6)
  assert int(namespace["state"].step) == 1
  if mesh is not None:
    spec = namespace["state"].params["embed"].sharding.spec
    assert "fsdp" in spec, spec


def data_parallel_block() -> str:
  """The README's block that splits a sampling batch over CPU devices."""
  text = (REPO_ROOT / "README.md").read_text()
  start = text.index("# JAX_NUM_CPU_DEVICES=2 in the environment")
  return text[start : text.index("```", start)]


def test_data_parallel_sampling_block_gives_the_same_rollout(
  devices8, tinystories_dir, monkeypatch
):
  # The block as written (from the repository root, its model path is
  # relative) on the 8 fake devices, 2 of its 16 rows each, against the
  # same call on one device: same tokens (per-row keys fold in the global
  # row index), logprobs to float rounding (each device runs B = 2
  # kernels).
  del devices8, tinystories_dir
  monkeypatch.chdir(REPO_ROOT)
  namespace: dict = {"__name__": "readme_dp_example"}
  exec(compile(data_parallel_block(), "README.md:sampling", "exec"), namespace)
  got, model_dir = namespace["rollout"], namespace["model_dir"]
  # The prompts made here, not taken from the block: one BOS (id 1) each,
  # left-padded with 0.
  adapter = HFTokenizerAdapter.wrap(models.load_tokenizer(model_dir))
  ds = tokenize_prompts(namespace["texts"], adapter, max_prompt_length=16)
  ids = ds.arrays["prompt_ids"]
  assert (ids == 1).sum(axis=1).tolist() == [1] * 16
  np.testing.assert_array_equal(namespace["ds"].arrays["prompt_ids"], ids)
  config, params = models.load_hf_checkpoint(model_dir)
  want = generate(
    params, jnp.asarray(ids), jnp.asarray(ds.arrays["prompt_mask"]),
    jax.random.key(0), config=config, max_new_tokens=64, eos_token_id=2,
    pad_token_id=0,
  )  # fmt: skip
  # Rows split, two per device (a replicated result would hold 16 each).
  assert got.response_ids.shape == (16, 64)
  assert {s.data.shape[0] for s in got.response_ids.addressable_shards} == {2}
  np.testing.assert_array_equal(got.response_ids, want.response_ids)
  np.testing.assert_array_equal(got.response_mask, want.response_mask)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
