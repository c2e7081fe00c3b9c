"""Dry run: AOT compile on a mesh with abstract weights; bytes and FLOPs."""

import json
import math
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax import models, parallel
from rlhf_jax.runner import dry_run as dr
from rlhf_jax.train import DPOConfig, SFTConfig

TINY = models.ModelConfig(
  model_type="llama",
  vocab_size=32,
  hidden_size=16,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  intermediate_size=32,
  max_position_embeddings=64,
)
GIB = 1 << 30


def _lm_params(c: dict) -> int:
  """Parameter count of a Llama LM from its HF config.json fields.

  Independent of rlhf_jax.models: written from the HF modelling code
  (embed, per layer q/k/v/o + gate/up/down + 2 RMSNorms, final norm, an
  lm_head only when untied; no biases).
  """
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
  dh = c.get("head_dim") or d // heads
  attn = d * heads * dh + 2 * d * kv * dh + heads * dh * d
  layer = attn + 3 * d * f + 2 * d
  head = 0 if c["tie_word_embeddings"] else d * v
  return v * d + c["num_hidden_layers"] * layer + d + head


TINY_HF = {
  "hidden_size": 16,
  "intermediate_size": 32,
  "vocab_size": 32,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "head_dim": 8,
  "num_hidden_layers": 2,
  "tie_word_embeddings": False,
}


def _live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def _rss() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


class _PeakRss:
  """Samples this process's resident memory every 2 ms in a thread."""

  def __enter__(self):
    self.base = self.peak = _rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()
    return self

  def _watch(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss())
      time.sleep(0.002)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss())

  @property
  def growth(self) -> int:
    return self.peak - self.base


# ------------------------------------------------------------ tiny stages


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "grpo"])
def test_tiny_stage_bytes_exact(stage, devices8):
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  live_before = _live_bytes()
  report = dr.dry_run(
    stage,
    TINY,
    mesh=mesh,
    rules=parallel.FSDP,
    batch_size=8,
    prompt_length=6,
    response_length=5,
  )
  assert _live_bytes() - live_before < 1 << 20

  lm = _lm_params(TINY_HF)
  assert lm == 5712  # 2*32*16 + 2*(256 + 2*128 + 256 + 3*16*32 + 32) + 16
  d = TINY.hidden_size
  # RM trains {"backbone": LM, "head": kernel f32[D], bias f32[]}.
  n = lm + d + 1 if stage == "rm" else lm
  assert report.num_params == n
  assert report.param_bytes_total == 4 * n
  # FSDP on fsdp=4: every LM weight has an "embed" axis (16, divisible by
  # 4) split over 'fsdp' and is replicated over 'data'; the RM head kernel
  # too; only the f32[] head bias is replicated whole (4 bytes).
  params_dev = 4 * lm // 4 + (4 * d // 4 + 4 if stage == "rm" else 0)
  assert report.param_bytes_per_device == params_dev  # sft: 5712
  # Adam: mu and nu like the params, plus its i32[] count.
  opt_dev = 2 * params_dev + 4
  assert report.opt_state_bytes_per_device == opt_dev
  # TrainState: step i32[] + params + opt + threefry key (u32[2]) +
  # skipped_steps i32[].
  state_dev = 4 + params_dev + opt_dev + 8 + 4
  assert report.state_bytes_per_device == state_dev  # sft: 17156
  # The DPO and GRPO reference LM.
  frozen_dev = 4 * lm // 4 if stage in ("dpo", "grpo") else 0
  assert report.frozen_bytes_per_device == frozen_dev
  # The compiled program's arguments are exactly state + frozen + one
  # device's batch rows (8 rows / 8 batch shards = 1): i32 ids and bool
  # masks of P = 6 prompt and T = 5 response tokens (twice for pairs).
  # GRPO's batch is prompts alone (it samples the responses).
  responses = {"sft": 1, "grpo": 0}.get(stage, 2)
  batch_dev = (4 + 1) * (6 + responses * 5)
  assert report.argument_bytes == state_dev + frozen_dev + batch_dev
  # The donated state is aliased into the new state.
  assert report.alias_bytes == state_dev
  assert report.output_bytes >= state_dev
  assert report.temp_bytes >= 0
  assert report.flops_per_step > 0
  if stage == "grpo":
    # XLA counts the sampler's while-loop body once; the jaxpr count of
    # matmuls runs every decode step.
    assert report.matmul_flops_per_step / 2 > report.flops_per_step
  else:
    # XLA's count is one device's (8 devices), the jaxpr's matmul count the
    # whole step's; TINY's 2 layers are unrolled in the scan
    # (models.transformer.SCAN_UNROLL_MAX_LAYERS), so XLA sees every layer:
    # at least its 1/8 share of the matmuls, and less than all of them
    # (XLA counting the scan body once gave < 1/8).
    m = report.matmul_flops_per_step
    assert m / 8 <= report.flops_per_step < m
  assert report.compile_seconds > 0
  text = report.format()
  assert f"dry run: {stage} on mesh data=2 fsdp=4 tensor=1" in text
  assert "KiB" in text


# ------------------------------------------------------------- 1B on fsdp=8


