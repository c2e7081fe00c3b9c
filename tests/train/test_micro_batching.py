"""Issue 5 acceptance 4: 1, 2 and 4 micro-batches give the gradient of one
batch (docs/conventions.md, conventions 6 and 14), for the SFT, reward-model,
DPO and PPO losses, on batches whose micro-batches hold unequal token counts.

The steps run with an optimizer that stores the gradient it receives in its
state and leaves the params alone (``_capture``), so the gradients are read
exactly. A plausible bug (normalising each micro-batch by its own token
count, then averaging the N micro-batch losses) gives a different gradient
whenever the micro-batches hold different numbers of tokens; the batches
below are built so they do, and it moves gradients by ~1e-2.

Every case runs twice. In float64 (the model's reference dtype, under
jax_enable_x64) the N-micro-batch gradients equal the one-batch gradient to
1e-12 relative (measured: 2e-16 .. 5e-16), which is the identity itself. In
float32 the comparison is bounded by rounding, not by the accumulation: the
one-batch f32 gradient of this test's reward model is itself 1.1e-6 .. 2.0e-6
(relative) away from the float64 gradient, depending on which XLA:CPU matmul
kernels the batch shape selects; the same loss on the batch concatenated with
itself (an identical mean) moves by 1.2e-6. So float32 asserts 2e-6.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_helpers as helpers

from rlhf_jax import models
from rlhf_jax.masked import aggregate_loss
from rlhf_jax.preference import bradley_terry_loss
from rlhf_jax.rollout import generate
from rlhf_jax.train import (
  DPOConfig,
  RewardModelConfig,
  SFTConfig,
  TrainState,
  init_ppo_state,
  make_dpo_step,
  make_ppo_step,
  make_reward_model_step,
  make_sft_step,
  pair_rewards,
)
from rlhf_jax.types import PreferenceBatch, SFTBatch

CFG = helpers.CFG
# (normwise relative, entrywise absolute) gradient tolerance, metric tolerance.
TOLERANCE = {"float32": (2e-6, 1e-5, 1e-6), "float64": (1e-12, 1e-12, 1e-12)}
LR = 0.1
MICRO = (1, 2, 4)
# Response lengths per row. 4 micro-batches of 2 rows hold 2, 12, 5, 9
# chosen and 11, 3, 8, 2 rejected tokens; 2 micro-batches hold 14, 14 chosen
# and 14, 10 rejected tokens.
CHOSEN_LEN = [1, 1, 6, 6, 2, 3, 4, 5]
REJECTED_LEN = [6, 5, 1, 2, 4, 4, 1, 1]
PROMPT_LEN = [5, 1, 3, 5, 2, 4, 1, 5]


@dataclasses.dataclass(frozen=True)
class Precision:
  name: str  # "float32" or "float64"
  config: models.ModelConfig

  def cast(self, tree):
    """Float leaves in this precision (params are made in float32)."""
    dt = self.config.params_dtype
    return jax.tree.map(
      lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree,
    )


@pytest.fixture(params=["float32", "float64"])
def prec(request):
  """Runs the test in float32, and in float64 under jax_enable_x64."""
  if request.param == "float32":
    yield Precision("float32", CFG)
    return
  with jax.enable_x64(True):
    yield Precision(
      "float64", CFG.replace(dtype="float64", param_dtype="float64")
    )


def _sgd():
  return optax.sgd(LR)


def _capture() -> optax.GradientTransformation:
  """Zero updates; the state is the last gradient received (read exactly)."""

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(jnp.zeros_like, grads), grads

  return optax.GradientTransformation(init, update)


def _rows(rng, lengths, width, left=False):
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), bool)
  for b, n in enumerate(lengths):
    sl = slice(width - n, width) if left else slice(0, n)
    ids[b, sl] = rng.integers(3, CFG.vocab_size, n)
    mask[b, sl] = True
  return jnp.asarray(ids), jnp.asarray(mask)


def _preference_batch(seed=0) -> PreferenceBatch:
  rng = np.random.default_rng(seed)
  p, pm = _rows(rng, PROMPT_LEN, 5, left=True)
  c, cm = _rows(rng, CHOSEN_LEN, 6)
  r, rm = _rows(rng, REJECTED_LEN, 6)
  return PreferenceBatch(p, pm, c, cm, r, rm)


def _sft_batch(seed=0) -> SFTBatch:
  b = _preference_batch(seed)
  return SFTBatch(b.prompt_ids, b.prompt_mask, b.chosen_ids, b.chosen_mask)


def _micro_counts(mask, n):
  return np.asarray(mask).reshape(n, -1).sum(axis=1).tolist()


def test_batches_have_unequal_micro_batch_token_counts():
  b = _preference_batch()
  assert _micro_counts(b.chosen_mask, 4) == [2, 12, 5, 9]
  assert _micro_counts(b.rejected_mask, 2) == [14, 10]
  assert _micro_counts(b.rejected_mask, 4) == [11, 3, 8, 2]


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _assert_tree_close(a, b, what, atol=1e-6, rtol=1e-6):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, what
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=what)


def _run_supervised(make, params, batch, extra=()):
  """Gradients (read from `_capture`) and metrics per micro-batch count.

  ``make(n, optimizer)`` builds the step.
  """
  out = {}
  for n in MICRO:
    step = jax.jit(make(n, _capture()))
    state = TrainState.create(params, _capture(), jax.random.key(0))
    new, metrics = step(state, batch, *extra)
    assert int(new.skipped_steps) == 0
    out[n] = (_host(new.opt_state), _host(metrics))
  return out


def _assert_grads_close(grads, want, what, prec):
  """||g - want|| <= rel ||want||; each entry within atol + rel |want|.

  (rel, atol) = TOLERANCE[prec.name]. The gradients are read exactly (no
  optimizer rounding), so what is left is summation order. float32,
  measured over the cases below: ||diff|| / ||g|| from 1.2e-7 to 1.4e-6
  (rm, 4 micro-batches; 9.4e-7 or less elsewhere) and entrywise up to
  9.5e-6 (ppo seq-mean-token-sum, entries of size ~5). float64: 1.6e-16 to
  4.9e-16. Wrong micro-batch normalisation moves them by ~1e-2
  (test_token_mean_differs_from_naive_micro_average).
  """
  rel_tol, atol, _ = TOLERANCE[prec.name]
  leaves = jax.tree.leaves(grads)
  assert all(x.dtype == np.dtype(prec.name) for x in leaves), what
  norm = float(optax.tree.norm(want))
  assert norm > 1e-3, f"{what}: zero gradient, the test would be vacuous"
  diff = jax.tree.map(np.subtract, grads, want)
  rel = float(optax.tree.norm(diff)) / norm
  worst = max(float(np.max(np.abs(d))) for d in jax.tree.leaves(diff))
  print(f"{what}: ||diff|| / ||g|| {rel:.2e}, max |diff| {worst:.2e}")
  assert rel <= rel_tol, f"{what}: relative error {rel}"
  _assert_tree_close(grads, want, what, atol=atol, rtol=rel_tol)


def _assert_same_across_micro(out, what, prec):
  """Gradients and metrics of N micro-batches equal those of N = 1.

  ``out[n] = (grads, metrics)``; gradients as `_assert_grads_close`,
  metrics within TOLERANCE[prec.name][2] (absolute and relative).
  """
  tol = TOLERANCE[prec.name][2]
  what = f"{what} ({prec.name})"
  grads1, metrics1 = out[1]
  for n in MICRO[1:]:
    grads, metrics = out[n]
    _assert_grads_close(grads, grads1, f"{what}, {n} micro-batches", prec)
    assert metrics.keys() == metrics1.keys()
    for k in metrics1:
      np.testing.assert_allclose(
        metrics[k], metrics1[k], atol=tol, rtol=tol, err_msg=f"{what} {k}"
      )


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_sft(mode, prec):
  params = prec.cast(helpers.policy_params())
  batch = _sft_batch()

  def make(n, opt):
    cfg = SFTConfig(num_micro_batches=n, loss_agg_mode=mode)
    return make_sft_step(prec.config, opt, cfg)

  out = _run_supervised(make, params, batch)
  _assert_same_across_micro(out, f"sft {mode}", prec)


def test_reward_model_and_independent_gradient(prec):
  params = prec.cast(helpers.scalar_params())
  batch = _preference_batch()
  cfg = dict(label_smoothing=0.1, center_rewards_coef=0.01, margin=0.5)

  def make(n, opt):
    return make_reward_model_step(
      prec.config, opt, RewardModelConfig(num_micro_batches=n, **cfg)
    )

  out = _run_supervised(make, params, batch)
  _assert_same_across_micro(out, "rm", prec)

  # The step's gradient is the gradient of the one-batch loss.
  def loss(p):
    rc, rr = pair_rewards(p, batch, model_config=prec.config)
    return bradley_terry_loss(rc, rr, **cfg)[0]

  direct = _host(jax.jit(jax.grad(loss))(params))
  _assert_grads_close(
    out[4][0], direct, f"rm 4 micro-batches vs jax.grad ({prec.name})", prec
  )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo(loss_type, prec):
  params = prec.cast(helpers.policy_params())
  ref = prec.cast(helpers.policy_params(seed=5))
  batch = _preference_batch()

  def make(n, opt):
    cfg = DPOConfig(num_micro_batches=n, beta=0.5, loss_type=loss_type)
    return make_dpo_step(prec.config, opt, cfg)

  out = _run_supervised(make, params, batch, (ref,))
  _assert_same_across_micro(out, f"dpo {loss_type}", prec)


def test_micro_batches_hold_one_micro_batch_of_activations():
  """Gradient accumulation saves memory: only one micro-batch's
  activations are live at a time, so the compiled DPO step's temporaries
  shrink with N (measured: 12.9 / 7.0 / 3.9 MB for N = 1 / 2 / 4). With
  the first micro-batch peeled off the loop, XLA ran it beside the second
  and N = 2 kept N = 1's temporaries (12.8 MB). The reference log-probs
  are given (``precomputed_ref``), so only the accumulated forward and
  backward are measured."""
  cfg = dataclasses.replace(
    CFG, vocab_size=256, hidden_size=64, intermediate_size=192
  )
  params = models.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = 8
  prompt = _rows(rng, [16] * rows, 16, left=True)
  chosen, rejected = (_rows(rng, [48] * rows, 48) for _ in range(2))
  ref = jnp.asarray(rng.normal(size=rows) - 50, jnp.float32)
  batch = PreferenceBatch(*prompt, *chosen, *rejected, ref, ref - 1)
  opt = _sgd()
  state = TrainState.create(params, opt, jax.random.key(1))
  temps = {}
  for n in (1, 2, 4):
    config = DPOConfig(num_micro_batches=n, precomputed_ref=True)
    step = make_dpo_step(cfg, opt, config)
    compiled = jax.jit(step).lower(state, batch).compile()
    temps[n] = compiled.memory_analysis().temp_size_in_bytes
  assert temps[2] < 0.65 * temps[1], temps
  assert temps[4] < 0.75 * temps[2], temps


# ------------------------------------------------------------------ PPO


def _ppo_config(n, mode):
  return dataclasses.replace(
    helpers.PPO_CONFIG,
    ppo_epochs=1,
    num_minibatches=1,
    num_micro_batches=n,
    loss_agg_mode=mode,
    vf_coef=0.5,
    ent_coef=0.01,
    kl_loss_coef=0.1,
    kl_estimator="k3",  # a KL loss term needs k2 or k3
    normalize_reward=True,
  )


def _sampled_response_mask(state, prompts, config, model_config):
  """The rollout the step draws (same keys as make_ppo_step)."""
  g = config.group_size
  ids = jnp.repeat(prompts.prompt_ids, g, axis=0)
  mask = jnp.repeat(prompts.prompt_mask.astype(bool), g, axis=0)
  rng = jax.random.fold_in(state.rng, state.step)
  sample_rng, _ = jax.random.split(rng)
  rows = jnp.arange(ids.shape[0], dtype=jnp.uint32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(sample_rng, rows)
  rollout = generate(
    state.policy_params,
    ids,
    mask,
    keys,
    config=model_config,
    max_new_tokens=config.max_new_tokens,
    temperature=config.temperature,
    eos_token_id=config.eos_token_id,
    pad_token_id=config.pad_token_id,
  )
  return np.asarray(rollout.response_mask)


@pytest.mark.parametrize(
  "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
)
def test_ppo_update(mode, prec):
  policy = prec.cast(helpers.policy_params())
  value = prec.cast(helpers.scalar_params(2))
  frozen = prec.cast(
    {"ref": helpers.policy_params(7), "reward": helpers.scalar_params(3)}
  )
  prompts = helpers.prompt_batch(4, seed=1)

  def init(cfg):
    opt = _capture()
    return init_ppo_state(policy, value, opt, opt, jax.random.key(3), cfg)

  resp_mask = _sampled_response_mask(
    init(_ppo_config(1, mode)), prompts, _ppo_config(1, mode), prec.config
  )
  counts = _micro_counts(resp_mask, 4)
  assert len(set(counts)) > 1, f"micro-batch token counts all equal {counts}"

  # N = 1 is the one-update program (train.ppo_fused), N > 1 the phased
  # one: a fault in either shows as a disagreement here.
  out = {}
  for n in MICRO:
    cfg = _ppo_config(n, mode)
    step = jax.jit(make_ppo_step(prec.config, _capture(), _capture(), cfg))
    state = init(cfg)
    new, metrics = step(state, prompts, frozen)
    # Every leaf keeps its dtype (a state that changed dtype would retrace
    # at the next step); the fitted reward normalisation is in `prec`.
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype, state, new)
    assert all(jax.tree.leaves(same)), same
    assert new.reward_norm.gain.dtype == np.dtype(prec.name)
    assert bool(new.reward_norm.fitted)
    metrics = _host(metrics)
    assert metrics["train/skipped_steps"] == 0
    # Same rollout whatever N: the sampled tokens are those counted above.
    assert metrics["train/tokens"] == resp_mask.sum()
    grads = (new.policy_opt_state, new.value_opt_state)
    out[n] = (_host(grads), metrics)
  _assert_same_across_micro(out, f"ppo {mode}", prec)
  # Both the policy and the critic received a gradient.
  (pg, vg), _ = out[1]
  assert optax.tree.norm(pg) > 1e-3 and optax.tree.norm(vg) > 1e-3


def test_float64_without_x64_fails_when_the_step_is_built():
  cfg64 = CFG.replace(dtype="float64", param_dtype="float64")
  match = "dtype='float64' needs jax_enable_x64"
  for make in (
    lambda: make_sft_step(cfg64, _sgd()),
    lambda: make_reward_model_step(cfg64, _sgd()),
    lambda: make_dpo_step(cfg64, _sgd()),
    lambda: make_ppo_step(cfg64, _sgd(), _sgd(), _ppo_config(1, "token-mean")),
  ):
    with pytest.raises(ValueError, match=match):
      make()


def test_ppo_micro_batches_must_divide():
  cfg = _ppo_config(3, "token-mean")
  step = make_ppo_step(CFG, _sgd(), _sgd(), cfg)
  state = init_ppo_state(
    helpers.policy_params(),
    helpers.scalar_params(2),
    _sgd(),
    _sgd(),
    jax.random.key(0),
    cfg,
  )
  frozen = {"ref": helpers.policy_params(), "reward": helpers.scalar_params(3)}
  with pytest.raises(ValueError, match="not divisible by num_micro_batches"):
    jax.jit(step)(state, helpers.prompt_batch(4), frozen)


def test_token_mean_differs_from_naive_micro_average():
  # Guards the test's power: the naive per-micro-batch normalisation gives a
  # different loss on this batch, so a regression to it would be caught.
  b = _sft_batch()
  x = jnp.asarray(np.random.default_rng(0).normal(size=b.response_mask.shape))
  x = x.astype(jnp.float32)
  whole = aggregate_loss(x, b.response_mask)
  naive = jnp.mean(
    jnp.stack(
      [
        aggregate_loss(x[i : i + 2], b.response_mask[i : i + 2])
        for i in range(0, 8, 2)
      ]
    )
  )
  assert abs(float(whole) - float(naive)) > 1e-2
