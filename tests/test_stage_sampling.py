"""stages.sampling.sample_continuations: params split once per pass."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.data import DataError, HFTokenizerAdapter
from rlhf_jax.rollout import generate
from rlhf_jax.runner.mesh import MeshConfig, Placement
from rlhf_jax.stages import sampling
from tests.test_rollout import CFG, NEVER, PAD, _prompts


def _ctx():
  settings = types.SimpleNamespace(
    batch_size=2, temperature=0.9, max_new_tokens=5
  )
  return types.SimpleNamespace(
    config=types.SimpleNamespace(sampling=settings),
    stop=types.SimpleNamespace(check=lambda what, checkpoint=True: None),
    placement=Placement.create(MeshConfig(), jax.devices()[:1]),
    model_config=CFG,
    eos=NEVER,
    pad=PAD,
    cache={},
  )


def test_batches_sample_as_generate_on_stacked_params():
  """Three prompts in batches of 2 (the last padded): each row as one
  generate call on the stacked params with its key fold_in(key, row)
  samples it; the split program and the sampler compile once for two
  passes."""
  params = models.init_params(CFG, jax.random.key(1))
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)
  ids, mask = (np.asarray(x[:3]) for x in _prompts())
  ctx, key = _ctx(), jax.random.key(9)
  out = sampling.sample_continuations(ctx, params, ids, mask, key, what="t")
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
    key, jnp.arange(3, dtype=jnp.uint32)
  )
  ref = generate(
    params,
    jnp.asarray(ids),
    jnp.asarray(mask),
    keys,
    config=CFG,
    max_new_tokens=5,
    temperature=0.9,
    eos_token_id=NEVER,
    pad_token_id=PAD,
  )
  np.testing.assert_array_equal(out["response_ids"], ref.response_ids)
  np.testing.assert_allclose(out["logprobs"], ref.logprobs, atol=1e-6)
  split, sampler = ctx.cache["split_layers"], ctx.cache["sampler"]
  sizes = split._cache_size(), sampler._cache_size()
  again = sampling.sample_continuations(ctx, params, ids, mask, key, what="t")
  np.testing.assert_array_equal(again["response_ids"], out["response_ids"])
  assert (split._cache_size(), sampler._cache_size()) == sizes == (1, 1)


def test_a_task_prompt_longer_than_p_names_the_option(shared_data):
  """A sampled task prompt longer than --task.max-prompt-length was the
  library's message ("max_prompt_length=4 (set truncate_prompts=True
  ...)", a setting the command does not have)."""
  tok = models.load_tokenizer(shared_data / "models" / "tinystories-656k")
  ctx = types.SimpleNamespace(
    adapter=HFTokenizerAdapter.wrap(tok),
    config=types.SimpleNamespace(
      task=types.SimpleNamespace(max_prompt_length=8), prompts=None
    ),
  )
  ds = sampling.tokenize_prompt_texts(ctx, ["A cat"])
  assert ds.arrays["prompt_ids"].shape == (1, 8)
  long = "The dog ran \x1b far away from the big house"
  with pytest.raises(DataError) as e:
    sampling.tokenize_prompt_texts(ctx, ["A cat", long])
  n = len(tok.encode(long, add_special_tokens=False)) + 1
  assert n > 8
  assert str(e.value) == (
    "--task.max-prompt-length 8: the task's prompt 'The dog ran \\x1b far "
    "away from the big house' "
    f"has {n} tokens (with the BOS); raise it to at least {n}"
  )


def test_sampled_prefixes_past_p_are_left_out_and_counted(shared_data, capsys):
  """A prefix of up to --task.prefix-max-words words sampled from the
  policy can take more tokens than --task.max-prompt-length: the run
  stopped after sampling, naming one random prefix as "the task's
  prompt"; it is now left out, counted and warned about."""
  from rlhf_jax.data.tokenize import prompt_lengths
  from rlhf_jax.stages.feedback import _fitting

  tok = models.load_tokenizer(shared_data / "models" / "tinystories-656k")
  task = types.SimpleNamespace(max_prompt_length=6, prefix_max_words=30)
  ctx = types.SimpleNamespace(
    adapter=HFTokenizerAdapter.wrap(tok),
    config=types.SimpleNamespace(task=task),
    primary=True,
  )
  short, long = "A cat", "The dog ran far away from the big house"
  # With the BOS: 5 and 10 tokens.
  assert prompt_lengths([short, long], ctx.adapter) == [5, 10]
  assert _fitting(ctx, [short, long, short]) == ([short, short], 1)
  assert capsys.readouterr().err == (
    "rlhf-jax: warning: 1 of 3 sampled story prefixes take more than "
    "--task.max-prompt-length 6 tokens (with the BOS) and were left out; "
    "raise it, or lower --task.prefix-max-words (30), to keep them\n"
  )
  assert _fitting(ctx, [short]) == ([short], 0)
  assert capsys.readouterr().err == ""