@pytest.mark.slow
def test_llama_1b_ppo_fsdp8_without_weights(devices8, shared_data):
  config_path = shared_data / "configs" / "llama-3.2-1b" / "config.json"
  hf = json.loads(config_path.read_text())
  cfg = models.ModelConfig.from_hf_dict(hf, source=str(config_path))
  mesh = parallel.make_mesh(data=1, fsdp=8, devices=devices8)

  live_before = _live_bytes()
  with _PeakRss() as rss:
    report = dr.dry_run("ppo", cfg, mesh=mesh, rules=parallel.FSDP)
  print(f"\n{report.format()}")  # shown with pytest -s

  lm = _lm_params(hf)
  assert round(lm / 1e6) == 1236  # Llama-3.2-1B, tied embeddings
  # PPO trains the policy and the critic ({"backbone", "head"}).
  n = 2 * lm + hf["hidden_size"] + 1
  assert report.num_params == n
  assert report.param_bytes_total == 4 * n
  assert report.param_bytes_per_device == pytest.approx(
    report.param_bytes_total / 8, rel=0.02
  )
  assert report.opt_state_bytes_per_device == pytest.approx(
    2 * report.param_bytes_per_device, rel=0.01
  )
  # Frozen reference LM + reward model: another policy + critic's worth.
  assert report.frozen_bytes_per_device == pytest.approx(
    report.param_bytes_per_device, rel=0.01
  )
  assert report.flops_per_step > 0
  assert report.matmul_flops_per_step / 8 > report.flops_per_step
  assert report.temp_bytes >= 0
  assert report.alias_bytes == report.state_bytes_per_device
  assert report.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
  assert "GiB" in report.format()

  # Nothing of weight size was allocated: no live arrays were left, and
  # resident memory (compiler included) grew by less than one weight
  # matrix, while the state alone is 3 x 9.2 GiB and the embedding and
  # each stacked MLP matrix are about 1 GiB each.
  assert _live_bytes() - live_before < 1 << 20
  assert 4 * hf["vocab_size"] * hf["hidden_size"] > 0.95 * GIB
  assert rss.growth < 0.95 * GIB, f"RSS grew {rss.growth / GIB:.2f} GiB"


# ------------------------------------------------------- errors and helpers


def test_rejects_bad_arguments(devices8):
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  kw = dict(mesh=mesh, rules=parallel.FSDP)
  with pytest.raises(ValueError, match="unknown stage"):
    dr.dry_run("kto", TINY, **kw)
  with pytest.raises(ValueError, match="not divisible by the 8 batch"):
    dr.dry_run("sft", TINY, batch_size=4, **kw)
  with pytest.raises(TypeError, match="DPOConfig"):
    dr.dry_run("dpo", TINY, config=SFTConfig(), **kw)
  with pytest.raises(TypeError, match="SFTConfig"):
    dr.dry_run("sft", TINY, config=DPOConfig(), **kw)


def test_flops_from_cost_analysis_shapes():
  assert dr.flops_from_cost_analysis({"flops": 3.0}) == 3.0
  # Older jax: one dict per program, summed.
  assert dr.flops_from_cost_analysis([{"flops": 1.0}, {"flops": 2.0}]) == 3.0
  for missing in (None, {}, [], [{}], {"bytes accessed": 1.0}):
    assert math.isnan(dr.flops_from_cost_analysis(missing))


def test_jaxpr_matmul_flops_counts_loop_trips():
  x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  one = 2 * 4 * 8 * 8  # 2 * rows * out cols * contracted = 512

  def f(x, w):
    x = x @ w  # 1 matmul
    x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=10)
    x = jax.lax.while_loop(
      lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, x)
    )[1]
    # cond: the dearer branch (two matmuls) counts.
    return jax.lax.cond(True, lambda y: y @ w @ w, lambda y: y, x)

  jaxpr = jax.jit(f).trace(x, w).jaxpr
  # 1 + 10 (scan) + 3 (while, trip count given) + 2 (cond) = 16; XLA's
  # cost analysis would count the scan and while bodies once (1+1+1+2).
  assert dr.jaxpr_matmul_flops(jaxpr, while_trip_count=3) == 16 * one
  assert dr.jaxpr_matmul_flops(jaxpr) == 14 * one


def test_format_bytes():
  assert dr.format_bytes(-1) == "n/a"
  assert dr.format_bytes(512) == "512 B"
  assert dr.format_bytes(1536) == "1.5 KiB"
  assert dr.format_bytes(589 << 20) == "589.0 MiB"
  assert dr.format_bytes(3 * GIB) == "3.00 GiB"


def test_sft_dry_run_from_the_cli(
  tinystories_dir, tmp_path, capsys, monkeypatch
):
  """`rlhf-jax sft --dry-run` on the 8 test devices: no --data, no run
  directory, the report printed, exit 0."""
  from rlhf_jax.cli.main import main

  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", "off")  # keep the test's cache
  monkeypatch.chdir(tmp_path)  # a default run dir would appear here
  code = main(["sft", "--dry-run", "--model", str(tinystories_dir)])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "dry run: sft on mesh data=8 fsdp=1 tensor=1 (8 devices)" in out
  assert "params" in out and "lower / compile" in out
  assert not list(tmp_path.iterdir())
