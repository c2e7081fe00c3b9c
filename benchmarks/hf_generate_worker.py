"""transformers side of bench_generate.py: a long-lived torch CPU worker.

Runs in the side Python 3.11 environment that has torch (CPU) and
transformers (the rlhf_jax env has no torch):

  .side/venv311/bin/python benchmarks/hf_generate_worker.py

(created by `bash scripts/setup_side_env.sh`)

Protocol: one JSON object per line on stdin, one JSON reply per line on
stdout (logs go to stderr). Commands:

  {"cmd": "init", "threads": N}          torch.set_num_threads(N)
  {"cmd": "make_random", "out_dir": D, "config": {...LlamaConfig kwargs},
   "seed": S}                            random LlamaForCausalLM -> D
                                          (safetensors, save_pretrained)
  {"cmd": "load", "model_dir": D}        LlamaForCausalLM fp32, eval mode
  {"cmd": "generate", "prompt_ids": [[..]], "attention_mask": [[..]],
   "max_new_tokens": T, "return_ids": bool}
                                          greedy generate with the KV cache,
                                          EOS disabled so exactly T new
                                          tokens; replies {"seconds": wall
                                          time of model.generate, "ids": ..}
  {"cmd": "quit"}

Every reply has "ok": true, or "ok": false and "error".
"""

import time

import torch
import transformers
import worker_protocol  # benchmarks/, beside this script

_MODEL = None


def _init(msg):
  torch.set_num_threads(int(msg["threads"]))
  return {
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
  }


def _make_random(msg):
  torch.manual_seed(int(msg.get("seed", 0)))
  config = transformers.LlamaConfig(**msg["config"])
  model = transformers.LlamaForCausalLM(config).to(torch.float32)
  model.save_pretrained(msg["out_dir"], safe_serialization=True)
  n = sum(p.numel() for p in model.parameters())
  return {"num_params": int(n)}


def _load(msg):
  global _MODEL
  model = transformers.LlamaForCausalLM.from_pretrained(
    msg["model_dir"], dtype=torch.float32
  ).eval()
  # Exactly max_new_tokens new tokens: no EOS stop (and no min_new_tokens
  # logits processor, which would add work the JAX side does not do).
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  _MODEL = model
  return {"num_params": int(sum(p.numel() for p in model.parameters()))}


@torch.inference_mode()
def _generate(msg):
  ids = torch.tensor(msg["prompt_ids"], dtype=torch.long)
  mask = torch.tensor(msg["attention_mask"], dtype=torch.long)
  new = int(msg["max_new_tokens"])
  start = time.perf_counter()
  out = _MODEL.generate(
    input_ids=ids,
    attention_mask=mask,
    max_new_tokens=new,
    min_new_tokens=0,
    do_sample=False,
    use_cache=True,
    eos_token_id=None,
    pad_token_id=0,
  )
  seconds = time.perf_counter() - start
  gen = out[:, ids.shape[1] :]
  if gen.shape[1] != new:
    raise RuntimeError(f"transformers generated {gen.shape[1]} != {new}")
  reply = {"seconds": seconds}
  if msg.get("return_ids"):
    reply["ids"] = gen.tolist()
  return reply


_COMMANDS = {
  "init": _init,
  "make_random": _make_random,
  "load": _load,
  "generate": _generate,
}


def main():
  worker_protocol.serve(_COMMANDS)


if __name__ == "__main__":
  main()
