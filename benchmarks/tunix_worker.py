"""Tunix side of bench_peers.py: a long-lived worker in its own process.

Runs in the side Python 3.12 environment that has google-tunix (created by
`bash scripts/setup_peers.sh`; the rlhf_jax env does not install Tunix):

  .side/venv312/bin/python benchmarks/tunix_worker.py

Each workload is built the way a Tunix user builds it, from Tunix's own
classes, on the same shapes and (where both load a checkpoint) the same
weights as the rlhf_jax side:

* sampler: ``tunix.generate.sampler.Sampler`` over a ``Llama3`` loaded from
  the model's safetensors (``llama3.params.create_model_from_safe_tensors``);
  prompts arrive as token ids and pass through a trivial tokenizer (ids
  written as text), so both sides decode the same left-padded prompts.
* DPO step: ``DPOTrainer`` with a reference model; one step is what its
  ``train()`` loop does per batch: ``_prepare_inputs`` (masks, positions and
  the reference forward, ``compute_logps``) and the jitted train step
  (``PeftTrainer._train_step``: value_and_grad of ``dpo_loss_fn`` plus the
  optimizer update), without logging or checkpointing.
* reward-model step: Tunix 0.1.7 has no reward-model trainer, so a
  ``PeftTrainer`` with a Bradley-Terry loss on the ``compute_score`` of a
  Llama3 whose LM head is a D -> 1 ``nnx.Linear`` (the head
  ``rl.utils.create_critic_model`` puts on a critic), chosen and rejected in
  one forward, score at each sequence's last real token.
* PPO / GRPO iteration: ``PPOLearner`` / ``GRPOLearner`` over an
  ``RLCluster`` (vanilla rollout, actor, reference, critic and reward model
  for PPO; actor, reference and a Python reward function for GRPO), driven by
  their own ``train()`` loop. One iteration is one call of the learner's
  ``_run_global_step`` (rollout, reference / old logprobs, values and scores,
  advantages, actor and critic updates); the loop runs in a thread that
  waits for the parent's ``step`` command before each iteration, so the
  parent can alternate with rlhf_jax inside one training run.

Protocol: one JSON object per line on stdin, one JSON reply per line on
stdout (logs go to stderr); every reply has "ok": true, or "ok": false and
"error". Times are wall seconds around a call, after block_until_ready.
"""

import json
import os
import queue
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import worker_protocol  # benchmarks/, beside this script
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models import safetensors_loader
from tunix.models.llama3 import model as llama_lib
from tunix.models.llama3 import params as llama_params
from tunix.rl import common as rl_common
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import peft_trainer
from tunix.sft.dpo import dpo_trainer

_STATE: dict = {}


class IdTokenizer:
  """Token ids written as text ("12 7 300"): no tokenizer cost on either
  side, and Tunix's sampler and rollout see exactly the parent's ids."""

  def __init__(self, pad: int, eos: int):
    self._pad, self._eos = pad, eos

  def encode(self, text, **_) -> list[int]:
    if not isinstance(text, str):  # the RL data pipeline hands np arrays
      text = str(np.asarray(text).reshape(-1)[0])
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self) -> int:
    return 0  # falsy: the sampler adds no BOS (the prompts carry theirs)

  def eos_id(self) -> int:
    return self._eos

  def pad_id(self) -> int:
    return self._pad


# Tunix 0.1.7's Llama3 attention calls apply_rope without the config's
# rope_theta, so every model gets apply_rope's default base of 1e6 instead
# of the checkpoint's (10000 here) and computes another function than
# transformers and rlhf_jax do. The base is a constant: passing the right one
# changes the tokens, not the work.
_ROPE_THETA = [10000.0]
_tunix_apply_rope = llama_lib.apply_rope


def _apply_rope(inputs, positions, head_dim, rope_theta=None):
  # 0.1.7 never passes it; a later Tunix that does is obeyed.
  theta = _ROPE_THETA[0] if rope_theta is None else rope_theta
  return _tunix_apply_rope(
    inputs, positions, head_dim=head_dim, rope_theta=theta
  )


llama_lib.apply_rope = _apply_rope


