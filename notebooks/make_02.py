"""Writes notebooks/02_pipeline_walkthrough.ipynb (no outputs stored).

The notebook's source lives here so it can be reviewed as plain Python and
regenerated: ``python notebooks/make_02.py``. ``--script`` prints the code
cells as one script instead (handy for debugging outside Jupyter).
"""

import pathlib
import sys

import nbformat

CELLS: list[tuple[str, str]] = [
  (
    "markdown",
    """\
# The RLHF pipeline at toy size: preferences -> reward model -> PPO -> compare

The whole loop of the seed page (`../shared/seed/`) with the library's
jitted steps, on a random 1-layer Llama-style model with a 16-token
vocabulary, so it runs on a CPU in seconds. The CLI (`rlhf-jax run`) does the
same with TinyStories-656K, a VADER gold score and a simulated annotator.

The toy task: tokens 3..6 are "positive". The **gold score** of a response is
the fraction of its tokens that are positive. An annotator compares two
responses to the same prompt and prefers the one with the higher gold score.
Every value below is asserted; the test suite executes this notebook.""",
  ),
  (
    "code",
    """\
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax.masked import masked_mean
from rlhf_jax.rollout import generate
from rlhf_jax.train import (
  PPOConfig,
  TrainState,
  init_ppo_state,
  make_ppo_step,
  make_reward_model_step,
  pair_rewards,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch

PAD, BOS, EOS = 0, 1, 2
POSITIVE = jnp.arange(16) >= 3
POSITIVE = POSITIVE & (jnp.arange(16) <= 6)  # tokens 3, 4, 5, 6
P, T = 4, 8  # prompt and response lengths

cfg = models.ModelConfig(
  model_type="llama", vocab_size=16, hidden_size=32, num_layers=1,
  num_heads=2, num_kv_heads=2, head_dim=16, intermediate_size=64,
  max_position_embeddings=P + T, tie_word_embeddings=True,
  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)
key = jax.random.key(0)
policy_key, rm_key, data_key, ppo_key, prompt_key = jax.random.split(key, 5)
policy0 = models.init_params(cfg, policy_key)  # initial policy = reference


def make_prompts(rng, n):
  \"\"\"n left-padded prompts [BOS, 3 random ordinary tokens].\"\"\"
  body = jax.random.randint(rng, (n, P - 1), 7, 16)
  ids = jnp.concatenate([jnp.full((n, 1), BOS), body], axis=1)
  return PromptBatch(ids.astype(jnp.int32), jnp.ones((n, P), bool))


def gold_score(rollout):
  \"\"\"Fraction of positive tokens in each response: f32[B].\"\"\"
  pos = POSITIVE[rollout.response_ids].astype(jnp.float32)
  return masked_mean(pos, rollout.response_mask, axis=-1)


def sample(params, prompts, rng, temperature=1.0):
  return generate(
    params, prompts.prompt_ids, prompts.prompt_mask, rng, config=cfg,
    max_new_tokens=T, temperature=temperature, eos_token_id=EOS,
    pad_token_id=PAD,
  )""",
  ),
  (
    "markdown",
    """\
## 1. Preferences

Sample two responses per prompt from the initial policy and let the
annotator label them (noiseless here; the CLI uses a Bradley-Terry annotator
with noise). Ties carry no preference and are dropped, as the data layer
drops identical pairs.""",
  ),
  (
    "code",
    """\
n_prompts = 512
prompts = make_prompts(data_key, n_prompts)
key_a, key_b = jax.random.split(jax.random.fold_in(data_key, 1))
ya, yb = sample(policy0, prompts, key_a), sample(policy0, prompts, key_b)
ga, gb = np.asarray(gold_score(ya)), np.asarray(gold_score(yb))
keep = ga != gb
a_wins = (ga > gb)[keep]
pick = lambda x, y: np.where(a_wins[:, None], np.asarray(x)[keep],
                             np.asarray(y)[keep])
prefs = PreferenceBatch(
  prompt_ids=np.asarray(prompts.prompt_ids)[keep],
  prompt_mask=np.asarray(prompts.prompt_mask)[keep],
  chosen_ids=pick(ya.response_ids, yb.response_ids),
  chosen_mask=pick(ya.response_mask, yb.response_mask),
  rejected_ids=pick(yb.response_ids, ya.response_ids),
  rejected_mask=pick(yb.response_mask, ya.response_mask),
)
n_pairs = int(keep.sum())
print(f"{n_pairs} labelled pairs, {n_prompts - n_pairs} ties dropped")
print("initial policy gold score:", float(np.mean(np.r_[ga, gb])))
assert n_pairs > n_prompts // 2""",
  ),
  (
    "markdown",
    """\
## 2. Reward model

The reward model is the policy's backbone plus a scalar head
(`models.from_policy_params`), read at the last real token. It is trained
with the Bradley-Terry loss $-\\log\\sigma(r^+ - r^-)$ by the jitted
`make_reward_model_step`. The first 384 pairs train it; the rest measure
held-out accuracy (strict: ties count as wrong).""",
  ),
  (
    "code",
    """\
n_train, batch = 384, 64
train = jax.tree.map(lambda x: x[:n_train], prefs)
held = jax.tree.map(lambda x: x[n_train:], prefs)
rm_opt = optax.adam(3e-3)
rm_state = TrainState.create(
  models.from_policy_params(policy0, cfg, rm_key), rm_opt, rm_key)
traces = {"rm": 0}


def rm_step_fn(state, b):
  traces["rm"] += 1  # runs only while tracing
  return make_reward_model_step(cfg, rm_opt)(state, b)


rm_step = jax.jit(rm_step_fn, donate_argnums=0)
losses = []
t0 = time.perf_counter()
for epoch in range(8):
  order = np.random.default_rng(epoch).permutation(n_train)
  for i in range(n_train // batch):
    idx = order[i * batch:(i + 1) * batch]
    rm_state, m = rm_step(rm_state, jax.tree.map(lambda x: x[idx], train))
    losses.append(float(m["rm/loss"]))
rc, rr = pair_rewards(rm_state.params, held, model_config=cfg)
rm_acc = float(jnp.mean(rc > rr))
print(f"{len(losses)} steps in {time.perf_counter() - t0:.1f}s, "
      f"loss {losses[0]:.3f} -> {np.mean(losses[-6:]):.3f}, "
      f"held-out accuracy {rm_acc:.3f} on {len(rc)} pairs")
assert traces["rm"] == 1  # one compile for all steps (static shapes)
assert np.mean(losses[-6:]) < losses[0] - 0.1  # the loss went down
assert rm_acc > 0.7  # it learned the annotator's preference""",
  ),
  (
    "markdown",
    """\
## 3. PPO against the reward model

`make_ppo_step` builds one compiled RLHF iteration: sample, score with the
frozen reward model, KL-shaped rewards
$r_t = -\\beta(\\log\\pi - \\log\\pi_{ref})$ plus the score on the last token,
GAE, then PPO epochs. The critic starts from the reward model
(`value_params`), the reference is the initial policy, and the KL
coefficient adapts toward `target_kl`. At the first epoch of every
iteration the policy that sampled is the one being trained, so the PPO
ratio is exactly 1 (docs/conventions.md, convention 4); in iteration 1 the
policy is also the reference, so the KL is exactly 0.""",
  ),
  (
    "code",
    """\
ppo_cfg = PPOConfig(
  eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=T, group_size=2,
  kl_coef=0.05, target_kl=2.0, kl_horizon=320, ppo_epochs=2,
  num_minibatches=2, vf_coef=0.1,
)
pol_opt, val_opt = optax.adam(3e-3), optax.adam(3e-3)
frozen = {"ref": policy0, "reward": rm_state.params}
state = init_ppo_state(
  jax.tree.map(jnp.copy, policy0), jax.tree.map(jnp.copy, rm_state.params),
  pol_opt, val_opt, ppo_key, ppo_cfg)
traces["ppo"] = 0


def ppo_step_fn(state, prompts, frozen):
  traces["ppo"] += 1
  return make_ppo_step(cfg, pol_opt, val_opt, ppo_cfg)(state, prompts, frozen)


ppo_step = jax.jit(ppo_step_fn, donate_argnums=0)
history = []
t0 = time.perf_counter()
for it in range(12):
  batch_prompts = make_prompts(jax.random.fold_in(prompt_key, it), 32)
  state, m = ppo_step(state, batch_prompts, frozen)
  history.append({k: float(v) for k, v in m.items()})
  if it % 4 == 0 or it == 11:
    print(f"iter {it:2d} score {history[-1]['objective/scores']:+.3f} "
          f"kl {history[-1]['objective/kl']:.4f} "
          f"kl_coef {history[-1]['objective/kl_coef']:.4f} "
          f"clipfrac {history[-1]['ppo/clipfrac']:.3f}")
print(f"12 iterations in {time.perf_counter() - t0:.1f}s")
assert traces["ppo"] == 1
assert all(np.isfinite(v) for h in history for v in h.values())
assert history[0]["objective/kl"] == 0.0  # policy == reference
assert all(h["ppo/first_ratio_dev_max"] < 1e-5 for h in history)  # ratio 1
assert abs(history[0]["objective/kl_coef"] - 0.05) < 1e-7  # initial coef
first = np.mean([h["objective/scores"] for h in history[:3]])
last = np.mean([h["objective/scores"] for h in history[-3:]])
assert last > first, (first, last)  # the proxy reward went up""",
  ),
  (
    "markdown",
    """\
## 4. Compare: initial vs PPO policy on fresh prompts

The gold score (what the annotator really wanted) of the initial and the
PPO policy on held-out prompts, the reward model's score (the proxy it was
optimised against), and the KL to the reference,
$\\mathrm{KL} \\approx \\frac{1}{B}\\sum_b \\sum_t
(\\log\\pi(y_t) - \\log\\pi_{ref}(y_t))$ over the PPO policy's samples.""",
  ),
  (
    "code",
    """\
from rlhf_jax.logprobs import response_logprobs
from rlhf_jax.train import concat_prompt_response

eval_prompts = make_prompts(jax.random.key(123), 256)
eval_key = jax.random.key(7)


def evaluate(params):
  ro = sample(params, eval_prompts, eval_key)
  ids, attn = concat_prompt_response(
    eval_prompts.prompt_ids, eval_prompts.prompt_mask,
    ro.response_ids, ro.response_mask)
  proxy = models.reward_forward(rm_state.params, ids, attn, config=cfg)
  lp = [response_logprobs(models.forward(p, ids, attn, config=cfg), ids,
                          prompt_length=P, response_mask=ro.response_mask)
        for p in (params, policy0)]
  kl = jnp.sum(lp[0] - lp[1], axis=-1)
  return {"gold": float(jnp.mean(gold_score(ro))),
          "proxy": float(jnp.mean(proxy)), "kl": float(jnp.mean(kl))}


before, after = evaluate(policy0), evaluate(state.policy_params)
for name, r in (("initial", before), ("ppo", after)):
  print(f"{name:8s} gold {r['gold']:.3f}  proxy {r['proxy']:+.3f}  "
        f"kl {r['kl']:.3f}")
assert before["kl"] == 0.0
assert after["kl"] > 0.0
assert after["proxy"] > before["proxy"]
assert after["gold"] > before["gold"]  # the reward model was a good proxy""",
  ),
  (
    "markdown",
    """\
The PPO policy writes more positive tokens than the initial one (gold score
up) and pays for it with a KL distance from the reference; the adaptive
controller raises `kl_coef` while the KL is above `target_kl`. With a larger
model and real preferences the same loop is `rlhf-jax run`;
`scripts/ppo_tinystories.py` is the same PPO step in a single research
script.""",
  ),
]


def build() -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata = {
    "kernelspec": {
      "display_name": "Python 3",
      "language": "python",
      "name": "python3",
    },
    "language_info": {"name": "python"},
  }
  for kind, src in CELLS:
    if kind == "markdown":
      nb.cells.append(nbformat.v4.new_markdown_cell(src))
    else:
      nb.cells.append(nbformat.v4.new_code_cell(src))
  return nb


if __name__ == "__main__":
  if "--script" in sys.argv:
    print("\n\n".join(src for kind, src in CELLS if kind == "code"))
  else:
    out = pathlib.Path(__file__).with_name("02_pipeline_walkthrough.ipynb")
    nb = build()
    for i, cell in enumerate(nb.cells):
      cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating is a no-op
    nbformat.write(nb, out)
    print(f"wrote {out}")
