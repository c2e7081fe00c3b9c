"""Flax decoder LMs with KV cache, scalar heads and HF checkpoint I/O.

Shapes: B batch, L sequence, P prompt, S cache slots, V vocab, D width,
N layers. Masks are bool, True = real token.

  config, params = load_hf_checkpoint(dir)       # HF dir -> (config, params)
  config = load_hf_config(dir)                   # config.json only
  _, params = load_hf_checkpoint(dir, shardings=shardings)  # straight to shards
  logits = forward(params, ids, mask, config=config)          # f32[B, L, V]
  cache = init_cache(config, B, S)
  logits, cache = prefill(params, prompt_ids, prompt_mask,
                          config=config, cache=cache)         # f32[B, V]
  logits, cache = decode_step(params, tokens, cache, config=config)
  logits = shared_prompt_logits(params, prompt_ids, prompt_mask,
                                resp_ids, resp_mask, config=config)
                                          # f32[B, K, T, V], prompt run once
  vparams = from_policy_params(params, config, rng)   # {"backbone", "head"}
  values = values_forward(vparams, ids, mask, config=config)  # f32[B, L]
  scores = reward_forward(vparams, ids, mask, config=config)  # f32[B]
  scores = shared_prompt_rewards(vparams, prompt_ids, prompt_mask,
                                 resp_ids, resp_mask, config=config)
                                          # f32[B, K], prompt run once
  export_hf_checkpoint(params, config, out_dir)  # transformers-loadable
  tok = load_tokenizer(dir)

`load_hf_checkpoint` / `export_hf_checkpoint` are this library's
from_pretrained / save_pretrained.
"""

from rlhf_jax.models.config import ModelConfig, ModelLoadError, RopeScaling
from rlhf_jax.models.heads import (
  ScalarHead,
  from_policy_params,
  head_logical_axes,
  init_head_params,
  last_valid_index,
  reward_forward,
  scalar_model_logical_axes,
  shared_prompt_rewards,
  values_forward,
)
from rlhf_jax.models.hf_io import (
  check_hf_checkpoint,
  export_hf_checkpoint,
  hf_state_dict,
  load_hf_checkpoint,
  load_hf_config,
  looks_like_hub_id,
  resolve_model_dir,
  write_safetensors,
)
from rlhf_jax.models.kv_cache import (
  KVCache,
  decode_step,
  grow_cache,
  init_cache,
  prefill,
)
from rlhf_jax.models.shared_prompt import (
  resolve_share_prompt,
  shared_prompt_logits,
  sharing_saves_work,
)
from rlhf_jax.models.tokenizer import (
  MissingSpecialTokenError,
  Tokenizer,
  check_vocab_fits,
  embedding_rows_needed,
  load_tokenizer,
)
from rlhf_jax.models.transformer import (
  Transformer,
  check_layer_count,
  check_params,
  check_position_table,
  default_positions,
  embedded_ids,
  forward,
  hidden_forward,
  holds_transposed_weights,
  init_params,
  param_logical_axes,
  unstack_layers,
)

__all__ = [
  "KVCache",
  "MissingSpecialTokenError",
  "ModelConfig",
  "ModelLoadError",
  "RopeScaling",
  "ScalarHead",
  "Tokenizer",
  "Transformer",
  "check_hf_checkpoint",
  "check_layer_count",
  "check_params",
  "check_position_table",
  "check_vocab_fits",
  "decode_step",
  "default_positions",
  "embedded_ids",
  "embedding_rows_needed",
  "export_hf_checkpoint",
  "forward",
  "from_policy_params",
  "head_logical_axes",
  "hf_state_dict",
  "hidden_forward",
  "holds_transposed_weights",
  "grow_cache",
  "init_cache",
  "init_head_params",
  "init_params",
  "last_valid_index",
  "load_hf_checkpoint",
  "load_hf_config",
  "load_tokenizer",
  "looks_like_hub_id",
  "param_logical_axes",
  "prefill",
  "resolve_model_dir",
  "write_safetensors",
  "reward_forward",
  "scalar_model_logical_axes",
  "shared_prompt_logits",
  "shared_prompt_rewards",
  "resolve_share_prompt",
  "sharing_saves_work",
  "unstack_layers",
  "values_forward",
]
