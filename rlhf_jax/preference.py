"""Preference losses: reward models (Bradley-Terry, best-of-K, rankings), DPO,
KTO.

Reward-model losses take scalar rewards per response; DPO-family losses take
per-sequence log-probabilities (see ``rlhf_jax.logprobs.sequence_logprobs``).
Every loss returns ``(loss f32[], stats)`` where ``stats`` is a flat dict of
summable statistics (``rlhf_jax.stats``; gradients stopped) keyed
``namespace/name``; ``stats.values`` gives the f32[] metrics. Inputs of any
float dtype (bf16 included) are computed in at least f32.

Batch means, and the statistics, are global over ``axis_name`` when one is
given (pmap/shard_map), so they do not depend on how the batch is split
across devices.

Accuracy is strict (docs/conventions.md, convention 11): a pair counts as
correct only if the chosen reward is strictly greater; ties count as wrong and
are reported.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import stats as st
from rlhf_jax.checks import check_integer_array, check_number
from rlhf_jax.masked import (
  masked_mean,
  masked_sum,
  promote_f32,
)

DPOLossType = Literal["sigmoid", "hinge"]
DPO_LOSS_TYPES = ("sigmoid", "hinge")


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
  check_number(
    "label_smoothing", label_smoothing, lambda v: 0 <= v <= 0.5, "in [0, 0.5]"
  )


def preference_accuracy(
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  *,
  axis_name: str | None = None,
) -> st.Stats:
  """Strict pairwise accuracy with ties reported.

  docs/conventions.md, convention 11:

  accuracy = mean_b [r+_b > r-_b]   (a tie counts as wrong)
  ties     = mean_b [r+_b == r-_b]  (a fraction of the pairs)

  A constant reward model therefore scores 0.0, not 0.5 or 1.0.

  >>> import jax.numpy as jnp
  >>> acc = preference_accuracy(jnp.array([2.0, 1.0, 0.0, 3.0]),
  ...                           jnp.array([1.0, 1.0, 1.0, 0.0]))
  >>> float(acc["accuracy"].value), float(acc["ties"].value)
  (0.5, 0.25)

  Args:
    chosen_rewards: f32[B] rewards of the preferred responses.
    rejected_rewards: f32[B] rewards of the dispreferred responses.
    axis_name: optional pmap/shard_map axis: statistics are global.

  Returns:
    dict with ``accuracy`` and ``ties``, each a ``stats.Mean`` over pairs.

  Raises:
    ValueError: inputs are not both [B] with the same B >= 1.
  """
  _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  rc = promote_f32(chosen_rewards)
  rr = promote_f32(rejected_rewards)
  stats = {"accuracy": st.Mean.of(rc > rr), "ties": st.Mean.of(rc == rr)}
  return st.reduce(stats, axis_name)


def _pair_stats(
  prefix: str,
  chosen: jax.Array,
  rejected: jax.Array,
  names: tuple[str, ...],
  axis_name: str | None,
) -> st.Stats:
  """Accuracy, ties, margin and the two means of paired scores f32[B].

  ``names`` are the keys of accuracy, ties, margin, chosen, rejected.
  """
  acc = preference_accuracy(chosen, rejected)
  values = (
    acc["accuracy"],
    acc["ties"],
    st.Mean.of(chosen - rejected),
    st.Mean.of(chosen),
    st.Mean.of(rejected),
  )
  stats = {f"{prefix}/{n}": v for n, v in zip(names, values, strict=True)}
  return st.reduce(stats, axis_name)


RM_STAT_NAMES = (
  "accuracy",
  "ties",
  "margin",
  "chosen_rewards",
  "rejected_rewards",
)


def bradley_terry_loss(
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  *,
  margin: jax.Array | None = None,
  label_smoothing: float = 0.0,
  center_rewards_coef: float = 0.0,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
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

  >>> import jax.numpy as jnp
  >>> from rlhf_jax import stats
  >>> chosen, rejected = jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0])
  >>> loss, st = bradley_terry_loss(chosen, rejected)
  >>> round(float(loss), 4)  # (softplus(-1) + softplus(0)) / 2
  0.5032
  >>> values = stats.values(st)
  >>> float(values["rm/accuracy"]), float(values["rm/ties"])
  (0.5, 0.5)

  Args:
    chosen_rewards: f32[B] scalar rewards r+ of the preferred responses.
    rejected_rewards: f32[B] rewards r- of the dispreferred responses.
    margin: optional f32[B] (or scalar) margin, in reward units.
    label_smoothing: eps in [0, 0.5].
    center_rewards_coef: weight of the centering penalty (0 disables it).
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats) with ``rm/loss``, ``rm/accuracy`` (strict),
    ``rm/ties`` (fraction), ``rm/margin`` (mean r+ - r-, without the margin
    argument), ``rm/chosen_rewards``, ``rm/rejected_rewards`` (means).

  Raises:
    ValueError: shapes are not equal [B]; margin not broadcastable to [B];
      label_smoothing outside [0, 0.5]; center_rewards_coef below 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  _check_smoothing(label_smoothing)
  check_number(
    "center_rewards_coef", center_rewards_coef, lambda v: v >= 0, ">= 0"
  )
  rc = promote_f32(chosen_rewards)
  rr = promote_f32(rejected_rewards)
  delta = rc - rr
  if margin is not None:
    m = promote_f32(margin)
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
  stats = _pair_stats("rm", rc, rr, RM_STAT_NAMES, axis_name)
  if center_rewards_coef:
    per_pair = per_pair + center_rewards_coef * (rc + rr) ** 2
  stats["rm/loss"] = st.Mean.of(per_pair).reduce(axis_name)
  return loss, stats


def best_of_k_loss(
  rewards: jax.Array,
  best_index: jax.Array,
  *,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
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
    (loss f32[], stats) with the keys of ``bradley_terry_loss``, where the
    rejected reward of a prompt is the highest reward among its other
    responses: ``rm/accuracy`` is the fraction of prompts whose labelled
    best response has a reward strictly greater than every other response
    (ties count as wrong).

  Raises:
    ValueError: rewards not [B, K] with K >= 2 or best_index not [B].
    TypeError: best_index not of an integer dtype.
  """
  r = promote_f32(rewards)
  if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] == 0:
    raise ValueError(f"rewards must be [B, K] with K >= 2, got {r.shape}")
  if np.shape(best_index) != r.shape[:1]:
    raise ValueError(
      f"best_index must be [B] = {r.shape[:1]}, got {np.shape(best_index)}"
    )
  check_integer_array("best_index", best_index)
  onehot = jax.nn.one_hot(best_index, r.shape[1], dtype=bool)
  best = jnp.sum(jnp.where(onehot, r, 0.0), axis=-1)
  per_prompt = jax.nn.logsumexp(r, axis=-1) - best
  loss = _batch_mean(per_prompt, axis_name)
  others_max = jnp.max(jnp.where(onehot, -jnp.inf, r), axis=-1)
  stats = _pair_stats("rm", best, others_max, RM_STAT_NAMES, axis_name)
  stats["rm/loss"] = st.Mean.of(per_prompt).reduce(axis_name)
  return loss, stats


