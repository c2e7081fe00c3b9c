"""The last layer on the head's rows only (hidden_forward rows_range /
row_index, forward logits_range, values_forward rows_range, reward_forward).

The pruned forward must give the full forward's values at those rows, for
every family (biases, sliding windows, soft-capping, q/k norms), both
param layouts, deep stacks (the scanned, not unrolled, path), remat and
LoRA, and their gradients; and it must really skip the work (XLA's flop
count).
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import lora, transformer

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
NAMES = [
  "llama3_tiny",
  "gpt2_tiny",
  "qwen2_tiny",
  "qwen3_tiny",
  "gemma2_tiny",
  "gemma3_tiny",
]
TOL = 2e-5


def _fixture(name):
  config, params = models.load_hf_checkpoint(FIX / name)
  with np.load(FIX / f"{name}.npz", allow_pickle=False) as f:
    ids, mask, logits = f["ids"], f["mask"], f["logits"]
  return config, params, jnp.asarray(ids), jnp.asarray(mask), logits


def _close(a, b, tol=TOL):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_logits_range_equals_full_rows_and_transformers(name):
  config, params, ids, mask, golden = _fixture(name)
  full = models.forward(params, ids, mask, config=config)
  start, stop = 3, ids.shape[1] - 1
  part = models.forward(
    params, ids, mask, config=config, logits_range=(start, stop)
  )
  assert part.shape == (ids.shape[0], stop - start, config.vocab_size)
  _close(part, full[:, start:stop])
  rows = np.asarray(mask[:, start:stop])
  err = np.abs(np.asarray(part) - golden[:, start:stop])[rows]
  assert err.max() < 1e-4, err.max()


@pytest.mark.parametrize("name", NAMES)
def test_row_index_equals_full_rows(name):
  config, params, ids, mask, _ = _fixture(name)
  full = models.hidden_forward(params, ids, mask, config=config)
  last = models.last_valid_index(mask)
  index = jnp.stack([last, jnp.zeros_like(last) + 4], axis=1)  # [B, 2]
  part = models.hidden_forward(
    params, ids, mask, config=config, row_index=index
  )
  want = jnp.take_along_axis(full, index[..., None], axis=1)
  _close(part, want)
  one = models.hidden_forward(
    params, ids, mask, config=config, row_index=last[:, None]
  )
  _close(one, want[:, :1])


def test_reward_and_values_equal_the_full_forward():
  config, params, ids, mask, _ = _fixture("qwen2_tiny")
  rm = models.from_policy_params(params, config, jax.random.key(0))
  hidden = models.hidden_forward(params, ids, mask, config=config)
  head = models.ScalarHead(config).apply({"params": rm["head"]}, hidden)
  last = models.last_valid_index(mask)
  reward = models.reward_forward(rm, ids, mask, config=config)
  _close(reward, jnp.take_along_axis(head, last[:, None], axis=1)[:, 0])
  values = models.values_forward(rm, ids, mask, config=config)
  part = models.values_forward(rm, ids, mask, config=config, rows_range=(2, 8))
  _close(part, values[:, 2:8])
  _close(values, jnp.where(mask, head, 0.0))


def _deep(config):
  """12 layers: more than SCAN_UNROLL_MAX_LAYERS, so the scan loops."""
  n = models.transformer.SCAN_UNROLL_MAX_LAYERS + 4
  assert n > models.transformer.SCAN_UNROLL_MAX_LAYERS
  return dataclasses.replace(config, num_layers=n)


@pytest.mark.parametrize(
  "variant", ["deep", "remat", "unstacked", "lora", "one_layer"]
)
def test_rows_in_every_layout_and_their_gradients(variant):
  config, params, ids, mask, _ = _fixture("llama3_tiny")
  if variant == "deep":
    config = _deep(config)
    params = models.init_params(config, jax.random.key(1))
  if variant == "one_layer":  # the last layer alone, no scan before it
    config = dataclasses.replace(config, num_layers=1)
    params = models.init_params(config, jax.random.key(1))
  if variant == "remat":
    config = dataclasses.replace(config, remat=True)
  if variant == "unstacked":
    params = models.unstack_layers(params, config)
  if variant == "lora":
    config = lora.configure(
      config, lora.LoraConfig(rank=4, targets=("q", "v", "down"))
    )
    params = lora.add_adapters(params, config, jax.random.key(2))
    # Non-zero B, so the adapters change the output and get gradients.
    params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if str(p[-1].key).endswith("_lora_b") else x,
      params,
    )
  start, stop = 2, ids.shape[1]
  weights = jax.random.normal(jax.random.key(3), (config.hidden_size,))

  def loss(p, pruned):
    kw = {"rows_range": (start, stop)} if pruned else {}
    h = models.hidden_forward(p, ids, mask, config=config, **kw)
    h = h if pruned else h[:, start:stop]
    return jnp.sum(
      jnp.where(mask[:, start:stop, None], h, 0.0) * weights[None, None]
    )

  full, g_full = jax.value_and_grad(loss)(params, False)
  part, g_part = jax.value_and_grad(loss)(params, True)
  _close(part, full, 1e-3)
  leaves = jax.tree.leaves(g_full)
  assert any(float(jnp.max(jnp.abs(g))) > 1e-3 for g in leaves)
  for a, b in zip(leaves, jax.tree.leaves(g_part), strict=True):
    _close(b, a, 1e-4)


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_pruned_forward_skips_the_last_layers_rows():
  """XLA's flop count: one of the 2 layers on 1 of 12 rows costs about
  half the full forward; the head's 2 of 12 rows save about a third."""
  config, params, _, _, _ = _fixture("llama3_tiny")
  ids = jnp.ones((4, 12), jnp.int32)
  mask = jnp.ones((4, 12), jnp.bool_)
  index = jnp.full((4, 1), 11, jnp.int32)

  def full(p):
    return models.hidden_forward(p, ids, mask, config=config)[:, 11]

  def one(p):
    return models.hidden_forward(p, ids, mask, config=config, row_index=index)

  ratio = _flops(one, params) / _flops(full, params)
  assert 0.4 < ratio < 0.75, ratio