def _llama_config(cfg: dict, tied: bool | None = None) -> llama_lib.ModelConfig:
  """Tunix Llama3 config from a Hugging Face config.json dict."""
  _ROPE_THETA[0] = float(cfg.get("rope_theta", 10000))
  return llama_lib.ModelConfig(
    num_layers=cfg["num_hidden_layers"],
    vocab_size=cfg["vocab_size"],
    embed_dim=cfg["hidden_size"],
    hidden_dim=cfg["intermediate_size"],
    num_heads=cfg["num_attention_heads"],
    head_dim=cfg.get("head_dim")
    or cfg["hidden_size"] // cfg["num_attention_heads"],
    num_kv_heads=cfg["num_key_value_heads"],
    rope_theta=int(cfg.get("rope_theta", 10000)),
    norm_eps=cfg.get("rms_norm_eps", 1e-6),
    weight_tying=cfg.get("tie_word_embeddings", False)
    if tied is None
    else tied,
  )


def _mesh() -> jax.sharding.Mesh:
  """One-device mesh with the axis names of Tunix's sharding rules."""
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto))


def _load_policy(model_dir: str) -> tuple[nnx.Module, dict]:
  with open(os.path.join(model_dir, "config.json")) as f:
    cfg = json.load(f)
  config = _llama_config(cfg)

  def key_mapping(c):
    mapping = dict(llama_params._get_key_and_transform_mapping(c))
    if c.weight_tying:  # tied HF checkpoints may store only lm_head.weight
      mapping[r"lm_head\.weight"] = ("embedder.input_embedding", None)
    return mapping

  model = safetensors_loader.load_and_create_model(
    file_dir=model_dir,
    model_class=llama_lib.Llama3,
    config=config,
    key_mapping=key_mapping,
    mesh=_mesh(),
    dtype=jnp.float32,
  )
  return model, cfg


class ScoreLlama3(llama_lib.Llama3):
  """Llama3 whose call accepts the ``segment_ids`` that Tunix's
  ``compute_score`` passes to critics and reward models (0.1.7's Llama3
  does not take them; the attention mask already covers the padding)."""

  def __call__(self, input_tokens, positions, cache, attention_mask, **_):
    return super().__call__(input_tokens, positions, cache, attention_mask)


def _scalar_model(cfg: dict, seed: int) -> nnx.Module:
  """Llama3 backbone with a D -> 1 head (critic / reward model)."""
  model = ScoreLlama3(_llama_config(cfg, tied=False), rngs=nnx.Rngs(seed))
  model.lm_head = nnx.Linear(
    cfg["hidden_size"], 1, use_bias=False, rngs=nnx.Rngs(seed + 1)
  )
  return model


def _init(msg):
  return {
    "jax": jax.__version__,
    "tunix": _tunix_version(),
    "devices": str(jax.devices()),
  }


def _tunix_version() -> str:
  from importlib import metadata  # noqa: PLC0415

  return metadata.version("google-tunix")


# ----------------------------------------------------------------- sampler


def _sampler_load(msg):
  model, cfg = _load_policy(msg["model_dir"])
  tok = IdTokenizer(pad=int(msg["pad_id"]), eos=int(msg["eos_id"]))
  cache = sampler_lib.CacheConfig(
    cache_size=int(msg["cache_size"]),
    num_layers=cfg["num_hidden_layers"],
    num_kv_heads=cfg["num_key_value_heads"],
    head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
  )
  _STATE["sampler"] = sampler_lib.Sampler(model, tok, cache)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return {"num_params": int(n)}


def _sample(msg):
  smp = _STATE["sampler"]
  prompts = [" ".join(map(str, p)) for p in msg["prompts"]]
  kwargs = dict(
    max_generation_steps=int(msg["max_new_tokens"]),
    max_prompt_length=int(msg["prompt_len"]),
    eos_tokens=[int(msg["eos_id"])],
    echo=False,
  )
  if msg.get("temperature", 0.0) > 0:
    kwargs.update(temperature=float(msg["temperature"]), top_p=1.0, seed=0)
  start = time.perf_counter()
  out = smp(prompts, **kwargs)
  seconds = time.perf_counter() - start
  reply = {"seconds": seconds}
  if msg.get("return_ids"):
    reply["ids"] = [np.asarray(t).tolist() for t in out.tokens]
  return reply


# --------------------------------------------------------------------- DPO