def ranking_loss(
  rewards: jax.Array,
  ranks: jax.Array,
  *,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
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
    TypeError: ranks not of an integer dtype.
  """
  r = promote_f32(rewards)
  if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] == 0:
    raise ValueError(f"rewards must be [B, K] with K >= 2, got {r.shape}")
  if np.shape(ranks) != r.shape:
    raise ValueError(f"ranks must be {r.shape}, got {np.shape(ranks)}")
  check_integer_array("ranks", ranks)
  ranks = jnp.asarray(ranks)
  diff = r[:, :, None] - r[:, None, :]  # [B, K, K]: r_i - r_j
  better = ranks[:, :, None] < ranks[:, None, :]  # i ranked above j
  pair_loss = jax.nn.softplus(-jnp.where(better, diff, 0.0))
  n_pairs = jnp.sum(better, axis=(1, 2)).astype(jnp.float32)
  per_prompt = masked_sum(pair_loss, better, axis=(1, 2)) / jnp.maximum(
    n_pairs, 1.0
  )
  loss = masked_mean(per_prompt, n_pairs > 0, axis_name=axis_name)
  stats = {
    "rm/loss": st.Mean.of(per_prompt, n_pairs > 0),
    "rm/accuracy": st.Mean.of(diff > 0, better),
  }
  return loss, st.reduce(stats, axis_name)


def _dpo_stats(
  per_pair: jax.Array,
  logps: tuple[jax.Array, jax.Array],
  rewards: tuple[jax.Array, jax.Array],
  axis_name: str | None,
) -> st.Stats:
  """TRL's DPO statistics: implicit rewards, their accuracy, the logps."""
  names = ("accuracies", "ties", "margins", "chosen", "rejected")
  stats = _pair_stats("rewards", *rewards, names, None)
  stats["dpo/loss"] = st.Mean.of(per_pair)
  stats["logps/chosen"] = st.Mean.of(logps[0])
  stats["logps/rejected"] = st.Mean.of(logps[1])
  return st.reduce(stats, axis_name)


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
  ref_c = jax.lax.stop_gradient(promote_f32(ref_chosen_logprobs))
  ref_r = jax.lax.stop_gradient(promote_f32(ref_rejected_logprobs))
  return promote_f32(chosen_logprobs) - ref_c, promote_f32(
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
) -> tuple[jax.Array, st.Stats]:
  """Direct Preference Optimization loss (Rafailov et al. 2023, eq. 7).

  With per-pair log-ratio difference (inputs are SUMMED sequence logprobs,
  docs/conventions.md, convention 12)

    h_b = [log pi(y+|x) - log pi_ref(y+|x)] - [log pi(y-|x) - log pi_ref(y-|x)]

  loss_type "sigmoid" (DPO; with eps = label_smoothing it is conservative
  DPO, Mitchell 2023):

    L = mean_b [ -(1 - eps) log sigma(beta h_b) - eps log sigma(-beta h_b) ]

  loss_type "hinge" (the SLiC-HF calibration loss of Zhao et al. 2023 on
  the reference-normalised log-ratio, as in TRL):
  L = mean_b relu(1 - beta h_b).

  Implicit rewards are beta (log pi - log pi_ref) per response. The reference
  logprobs get no gradient. With pi == pi_ref every pair gives ln 2 (sigmoid).

  >>> import jax.numpy as jnp
  >>> logps = jnp.array([-4.0])
  >>> loss, _ = dpo_loss(logps, logps, logps, logps, beta=0.1)
  >>> round(float(loss), 6)  # ln 2
  0.693147

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
    (loss f32[], stats) under TRL's names: ``dpo/loss``, ``rewards/chosen``,
    ``rewards/rejected`` (mean implicit rewards), ``rewards/accuracies``
    (strict chosen > rejected implicit reward), ``rewards/ties`` (fraction),
    ``rewards/margins`` (mean chosen - rejected implicit reward),
    ``logps/chosen`` and ``logps/rejected`` (mean policy logprobs, as
    passed in).

  Raises:
    ValueError: the four inputs are not equal [B]; unknown loss_type;
      label_smoothing outside [0, 0.5] or non-zero with "hinge"; beta <= 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(
      f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}"
    )
  _check_smoothing(label_smoothing)
  if loss_type == "hinge" and label_smoothing:
    raise ValueError("label_smoothing applies only to loss_type='sigmoid'")
  check_number("beta", beta, lambda v: v > 0, "> 0")
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
  logps = (promote_f32(chosen_logprobs), promote_f32(rejected_logprobs))
  rewards = (beta * ratio_c, beta * ratio_r)
  return loss, _dpo_stats(per_pair, logps, rewards, axis_name)


def ipo_loss(
  chosen_logprobs: jax.Array,
  rejected_logprobs: jax.Array,
  ref_chosen_logprobs: jax.Array,
  ref_rejected_logprobs: jax.Array,
  *,
  beta: float,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
  """Identity Preference Optimization loss (Azar et al. 2023, eq. 17).

    h_b = [log pi(y+) - log pi_ref(y+)] - [log pi(y-) - log pi_ref(y-)]
    L   = mean_b (h_b - 1 / (2 beta))^2

  Inputs are LENGTH-NORMALISED sequence logprobs, i.e. the per-token mean
  over valid response tokens (``sequence_logprobs(..., average=True)``,
  docs/conventions.md, convention 12), as in the IPO authors' and TRL's
  implementation. The squared loss regresses the log-ratio gap to 1/(2 beta)
  instead of pushing it to infinity, so IPO does not overfit deterministic
  preferences.

  Args:
    chosen_logprobs: f32[B] per-token mean log pi(y+).
    rejected_logprobs: f32[B] per-token mean log pi(y-).
    ref_chosen_logprobs: f32[B] per-token mean reference logprobs of y+.
    ref_rejected_logprobs: f32[B] per-token mean reference logprobs of y-.
    beta: regularisation tau of the paper (> 0); target gap 1/(2 beta).
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats) with the same keys as ``dpo_loss``;
    implicit rewards are beta (mean log pi - mean log pi_ref).

  Raises:
    ValueError: the four inputs are not equal [B]; beta <= 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  check_number("beta", beta, lambda v: v > 0, "> 0")
  ratio_c, ratio_r = _policy_logits(
    chosen_logprobs,
    rejected_logprobs,
    ref_chosen_logprobs,
    ref_rejected_logprobs,
  )
  per_pair = (ratio_c - ratio_r - 1.0 / (2.0 * beta)) ** 2
  loss = _batch_mean(per_pair, axis_name)
  logps = (promote_f32(chosen_logprobs), promote_f32(rejected_logprobs))
  rewards = (beta * ratio_c, beta * ratio_r)
  return loss, _dpo_stats(per_pair, logps, rewards, axis_name)


