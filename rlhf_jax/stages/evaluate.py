"""Held-out evaluation of policies (gold, proxy score, KL, diversity)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.logprobs import response_logprobs
from rlhf_jax.stages.common import Context
from rlhf_jax.stages.eval_metrics import distinct_n, mean_stderr, win_rate
from rlhf_jax.stages.rm import reward_model_for_eval
from rlhf_jax.stages.sampling import (
  chunks,
  decode,
  pad_rows,
  sample_continuations,
  tokenize_prompt_texts,
)
from rlhf_jax.train.common import concat_prompt_response
from rlhf_jax.train.supervised import response_mean_reward


def _score_batch(ref, rm, prompt_ids, prompt_mask, roll, temp, **kw):
  """Sequence k1 KL to the reference and reward-model score of samples."""
  config = kw["config"]
  mask = roll["response_mask"]
  ids, attn = concat_prompt_response(
    prompt_ids, prompt_mask, roll["response_ids"], mask
  )
  ref_lp = response_logprobs(
    models.forward(ref, ids, attn, config=config),
    ids,
    prompt_length=prompt_ids.shape[1],
    temperature=temp,
    response_mask=mask,
  )
  # k1 per sampled sequence: sum_t log pi(y_t) - log pi_ref(y_t).
  kl = jnp.sum(jnp.where(mask, roll["logprobs"] - ref_lp, 0.0), axis=-1)
  if kw["with_rm"] and kw["pooling"] == "mean":
    proxy = response_mean_reward(rm, ids, attn, mask, model_config=config)
  elif kw["with_rm"]:
    proxy = models.reward_forward(rm, ids, attn, config=config)
  else:
    proxy = jnp.zeros((ids.shape[0],), jnp.float32)
  return kl, proxy


def _scorer(ctx: Context):
  if "scorer" not in ctx.cache:
    ctx.cache["scorer"] = ctx.placement.jit_gather(
      _score_batch, static_argnames=("config", "with_rm", "pooling")
    )
  return ctx.cache["scorer"]


def heldout_rows(ctx: Context, heldout: list[str], samples: int):
  """(prompt arrays, prompt index) of rows i*samples + s."""
  ds = tokenize_prompt_texts(ctx, heldout)
  rows = np.repeat(np.arange(len(heldout)), samples)
  return ds.arrays["prompt_ids"][rows], ds.arrays["prompt_mask"][rows], rows


def _score_samples(ctx, rm_params, p_ids, p_mask, roll) -> tuple:
  """(sequence k1 KL f32[N], reward-model score f32[N]) of the samples."""
  n = len(p_ids)
  size = ctx.config.sampling.batch_size
  kls, proxies = [], []
  for start, stop in chunks(n, size):
    part = ctx.placement.batch(
      {
        k: pad_rows(v[start:stop], size)
        for k, v in roll.items()
        if k != "truncated"
      }
    )
    ids, mask = ctx.placement.batch(
      (pad_rows(p_ids[start:stop], size), pad_rows(p_mask[start:stop], size))
    )
    kl, proxy = _scorer(ctx)(
      ctx.ref_params,
      rm_params,
      ids,
      mask,
      part,
      jnp.float32(ctx.config.sampling.temperature),
      config=ctx.model_config,
      with_rm=rm_params is not None,
      pooling=ctx.cache.get("rm_pooling", ctx.config.rm.loss.pooling),
    )
    kls.append(np.asarray(kl)[: stop - start])
    proxies.append(np.asarray(proxy)[: stop - start])
  kl, proxy = np.concatenate(kls), np.concatenate(proxies)
  return kl, proxy


def evaluate_policy(
  ctx: Context,
  params: Any,
  rm_params: Any | None,
  *,
  heldout: list[str],
  samples: int,
  key: jax.Array,
  baseline_gold: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
  """Held-out evaluation of one policy.

  Every policy sees the same rows with the same keys (common random
  numbers), so row i of two policies is a fair pair for the win rate.

  Returns:
    (metrics: eval/gold_score, eval/proxy_score, eval/kl (mean sampled-
    sequence k1, nats), eval/kl_stderr (its standard error over the
    held-out prompts, each prompt's samples averaged first; with 2 or
    more prompts), eval/kl_k1_per_token, eval/response_length
    (tokens), eval/truncated_frac, eval/distinct_1, eval/distinct_2 and,
    with ``baseline_gold``, eval/gold_win_rate; details: texts, gold f64[N]).
  """
  p_ids, p_mask, _ = heldout_rows(ctx, heldout, samples)
  roll = sample_continuations(ctx, params, p_ids, p_mask, key, what="eval")
  kl, proxy = _score_samples(ctx, rm_params, p_ids, p_mask, roll)
  ids, mask, trunc = (
    roll["response_ids"],
    roll["response_mask"],
    roll["truncated"],
  )
  texts = decode(ctx, ids, mask)
  # The task's gold scorer; the user's own prompts (--prompts) have none.
  gold = ctx.gold.score(texts) if ctx.has_gold else np.zeros(0)
  lengths = mask.sum(-1)
  metrics = {
    **({"eval/gold_score": float(gold.mean())} if ctx.has_gold else {}),
    "eval/kl": float(kl.mean()),
    "eval/kl_k1_per_token": float(kl.sum() / max(lengths.sum(), 1)),
    "eval/response_length": float(lengths.mean()),
    "eval/truncated_frac": float(trunc.mean()),
    "eval/distinct_1": distinct_n(texts, 1),
    "eval/distinct_2": distinct_n(texts, 2),
  }
  if len(heldout) > 1:
    # k1 is unbiased but noisy per sequence (its mean can be negative on a
    # few rows): the standard error over the prompts (rows are prompt-major,
    # `heldout_rows`) says how far the mean can be trusted.
    metrics["eval/kl_stderr"] = mean_stderr(kl, groups=len(heldout))
  if rm_params is not None:
    metrics["eval/proxy_score"] = float(proxy.mean())
  if ctx.has_gold and baseline_gold is not None:
    metrics["eval/gold_win_rate"] = win_rate(gold, baseline_gold)
  # Report samples: the continuation as it reads after its prompt (the
  # gold scores above keep the response-only text they were tuned on).
  shown = [
    ctx.tokenizer.decode_continuation(p[pm], r[m])
    for p, pm, r, m in zip(p_ids, p_mask, ids, mask, strict=True)
  ]
  return metrics, {"texts": texts, "shown": shown, "gold": gold.tolist()}


def evaluate_into(m, ctx, params, rm, base_gold, prompts) -> dict:
  """evaluate_policy of a training stage's policy: its metrics are merged
  into the step's metrics ``m``; returns {"metrics": ..., **details}."""
  em, details = evaluate_policy(
    ctx, params, rm, baseline_gold=base_gold, **eval_kwargs(ctx, prompts)
  )
  m.update(em)
  return {"metrics": em, **details}


def eval_kwargs(ctx: Context, prompts: dict) -> dict:
  return dict(
    heldout=prompts["heldout"],
    samples=ctx.config.eval.samples_per_prompt,
    key=ctx.key("eval"),
  )


def stage_initial(ctx: Context, prompts: dict) -> dict:
  """The initial policy (= reference) on the held-out prompts."""
  metrics, details = evaluate_policy(
    ctx, ctx.ref_params, reward_model_for_eval(ctx), **eval_kwargs(ctx, prompts)
  )
  ctx.log_record("initial", metrics)
  return {"metrics": metrics, **details}