def _dpo_setup(msg):
  policy, _ = _load_policy(msg["model_dir"])
  ref, _ = _load_policy(msg["model_dir"])
  trainer = dpo_trainer.DPOTrainer(
    model=policy,
    ref_model=ref,
    optimizer=optax.adam(float(msg["lr"])),
    training_config=dpo_trainer.DPOTrainingConfig(
      eval_every_n_steps=10**9, max_steps=10**9, beta=0.1
    ),
  )
  batch = {k: jnp.asarray(v) for k, v in msg["batch"].items()}
  example = dpo_trainer.TrainingInput(**batch)
  train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)

  def step():
    prepared = trainer._prepare_inputs(example)
    loss, aux, _ = train_step(prepared)
    jax.block_until_ready((loss, aux))
    return float(loss)

  _STATE["dpo"] = step
  start = time.perf_counter()
  loss = step()
  return {"first_step_s": time.perf_counter() - start, "loss": loss}


# ------------------------------------------------------------ reward model


def _bt_loss(model, input_ids, positions, attention_mask, last):
  """Bradley-Terry loss on [chosen; rejected] rows, score at `last`."""
  n_pairs = input_ids.shape[0] // 2
  scores, _ = model(input_ids, positions, None, attention_mask)
  scores = jnp.take_along_axis(scores[..., 0], last[:, None], axis=1)[:, 0]
  rc, rr = scores[:n_pairs], scores[n_pairs:]
  loss = -jnp.mean(jax.nn.log_sigmoid(rc - rr))
  return loss, {"accuracy": jnp.mean(rc > rr)}


def _rm_setup(msg):
  with open(os.path.join(msg["model_dir"], "config.json")) as f:
    cfg = json.load(f)
  model = _scalar_model(cfg, seed=3)
  trainer = peft_trainer.PeftTrainer(
    model,
    optax.adam(float(msg["lr"])),
    peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9),
  )
  trainer.with_loss_fn(_bt_loss, has_aux=True)
  b = {k: np.asarray(v) for k, v in msg["batch"].items()}
  prompt = np.concatenate([b["prompt_ids"]] * 2)
  pmask = np.concatenate([b["prompt_mask"]] * 2)
  resp = np.concatenate([b["chosen_ids"], b["rejected_ids"]])
  rmask = np.concatenate([b["chosen_mask"], b["rejected_mask"]])
  ids = jnp.asarray(np.concatenate([prompt, resp], 1))
  mask = jnp.asarray(np.concatenate([pmask, rmask], 1))
  length = ids.shape[1]
  last = jnp.asarray(length - 1 - np.argmax(np.asarray(mask)[:, ::-1], 1))
  inputs = {
    "input_ids": ids,
    "positions": rl_common.build_positions_from_mask(mask),
    "attention_mask": rl_common.make_causal_attn_mask(mask),
    "last": last,
  }
  train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
  trainer.gen_model_input_fn = lambda x: x

  def step():
    loss, aux, _ = train_step(inputs)
    jax.block_until_ready((loss, aux))
    return float(loss)

  _STATE["rm"] = step
  start = time.perf_counter()
  loss = step()
  return {"first_step_s": time.perf_counter() - start, "loss": loss}


# ----------------------------------------------------------- PPO and GRPO


class _SteppedLearner:
  """Runs a learner's own train() loop in a thread, one global step per
  parent `step` command (the parent alternates with rlhf_jax between)."""

  def __init__(self, learner, dataset):
    self.go: queue.Queue = queue.Queue()
    self.done: queue.Queue = queue.Queue()
    original = learner._run_global_step

    def stepped(*args, **kwargs):
      if self.go.get() == "stop":
        raise StopIteration
      start = time.perf_counter()
      original(*args, **kwargs)
      jax.block_until_ready(nnx.state(learner.rl_cluster.actor_trainer.model))
      self.done.put(time.perf_counter() - start)

    learner._run_global_step = stepped
    self.thread = threading.Thread(
      target=self._run, args=(learner, dataset), daemon=True
    )
    self.error = None
    self.thread.start()

  def _run(self, learner, dataset):
    try:
      learner.train(dataset)
    except Exception as e:  # reported on the next step
      traceback.print_exc(file=sys.stderr)
      self.error = e
      self.done.put(None)

  def step(self) -> float:
    if not self.thread.is_alive():
      raise RuntimeError(f"learner stopped: {self.error!r}")
    self.go.put("step")
    seconds = None
    while self.thread.is_alive() or not self.done.empty():
      try:
        seconds = self.done.get(timeout=1.0)
        break
      except queue.Empty:
        continue
    if seconds is None:
      raise RuntimeError(f"learner stopped: {self.error!r}")
    return seconds

  def stop(self):
    self.go.put("stop")
    self.thread.join(timeout=60)


