"""make_kto_step: micro-batch and device invariance, the global reference
point, padding rows, one trace with donated state, LoRA reference, learning.

The steps run with an optimizer that stores the gradient it receives in its
state (``_capture``), so gradients are compared exactly. z_ref is the KL
estimate of the WHOLE step batch (two passes), so 1, 2 and 4 micro-batches
and 8 devices give the gradient of one batch; a per-micro-batch z_ref (the
plausible bug) moves the gradient by ~1e-2 relative on this batch
(test_per_micro_batch_reference_point_would_differ).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_helpers as helpers

from rlhf_jax import models, parallel
from rlhf_jax import stats as st
from rlhf_jax.data import UnpairedBatch
from rlhf_jax.models import lora
from rlhf_jax.preference import kto_kl, kto_loss
from rlhf_jax.train import KTOConfig, TrainState, make_kto_step
from rlhf_jax.train.kto import completion_logprobs, mismatched, partner

CFG = helpers.CFG
PROMPT_LEN = [5, 1, 3, 5, 2, 4, 1, 5]
RESPONSE_LEN = [1, 1, 6, 6, 2, 3, 4, 5]
LABELS = [True, False, False, True, True, True, False, True]
MICRO = (1, 2, 4)


def _capture() -> optax.GradientTransformation:
  """Zero updates; the state is the last gradient received."""

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
  return ids, mask


def kto_batch(seed=0, prompt_len=PROMPT_LEN, response_len=RESPONSE_LEN):
  rng = np.random.default_rng(seed)
  p, pm = _rows(rng, prompt_len, 5, left=True)
  r, rm = _rows(rng, response_len, 6)
  labels = np.resize(np.asarray(LABELS, bool), len(prompt_len))
  return UnpairedBatch(*map(jnp.asarray, (p, pm, r, rm, labels)))


def _host(tree):
  def get(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def _close(a, b, what, tol=2e-6):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, what
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(x, y, atol=tol, rtol=tol, err_msg=what)


CONFIG = KTOConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)


def _run(batch, micro=1, opt=None, config=CONFIG):
  opt = opt or _capture()
  cfg = config.__class__(**{**config.__dict__, "num_micro_batches": micro})
  step = jax.jit(make_kto_step(CFG, opt, cfg))
  state = TrainState.create(helpers.policy_params(), opt, jax.random.key(0))
  new, metrics = step(state, batch, helpers.policy_params(seed=5))
  return _host(new.opt_state), _host(metrics)


def test_partner_swaps_adjacent_rows_and_rejects_odd_batches():
  np.testing.assert_array_equal(partner(jnp.arange(6)), [1, 0, 3, 2, 5, 4])
  with pytest.raises(ValueError, match="even number of rows"):
    partner(jnp.arange(5))


def test_metrics_are_the_losss_statistics_with_a_global_reference_point():
  batch = kto_batch()
  params, ref = helpers.policy_params(), helpers.policy_params(seed=5)
  _, metrics = _run(batch)
  # Host reference: both passes by hand.
  kl_batch, kl_valid = mismatched(batch)
  kl = kto_kl(
    completion_logprobs(params, kl_batch, model_config=CFG),
    completion_logprobs(ref, kl_batch, model_config=CFG),
    kl_valid,
  )
  z = max(float(kl.value), 0.0)
  loss, stats = kto_loss(
    completion_logprobs(params, batch, model_config=CFG),
    completion_logprobs(ref, batch, model_config=CFG),
    batch.labels,
    z,
    beta=0.5,
    desirable_weight=1.0,
    undesirable_weight=1.5,
  )
  want = st.values(stats)
  np.testing.assert_allclose(metrics["kto/kl"], kl.value, rtol=1e-5)
  np.testing.assert_allclose(metrics["kto/z_ref"], z, rtol=1e-5, atol=1e-7)
  for k, v in want.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(metrics["count/chosen"]) == 5.0
  assert abs(float(kl.value)) > 0.1, "the test needs a non-trivial z_ref"


def test_same_gradient_for_1_2_4_micro_batches():
  batch = kto_batch()
  grads1, metrics1 = _run(batch, 1)
  assert float(optax.tree.norm(grads1)) > 1e-3
  for n in MICRO[1:]:
    grads, metrics = _run(batch, n)
    _close(grads, grads1, f"{n} micro-batches")
    _close(metrics, metrics1, f"{n} micro-batches metrics", tol=1e-5)


def test_per_micro_batch_reference_point_would_differ():
  # The plausible bug: z_ref from each micro-batch's own pairs. Emulated by
  # running the two halves as separate batches (their own KL estimates),
  # each normalised by its own rows: the mean of their gradients differs
  # from the one-batch gradient.
  batch = kto_batch()
  grads1, _ = _run(batch, 1)
  halves = [
    jax.tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, 4), slice(4, 8))
  ]
  parts = [_run(h, 1)[0] for h in halves]
  naive = jax.tree.map(lambda a, b: (a + b) / 2, *parts)
  diff = jax.tree.map(np.subtract, naive, grads1)
  rel = float(optax.tree.norm(diff)) / float(optax.tree.norm(grads1))
  assert rel > 1e-3, rel


def test_padding_rows_change_nothing():
  # Two padding rows appended (a partner pair of their own): loss,
  # statistics and gradient equal those of the 8 real rows.
  batch = kto_batch()
  pad = UnpairedBatch(
    jnp.zeros((2, 5), jnp.int32),
    jnp.zeros((2, 5), bool),
    jnp.full((2, 6), 7, jnp.int32),  # garbage ids under a False mask
    jnp.zeros((2, 6), bool),
    jnp.array([True, False]),
  )
  padded = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch, pad)
  grads, metrics = _run(padded, 1)
  want_grads, want_metrics = _run(batch, 1)
  _close(grads, want_grads, "padded grads")
  _close(metrics, want_metrics, "padded metrics", tol=1e-5)


MESHES = {
  "data": (dict(data=8), parallel.DATA_PARALLEL),
  "fsdp": (dict(data=2, fsdp=4), parallel.FSDP),
  "fsdp_tp": (dict(data=2, fsdp=2, tensor=2), parallel.FSDP_TP),
}


def _init():
  return TrainState.create(
    helpers.policy_params(), helpers.optimizer(), jax.random.key(0)
  )


def _on_mesh(make_step, mesh_kw, rules, devices):
  mesh = parallel.make_mesh(devices=devices, **mesh_kw)
  axes = (models.param_logical_axes(CFG),)
  shardings = parallel.state_shardings(
    _init, mesh=mesh, rules=rules, param_axes=axes
  )
  state = parallel.shard_init(_init, shardings=shardings)
  ref = helpers.policy_params(seed=5)
  ref_sh = parallel.logical_to_shardings(axes[0], mesh, rules, shapes=ref)
  step = parallel.jit_step(
    make_step(),
    shardings,
    parallel.batch_sharding(mesh, rules),
    extra_shardings=(ref_sh,),
  )
  return shardings, step, state, jax.device_put(ref, ref_sh)


def _make(axis=None):
  cfg = KTOConfig(beta=0.5, undesirable_weight=1.5, axis_name=axis)
  return make_kto_step(CFG, helpers.optimizer(), cfg)


def test_same_numbers_on_one_device_meshes_and_pmap(devices8):
  # 16 rows: 2 per device, one KL pair each.
  batch = kto_batch(
    prompt_len=PROMPT_LEN + PROMPT_LEN[::-1],
    response_len=RESPONSE_LEN[::-1] + RESPONSE_LEN,
  )
  ref = helpers.policy_params(seed=5)
  want_state, want_metrics = jax.jit(_make())(_init(), batch, ref)
  want_state, want_metrics = _host(want_state), _host(want_metrics)
  for name, (mesh_kw, rules) in MESHES.items():
    _, step, state, ref_on = _on_mesh(_make, mesh_kw, rules, devices8)
    state, metrics = step(state, batch, ref_on)
    _close(_host(metrics), want_metrics, f"metrics {name}", tol=1e-5)
    _close(_host(state), want_state, f"state {name}", tol=1e-5)
  pstep = parallel.pmap_step(_make(parallel.PMAP_AXIS), devices=devices8)
  rep = lambda t: parallel.replicate(t, devices8)
  state, metrics = pstep(rep(_init()), parallel.split_batch(batch, 8), rep(ref))
  _close(_host(parallel.unreplicate(metrics)), want_metrics, "pmap", tol=1e-5)
  _close(_host(parallel.unreplicate(state)), want_state, "pmap state", 1e-5)


def test_shardings_stable_one_trace_donated(devices8):
  traces = []
  inner = _make()

  def counted(*args):
    traces.append(1)
    return inner(*args)

  mesh_kw, rules = MESHES["fsdp"]
  shardings, step, state, ref = _on_mesh(
    lambda: counted, mesh_kw, rules, devices8
  )
  batch = kto_batch(
    prompt_len=PROMPT_LEN * 2, response_len=RESPONSE_LEN[::-1] * 2
  )
  before = jax.tree.map(lambda x: x.sharding, state)
  ndims = jax.tree.map(lambda x: x.ndim, state)
  for _ in range(3):
    old = state
    state, _ = step(state, batch, ref)
    assert all(x.is_deleted() for x in jax.tree.leaves(old))
  assert len(traces) == 1
  same = jax.tree.map(
    lambda x, s, n: x.sharding.is_equivalent_to(s, n), state, before, ndims
  )
  assert jax.tree.all(same)
  assert int(state.step) == 3
  assert not any(x.is_deleted() for x in jax.tree.leaves(ref))


def test_lora_policy_uses_its_base_as_reference():
  cfg = lora.configure(CFG, lora.LoraConfig(rank=2, alpha=4.0))
  params = lora.add_adapters(helpers.policy_params(), cfg, jax.random.key(1))
  opt = lora.trainable_optimizer(helpers.optimizer(0.05))
  step = jax.jit(make_kto_step(cfg, opt, CONFIG))
  state = TrainState.create(params, opt, jax.random.key(0))
  state, metrics = step(state, kto_batch())
  # Adapters start at B = 0: the policy is its base, so the KL is 0 and
  # every row's loss is lambda / 2.
  np.testing.assert_allclose(metrics["kto/kl"], 0.0, atol=1e-5)
  np.testing.assert_allclose(
    metrics["kto/loss"], (5 * 0.5 + 3 * 0.75) / 8, rtol=1e-5
  )
  assert float(metrics["train/grad_norm"]) > 0
  with pytest.raises(ValueError, match="ref_params"):
    make_kto_step(CFG, opt, CONFIG)(state, kto_batch())


def test_kto_raises_accepted_and_lowers_rejected_logprobs():
  batch = kto_batch()
  opt = optax.adam(3e-3)
  step = jax.jit(make_kto_step(CFG, opt, KTOConfig(beta=0.5)))
  ref = helpers.policy_params(seed=0)
  state = TrainState.create(helpers.policy_params(), opt, jax.random.key(0))
  first = None
  for _ in range(15):
    state, metrics = step(state, batch, ref)
    first = first or {k: float(v) for k, v in metrics.items()}
  assert float(metrics["kto/loss"]) < first["kto/loss"] - 0.05
  assert (
    float(metrics["rewards/chosen"]) > 0 > float(metrics["rewards/rejected"])
  )
