"""Batch and rollout containers shared by the math, rollout and train steps.

All containers are ``flax.struct`` dataclasses holding arrays only, so they
are pytrees that pass through ``jax.jit``, ``pmap`` and sharding unchanged.

Shapes (see the package docstring): B sequences, P prompt length (prompts are
LEFT-padded), T response length (responses are RIGHT-padded), K responses per
ranked prompt. Masks are bool, True = valid. ``data.check_padding``
checks a host batch's padding (``runner.mesh.Placement.batch`` calls it):
the steps cannot, as they trace the masks' values.
"""

import jax
from flax import struct


@struct.dataclass
class PromptBatch:
  """Left-padded prompts.

  Attributes:
    prompt_ids: i32[B, P] token ids, padding on the left.
    prompt_mask: bool[B, P] True at real prompt tokens.
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array


@struct.dataclass
class Rollout:
  """Sampled responses and the sampler's logprobs.

  docs/conventions.md, conventions 1 and 3.

  Attributes:
    prompt_ids: i32[B, P] left-padded prompts the responses continue.
    prompt_mask: bool[B, P] True at real prompt tokens.
    response_ids: i32[B, T] sampled tokens, pad after the first EOS.
    response_mask: bool[B, T] True up to and including the first EOS.
    logprobs: f32[B, T] log pi(y_t | x, y_<t) of the sampled tokens under the
      sampling distribution (temperature applied); 0 at masked slots.
    truncated: bool[B] True for rows that hit max_new_tokens without EOS.
    response_lengths: i32[B] number of True entries of response_mask.
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  response_ids: jax.Array
  response_mask: jax.Array
  logprobs: jax.Array
  truncated: jax.Array
  response_lengths: jax.Array


@struct.dataclass
class PPOBatch:
  """Everything one PPO update needs, response-aligned [B, T].

  Attributes:
    prompt_ids: i32[B, P] left-padded prompts.
    prompt_mask: bool[B, P].
    response_ids: i32[B, T] right-padded responses.
    response_mask: bool[B, T].
    old_logprobs: f32[B, T] logprobs of the policy that sampled the batch.
    ref_logprobs: f32[B, T] logprobs of the frozen reference policy.
    old_values: f32[B, T] critic values stored at rollout time
      (value clipping is against these, docs/conventions.md, convention 10).
    advantages: f32[B, T].
    returns: f32[B, T] value targets.
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  response_ids: jax.Array
  response_mask: jax.Array
  old_logprobs: jax.Array
  ref_logprobs: jax.Array
  old_values: jax.Array
  advantages: jax.Array
  returns: jax.Array


@struct.dataclass
class GRPOBatch:
  """Everything one critic-free (GRPO/RLOO) update needs.

  Attributes:
    prompt_ids: i32[B, P] left-padded prompts, rows prompt * G + g.
    prompt_mask: bool[B, P].
    response_ids: i32[B, T] right-padded responses.
    response_mask: bool[B, T].
    old_logprobs: f32[B, T] logprobs of the policy that sampled the batch.
    ref_logprobs: f32[B, T] logprobs of the frozen reference (0 when the
      iteration uses no reference).
    advantages: f32[B] sequence advantages (broadcast over the tokens).
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  response_ids: jax.Array
  response_mask: jax.Array
  old_logprobs: jax.Array
  ref_logprobs: jax.Array
  advantages: jax.Array


@struct.dataclass
class SFTBatch:
  """Demonstrations: the loss is on response tokens only.

  Attributes:
    prompt_ids: i32[B, P] left-padded prompts.
    prompt_mask: bool[B, P].
    response_ids: i32[B, T] right-padded target responses.
    response_mask: bool[B, T].
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  response_ids: jax.Array
  response_mask: jax.Array


@struct.dataclass
class PreferenceBatch:
  """Pairwise preferences: one prompt, a chosen and a rejected response.

  Attributes:
    prompt_ids: i32[B, P] left-padded prompts.
    prompt_mask: bool[B, P].
    chosen_ids: i32[B, T] right-padded preferred responses.
    chosen_mask: bool[B, T].
    rejected_ids: i32[B, T] right-padded dispreferred responses.
    rejected_mask: bool[B, T].
    ref_chosen_logprobs: optional f32[B] precomputed reference sequence
      logprobs of the chosen responses (DPO; sums, or per-token means for
      IPO); None when the reference is run on the fly.
    ref_rejected_logprobs: optional f32[B], as above.
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  chosen_ids: jax.Array
  chosen_mask: jax.Array
  rejected_ids: jax.Array
  rejected_mask: jax.Array
  ref_chosen_logprobs: jax.Array | None = None
  ref_rejected_logprobs: jax.Array | None = None


@struct.dataclass
class FeaturePairBatch:
  """Fixed features of preference pairs (a frozen backbone's phi).

  Attributes:
    chosen: f32[B, D] features of the preferred responses.
    rejected: f32[B, D] features of the dispreferred responses.
  """

  chosen: jax.Array
  rejected: jax.Array


@struct.dataclass
class RankedBatch:
  """K scored responses per prompt (best-of-K or full rankings).

  Attributes:
    prompt_ids: i32[B, P] left-padded prompts.
    prompt_mask: bool[B, P].
    response_ids: i32[B, K, T] right-padded responses.
    response_mask: bool[B, K, T].
    ranks: i32[B, K] rank of each response, 0 = best (ties not allowed).
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  response_ids: jax.Array
  response_mask: jax.Array
  ranks: jax.Array
