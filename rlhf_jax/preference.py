"""Preference losses: reward models (Bradley-Terry, best-of-K, rankings), DPO.

Reward-model losses take scalar rewards per response; DPO-family losses take
per-sequence log-probabilities (see ``rlhf_jax.logprobs.sequence_logprobs``).
Every loss returns ``(loss f32[], stats)`` where ``stats`` is a flat dict of
f32[] metrics (gradients stopped) keyed ``namespace/name``. Inputs of any
float dtype (bf16 included) are computed in at least f32.

Batch means are global over ``axis_name`` when one is given (pmap/shard_map),
so the loss does not depend on how the batch is split across devices.

Accuracy is strict (DESIGN.md convention 11): a pair counts as correct only if
the chosen reward is strictly greater; ties count as wrong and are reported.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.masked import masked_mean, masked_sum

DPOLossType = Literal["sigmoid", "hinge"]
DPO_LOSS_TYPES = ("sigmoid", "hinge")


def _as_float(x: jax.Array) -> jax.Array:
  """Promotes to at least f32 (bf16/f16 inputs give f32 outputs)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_pairs(**arrays: jax.Array) -> None:
  """Raises ValueError unless all arrays are f[B] with the same B >= 1."""
  shapes = {name: jnp.shape(a) for name, a in arrays.items()}
  first = next(iter(shapes.values()))
  if len(first) != 1 or first[0] == 0 or len(set(shapes.values())) != 1:
    desc = ", ".join(f"{n}={s}" for n, s in shapes.items())
    raise ValueError(f"expected equal non-empty rank-1 shapes [B], got {desc}")


def _batch_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean over a [B] batch, global over ``axis_name`` devices."""
  return masked_mean(x, jnp.ones(x.shape, bool), axis_name=axis_name)


def _check_smoothing(label_smoothing: float) -> None:
  if isinstance(label_smoothing, int | float) and not (
    0.0 <= label_smoothing <= 0.5
  ):
    raise ValueError(
      f"label_smoothing must be in [0, 0.5], got {label_smoothing}"
    )


def preference_accuracy(
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  *,
  axis_name: str | None = None,
) -> dict[str, jax.Array]:
  """Strict pairwise accuracy with ties reported (DESIGN.md convention 11).

  accuracy = mean_b [r+_b > r-_b]   (a tie counts as wrong)
  ties     = sum_b  [r+_b == r-_b]

  A constant reward model therefore scores 0.0, not 0.5 or 1.0.

  Args:
    chosen_rewards: f32[B] rewards of the preferred responses.
    rejected_rewards: f32[B] rewards of the dispreferred responses.
    axis_name: optional pmap/shard_map axis: statistics are global.

  Returns:
    dict with ``accuracy`` f32[] in [0, 1] and ``ties`` f32[] (a count).

  Raises:
    ValueError: inputs are not both [B] with the same B >= 1.
  """
  _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  rc = _as_float(chosen_rewards)
  rr = _as_float(rejected_rewards)
  ones = jnp.ones(rc.shape, bool)
  correct = (rc > rr).astype(jnp.float32)
  ties = (rc == rr).astype(jnp.float32)
  return {
    "accuracy": masked_mean(correct, ones, axis_name=axis_name),
    "ties": masked_sum(ties, ones, axis_name=axis_name),
  }


def bradley_terry_loss(
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  *,
  margin: jax.Array | None = None,
  label_smoothing: float = 0.0,
  center_rewards_coef: float = 0.0,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry reward-model loss on pairs.

  With d_b = r+_b - r-_b - m_b and eps = ``label_smoothing``:

    L = mean_b [ (1 - eps) * -log sigma(d_b) + eps * -log sigma(-d_b) ]
        + center_rewards_coef * mean_b (r+_b + r-_b)^2

  The first term is the negative log-likelihood of P(y+ > y-) = sigma(r+ - r-)
  (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1 with K = 2). The optional
  per-pair margin m_b (Touvron et al. 2023, Llama 2 eq. 2) demands a larger
  reward gap on clearly-separated pairs. Label smoothing treats each label as
  flipped with probability eps. The centering term (Eisenstein et al. 2023,
  as in TRL's ``center_rewards_coefficient``) pins the otherwise free
  additive constant of the rewards near 0. Per pair,
  dL/dd = sigma(d) - (1 - eps), which is sigma(d) - 1 without smoothing.

  Args:
    chosen_rewards: f32[B] scalar rewards r+ of the preferred responses.
    rejected_rewards: f32[B] rewards r- of the dispreferred responses.
    margin: optional f32[B] (or scalar) margin, in reward units.
    label_smoothing: eps in [0, 0.5].
    center_rewards_coef: weight of the centering penalty (0 disables it).
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats) with ``rm/loss``, ``rm/accuracy`` (strict),
    ``rm/ties`` (count), ``rm/margin`` (mean r+ - r-, without the margin
    argument), ``rm/chosen_rewards``, ``rm/rejected_rewards`` (means).

  Raises:
    ValueError: shapes are not equal [B]; margin not broadcastable to [B];
      label_smoothing outside [0, 0.5].
  """
  _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  _check_smoothing(label_smoothing)
  rc = _as_float(chosen_rewards)
  rr = _as_float(rejected_rewards)
  delta = rc - rr
  if margin is not None:
    m = _as_float(margin)
    if m.shape not in ((), rc.shape):
      raise ValueError(f"margin must be scalar or {rc.shape}, got {m.shape}")
    delta = delta - m
  # -log sigma(d) = softplus(-d), stable for large |d|.
  per_pair = (1.0 - label_smoothing) * jax.nn.softplus(
    -delta
  ) + label_smoothing * jax.nn.softplus(delta)
  loss = _batch_mean(per_pair, axis_name)
  if center_rewards_coef:
    loss = loss + center_rewards_coef * _batch_mean((rc + rr) ** 2, axis_name)
  acc = preference_accuracy(rc, rr, axis_name=axis_name)
  stats = {
    "rm/loss": loss,
    "rm/accuracy": acc["accuracy"],
    "rm/ties": acc["ties"],
    "rm/margin": _batch_mean(rc - rr, axis_name),
    "rm/chosen_rewards": _batch_mean(rc, axis_name),
    "rm/rejected_rewards": _batch_mean(rr, axis_name),
  }
  return loss, jax.lax.stop_gradient(stats)