def _cluster(msg, cfg, *, critic: bool, reward: bool, n_rows: int):
  mesh = _mesh()
  roles = [
    rl_cluster_lib.Role.ACTOR,
    rl_cluster_lib.Role.REFERENCE,
    rl_cluster_lib.Role.ROLLOUT,
  ]
  if critic:
    roles.append(rl_cluster_lib.Role.CRITIC)
  if reward:
    roles.append(rl_cluster_lib.Role.REWARD)
  prompt_len, new = int(msg["prompt_len"]), int(msg["max_new_tokens"])
  opt = optax.adam(float(msg["lr"]))
  config = rl_cluster_lib.ClusterConfig(
    role_to_mesh={r: mesh for r in roles},
    rollout_engine="vanilla",
    offload_to_cpu=False,
    training_config=rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=opt,
      critic_optimizer=opt if critic else None,
      eval_every_n_steps=10**9,
      max_steps=10**9,
      mini_batch_size=n_rows,
    ),
    rollout_config=base_rollout.RolloutConfig(
      max_tokens_to_generate=new,
      max_prompt_length=prompt_len,
      kv_cache_size=prompt_len + new + 8,
      temperature=1.0,
      top_p=1.0,
      eos_tokens=[int(msg["eos_id"])],
    ),
  )
  actor, _ = _load_policy(msg["model_dir"])
  ref, _ = _load_policy(msg["model_dir"])
  models = {"actor": actor, "reference": ref}
  if critic:
    models["critic"] = _scalar_model(cfg, seed=5)
  if reward:
    models["reward"] = _scalar_model(cfg, seed=7)
  tok = IdTokenizer(pad=int(msg["pad_id"]), eos=int(msg["eos_id"]))
  return rl_cluster_lib.RLCluster(
    **models, tokenizer=tok, cluster_config=config
  )


def _prompt_dataset(prompts: list[list[int]], batch: int):
  """An endless iterator of the same batch of prompt strings."""
  texts = [" ".join(map(str, p)) for p in prompts]

  def gen():
    while True:
      yield {"prompts": texts[:batch]}

  return gen()


def _learner_setup(msg, kind: str):
  with open(os.path.join(msg["model_dir"], "config.json")) as f:
    cfg = json.load(f)
  prompts = msg["prompts"]
  if kind == "ppo":
    cluster = _cluster(msg, cfg, critic=True, reward=True, n_rows=len(prompts))
    learner = ppo_learner.PPOLearner(
      rl_cluster=cluster,
      ppo_config=ppo_learner.PPOConfig(num_iterations=1, beta=0.05),
    )
  else:
    group = int(msg["group_size"])

    def length_reward(prompts, completions, **_):
      return [float(len(c.split())) for c in completions]

    cluster = _cluster(
      msg, cfg, critic=False, reward=False, n_rows=len(prompts)
    )
    learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster,
      algo_config=grpo_learner.GRPOConfig(
        num_generations=group, num_iterations=1, beta=0.04
      ),
      reward_fns=[length_reward],
    )
  runner = _SteppedLearner(learner, _prompt_dataset(prompts, len(prompts)))
  _STATE[kind] = runner.step
  _STATE[kind + "_runner"] = runner
  start = time.perf_counter()
  runner.step()
  return {"first_step_s": time.perf_counter() - start}


_COMMANDS = {
  "init": _init,
  "sampler_load": _sampler_load,
  "sample": _sample,
  "dpo_setup": _dpo_setup,
  "rm_setup": _rm_setup,
  "ppo_setup": lambda m: _learner_setup(m, "ppo"),
  "grpo_setup": lambda m: _learner_setup(m, "grpo"),
  "step": worker_protocol.step_command(_STATE),
}


def _stop_runners() -> None:
  for key in ("ppo_runner", "grpo_runner"):
    if key in _STATE:
      _STATE[key].stop()


def main():
  worker_protocol.serve(_COMMANDS, on_quit=_stop_runners)


if __name__ == "__main__":
  main()
