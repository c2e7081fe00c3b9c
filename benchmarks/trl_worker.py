"""TRL side of bench_peers.py: a long-lived torch CPU worker.

Runs in the side Python 3.11 environment that has torch (CPU),
transformers and trl (created by `bash scripts/setup_peers.sh`; the rlhf_jax
env has no torch):

  .side/venv311/bin/python benchmarks/trl_worker.py

Each workload is built the way a TRL user builds it, from TRL's own
trainers, on the same checkpoint (float32, loaded from its directory, no
downloads) and the same token ids as the rlhf_jax side:

* DPO step: ``trl.DPOTrainer`` with a separate reference model (both
  ``AutoModelForCausalLM.from_pretrained``), sigmoid loss, beta 0.1. The
  parent's rows become the examples TRL's tokenized dataset holds (the real
  prompt ids, the real chosen / rejected ids) and pass through the
  trainer's own ``DataCollatorForPreference``: prompt + response packed,
  then right-padded to the width of the parent's batch (``pad_to_multiple_of``
  = prompt width + response width), so the model sees [2 B, 96] like ours.
* reward-model step: ``trl.RewardTrainer`` on
  ``AutoModelForSequenceClassification.from_pretrained(num_labels=1)``
  (score at the last non-pad token), chosen and rejected = prompt +
  response, through its ``DataCollatorForPreference``, same width.

One step is what ``Trainer``'s training loop does per batch, after its
``_prepare_for_training`` (optimizer, ``accelerator.prepare``, scheduler):
``trainer.training_step`` (forward(s), loss with TRL's metrics, backward),
the gradient norm the loop computes for logging (``_get_grad_norm``; no
clipping: ``max_grad_norm=0``, ours has none), ``optimizer.step()``,
``lr_scheduler.step()`` (constant) and ``model.zero_grad()``; no callbacks,
logging or checkpointing. The optimizer is TrainingArguments' default
(``adamw_torch_fused``) with weight decay 0, i.e. Adam like our
``optax.adam(lr)``. Two TRL defaults are turned off so the work matches
ours: ``bf16`` (TRL autocasts to bfloat16 unless told) and
``gradient_checkpointing`` (TRL recomputes activations unless told).

Protocol: one JSON object per line on stdin, one JSON reply per line on
stdout (logs go to stderr); every reply has "ok": true, or "ok": false and
"error". Commands: init (versions; "trl": null when trl does not import),
dpo_setup / rm_setup (model_dir, lr, batch: the parent's preference batch
as int lists; reply first_step_s), step (name: "dpo" | "rm"; reply
seconds), quit.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything from model_dir
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import worker_protocol  # noqa: E402 - benchmarks/, beside this script

try:
  import datasets
  import trl
except Exception as e:  # noqa: BLE001 - no TRL column, not a dead worker
  trl = datasets = None
  _TRL_ERROR = f"{type(e).__name__}: {e}"
else:
  _TRL_ERROR = None

_STATE: dict = {}


def _init(msg):
  torch.set_num_threads(int(msg.get("threads") or os.cpu_count() or 1))
  return {
    "trl": trl.__version__ if trl else None,
    "trl_error": _TRL_ERROR,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "threads": torch.get_num_threads(),
  }


def _examples(batch: dict) -> tuple[list[dict], int]:
  """The parent's padded rows as TRL's tokenized examples (real ids
  only), and the padded width prompt + response."""

  def real(name):
    rows = zip(batch[f"{name}_ids"], batch[f"{name}_mask"], strict=True)
    return [[t for t, m in zip(r, k, strict=True) if m] for r, k in rows]

  prompts, chosen, rejected = real("prompt"), real("chosen"), real("rejected")
  examples = [
    {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
    for p, c, r in zip(prompts, chosen, rejected, strict=True)
  ]
  width = len(batch["prompt_ids"][0]) + len(batch["chosen_ids"][0])
  return examples, width


def _config(cls, msg, width: int, out_dir: str, **extra):
  return cls(
    output_dir=out_dir,
    learning_rate=float(msg["lr"]),
    per_device_train_batch_size=8,
    weight_decay=0.0,
    lr_scheduler_type="constant",
    max_grad_norm=0.0,  # no clipping, like optax.adam(lr)
    bf16=False,  # TRL's default autocasts to bfloat16; ours is float32
    activation_checkpointing=False,  # TRL's default recomputes them
    pad_to_multiple_of=width,
    logging_strategy="no",
    save_strategy="no",
    eval_strategy="no",
    report_to=[],
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    **extra,
  )


def _setup(name: str, trainer, inputs: dict) -> dict:
  """Prepares the trainer as its train() does; times the first step."""
  model, _ = trainer._prepare_for_training(10**6, None, None)
  trainer.current_gradient_accumulation_steps = 1  # set by _run_epoch
  model.zero_grad()

  def step():
    loss = trainer.training_step(model, inputs)
    trainer._get_grad_norm(model)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return float(loss)

  _STATE[name] = step
  start = time.perf_counter()
  loss = step()
  opt = trainer.optimizer.optimizer  # AcceleratedOptimizer -> torch's
  decay = sorted({g["weight_decay"] for g in opt.param_groups})
  print(
    f"trl {name}: input_ids {tuple(inputs['input_ids'].shape)},"
    f" {type(opt).__name__} fused={opt.defaults['fused']}"
    f" weight_decay={decay} bf16={trainer.args.bf16}"
    f" gradient_checkpointing={model.is_gradient_checkpointing}",
    file=sys.stderr,
    flush=True,
  )
  return {"first_step_s": time.perf_counter() - start, "loss": loss}


def _dpo_setup(msg):
  model_dir = msg["model_dir"]
  examples, width = _examples(msg["batch"])

  def load():
    return transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=torch.float32
    )

  policy, ref = load(), load()
  # DPOTrainer tokenizes text datasets only; this one row is never trained
  # on: the step gets the parent's ids through the trainer's collator.
  dummy = datasets.Dataset.from_dict(
    {"prompt": ["Hi."], "chosen": ["."], "rejected": ["!"]}
  )
  trainer = trl.DPOTrainer(
    model=policy,
    ref_model=ref,
    args=_config(
      trl.DPOConfig,
      msg,
      width,
      _STATE["tmp"],
      beta=0.1,
      loss_type=["sigmoid"],
    ),
    train_dataset=dummy,
    processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
  )
  return _setup("dpo", trainer, trainer.data_collator(examples))


def _copy_tied_embedding(model, model_dir: str) -> None:
  """The embedding from the causal LM: a tied checkpoint that stores the
  matrix only as lm_head.weight leaves a classifier's embed_tokens random."""
  lm = transformers.AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32
  )
  with torch.no_grad():
    model.get_input_embeddings().weight.copy_(lm.get_input_embeddings().weight)
  print("trl rm: embed_tokens copied from the causal LM", file=sys.stderr)


def _rm_setup(msg):
  model_dir = msg["model_dir"]
  examples, width = _examples(msg["batch"])
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
    model_dir, num_labels=1, dtype=torch.float32
  )
  model.config.pad_token_id = tok.pad_token_id
  _copy_tied_embedding(model, model_dir)
  pairs = [
    {
      "chosen_ids": e["prompt_ids"] + e["chosen_ids"],
      "rejected_ids": e["prompt_ids"] + e["rejected_ids"],
    }
    for e in examples
  ]
  trainer = trl.RewardTrainer(
    model=model,
    args=_config(trl.RewardConfig, msg, width, _STATE["tmp"]),
    train_dataset=datasets.Dataset.from_list(pairs),
    processing_class=tok,
  )
  return _setup("rm", trainer, trainer.data_collator(pairs))


_COMMANDS = {
  "init": _init,
  "dpo_setup": _dpo_setup,
  "rm_setup": _rm_setup,
  "step": worker_protocol.step_command(_STATE),
}


def main():
  with tempfile.TemporaryDirectory() as tmp:  # TRL's output_dir, unused
    _STATE["tmp"] = tmp
    worker_protocol.serve(_COMMANDS)


if __name__ == "__main__":
  main()
