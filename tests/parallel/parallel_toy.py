"""A toy linen LM, train state and step shared by the parallel, checkpoint
and multi-process tests.

The step is a pure ``step(state, batch) -> (state, metrics)`` with no mesh
code; ``axis_name`` is set only for pmap (reductions then psum over it).
"""

import typing

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.masked import masked_count, masked_mean

VOCAB, EMBED, MLP, HEADS, KV = 16, 8, 16, 2, 4
BATCH, LENGTH = 8, 6


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


class ToyLM(nn.Module):
  """Embedding -> per-head projection -> MLP residual -> vocab logits."""

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    emb = self.param(
      "embedding",
      _part(nn.initializers.normal(1.0), ("vocab", "embed")),
      (VOCAB, EMBED),
    )
    x = jnp.take(emb, tokens, axis=0)  # f32[B, T, EMBED]
    heads = nn.DenseGeneral(
      (HEADS, KV),
      kernel_init=_part(
        nn.initializers.lecun_normal(), ("embed", "heads", "kv")
      ),
      use_bias=False,
      name="heads",
    )(x)  # f32[B, T, HEADS, KV]
    x = x + nn.DenseGeneral(
      EMBED,
      axis=(-2, -1),
      kernel_init=_part(
        nn.initializers.lecun_normal(), ("heads", "kv", "embed")
      ),
      use_bias=False,
      name="heads_out",
    )(heads)
    h = nn.Dense(
      MLP,
      kernel_init=_part(nn.initializers.lecun_normal(), ("embed", "mlp")),
      bias_init=_part(nn.initializers.normal(0.1), ("mlp",)),
      name="mlp_in",
    )(x)
    x = x + nn.Dense(
      EMBED,
      kernel_init=_part(nn.initializers.lecun_normal(), ("mlp", "embed")),
      use_bias=False,
      name="mlp_out",
    )(nn.gelu(h))
    return nn.Dense(
      VOCAB,
      kernel_init=_part(nn.initializers.lecun_normal(), ("embed", "vocab")),
      use_bias=False,
      name="unembed",
    )(x)


MODEL = ToyLM()
OPTIMIZER = optax.adamw(1e-2, weight_decay=0.1)


class KLState(typing.NamedTuple):
  kl_coef: jax.Array  # f32[]


class RewardStats(typing.NamedTuple):
  mean: jax.Array  # f32[]
  count: jax.Array  # f32[]


@flax.struct.dataclass
class ToyState:
  step: jax.Array  # i32[]
  params: typing.Any
  opt_state: typing.Any
  rng: jax.Array  # typed PRNG key
  kl: KLState
  reward_stats: RewardStats


def _dummy_tokens():
  return jnp.zeros((1, LENGTH - 1), jnp.int32)


def boxed_params(rng):
  return MODEL.init(rng, _dummy_tokens())["params"]


def param_logical_axes():
  """Logical PartitionSpecs of the params (as models/ provides them)."""
  return nn.get_partition_spec(jax.eval_shape(boxed_params, jax.random.key(0)))


def init_state(rng: jax.Array) -> ToyState:
  """Unboxed state (params passed around unboxed, as in models/)."""
  init_rng, state_rng = jax.random.split(rng)
  params = nn.meta.unbox(boxed_params(init_rng))
  return ToyState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=OPTIMIZER.init(params),
    rng=state_rng,
    kl=KLState(kl_coef=jnp.float32(0.1)),
    reward_stats=RewardStats(mean=jnp.float32(0.0), count=jnp.float32(0.0)),
  )


def make_step(*, axis_name=None):
  """Next-token cross entropy on masked tokens, adamw update."""

  def step(state: ToyState, batch: dict) -> tuple[ToyState, dict]:
    tokens, mask = batch["tokens"], batch["mask"]
    inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    # Per-step randomness from (rng, step): a random token-dropping mask.
    # Keyed per GLOBAL row, so a device holding rows r..r+b draws the same
    # numbers as one device holding the whole batch (pmap parity).
    rng = jax.random.fold_in(state.rng, state.step)
    rows = jnp.arange(tmask.shape[0])
    if axis_name is not None:
      rows = rows + jax.lax.axis_index(axis_name) * tmask.shape[0]
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, rows)
    keep = (
      jax.vmap(lambda k: jax.random.uniform(k, tmask.shape[1:]))(row_keys) > 0.1
    )
    tmask = tmask & keep

    def loss_fn(params):
      logits = MODEL.apply({"params": params}, inputs)
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      loss = masked_mean(nll, tmask, axis_name=axis_name)
      acc = masked_mean(
        (jnp.argmax(logits, -1) == targets).astype(jnp.float32),
        tmask,
        axis_name=axis_name,
      )
      return loss, acc

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
      # pmap: each device holds n x its share (see parallel/pmap.py).
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Stand-ins for the KL controller and reward statistics updates.
    err = jnp.clip(loss / 2.0 - 1.0, -0.2, 0.2)
    kl = KLState(kl_coef=state.kl.kl_coef * (1.0 + 0.5 * err))
    tokens_n = masked_count(tmask, axis_name=axis_name)
    count = state.reward_stats.count + tokens_n
    # Running token-weighted mean of the loss (count > 0: every row has
    # at least one valid target before dropping; guarded anyway).
    mean = state.reward_stats.mean + (loss - state.reward_stats.mean) * (
      tokens_n / jnp.maximum(count, 1.0)
    )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      kl=kl,
      reward_stats=RewardStats(mean=mean, count=count),
    )
    metrics = {
      "train/loss": loss,
      "train/accuracy": acc,
      "train/grad_norm": optax.tree.norm(grads),
      "train/tokens": tokens_n,
      "objective/kl_coef": kl.kl_coef,
    }
    return new_state, metrics

  return step


def make_batch(seed: int, batch: int = BATCH) -> dict:
  """tokens i32[B, LENGTH] and a bool mask with tail padding per row."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k1, (batch, LENGTH), 0, VOCAB, jnp.int32)
  lengths = jax.random.randint(k2, (batch, 1), 2, LENGTH + 1)
  mask = jnp.arange(LENGTH)[None, :] < lengths
  return {"tokens": tokens, "mask": mask}
