"""The model's weight matmuls as 2-D dots, with gradients XLA:CPU runs fast.

``flat_dot`` is every projection and the LM head; ``dot_nt`` the tied LM
head. Both shapes of product are chosen for XLA:CPU's backward pass (the
forward values are the plain products'); benchmarks/README.md has the
measurements.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

_NN = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, N] -> [M, N]
_NT = (((1,), (1,)), ((), ()))  # x [M, K] . w [N, K] -> [M, N]

# Hidden sizes up to this one take the tied head's own derivative on CPU
# (`_dot_nt_cpu`): measured faster at 64, 128 and 256, mixed at 512. Read
# when a function is traced (a compiled step keeps its choice).
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


def dot_weight_t(
  x: Array, w_t: Array, n_in: int = 1, *, preferred_element_type: Any = None
) -> Array:
  """x [..., *in] times a weight held transposed, w_t [N, K]: [..., N].

  K = prod(in). Computed as (w_t . x^T)^T, the weight the left operand:
  XLA:CPU's matmul packs its right operand on every call, so this packs
  the few rows of a decode step's activations instead of the weight
  (16 rows, against ``flat_dot`` on the weight [K, N]: a 20M Llama's
  projections 1.1x-1.5x faster, an 8192-word LM head up to 3x; 64 rows
  and more: as fast, the same values; benchmarks/bench_decode_dots.py). The
  barrier keeps XLA from folding the final transpose back into the dot
  (swapping the operands again). No custom gradient: this is for the
  decode layout (`models.unstack_layers`), which is not trained.

  Args:
    x: [..., *in] activations.
    w_t: [N, K] the weight [*in, N] transposed and flattened.
    n_in: number of contracted trailing axes of x.
    preferred_element_type: result dtype; the operands' promoted dtype
      when None.

  Returns:
    [..., N]; equal to ``flat_dot(x, w)`` up to float32 rounding (the
    products are summed in another order).
  """
  lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
  y_t = jax.lax.dot_general(
    w_t, x.reshape(-1, k), _NT, preferred_element_type=preferred_element_type
  )
  return jax.lax.optimization_barrier(y_t).T.reshape(*lead, w_t.shape[0])


def dot_nt(x: Array, w: Array, preferred_element_type: Any = None) -> Array:
  """x [M, K] times w [N, K] transposed: [M, N] (the tied LM head).

  The same product as ``lax.dot_general`` contracting both K axes. On CPU
  with K <= `NT_GRAD_MAX_HIDDEN`, w's gradient comes out as (x^T g)^T
  instead of autodiff's g^T x (`_dot_nt_cpu`); on other platforms, and
  for wider K, this is the plain dot.

  Args:
    x: [M, K] activations (f32 or bf16).
    w: [N, K] weights (a tied embedding [V, D]).
    preferred_element_type: result dtype; the operands' promoted dtype
      when None.

  Returns:
    [M, N].
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dot_nt_cpu(x: Array, w: Array, preferred_element_type: Any) -> Array:
  """``dot_nt`` whose derivative routes w's tangent through w^T.

  Autodiff writes dw = g^T x [N, K] straight into w's layout. With a
  narrow K, XLA:CPU runs that product at a fraction of the rate of
  x^T g [K, N] (M x N x K = 1024 x 2048 x 128: 6.3 against 3.6 ms;
  1024 x 32768 x 64: 111 against 34 ms). The JVP below writes w's part of
  the tangent as x . (w_dot^T), the transpose behind an optimization
  barrier; reverse mode transposes that into x^T g [K, N] and then one
  transpose into w's layout, which the barrier keeps XLA from folding
  back into the dot. A JVP rule (not a VJP one) keeps forward mode and
  jax's transposition of sharded and shard_map values working as for the
  plain dot. A tangent that is a symbolic zero (a frozen base under LoRA)
  adds no product.
  """
  return jax.lax.dot_general(
    x, w, _NT, preferred_element_type=preferred_element_type
  )


def _dot_nt_cpu_jvp(preferred_element_type, primals, tangents):
  x, w = primals
  x_dot, w_dot = tangents
  pet = preferred_element_type
  y = _dot_nt_cpu(x, w, pet)
  parts = []
  if not isinstance(x_dot, jax.custom_derivatives.SymbolicZero):
    parts.append(jax.lax.dot_general(x_dot, w, _NT, preferred_element_type=pet))
  if not isinstance(w_dot, jax.custom_derivatives.SymbolicZero):
    w_dot_t = jax.lax.optimization_barrier(w_dot.T)
    parts.append(
      jax.lax.dot_general(x, w_dot_t, _NN, preferred_element_type=pet)
    )
  # jax skips the rule when both tangents are symbolic zeros.
  return y, functools.reduce(jnp.add, parts)


_dot_nt_cpu.defjvp(_dot_nt_cpu_jvp, symbolic_zeros=True)