def best_of_k_loss(
  rewards: jax.Array,
  best_index: jax.Array,
  *,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Best-of-K softmax cross-entropy (Ziegler et al. 2019, section 2.2).

  The labeller picks the best of K responses; the reward model is trained as
  a K-way classifier over its scalar rewards (lm-human-preferences):

    L = mean_b [ logsumexp_k r_{b,k} - r_{b, i_b} ]

  For K = 2 this equals the Bradley-Terry loss.

  Args:
    rewards: f32[B, K] reward of each of the K responses to a prompt.
    best_index: i32[B] index in [0, K) of the preferred response. Indices out
      of range are not checked (they cannot be under jit) and give garbage.
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats) with ``rm/loss`` and ``rm/accuracy``: fraction of
    prompts whose labelled best response has a reward strictly greater than
    every other response (ties count as wrong).

  Raises:
    ValueError: rewards not [B, K] with K >= 2 or best_index not [B].
  """
  r = _as_float(rewards)
  if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] == 0:
    raise ValueError(f"rewards must be [B, K] with K >= 2, got {r.shape}")
  if jnp.shape(best_index) != r.shape[:1]:
    raise ValueError(
      f"best_index must be [B] = {r.shape[:1]}, got {jnp.shape(best_index)}"
    )
  onehot = jax.nn.one_hot(best_index, r.shape[1], dtype=bool)
  best = jnp.sum(jnp.where(onehot, r, 0.0), axis=-1)
  per_prompt = jax.nn.logsumexp(r, axis=-1) - best
  loss = _batch_mean(per_prompt, axis_name)
  others_max = jnp.max(jnp.where(onehot, -jnp.inf, r), axis=-1)
  correct = (best > others_max).astype(jnp.float32)
  stats = {"rm/loss": loss, "rm/accuracy": _batch_mean(correct, axis_name)}
  return loss, jax.lax.stop_gradient(stats)


def ranking_loss(
  rewards: jax.Array,
  ranks: jax.Array,
  *,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """All-pairs ranking loss from a full ranking (Ouyang et al. 2022, eq. 1).

  Each prompt's K ranked responses give K-choose-2 comparisons; the loss on a
  prompt is their average, so each prompt counts once however large K is
  (InstructGPT's fix for overfitting on correlated comparisons):

    L = mean_b [ 1/|S_b| sum_{(i,j) in S_b} -log sigma(r_{b,i} - r_{b,j}) ]
    S_b = {(i, j) : ranks_{b,i} < ranks_{b,j}}   (i ranked better than j)

  With distinct ranks |S_b| = K (K - 1) / 2; tied ranks give no comparison.
  For K = 2 this equals the Bradley-Terry loss.

  Args:
    rewards: f32[B, K] reward of each response.
    ranks: i32[B, K] rank of each response, 0 = best.
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats) with ``rm/loss`` and ``rm/accuracy``: fraction of all
    ordered pairs whose better-ranked response has the strictly greater
    reward.

  Raises:
    ValueError: rewards not [B, K] with K >= 2 or ranks of another shape.
  """
  r = _as_float(rewards)
  if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] == 0:
    raise ValueError(f"rewards must be [B, K] with K >= 2, got {r.shape}")
  if jnp.shape(ranks) != r.shape:
    raise ValueError(f"ranks must be {r.shape}, got {jnp.shape(ranks)}")
  ranks = jnp.asarray(ranks)
  diff = r[:, :, None] - r[:, None, :]  # [B, K, K]: r_i - r_j
  better = ranks[:, :, None] < ranks[:, None, :]  # i ranked above j
  pair_loss = jax.nn.softplus(-jnp.where(better, diff, 0.0))
  n_pairs = jnp.sum(better, axis=(1, 2)).astype(jnp.float32)
  per_prompt = masked_sum(pair_loss, better, axis=(1, 2)) / jnp.maximum(
    n_pairs, 1.0
  )
  loss = masked_mean(per_prompt, n_pairs > 0, axis_name=axis_name)
  correct = (diff > 0).astype(jnp.float32)
  stats = {
    "rm/loss": loss,
    "rm/accuracy": masked_mean(correct, better, axis_name=axis_name),
  }
  return loss, jax.lax.stop_gradient(stats)


def _dpo_stats(
  prefix: str,
  loss: jax.Array,
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  axis_name: str | None,
) -> dict[str, jax.Array]:
  acc = preference_accuracy(
    chosen_rewards, rejected_rewards, axis_name=axis_name
  )
  stats = {
    f"{prefix}/loss": loss,
    f"{prefix}/chosen_rewards": _batch_mean(chosen_rewards, axis_name),
    f"{prefix}/rejected_rewards": _batch_mean(rejected_rewards, axis_name),
    f"{prefix}/accuracy": acc["accuracy"],
    f"{prefix}/ties": acc["ties"],
    f"{prefix}/margin": _batch_mean(
      chosen_rewards - rejected_rewards, axis_name
    ),
  }
  return jax.lax.stop_gradient(stats)


def _policy_logits(
  chosen_logprobs: jax.Array,
  rejected_logprobs: jax.Array,
  ref_chosen_logprobs: jax.Array,
  ref_rejected_logprobs: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Returns (log-ratio chosen, log-ratio rejected), each f32[B]."""
  _check_pairs(
    chosen_logprobs=chosen_logprobs,
    rejected_logprobs=rejected_logprobs,
    ref_chosen_logprobs=ref_chosen_logprobs,
    ref_rejected_logprobs=ref_rejected_logprobs,
  )
  # The reference is a constant target: no gradient flows into it.
  ref_c = jax.lax.stop_gradient(_as_float(ref_chosen_logprobs))
  ref_r = jax.lax.stop_gradient(_as_float(ref_rejected_logprobs))
  return _as_float(chosen_logprobs) - ref_c, _as_float(
    rejected_logprobs
  ) - ref_r


