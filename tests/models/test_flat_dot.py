"""models.dots: the projections' 2-D matmul and the tied LM head (issue 16)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import dots
from rlhf_jax.models.dots import flat_dot


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


@pytest.mark.parametrize("hidden", [16, dots.NT_GRAD_MAX_HIDDEN + 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_head_gradients_equal_autodiff(hidden, dtype):
  # Hidden 16 takes the CPU backward (dw as (x^T g)^T), the wider one the
  # plain dot: both give autodiff's gradients, in the operands' dtypes.
  x = _draw((2, 5, hidden), 0).astype(dtype)
  embed = _draw((11, hidden), 1).astype(dtype)  # [V, D]
  f32 = jnp.float32

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

  got = jax.grad(
    loss(
      lambda x, w: flat_dot(x, w, w_transposed=True, preferred_element_type=f32)
    ),
    (0, 1),
  )(x, embed)
  want = jax.grad(
    loss(
      lambda x, w: jnp.einsum("bld,vd->blv", x, w, preferred_element_type=f32)
    ),
    (0, 1),
  )(x, embed)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for a, b in zip(got, want, strict=True):
    assert a.dtype == dtype
    np.testing.assert_allclose(a.astype(f32), b.astype(f32), rtol=tol, atol=tol)


def _embed_grad_hlo(hidden: int) -> str:
  x, embed = _draw((10, hidden), 0), _draw((11, hidden), 1)
  grad = jax.grad(lambda w: jnp.sum(jnp.sin(dots.dot_nt(x, w))), argnums=0)
  return jax.jit(grad).lower(embed).compile().as_text()


def test_tied_head_weight_gradient_is_made_hidden_major(monkeypatch):
  # XLA:CPU runs g^T x into the embedding's [V, D] layout at a fraction of
  # the rate of x^T g into [D, V] when D is narrow (dots._dot_nt_cpu); the
  # compiled gradient holds the [D, V] = [16, 11] dot and no [11, 16] one.
  hlo = _embed_grad_hlo(16)
  assert re.search(r"f32\[16,11\]\{1,0\} dot\(", hlo)
  assert not re.search(r"f32\[11,16\]\{1,0\} dot\(", hlo)
  # Above the threshold (here forced to 8) it is autodiff's [V, D] product.
  monkeypatch.setattr(dots, "NT_GRAD_MAX_HIDDEN", 8)
  hlo = _embed_grad_hlo(16)
  assert re.search(r"f32\[11,16\]\{1,0\} dot\(", hlo)


def test_tied_head_forward_mode_equals_autodiff():
  # The CPU rule is a JVP: forward mode (jvp, Hessian-vector products)
  # works as for the plain dot.
  x, w = _draw((10, 16), 0), _draw((11, 16), 1)
  dx, dw = _draw((10, 16), 2), _draw((11, 16), 3)

  def f(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

  plain = lambda x, w: jnp.einsum("md,nd->mn", x, w)  # noqa: E731
  got = jax.jvp(f(dots.dot_nt), (x, w), (dx, dw))[1]
  want = jax.jvp(f(plain), (x, w), (dx, dw))[1]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  hvp = jax.jvp(jax.grad(f(dots.dot_nt), 1), (x, w), (dx, dw))[1]
  want = jax.jvp(jax.grad(f(plain), 1), (x, w), (dx, dw))[1]
  np.testing.assert_allclose(hvp, want, rtol=1e-4, atol=1e-5)


def test_tied_head_gradient_inside_shard_map(devices8):
  # Replicated w, rows split: inside shard_map the gradient of a
  # replicated input is summed over the devices, as for the plain dot.
  mesh = jax.sharding.Mesh(np.asarray(devices8), ("d",))
  spec = jax.sharding.PartitionSpec
  x, w = _draw((16, 16), 0), _draw((11, 16), 1)

  def grad_of(fn):
    def per_device(x, w):
      return jax.grad(lambda w: jnp.sum(jnp.sin(fn(x, w))))(w)

    return jax.jit(
      jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(spec("d"), spec()),
        out_specs=spec(),
      )
    )(x, w)

  want = jax.grad(lambda w: jnp.sum(jnp.sin(jnp.einsum("md,nd->mn", x, w))))(w)
  np.testing.assert_allclose(grad_of(dots.dot_nt), want, rtol=1e-5)


@pytest.mark.parametrize(
  "x_shape, w_shape, n_in",
  [
    ((16, 48), (48, 80), 1),
    ((2, 9, 48), (48, 80), 1),
    ((16, 4, 6), (4, 6, 40), 2),
  ],
)
def test_dot_weight_t_is_the_product_with_the_weight_transposed(
  x_shape, w_shape, n_in
):
  """x times w held as w_t [N, K] (the decode layout on CPU): the product
  of x and w, up to float32 rounding."""
  x, w = _draw(x_shape, 0), _draw(w_shape, 1)
  k = int(np.prod(w_shape[:n_in]))
  w_t = w.reshape(k, -1).T
  got = jax.jit(dots.dot_weight_t, static_argnums=2)(x, w_t, n_in)
  want = flat_dot(x, w, n_in).reshape(got.shape)
  assert got.shape == (*x_shape[: len(x_shape) - n_in], w_t.shape[0])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert float(jnp.abs(want).max()) > 1.0
