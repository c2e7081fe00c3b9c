"""transformer.flat_dot: the projections' 2-D matmul (issue 16)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.transformer import flat_dot


def _draw(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize(
  "x_shape, w_shape, n_in, spec",
  [
    ((3, 5, 16), (16, 7), 1, "bli,io->blo"),
    ((3, 5, 16), (16, 4, 6), 1, "bld,dhk->blhk"),
    ((3, 5, 4, 6), (4, 6, 16), 2, "blhk,hkd->bld"),
    ((2, 3, 5, 16), (16, 7), 1, "abli,io->ablo"),
  ],
)
def test_flat_dot_matches_einsum_and_its_gradients(
  x_shape, w_shape, n_in, spec
):
  x, w = _draw(x_shape, 0), _draw(w_shape, 1)
  got = flat_dot(x, w, n_in)
  want = jnp.einsum(spec, x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

  g_got = jax.grad(loss(lambda x, w: flat_dot(x, w, n_in)), (0, 1))(x, w)
  g_want = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w)), (0, 1))(x, w)
  for a, b in zip(g_got, g_want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_flat_dot_transposed_weight_is_the_tied_lm_head():
  hidden, embed = _draw((2, 5, 16), 0), _draw((11, 16), 1)  # [V, D]
  got = flat_dot(hidden, embed, w_transposed=True)
  np.testing.assert_allclose(
    got, jnp.einsum("bld,vd->blv", hidden, embed), rtol=1e-5, atol=1e-5
  )
  assert got.shape == (2, 5, 11)


def test_flat_dot_accumulates_in_the_preferred_type():
  x = _draw((2, 3, 16), 0).astype(jnp.bfloat16)
  w = _draw((16, 7), 1).astype(jnp.bfloat16)
  got = flat_dot(x, w, preferred_element_type=jnp.float32)
  assert got.dtype == jnp.float32
  want = jnp.einsum("bli,io->blo", x, w, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def _transposes_activation_grad(f) -> bool:
  """Whether the compiled weight gradient of f writes the [3, 5, 7]
  activation gradient transposed ([7, 3, 5] or [7, 15]) for its matmul."""
  x, w = _draw((3, 5, 16), 0), _draw((16, 7), 1)
  hlo = (
    jax.jit(jax.grad(lambda w: jnp.sum(jax.nn.silu(f(x, w)) ** 2)))
    .lower(w)
    .compile()
    .as_text()
  )
  return re.search(r"f32\[7,(3,5|15)\]", hlo) is not None


def test_weight_gradient_needs_no_transposed_activation_gradient():
  # On XLA:CPU (the tests' backend) the einsum over [B, L, I] writes the
  # [B, L, O] gradient transposed (a strided copy; a SwiGLU MLP's forward
  # + backward 1.3-1.4x slower); the 2-D dot does not. The first assertion
  # shows the check can fail.
  assert _transposes_activation_grad(
    lambda x, w: jnp.einsum("bli,io->blo", x, w)
  )
  assert not _transposes_activation_grad(lambda x, w: flat_dot(x, w))