# --------------------------------------------------------------------- KTO


def _check_rows(**arrays: jax.Array) -> None:
  """Raises ValueError unless all arrays are [B] with the same B >= 1."""
  _check_pairs(**{k: v for k, v in arrays.items() if v is not None})


def kto_kl(
  kl_logprobs: jax.Array,
  ref_kl_logprobs: jax.Array,
  mask: jax.Array | None = None,
  *,
  axis_name: str | None = None,
) -> st.Mean:
  """The batch KL estimate of KTO's reference point, as a summable mean.

  Ethayarajh et al. 2024 (KTO), eq. 7-8: the reference point is

    z_0 = KL(pi(y'|x) || pi_ref(y'|x))

  estimated, as in the authors' code (HALOs) and TRL's ``KTOTrainer``, from
  MISMATCHED pairs of the batch: each prompt x_i is paired with the
  completion y_j of another row j != i, and

    KL_hat = mean_i [log pi(y_j|x_i) - log pi_ref(y_j|x_i)]

  Mismatched pairs are used rather than the rows' own completions so that
  z_0 is not simply the mean of the implicit rewards being optimised
  (which would make the loss depend only on rewards relative to the batch
  and on the label mix). The estimate is unbiased only up to the
  mismatched completions not being samples of pi; it is what every
  published KTO implementation does. ``kto_loss`` takes
  z_ref = max(KL_hat, 0) without gradient.

  The mean is returned as a ``stats.Mean`` (sum, count), so a step merges
  it over micro-batches and devices into the GLOBAL batch estimate before
  the loss is computed (docs/conventions.md, conventions 6 and 15).

  Args:
    kl_logprobs: f[B] summed policy logprobs of the mismatched completions.
    ref_kl_logprobs: f[B] the same under the reference policy.
    mask: optional bool[B], True = a valid mismatched pair; masked slots may
      hold anything (NaN included).
    axis_name: optional pmap/shard_map axis: the mean is global.

  Returns:
    ``stats.Mean`` of the log-ratios (gradient stopped); ``.value`` is f32[]
    KL_hat, 0 when no pair is valid.

  Raises:
    ValueError: inputs (and mask) are not equal [B].
  """
  _check_rows(kl=kl_logprobs, ref_kl=ref_kl_logprobs, mask=mask)
  ratio = promote_f32(kl_logprobs) - promote_f32(ref_kl_logprobs)
  return st.Mean.of(ratio, mask).reduce(axis_name)


