"""The model's weight matmuls as 2-D dots, with gradients XLA:CPU runs fast.

``flat_dot`` is every projection and the LM head. Both choices below are
about the backward pass on CPU (the forward values are the plain
products'); benchmarks/README.md has the measurements.
"""

import functools
import math
from typing import Any

import jax

Array = jax.Array

_NN = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, N] -> [M, N]
_NT = (((1,), (1,)), ((), ()))  # x [M, K] . w [N, K] -> [M, N]
_TN = (((0,), (0,)), ((), ()))  # a [M, K] . b [M, N] -> [K, N]

# Hidden sizes up to this one take the tied head's own backward on CPU
# (`_dot_nt_cpu`): measured faster at 64, 128 and 256, mixed at 512.
NT_GRAD_MAX_HIDDEN = 256


def flat_dot(
  x: Array,
  w: Array,
  n_in: int = 1,
  *,
  w_transposed: bool = False,
  preferred_element_type: Any = None,
) -> Array:
  """x [..., *in] contracted with w [*in, *out] as one 2-D matmul.

  Same product as ``jnp.einsum("...i,io->...o")``, computed as an
  [M, K] x [K, N] dot with M the product of x's leading axes. Why: the
  einsum's weight gradient contracts over every leading axis at once, which
  XLA:CPU lowers with a strided transposing copy of the [..., out]
  gradient; the 2-D dot's weight gradient is a plain matmul (a SwiGLU MLP's
  forward + backward 1.3-1.4x faster, benchmarks/README.md).

  Args:
    x: [..., *in] activations (f32 or bf16).
    w: [*in, *out] weights in x's dtype, or [*out, *in] with
      ``w_transposed`` (a tied embedding [V, D] used as the LM head; see
      `dot_nt` for its gradient).
    n_in: number of contracted trailing axes of x.
    preferred_element_type: result dtype (as in ``jnp.einsum``); x's when
      None.

  Returns:
    [..., *out].
  """
  lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
  x2 = x.reshape(-1, k)
  if w_transposed:
    out = w.shape[: w.ndim - n_in]
    y = dot_nt(x2, w.reshape(-1, k), preferred_element_type)
  else:
    out = w.shape[n_in:]
    y = jax.lax.dot_general(
      x2, w.reshape(k, -1), _NN, preferred_element_type=preferred_element_type
    )
  return y.reshape(*lead, *out)


def dot_nt(x: Array, w: Array, preferred_element_type: Any = None) -> Array:
  """x [M, K] times w [N, K] transposed: [M, N] (the tied LM head).

  On CPU, with K <= `NT_GRAD_MAX_HIDDEN`, w's gradient is computed as
  (x^T g)^T (`_dot_nt_cpu`) instead of autodiff's g^T x; elsewhere this is
  ``lax.dot_general``. The values are the same product either way
  (tests/models/test_flat_dot.py).
  """
  plain = functools.partial(
    jax.lax.dot_general,
    dimension_numbers=_NT,
    preferred_element_type=preferred_element_type,
  )
  if x.shape[1] > NT_GRAD_MAX_HIDDEN:
    return plain(x, w)
  return jax.lax.platform_dependent(
    x,
    w,
    cpu=lambda x, w: _dot_nt_cpu(x, w, preferred_element_type),
    default=plain,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_nt_cpu(x: Array, w: Array, preferred_element_type: Any) -> Array:
  """``dot_nt`` with its own backward for w's gradient.

  Autodiff writes dw = g^T x [N, K] straight into w's layout. With a
  narrow K, XLA:CPU runs that product at a fraction of the rate of
  x^T g [K, N] (M x N x K = 1024 x 2048 x 128: 6.3 against 3.6 ms;
  1024 x 32768 x 64: 111 against 34 ms). So the backward makes x^T g and
  transposes it, behind an optimization barrier that keeps XLA from
  folding the transpose back into the dot. dx is autodiff's product.
  """
  return jax.lax.dot_general(
    x, w, _NT, preferred_element_type=preferred_element_type
  )


def _dot_nt_cpu_fwd(x, w, preferred_element_type):
  return _dot_nt_cpu(x, w, preferred_element_type), (x, w)


def _dot_nt_cpu_bwd(preferred_element_type, res, g):
  x, w = res
  pet = preferred_element_type
  dx = jax.lax.dot_general(g, w, _NN, preferred_element_type=pet)
  dw_t = jax.lax.dot_general(x, g, _TN, preferred_element_type=pet)
  dw = jax.lax.optimization_barrier(dw_t).T
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dot_nt_cpu.defvjp(_dot_nt_cpu_fwd, _dot_nt_cpu_bwd)