def dpo_loss(
  chosen_logprobs: jax.Array,
  rejected_logprobs: jax.Array,
  ref_chosen_logprobs: jax.Array,
  ref_rejected_logprobs: jax.Array,
  *,
  beta: float,
  label_smoothing: float = 0.0,
  loss_type: DPOLossType = "sigmoid",
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Direct Preference Optimization loss (Rafailov et al. 2023, eq. 7).

  With per-pair log-ratio difference (inputs are SUMMED sequence logprobs,
  DESIGN.md convention 12)

    h_b = [log pi(y+|x) - log pi_ref(y+|x)] - [log pi(y-|x) - log pi_ref(y-|x)]

  loss_type "sigmoid" (DPO; with eps = label_smoothing it is conservative
  DPO, Mitchell 2023):

    L = mean_b [ -(1 - eps) log sigma(beta h_b) - eps log sigma(-beta h_b) ]

  loss_type "hinge" (the SLiC-HF calibration loss of Zhao et al. 2023 on
  the reference-normalised log-ratio, as in TRL):
  L = mean_b relu(1 - beta h_b).

  Implicit rewards are beta (log pi - log pi_ref) per response. The reference
  logprobs get no gradient. With pi == pi_ref every pair gives ln 2 (sigmoid).

  Args:
    chosen_logprobs: f32[B] sum over valid response tokens of log pi(y+).
    rejected_logprobs: f32[B] same for y-.
    ref_chosen_logprobs: f32[B] reference-policy sums for y+ (same pairs, same
      order).
    ref_rejected_logprobs: f32[B] reference-policy sums for y-.
    beta: inverse temperature of the implicit reward (> 0).
    label_smoothing: cDPO flip probability eps in [0, 0.5] (sigmoid only).
    loss_type: "sigmoid" or "hinge".
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats) with ``dpo/loss``, ``dpo/chosen_rewards``,
    ``dpo/rejected_rewards`` (mean implicit rewards), ``dpo/accuracy``
    (strict chosen > rejected implicit reward), ``dpo/ties`` (count),
    ``dpo/margin`` (mean chosen - rejected implicit reward).

  Raises:
    ValueError: the four inputs are not equal [B]; unknown loss_type;
      label_smoothing outside [0, 0.5] or non-zero with "hinge"; beta <= 0.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(
      f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}"
    )
  _check_smoothing(label_smoothing)
  if loss_type == "hinge" and label_smoothing:
    raise ValueError("label_smoothing applies only to loss_type='sigmoid'")
  if isinstance(beta, int | float) and beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  ratio_c, ratio_r = _policy_logits(
    chosen_logprobs,
    rejected_logprobs,
    ref_chosen_logprobs,
    ref_rejected_logprobs,
  )
  z = beta * (ratio_c - ratio_r)
  if loss_type == "sigmoid":
    per_pair = (1.0 - label_smoothing) * jax.nn.softplus(
      -z
    ) + label_smoothing * jax.nn.softplus(z)
  else:
    per_pair = jax.nn.relu(1.0 - z)
  loss = _batch_mean(per_pair, axis_name)
  stats = _dpo_stats("dpo", loss, beta * ratio_c, beta * ratio_r, axis_name)
  return loss, stats