KTO_STAT_NAMES = (
  "kto/loss",
  "kto/z_ref",
  "rewards/chosen",
  "rewards/rejected",
  "logps/chosen",
  "logps/rejected",
  "count/chosen",
  "count/rejected",
)


def kto_loss(
  logprobs: jax.Array,
  ref_logprobs: jax.Array,
  labels: jax.Array,
  z_ref: jax.Array | float,
  mask: jax.Array | None = None,
  *,
  beta: float,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
  """Kahneman-Tversky Optimization loss (Ethayarajh et al. 2024, eq. 7-8).

  With implicit reward r_b = log pi(y_b|x_b) - log pi_ref(y_b|x_b) (SUMMED
  sequence logprobs, as DPO) and z = stop_gradient(max(z_ref, 0)):

    v_b = lambda_D sigma(beta (r_b - z))   if y_b is desirable (label True)
          lambda_U sigma(beta (z - r_b))   if y_b is undesirable
    L   = mean_b [lambda_{y_b} - v_b]

  i.e. lambda_D (1 - sigma(beta (r - z))) per desirable row and
  lambda_U (1 - sigma(beta (z - r))) per undesirable one: TRL's
  ``KTOTrainer.kto_loss`` (the two groups concatenated, then averaged over
  all rows). z is the reference point z_0 = KL(pi || pi_ref), estimated on
  the batch by ``kto_kl`` and passed in by the step (clamped at 0 and never
  differentiated here as well). With pi == pi_ref and z = 0 every row gives
  lambda / 2. The paper's advice for imbalanced data is
  lambda_D n_D / (lambda_U n_U) in [1, 4/3].

  >>> import jax.numpy as jnp
  >>> logp = jnp.array([-4.0, -4.0])
  >>> loss, _ = kto_loss(logp, logp, jnp.array([True, False]), 0.0, beta=0.1)
  >>> float(loss)  # (1 - sigma(0) + 1 - sigma(0)) / 2
  0.5

  Args:
    logprobs: f[B] sum over valid response tokens of log pi(y|x).
    ref_logprobs: f[B] the same under the frozen reference (no gradient).
    labels: bool[B] True = desirable (accepted), or 0/1 numbers (any
      non-zero value is read as desirable: they may be traced, so their
      values are not checked).
    z_ref: f32[] the reference point (the batch KL estimate).
    mask: optional bool[B] valid rows (padding rows False); masked slots
      may hold anything (NaN included).
    beta: inverse temperature of the implicit reward (> 0).
    desirable_weight: lambda_D (> 0).
    undesirable_weight: lambda_U (> 0).
    normalizer: optional global count of valid rows the sum is divided by
      (a step's whole batch, for micro-batching); default this batch's
      valid rows, global over ``axis_name``.
    axis_name: optional pmap/shard_map axis for global batch means.

  Returns:
    (loss f32[], stats): ``kto/loss`` (mean per-row loss), ``kto/z_ref``
    (the clamped reference point used), ``rewards/chosen`` and
    ``rewards/rejected`` (mean beta r over desirable / undesirable rows),
    ``logps/chosen`` and ``logps/rejected`` (mean policy logprobs),
    ``count/chosen`` and ``count/rejected`` (``stats.Sum`` of rows).

  Raises:
    ValueError: inputs not equal [B]; z_ref not a finite scalar; beta or
      a weight <= 0 or not finite.
    TypeError: a hyperparameter that is not a number or a scalar array.
  """
  _check_rows(logprobs=logprobs, ref_logprobs=ref_logprobs, labels=labels)
  _check_rows(logprobs=logprobs, mask=mask)
  check_number("z_ref", z_ref, math.isfinite, "finite")
  for name, v in (
    ("beta", beta),
    ("desirable_weight", desirable_weight),
    ("undesirable_weight", undesirable_weight),
  ):
    check_number(name, v, lambda v: v > 0, "> 0")
  valid = jnp.ones(jnp.shape(logprobs), bool) if mask is None else mask
  valid = jnp.asarray(valid).astype(bool)
  good = jnp.asarray(labels).astype(bool)
  # where BEFORE any arithmetic: garbage in masked rows cannot leak.
  logp = jnp.where(valid, promote_f32(logprobs), 0.0)
  ref = jax.lax.stop_gradient(jnp.where(valid, promote_f32(ref_logprobs), 0.0))
  z = jax.lax.stop_gradient(jnp.maximum(promote_f32(z_ref), 0.0))
  ratio = logp - ref
  # 1 - sigma(u) = sigma(-u): stable, with u = beta (r - z) or beta (z - r).
  per_row = jnp.where(
    good,
    desirable_weight * jax.nn.sigmoid(-beta * (ratio - z)),
    undesirable_weight * jax.nn.sigmoid(-beta * (z - ratio)),
  )
  total = masked_sum(per_row, valid, axis_name=axis_name)
  if normalizer is None:
    normalizer = _global_count(valid, axis_name)
  loss = total / jnp.maximum(jnp.asarray(normalizer, total.dtype), 1.0)
  return loss, _kto_stats(
    per_row, logp, beta * ratio, z, good, valid, axis_name
  )


def _global_count(mask: jax.Array, axis_name: str | None) -> jax.Array:
  """f32[] number of True entries of ``mask``, summed over ``axis_name``."""
  count = jnp.sum(mask).astype(jnp.float32)
  return count if axis_name is None else jax.lax.psum(count, axis_name)


def _kto_stats(per_row, logp, rewards, z, good, valid, axis_name):
  """TRL-like KTO statistics, summable (``KTO_STAT_NAMES``)."""
  chosen, rejected = valid & good, valid & ~good
  values = (
    st.Mean.of(per_row, valid),
    st.Mean.of(jnp.broadcast_to(z, valid.shape), valid),
    st.Mean.of(rewards, chosen),
    st.Mean.of(rewards, rejected),
    st.Mean.of(logp, chosen),
    st.Mean.of(logp, rejected),
    st.Sum.of(chosen),
    st.Sum.of(rejected),
  )
  stats = dict(zip(KTO_STAT_NAMES, values, strict=True))
  return st.reduce(stats, axis_name)
