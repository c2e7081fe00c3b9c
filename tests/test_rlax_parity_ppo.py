"""Parity of ppo_policy_loss with rlax.clipped_surrogate_pg_loss.

Convention mapping. rlax takes probability ratios f32[T] (one trajectory)
and returns L = -mean_t min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t), the
same sign as ours (a loss to minimise). We take logprobs and old logprobs
f32[B, T] and a mask, and form r = exp(logp - old_logp). On unpadded rows:
  * token-mean over [B, T] == rlax on the flattened B * T tokens;
  * seq-mean-token-mean == mean over rows of rlax on each row (vmap).
rlax has no asymmetric or dual clip, so only the symmetric clip is compared.
Gradients are compared w.r.t. the logprobs: rlax's ratio is built from the
same logprobs, so the chain rule through exp is identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rlhf_jax.ppo import ppo_policy_loss


def _data(seed, b=4, t=7):
  rng = np.random.default_rng(seed)
  old = (-np.abs(rng.normal(size=(b, t))) - 0.1).astype(np.float32)
  logp = (old + rng.normal(size=(b, t)) * 0.5).astype(np.float32)
  adv = (rng.normal(size=(b, t)) * 2).astype(np.float32)
  return jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv)


def _rlax_flat(logp, old, adv, eps):
  ratio = jnp.exp(logp - old).reshape(-1)
  return rlax.clipped_surrogate_pg_loss(ratio, adv.reshape(-1), eps)


def _rlax_rows(logp, old, adv, eps):
  per_row = jax.vmap(rlax.clipped_surrogate_pg_loss, in_axes=(0, 0, None))(
    jnp.exp(logp - old), adv, eps
  )
  return jnp.mean(per_row)


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_clipped_surrogate_matches_rlax(seed, eps):
  logp, old, adv = _data(seed)
  mask = jnp.ones(logp.shape, bool)
  for mode, ref_fn in (
    ("token-mean", _rlax_flat),
    ("seq-mean-token-mean", _rlax_rows),
  ):

    def ours(lp, mode=mode):
      return ppo_policy_loss(
        lp, old, adv, mask, cliprange=eps, loss_agg_mode=mode
      )[0]

    ref = lambda lp, ref_fn=ref_fn: ref_fn(lp, old, adv, eps)
    np.testing.assert_allclose(ours(logp), ref(logp), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
      jax.grad(ours)(logp), jax.grad(ref)(logp), rtol=1e-6, atol=1e-6
    )


def test_parity_data_has_clipped_tokens():
  # Without clipped tokens the parity test would only check r * A.
  logp, old, adv = _data(0)
  _, stats = ppo_policy_loss(
    logp, old, adv, jnp.ones(logp.shape, bool), cliprange=0.2
  )
  assert 0.1 < float(stats["ppo/clipfrac"].value) < 0.9