def test_which_models_prune_the_last_layer():
  """Shallow unbiased stacks without remat do; a deep (rolled) scan, remat
  and projection biases keep every row (the same values, above)."""
  llama = _fixture("llama3_tiny")[0]
  assert transformer.prunes_last_layer(llama)
  assert transformer.prunes_last_layer(_fixture("gemma2_tiny")[0])
  assert not transformer.prunes_last_layer(_deep(llama))
  assert not transformer.prunes_last_layer(
    dataclasses.replace(llama, remat=True)
  )
  for biased in ("gpt2_tiny", "qwen2_tiny"):
    assert not transformer.prunes_last_layer(_fixture(biased)[0])


def test_return_hidden_keeps_every_row():
  config, params, ids, mask, _ = _fixture("gemma3_tiny")
  full_logits, full_hidden = models.forward(
    params, ids, mask, config=config, return_hidden=True
  )
  logits, hidden = models.forward(
    params, ids, mask, config=config, return_hidden=True, logits_range=(2, 8)
  )
  assert hidden.shape == full_hidden.shape
  _close(hidden, full_hidden, 0)
  _close(logits, full_logits[:, 2:8])


def test_rows_with_a_kv_cache_are_refused():
  config, params, ids, mask, _ = _fixture("llama3_tiny")
  cache = models.init_cache(config, ids.shape[0], ids.shape[1])
  with pytest.raises(ValueError, match="not a KV cache"):
    transformer._run(
      params,
      ids,
      ids,
      jnp.ones((ids.shape[0], ids.shape[1], ids.shape[1]), jnp.bool_),
      (cache.k, cache.v),
      cache.index,
      config,
      (0, 2),
    )


@pytest.mark.parametrize("rows", [(3, 3), (5, 2), (0, 10), (-1, 4)])
def test_a_bad_rows_range_is_an_error_naming_it(rows):
  config, params, ids, mask, _ = _fixture("llama3_tiny")  # L = 9
  with pytest.raises(ValueError, match=r"rows_range=.*L = 9"):
    models.hidden_forward(params, ids, mask, config=config, rows_range=rows)
  with pytest.raises(ValueError, match=r"logits_range=.*L = 9"):
    models.forward(params, ids, mask, config=config, logits_range=rows)
  rm = models.from_policy_params(params, config, jax.random.key(0))
  with pytest.raises(ValueError, match="rows_range"):
    models.values_forward(rm, ids, mask, config=config, rows_range=rows)
  with pytest.raises(ValueError, match="not both"):
    models.hidden_forward(
      params,
      ids,
      mask,
      config=config,
      rows_range=(0, 2),
      row_index=jnp.zeros((ids.shape[0], 1), jnp.int32),
    )