def ipo_loss(
  chosen_logprobs: jax.Array,
  rejected_logprobs: jax.Array,
  ref_chosen_logprobs: jax.Array,
  ref_rejected_logprobs: jax.Array,
  *,
  beta: float,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Identity Preference Optimization loss (Azar et al. 2023, eq. 17).

    h_b = [log pi(y+) - log pi_ref(y+)] - [log pi(y-) - log pi_ref(y-)]
    L   = mean_b (h_b - 1 / (2 beta))^2

  Inputs are LENGTH-NORMALISED sequence logprobs, i.e. the per-token mean
  over valid response tokens (``sequence_logprobs(..., average=True)``,
  DESIGN.md convention 12), as in the IPO authors' and TRL's implementation.
  The squared loss regresses the log-ratio gap to 1/(2 beta) instead of
  pushing it to infinity, so IPO does not overfit deterministic preferences.

  Args:
    chosen_logprobs: f32[B] per-token mean log pi(y+).
    rejected_logprobs: f32[B] per-token mean log pi(y-).
    ref_chosen_logprobs: f32[B] per-token mean reference logprobs of y+.
    ref_rejected_logprobs: f32[B] per-token mean reference logprobs of y-.
    beta: regularisation tau of the paper (> 0); target gap 1/(2 beta).
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats) with the same ``dpo/...`` keys as ``dpo_loss``;
    implicit rewards are beta (mean log pi - mean log pi_ref).

  Raises:
    ValueError: the four inputs are not equal [B]; beta <= 0.
  """
  if isinstance(beta, int | float) and beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  ratio_c, ratio_r = _policy_logits(
    chosen_logprobs,
    rejected_logprobs,
    ref_chosen_logprobs,
    ref_rejected_logprobs,
  )
  per_pair = (ratio_c - ratio_r - 1.0 / (2.0 * beta)) ** 2
  loss = _batch_mean(per_pair, axis_name)
  stats = _dpo_stats("dpo", loss, beta * ratio_c, beta * ratio_r, axis_name)
  return loss, stats
