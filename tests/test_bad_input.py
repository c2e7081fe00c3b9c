"""Bad input is a named error before any work starts (issue 13).

Options: every case exits 2 with a line naming the option, its value and
what is expected, prints no traceback and creates no run directory (the
check runs before anything is written). Library calls: each bad config or
argument raises the documented exception with a message naming the field
or argument, when the step is built or the function is traced.
"""

import dataclasses
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import (
  aggregate_loss,
  bradley_terry_loss,
  dpo_loss,
  gae_advantages,
  grpo_advantages,
  kl,
  kl_estimate,
  kl_shaped_rewards,
  kto_loss,
  last_valid_index,
  masked_count,
  masked_whiten,
  models,
  ppo_policy_loss,
  sft_loss,
)
from rlhf_jax.cli.main import DEBUG_ENV, main
from rlhf_jax.data import UnpairedBatch, load_examples, tokenize_prompts
from rlhf_jax.models import ModelConfig
from rlhf_jax.rollout import generate
from rlhf_jax.rollout.generate import response_mask_from_ids, row_rngs
from rlhf_jax.train import (
  DPOConfig,
  GRPOConfig,
  PPOConfig,
  RewardModelConfig,
  SFTConfig,
  TrainState,
  init_grpo_state,
  init_ppo_state,
  make_dpo_step,
  make_grpo_rollout,
  make_grpo_step,
  make_grpo_update,
  make_kto_step,
  make_ppo_step,
  make_reward_model_step,
  make_sft_step,
)
from rlhf_jax.train.common import (
  apply_if_finite,
  concat_prompt_response,
  config_problems,
  split_micro_batches,
  stacked_pairs,
)
from rlhf_jax.train.frozen_head import make_head_step
from rlhf_jax.types import (
  FeaturePairBatch,
  PreferenceBatch,
  PromptBatch,
  RankedBatch,
  SFTBatch,
)


def _pairs(rejected_rows: int = 4, rejected_len: int = 4) -> PreferenceBatch:
  """4 pairs, prompt 3 + responses 4, the rejected side resized."""

  def rows(b, t):
    return jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool)

  (p, pm), (c, cm) = rows(4, 3), rows(4, 4)
  r, rm = rows(rejected_rows, rejected_len)
  return PreferenceBatch(p, pm, c, cm, r, rm)


# (argv, a fragment of the expected message)
OPTION_CASES = [
  (
    ["run", "--ppo.learning-rate", "nan"],
    "--ppo.learning-rate nan: expected a finite",
  ),
  (
    ["run", "--ppo.learning-rate", "-1e-3"],
    "--ppo.learning-rate -0.001: expected > 0",
  ),
  (["run", "--rm.learning-rate", "inf"], "--rm.learning-rate inf"),
  (  # it passed and overflowed to inf in the float32 step
    ["sft", "--learning-rate", "1e308"],
    "--learning-rate 1e+308: expected a finite float32 number (|x| <= "
    "3.403e+38)",
  ),
  (
    ["run", "--dpo.learning-rate", "0"],
    "--dpo.learning-rate 0.0: expected > 0",
  ),
  (["run", "--ppo.value-learning-rate", "-2"], "--ppo.value-learning-rate"),
  (
    ["run", "--sampling.temperature", "0"],
    "--sampling.temperature 0.0: expected >= 0.01",
  ),
  (  # a PPO run at 1e-30 skipped every update (NaN) after work started
    ["run", "--sampling.temperature", "1e-30"],
    "--sampling.temperature 1e-30: expected >= 0.01 (logprobs and their",
  ),
  (["run", "--sampling.temperature", "-1"], "--sampling.temperature"),
  (
    ["run", "--sampling.max-new-tokens", "0"],
    "--sampling.max-new-tokens 0: expected >= 1",
  ),
  (["run", "--sampling.batch-size", "0"], "--sampling.batch-size 0"),
  (["rm", "--rm.batch-size", "0"], "--rm.batch-size 0: expected >= 1"),
  (["rm", "--rm.steps", "-5"], "--rm.steps -5"),
  (["rm", "--rm.warmup-steps", "-1"], "--rm.warmup-steps -1: expected >= 0"),
  (["rm", "--rm.weight-decay", "-0.1"], "--rm.weight-decay"),
  (["rm", "--rm.max-grad-norm", "0"], "--rm.max-grad-norm 0.0: expected > 0"),
  (["rm", "--rm.eval-every", "0"], "--rm.eval-every 0"),
  (
    ["rm", "--rm.loss.label-smoothing", "1.5"],
    "--rm.loss.label-smoothing 1.5: expected in [0, 0.5]",
  ),
  (
    ["rm", "--rm.loss.margin", "nan"],
    "--rm.loss.margin nan: expected a finite",
  ),
  (
    ["rm", "--rm.loss.center-rewards-coef", "-1"],
    "--rm.loss.center-rewards-coef",
  ),
  (["rm", "--rm.loss.num-micro-batches", "0"], "--rm.loss.num-micro-batches 0"),
  (
    ["rm", "--rm.batch-size", "12", "--rm.loss.num-micro-batches", "5"],
    "--rm.batch-size 12: expected a multiple of --rm.loss.num-micro-batches",
  ),
  (["dpo", "--dpo.loss.beta", "-1"], "--dpo.loss.beta -1.0: expected > 0"),
  (["dpo", "--dpo.loss.beta", "nan"], "--dpo.loss.beta nan"),
  (["dpo", "--dpo.loss.beta", "0"], "--dpo.loss.beta 0.0: expected > 0"),
  (
    ["dpo", "--dpo.loss.label-smoothing", "0.7"],
    "--dpo.loss.label-smoothing 0.7",
  ),
  (
    [
      "dpo",
      "--dpo.loss.loss-type",
      "hinge",
      "--dpo.loss.label-smoothing",
      "0.1",
    ],
    "expected 0 with loss_type='hinge'",
  ),
  (
    ["dpo", "--dpo.batch-size", "10", "--dpo.loss.num-micro-batches", "4"],
    "--dpo.batch-size 10: expected a multiple",
  ),
  (
    ["ppo", "--ppo.algo.cliprange", "-1"],
    "--ppo.algo.cliprange -1.0: expected >= 0",
  ),
  (
    ["ppo", "--ppo.algo.cliprange-low", "1.5"],
    "--ppo.algo.cliprange-low 1.5: expected in [0, 1)",
  ),
  (
    ["ppo", "--ppo.algo.dual-clip", "0.5"],
    "--ppo.algo.dual-clip 0.5: expected > 1",
  ),
  (
    ["ppo", "--ppo.algo.gamma", "1.5"],
    "--ppo.algo.gamma 1.5: expected in [0, 1]",
  ),
  (["ppo", "--ppo.algo.lam", "-0.1"], "--ppo.algo.lam"),
  (
    ["ppo", "--ppo.algo.kl-coef", "-0.1"],
    "--ppo.algo.kl-coef -0.1: expected >= 0",
  ),
  (["ppo", "--ppo.algo.kl-coef", "0"], "expected > 0 with adaptive_kl"),
  (
    ["ppo", "--ppo.algo.target-kl", "0"],
    "--ppo.algo.target-kl 0.0: expected > 0",
  ),
  (["ppo", "--ppo.algo.kl-horizon", "0"], "--ppo.algo.kl-horizon 0"),
  (
    ["ppo", "--ppo.algo.top-p", "0"],
    "--ppo.algo.top-p 0.0: expected in (0, 1]",
  ),
  (["ppo", "--ppo.algo.top-k", "-1"], "--ppo.algo.top-k -1"),
  (["ppo", "--ppo.algo.ppo-epochs", "0"], "--ppo.algo.ppo-epochs 0"),
  (["ppo", "--ppo.algo.vf-coef", "nan"], "--ppo.algo.vf-coef nan"),
  (
    ["ppo", "--ppo.algo.loss-agg-mode", "bogus"],
    "--ppo.algo.loss-agg-mode 'bogus': expected one of token-mean",
  ),
  (
    ["ppo", "--ppo.algo.num-minibatches", "3"],
    "expected a multiple of --ppo.algo.num-minibatches (3)",
  ),
  (
    [
      "ppo",
      "--ppo.algo.num-minibatches",
      "2",
      "--ppo.algo.num-micro-batches",
      "3",
    ],
    "expected a multiple of --ppo.algo.num-micro-batches (3)",
  ),
  (["ppo", "--ppo.iterations", "0"], "--ppo.iterations 0"),
  (  # 8 prompts x G = 8: 64 rows split in 16, 8 groups do not
    [
      "grpo",
      "--grpo.algo.share-prompt",
      "True",
      "--grpo.algo.num-minibatches",
      "16",
    ],
    "--grpo.batch-size (groups, with --grpo.algo.share-prompt True) 8: "
    "expected a multiple of --grpo.algo.num-minibatches x "
    "--grpo.algo.num-micro-batches (16)",
  ),
  (
    ["grpo", "--grpo.algo.share-prompt", "True", "--sampling.exact-sampling"],
    "--grpo.algo.share-prompt True: expected None or False with "
    "--sampling.exact-sampling",
  ),
  (  # the accept-rate task's GRPO arm
    ["kto", "--grpo.algo.share-prompt", "True", "--sampling.exact-sampling"],
    "--grpo.algo.share-prompt True: expected None or False with "
    "--sampling.exact-sampling",
  ),
  (
    ["run", "--feedback.group-size", "1"],
    "--feedback.group-size 1: expected >= 2",
  ),
  (
    ["run", "--task.eval-fraction", "1.0"],
    "--task.eval-fraction 1.0: expected in (0, 1)",
  ),
  (
    ["run", "--task.prefix-min-words", "9"],
    "--task.prefix-min-words 9: expected <= --task.prefix-max-words",
  ),
  (["run", "--seed", "-1"], "--seed -1: expected in [0, 2^32)"),
  (["rm", "--run-dir", ""], "--run-dir '': expected a path"),
  # eval's and export's own folder options are required: not given, they
  # were reported as given empty.
  (["eval"], "--run-dir is needed: expected a path (none given, or '')"),
  (["export", "--run-dir", "r"], "--out is needed: expected a path (none"),
  (
    ["dpo", "--dpo.loss.loss-type", "foo"],
    "Expected one of ('sigmoid', 'hinge', 'ipo')",
  ),
  (["run", "--checkpoint-every", "0"], "--checkpoint-every 0"),
  (["run", "--mesh.data", "0"], "--mesh.data 0: expected >= 1, or -1"),
  (["run", "--mesh.fsdp", "-3"], "--mesh.fsdp -3"),
  (
    ["run", "--data", "no/such/file.jsonl"],
    "--data no/such/file.jsonl: no such file",
  ),
  (
    ["ppo", "--prompts", "nope.txt", "--reward-model", "x"],
    "--prompts nope.txt: no such file",
  ),
  (["sft", "--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
  # New options of sft and kto, range-checked as the pipeline's are.
  (
    ["sft", "--data", "m.jsonl", "--max-skipped-fraction", "2"],
    "--max-skipped-fraction 2.0: expected a fraction in [0, 1]",
  ),
  (
    ["kto", "--data", "m.jsonl", "--keep-checkpoints", "0"],
    "--keep-checkpoints 0: expected >= 1",
  ),
  (
    ["sft", "--data", "missing.jsonl", "--learning-rate", "nan"],
    "--learning-rate nan",
  ),
  (["generate", "--temperature", "0"], "--temperature 0.0: expected >= 0.01"),
  (["generate", "--temperature", "1e-40"], "--temperature 1e-40: expected >="),
  (  # it was ignored without a word
    ["generate", "--greedy", "--temperature", "0.5"],
    "--temperature 0.5: has no effect with --greedy (argmax decoding); drop "
    "one of them",
  ),
  (["generate", "--num-samples", "0"], "--num-samples 0"),
  (
    ["eval", "--run-dir", "no/such/run"],
    "--run-dir no/such/run: no such run directory",
  ),
  (
    ["export", "--run-dir", "no/such/run", "--out", "x"],
    "--run-dir no/such/run: no such run directory",
  ),
  (
    ["rm", "--preset", "hh-rlhf", "--hh.learning-rate", "nan"],
    "--hh.learning-rate nan",
  ),
  (
    ["rm", "--preset", "hh-rlhf", "--hh.label-smoothing", "0.9"],
    "--hh.label-smoothing 0.9",
  ),
  (["rm", "--preset", "hh-rlhf", "--hh.num-layers", "0"], "--hh.num-layers 0"),
]


def test_documented_infinite_option_is_accepted():
  # --feedback.annotator-beta inf is the noiseless gold order; the float32
  # range check must not refuse it.
  from rlhf_jax.stages import configs, validate

  base = configs.PipelineConfig()
  feedback = dataclasses.replace(base.feedback, annotator_beta=float("inf"))
  config = dataclasses.replace(base, feedback=feedback)
  assert validate.problems("run", config) == []
  big = dataclasses.replace(base.feedback, annotator_beta=1e39)
  assert validate.problems("run", dataclasses.replace(base, feedback=big)) == [
    "--feedback.annotator-beta 1e+39: expected a finite float32 number "
    "(|x| <= 3.403e+38)"
  ]


@pytest.mark.parametrize(
  "argv, message", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES]
)
def test_bad_option_is_named_before_any_work(
  argv, message, tmp_path, capsys, monkeypatch
):
  monkeypatch.chdir(tmp_path)  # relative paths and default run dirs land here
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert message in err, err
  assert "Traceback" not in err
  assert all(line.startswith("rlhf-jax: error: ") for line in err.splitlines())
  assert not (tmp_path / "runs").exists()  # nothing was written


def test_every_problem_is_listed_at_once(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = [
    "rm",
    "--rm.batch-size",
    "0",
    "--rm.loss.margin",
    "nan",
    "--seed",
    "-2",
  ]
  assert main(argv) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 3 and all("expected" in line for line in err)


def test_internal_error_is_one_line_and_debug_shows_the_traceback(
  monkeypatch, capsys
):
  import rlhf_jax.cli.main as cli

  def boom(command, config):
    raise RuntimeError("a bug")

  monkeypatch.setattr(cli, "_dispatch", boom)
  assert main(["generate"]) == 1
  err = capsys.readouterr().err
  assert "internal error: RuntimeError: a bug" in err and "--debug" in err
  assert "Traceback" not in err and len(err.splitlines()) == 1
  assert main(["generate", "--debug"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and 'raise RuntimeError("a bug")' in err
  assert err.endswith(
    "rlhf-jax: internal error: RuntimeError: a bug (traceback above, and "
    "report it)\n"
  )
  monkeypatch.setenv(DEBUG_ENV, "1")
  assert main(["generate"]) == 1
  assert capsys.readouterr().err == err
  short = "rlhf-jax: internal error: RuntimeError: a bug (rerun with"
  for off in ("0", "false", "No", " off "):  # =false turned it on
    monkeypatch.setenv(DEBUG_ENV, off)
    assert main(["generate"]) == 1
    assert capsys.readouterr().err.startswith(short)


def test_debug_keeps_a_user_error_s_exit_status(monkeypatch, capsys):
  # With --debug a bad option exited 1 (the traceback of a UserError).
  assert main(["dpo", "--dpo.loss.beta", "-1", "--debug"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and "UserError" in err
  assert err.endswith("rlhf-jax: error: --dpo.loss.beta -1.0: expected > 0\n")


@pytest.mark.parametrize(
  "code, reason", [(30, "read-only file system"), (28, "no space left")]
)
def test_read_only_and_full_disk_are_one_line(
  monkeypatch, capsys, code, reason
):
  import rlhf_jax.cli.main as cli

  def full(command, config):
    raise OSError(code, os.strerror(code), "runs/x/metrics.jsonl")

  monkeypatch.setattr(cli, "_dispatch", full)
  assert main(["generate"]) == 2
  err = capsys.readouterr().err
  assert f"cannot write runs/x/metrics.jsonl: {reason}" in err, err
  assert "Traceback" not in err


# ------------------------------------------------------------ library calls

TINYSTORIES = (
  pathlib.Path(__file__).resolve().parents[2]
  / "shared"
  / "data"
  / "models"
  / "tinystories-656k"
)
TINY = ModelConfig(
  model_type="llama",
  vocab_size=16,
  hidden_size=8,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=4,
  intermediate_size=16,
  max_position_embeddings=16,
)


def _rows(b: int, length: int) -> tuple[jax.Array, jax.Array]:
  """(ids i32[b, length], mask bool[b, length]) of ones."""
  return jnp.ones((b, length), jnp.int32), jnp.ones((b, length), bool)


def _opt():
  import optax

  return optax.sgd(0.1)


def _state() -> TrainState:
  return TrainState.create(
    models.init_params(TINY, jax.random.key(0)), _opt(), jax.random.key(0)
  )


def _sft_shapes(batch):
  return jax.eval_shape(make_sft_step(TINY, _opt()), _state(), batch)


def _features(*shape: int) -> tuple[jax.Array, jax.Array]:
  """Two f32 arrays of ``shape`` (chosen and rejected features)."""
  return jnp.ones(shape), jnp.ones(shape)


def _head_shapes(batch):
  policy = models.init_params(TINY, jax.random.key(0))
  head = models.from_policy_params(policy, TINY, jax.random.key(1))["head"]
  state = TrainState.create(head, _opt(), jax.random.key(0))
  return jax.eval_shape(make_head_step(TINY, _opt()), state, batch)


LIBRARY_CASES = [
  (
    lambda: make_sft_step(TINY, _opt(), SFTConfig(num_micro_batches=0)),
    "num_micro_batches=0: expected an integer >= 1",
  ),
  (
    lambda: make_sft_step(TINY, _opt(), SFTConfig(loss_agg_mode="mean")),
    "loss_agg_mode='mean'",
  ),
  (
    lambda: make_reward_model_step(
      TINY, _opt(), RewardModelConfig(label_smoothing=0.8)
    ),
    "label_smoothing=0.8",
  ),
  (
    lambda: make_reward_model_step(
      TINY, _opt(), RewardModelConfig(margin=float("nan"))
    ),
    "margin=nan: expected a finite",
  ),
  (
    lambda: make_reward_model_step(
      TINY, _opt(), RewardModelConfig(loss_type="best_of_k", pooling="mean")
    ),
    "expected 'last' with loss_type='best_of_k'",
  ),
  (  # it was silently ignored: best_of_k_loss takes no margin
    lambda: make_reward_model_step(
      TINY, _opt(), RewardModelConfig(loss_type="best_of_k", margin=1.0)
    ),
    "margin=1.0: expected None with loss_type='best_of_k' (pairwise only)",
  ),
  (
    lambda: make_reward_model_step(
      TINY,
      _opt(),
      RewardModelConfig(loss_type="best_of_k", label_smoothing=0.1),
    ),
    "label_smoothing=0.1: expected 0.0 with loss_type='best_of_k'",
  ),
  (
    lambda: make_reward_model_step(
      TINY, _opt(), RewardModelConfig(num_micro_batches=1.5)
    ),
    "num_micro_batches=1.5: expected an integer >= 1",
  ),
  (
    lambda: make_reward_model_step(
      TINY, _opt(), RewardModelConfig(share_prompt="no")
    ),
    "share_prompt='no': expected True, False or None",
  ),
  (
    lambda: make_dpo_step(TINY, _opt(), DPOConfig(share_prompt=1)),
    "share_prompt=1: expected True, False or None",
  ),
  (
    lambda: make_dpo_step(TINY, _opt(), DPOConfig(precomputed_ref="yes")),
    "precomputed_ref='yes': expected True or False",
  ),
  (
    lambda: make_dpo_step(TINY, _opt(), DPOConfig(beta=0.0)),
    "beta=0.0: expected > 0",
  ),
  (  # True passed as 1.0
    lambda: make_dpo_step(TINY, _opt(), DPOConfig(beta=True)),
    "beta=True: expected a number, not a bool",
  ),
  (
    lambda: make_dpo_step(TINY, _opt(), DPOConfig(loss_type="kto")),
    "loss_type='kto'",
  ),
  (
    lambda: make_ppo_step(
      TINY, _opt(), _opt(), PPOConfig(0, 0, cliprange=-0.2)
    ),
    "cliprange=-0.2: expected >= 0",
  ),
  (
    lambda: make_ppo_step(
      TINY, _opt(), _opt(), PPOConfig(0, 0, kl_estimator="k4")
    ),
    "kl_estimator='k4'",
  ),
  (
    lambda: make_ppo_step(
      TINY, _opt(), _opt(), PPOConfig(0, 0, temperature=0.0)
    ),
    "temperature=0.0: expected >= 0.01",
  ),
  (
    lambda: make_ppo_step(
      TINY, _opt(), _opt(), PPOConfig(0, 0, gamma=float("inf"))
    ),
    "gamma=inf",
  ),
  (
    lambda: split_micro_batches(jnp.zeros((6, 2)), 4),
    "batch size 6 is not divisible by num_micro_batches=4",
  ),
  # A count of 0 divided by zero, -2 failed in a reshape, leaves of two
  # sizes in a reshape; a scalar leaf has no batch axis.
  # Hyperparameters given straight to a loss (the configs check theirs):
  # each returned a value (a negative loss, inf advantages, 0).
  (
    lambda: bradley_terry_loss(
      jnp.zeros(2), jnp.ones(2), center_rewards_coef=-1.0
    ),
    "center_rewards_coef must be >= 0, got -1.0",
  ),
  (
    lambda: kl_shaped_rewards(
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.zeros(1),
      jnp.ones((1, 2), bool),
      kl_coef=float("nan"),
    ),
    "kl_coef must be >= 0, got nan",
  ),
  (
    lambda: masked_whiten(jnp.zeros(3), jnp.ones(3, bool), eps=-1.0),
    "eps must be >= 0, got -1.0",
  ),
  (
    lambda: grpo_advantages(jnp.zeros(4), group_size=2, eps=-1e-6),
    "eps must be >= 0, got -1e-06",
  ),
  (
    lambda: aggregate_loss(
      jnp.zeros((1, 2)), jnp.ones((1, 2), bool), normalizer=-1.0
    ),
    "normalizer must be > 0, got -1.0",
  ),
  (  # the id rules: eos = V ("never sampled") passes, -1 does not
    lambda: make_ppo_step(TINY, _opt(), _opt(), PPOConfig(-1, 0)),
    "eos_token_id=-1: expected an integer >= 0",
  ),
  (
    lambda: make_ppo_step(TINY, _opt(), _opt(), PPOConfig(0, 1.5)),
    "pad_token_id=1.5: expected an integer >= 0",
  ),
  # Fields of a batch that disagree: they failed in a concatenate or an
  # einsum without naming a field.
  (
    lambda: stacked_pairs(_pairs(rejected_rows=3)),
    "rejected_ids has 3 rows but prompt_ids 4: expected one batch size",
  ),
  (
    lambda: stacked_pairs(_pairs(rejected_len=6)),
    "chosen_ids length 4 but rejected_ids 6: expected one padded response",
  ),
  (
    lambda: concat_prompt_response(
      jnp.zeros((2, 3), jnp.int32),
      jnp.ones((2, 2), bool),
      jnp.zeros((2, 4), jnp.int32),
      jnp.ones((2, 4), bool),
    ),
    "prompt_mask shape (2, 2): expected (2, 3), as prompt_ids",
  ),
  (
    lambda: concat_prompt_response(
      jnp.zeros((2, 3), jnp.int32),
      jnp.ones((2, 3), bool),
      jnp.zeros((2, 4)),
      jnp.ones((2, 4), bool),
    ),
    "response_ids dtype float32: expected integer token ids",
  ),
  # A float mask counted 0.5 as a real token (cast with != 0).
  (
    lambda: concat_prompt_response(
      jnp.zeros((2, 3), jnp.int32),
      jnp.ones((2, 3), bool),
      jnp.zeros((2, 4), jnp.int32),
      jnp.full((2, 4), 0.5),
    ),
    "response_mask must be bool (True = valid), got float32",
  ),
  (
    lambda: stacked_pairs(_pairs().replace(chosen_mask=jnp.full((4, 4), 0.5))),
    "chosen_mask must be bool (True = valid), got float32",
  ),
  # Python lists were "Cannot determine dtype of [[1, 2]]".
  (
    lambda: concat_prompt_response(
      [[1, 2]], jnp.ones((1, 2), bool), jnp.zeros((1, 1), jnp.int32), [[True]]
    ),
    "prompt_ids must be an array (jax or numpy), got list",
  ),
  (
    lambda: concat_prompt_response(
      jnp.zeros((1, 2), jnp.int32),
      jnp.ones((1, 2), bool),
      jnp.zeros((1, 1), jnp.int32),
      [[True]],
    ),
    "response_mask must be an array (jax or numpy), got list",
  ),
  (
    lambda: split_micro_batches(jnp.zeros((6, 2)), 0),
    "num_micro_batches must be an integer >= 1, got 0",
  ),
  (
    lambda: split_micro_batches(jnp.zeros((6, 2)), -2),
    "num_micro_batches must be an integer >= 1, got -2",
  ),
  (
    lambda: split_micro_batches({"a": jnp.zeros(6), "b": jnp.zeros(4)}, 2),
    "leading sizes [4, 6]: every leaf of the batch must be [B, ...] with one",
  ),
  (
    lambda: split_micro_batches({"a": jnp.zeros(6), "b": jnp.float32(1)}, 2),
    "every leaf of the batch must be [B, ...] (got no leaves or a scalar)",
  ),
  (
    lambda: ppo_policy_loss(
      jnp.zeros((2, 3)),
      jnp.zeros((2, 3)),
      jnp.zeros((2, 4)),
      jnp.ones((2, 3), bool),
      cliprange=0.2,
    ),
    "advantages shape (2, 4) must equal response_mask shape (2, 3)",
  ),
  (
    lambda: ppo_policy_loss(
      jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3, bool), cliprange=0.2
    ),
    "response_mask must be [B, T]",
  ),
  (
    lambda: ppo_policy_loss(
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.ones((1, 2)),
      cliprange=0.2,
    ),
    "must be bool",
  ),
  # These two counted 0.5 as valid where every other masked function
  # refused a float mask.
  (
    lambda: masked_count(jnp.array([0.5, 1.0])),
    "mask must be bool (True = valid), got float32",
  ),
  (
    lambda: last_valid_index(jnp.array([[0.5, 0.0]])),
    "mask must be bool (True = valid), got float32",
  ),
  (
    lambda: ppo_policy_loss(
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.ones((1, 2), bool),
      cliprange=float("nan"),
    ),
    "cliprange must be >= 0, got nan",  # named cliprange_low, not passed
  ),
  (
    lambda: ppo_policy_loss(
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.ones((1, 2), bool),
      cliprange=0.2,
      cliprange_low=1.5,
    ),
    "cliprange_low must be < 1, got 1.5",
  ),
  (
    lambda: kl_estimate(jnp.zeros((2, 3)), jnp.zeros((2, 2))),
    "logprobs shape (2, 3) != ref_logprobs shape (2, 2)",
  ),
  (
    lambda: kl_estimate(
      jnp.zeros((2, 3)), jnp.zeros((2, 3)), kl_estimator="k5"
    ),
    "kl_estimator must be one of",
  ),
  (
    lambda: dpo_loss(
      jnp.zeros(2), jnp.zeros(3), jnp.zeros(2), jnp.zeros(2), beta=0.1
    ),
    "rank-1 shapes [B]",
  ),
  (
    lambda: dpo_loss(
      jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), beta=-1.0
    ),
    "beta must be > 0",
  ),
  (
    lambda: gae_advantages(
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.ones((1, 2), bool),
      gamma=1.5,
      lam=0.9,
    ),
    "gamma must be in [0, 1], got 1.5",
  ),
  (
    lambda: dpo_loss(
      jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), beta=float("nan")
    ),
    "beta must be > 0, got nan",
  ),
  (
    lambda: sft_loss(jnp.zeros((2, 3)), jnp.ones((2, 2), bool)),
    "logprobs shape (2, 3) must equal response_mask shape (2, 2)",
  ),
  # Hyperparameters of another type failed inside jax, naming nothing.
  (
    lambda: dpo_loss(*[jnp.zeros(2)] * 4, beta="0.1"),
    "beta must be a real number (> 0) or a scalar array, got '0.1' (str)",
  ),
  (
    lambda: kto_loss(
      jnp.zeros(2),
      jnp.zeros(2),
      jnp.ones(2, bool),
      0.0,
      beta=0.1,
      desirable_weight=None,
    ),
    "desirable_weight must be a real number (> 0) or a scalar array, got None",
  ),
  (
    lambda: ppo_policy_loss(
      *[jnp.zeros((1, 2))] * 3,
      jnp.ones((1, 2), bool),
      cliprange=0.2,
      dual_clip="3",
    ),
    "dual_clip must be a real number (> 1) or a scalar array, got '3' (str)",
  ),
  (  # np.True_ passed as an array and was read as beta = 1
    lambda: dpo_loss(*[jnp.zeros(2)] * 4, beta=np.True_),
    "beta must be a real number (> 0) or a scalar array, got np.True_",
  ),
  (  # inf passed "> 0" and the loss was NaN
    lambda: dpo_loss(*[jnp.zeros(2)] * 4, beta=float("inf")),
    "beta must be finite and > 0, got inf",
  ),
  (
    lambda: bradley_terry_loss(
      jnp.zeros(4), jnp.zeros(4), center_rewards_coef=jnp.full(4, 0.1)
    ),
    "center_rewards_coef must be a scalar, got an array of shape (4,)",
  ),
  (
    lambda: kto_loss(
      jnp.zeros(2), jnp.zeros(2), jnp.ones(2, bool), float("nan"), beta=0.1
    ),
    "z_ref must be finite, got nan",
  ),
  # rng=0 was flax's InvalidRngError or "invalid PRNG key data".
  (
    lambda: models.init_params(TINY, 0),
    "rng must be one PRNG key (jax.random.key(seed)), got 0",
  ),
  (
    lambda: models.from_policy_params({}, TINY, 0),
    "rng must be one PRNG key (jax.random.key(seed)), got 0",
  ),
  (
    lambda: TrainState.create({}, _opt(), jax.random.split(jax.random.key(0))),
    "rng must be one PRNG key (jax.random.key(seed)), got key<fry>[2]",
  ),
  (
    lambda: load_examples([{"prompt": "a", "completion": "b"}], strict="no"),
    "strict must be True or False, got 'no'",
  ),
  # Arguments of the wrong type were AttributeErrors naming no argument.
  (
    lambda: models.init_params(None, jax.random.key(0)),
    "config must be a ModelConfig (models.load_hf_config(dir) or "
    "ModelConfig(...)), got NoneType",
  ),
  (
    lambda: TrainState.create({}, None, jax.random.key(0)),
    "optimizer must be an optax GradientTransformation",
  ),
  (
    lambda: models.from_policy_params(None, TINY, jax.random.key(0)),
    "policy_params must be the policy's params, a dict",
  ),
  (
    lambda: models.load_tokenizer(TINYSTORIES, pad_token=0),
    "pad_token must be a token string such as '<|endoftext|>', got 0 (int)",
  ),
  (
    lambda: tokenize_prompts(["a"], None, max_prompt_length=-1),
    "max_prompt_length must be an integer >= 1, got -1",
  ),
  (
    lambda: tokenize_prompts(["a"], None, max_prompt_length="8"),
    "max_prompt_length must be an integer >= 1, got '8'",
  ),
  # An empty response was "prompt_length must be a Python int in [1, L)".
  (
    lambda: jax.eval_shape(
      make_sft_step(TINY, _opt()),
      TrainState.create(
        models.init_params(TINY, jax.random.key(0)),
        _opt(),
        jax.random.key(0),
      ),
      SFTBatch(*_rows(2, 3), *_rows(2, 0)),
    ),
    "response_ids shape (2, 0): expected at least one slot (T >= 1)",
  ),
  # An empty batch or prompt named internal arguments ("input_ids shape
  # (0, 11)", "prompt_length must be ..."); another batch type or 1-D ids
  # were an AttributeError or an IndexError.
  (
    lambda: _sft_shapes(SFTBatch(*_rows(0, 3), *_rows(0, 4))),
    "prompt_ids shape (0, 3): expected at least one row and one prompt token "
    "(B >= 1, P >= 1)",
  ),
  (
    lambda: _sft_shapes(SFTBatch(*_rows(2, 0), *_rows(2, 4))),
    "prompt_ids shape (2, 0): expected at least one row and one prompt token",
  ),
  (
    lambda: _sft_shapes(
      SFTBatch(jnp.ones(3, jnp.int32), jnp.ones(3, bool), *_rows(2, 4))
    ),
    "prompt_ids shape (3,): expected [B, L]",
  ),
  (
    lambda: _sft_shapes(
      PreferenceBatch(*_rows(2, 3), *_rows(2, 4), *_rows(2, 4))
    ),
    "the batch must be of type SFTBatch, got PreferenceBatch",
  ),
  (
    lambda: jax.eval_shape(make_dpo_step(TINY, _opt()), _state(), {}),
    "the batch must be of type PreferenceBatch, got dict",
  ),
  (
    lambda: jax.eval_shape(
      make_reward_model_step(TINY, _opt()),
      _state(),
      SFTBatch(*_rows(2, 3), *_rows(2, 4)),
    ),
    "the batch must be of type PreferenceBatch, got SFTBatch (loss_type=",
  ),
  (
    lambda: jax.eval_shape(
      make_kto_step(TINY, _opt()),
      _state(),
      PreferenceBatch(*_rows(0, 3), *_rows(0, 4), *_rows(0, 4)),
    ),
    "the batch must be of type UnpairedBatch, got PreferenceBatch",
  ),
  (
    lambda: _head_shapes(_rows(2, 3)),
    "the batch must be of type FeaturePairBatch, got tuple",
  ),
  (
    lambda: _head_shapes(FeaturePairBatch(*_features(2))),
    f"FeaturePairBatch.chosen shape (2,): expected [B, {TINY.hidden_size}]",
  ),
  (
    lambda: _head_shapes(FeaturePairBatch(*_features(0, TINY.hidden_size))),
    f"FeaturePairBatch.chosen shape (0, {TINY.hidden_size}): expected",
  ),
  (
    lambda: _head_shapes(FeaturePairBatch(*_features(3, 7))),
    f"FeaturePairBatch.chosen shape (3, 7): expected [B, {TINY.hidden_size}]",
  ),
  (
    lambda: _head_shapes(
      FeaturePairBatch([[1.0] * TINY.hidden_size], jnp.ones((1, 8)))
    ),
    "FeaturePairBatch.chosen: list; expected a float array [B, D]",
  ),
  (
    lambda: _head_shapes(
      FeaturePairBatch(
        jnp.ones((2, TINY.hidden_size), jnp.int32),
        jnp.ones((2, TINY.hidden_size)),
      )
    ),
    "FeaturePairBatch.chosen: dtype int32; expected a float array [B, D]",
  ),
  (
    lambda: _head_shapes(
      FeaturePairBatch(
        jnp.ones((3, TINY.hidden_size)), jnp.ones((2, TINY.hidden_size))
      )
    ),
    f"chosen (3, {TINY.hidden_size}) and rejected (2, {TINY.hidden_size}) "
    "must have one shape",
  ),
  # Arguments in another order, or an optimizer left uncalled, failed
  # later with an AttributeError of another object.
  (
    lambda: make_dpo_step(DPOConfig(), _opt(), TINY),
    "model_config must be a models.ModelConfig (models.load_hf_config), "
    "got DPOConfig",
  ),
  (
    lambda: make_dpo_step(TINY, _opt(), RewardModelConfig()),
    "config must be a DPOConfig, got RewardModelConfig",
  ),
  (
    lambda: make_dpo_step(TINY, optax.adam),
    "optimizer must be an optax GradientTransformation (e.g. "
    "optax.adam(1e-5)), got function",
  ),
  (
    lambda: make_ppo_step(TINY, _opt(), "adam", PPOConfig(0, 0)),
    "value_optimizer must be an optax GradientTransformation",
  ),
  # Accepted when built, a TypeError ("'int' object is not callable") when
  # the step was traced.
  (
    lambda: make_grpo_step(TINY, _opt(), GRPOConfig(0, 0), score_fn=3),
    "score_fn must be a function score_fn(frozen_reward, input_ids, "
    "attention_mask, response_mask) -> f32[B] (or None), got int",
  ),
  (
    lambda: make_ppo_step(TINY, _opt(), _opt(), PPOConfig(0, 0), score_fn=""),
    "score_fn must be a function",
  ),
  # "'str' object has no attribute 'update'".
  (
    lambda: apply_if_finite("adam", {}, {}, {}),
    "optimizer must be an optax GradientTransformation",
  ),
  # A critic's params were nested again: {"backbone": {"backbone": ...}}.
  (
    lambda: models.from_policy_params(
      {"backbone": {}, "head": {}}, TINY, jax.random.key(0)
    ),
    "policy_params already holds a 'backbone' and 'head'",
  ),
  # A string for a number was a TypeError of a comparison.
  (
    lambda: make_dpo_step(TINY, _opt(), DPOConfig(beta="0.1")),
    "DPOConfig: beta='0.1': expected > 0",
  ),
  # cliprange is the lower clip too unless cliprange_low is set; 1.5
  # failed only when the step was traced.
  (
    lambda: make_ppo_step(TINY, _opt(), _opt(), PPOConfig(0, 0, cliprange=1.5)),
    "cliprange=1.5: expected < 1 while cliprange_low is unset",
  ),
  (
    lambda: make_grpo_update(TINY, _opt(), GRPOConfig(0, 0, cliprange=1.0)),
    "cliprange=1.0: expected < 1 while cliprange_low is unset",
  ),
  # None passed the build and failed in the trace; 1 is not True.
  (
    lambda: make_ppo_step(TINY, _opt(), _opt(), PPOConfig(0, None)),
    "pad_token_id=None: expected an integer >= 0",
  ),
  (
    lambda: make_ppo_step(
      TINY, _opt(), _opt(), PPOConfig(0, 0, normalize_reward=1)
    ),
    "normalize_reward=1: expected True or False",
  ),
  (
    lambda: make_grpo_update(TINY, _opt(), GRPOConfig(None, 0)),
    "eos_token_id=None: expected an integer >= 0",
  ),
  # Rollout helpers: an AttributeError, a jax axis error, an empty result.
  (
    lambda: generate(
      {},
      *_rows(1, 2),
      jax.random.key(0),
      config=None,
      max_new_tokens=1,
      eos_token_id=1,
      pad_token_id=0,
    ),
    "config must be a models.ModelConfig, got NoneType",
  ),  # fmt: skip
  (
    lambda: response_mask_from_ids(_rows(1, 2)[0], eos_token_id=None),
    "eos_token_id must be an integer, got None",
  ),
  (
    lambda: row_rngs(jax.random.key(0), -1),
    "batch must be an integer >= 1, got -1",
  ),
  # An embedding of another V passed: a tied head sampled ids past the
  # tokenizer's.
  (
    lambda: models.check_params(
      {
        **models.init_params(TINY, jax.random.key(0)),
        "embed": jnp.zeros((2 * TINY.vocab_size, TINY.hidden_size)),
      },
      TINY,
    ),
    f"params['embed'] has shape ({2 * TINY.vocab_size}, "
    f"{TINY.hidden_size}): expected [vocab_size, hidden_size] = "
    f"[{TINY.vocab_size}, {TINY.hidden_size}] of the config",
  ),
  # eos 2.5 matched no token, so every response was penalised.
  (
    lambda: kl.apply_missing_eos_penalty(
      jnp.zeros(2), *_rows(2, 3), eos_token_id=2.5, penalty=1.0
    ),
    "eos_token_id must be an integer, got 2.5",
  ),
  (
    lambda: kl.apply_missing_eos_penalty(
      jnp.zeros(2), *_rows(2, 3), eos_token_id=np.array(1.5), penalty=1.0
    ),
    "eos_token_id must be an integer, got array(1.5)",
  ),
  # The decode layout's head is read without flax's shape check: logits
  # of another width were sampled.
  (
    lambda: models.check_params(
      {
        **models.unstack_layers(
          models.init_params(TINY, jax.random.key(0)),
          TINY,
          transpose_min_size=0,
        ),
        "lm_head_t": jnp.zeros((2 * TINY.vocab_size, TINY.hidden_size)),
      },
      TINY,
    ),
    f"params['lm_head_t'] has shape ({2 * TINY.vocab_size}, "
    f"{TINY.hidden_size}): expected [vocab_size, hidden_size]",
  ),
  (
    lambda: kl.apply_missing_eos_penalty(
      jnp.zeros(2),
      jnp.ones((2, 3)),
      jnp.ones((2, 3), bool),
      eos_token_id=2,
      penalty=1.0,
    ),
    "response_ids must hold integers, got dtype float32",
  ),
]


@pytest.mark.parametrize(
  "call, message", LIBRARY_CASES, ids=[m for _, m in LIBRARY_CASES]
)
def test_library_misuse_raises_a_named_error(call, message):
  with pytest.raises((ValueError, TypeError)) as info:
    call()
  assert message in str(info.value), str(info.value)


def _two_pairs():
  return PreferenceBatch(*_rows(2, 3), *_rows(2, 4), *_rows(2, 4))


def _grpo_update_args():
  """(make_grpo_update's update, GRPOSamples, scores) of 2 prompts x 2."""
  rollout = make_grpo_rollout(TINY, _GRPO)
  samples = jax.eval_shape(rollout, _state(), PromptBatch(*_rows(2, 3)), None)
  return make_grpo_update(TINY, _opt(), _GRPO), samples, jnp.zeros(4)


_PPO = PPOConfig(0, 0, max_new_tokens=2, num_minibatches=1)
_GRPO = GRPOConfig(0, 0, group_size=2, max_new_tokens=2, kl_penalty="off")
# (step, its batch and further arguments, the state type it takes).
STEPS_AND_STATES = {
  "sft": (make_sft_step(TINY, _opt()), (SFTBatch(*_rows(2, 3), *_rows(2, 4)),)),
  "rm": (make_reward_model_step(TINY, _opt()), (_two_pairs(),)),
  "dpo": (make_dpo_step(TINY, _opt()), (_two_pairs(),)),
  "kto": (
    make_kto_step(TINY, _opt()),
    (UnpairedBatch(*_rows(2, 3), *_rows(2, 4), jnp.array([True, False])),),
  ),
  "ppo": (
    make_ppo_step(TINY, _opt(), _opt(), _PPO),
    (PromptBatch(*_rows(2, 3)), None),
  ),
  "grpo": (
    make_grpo_step(TINY, _opt(), _GRPO),
    (PromptBatch(*_rows(2, 3)), None),
  ),
  "grpo_rollout": (
    make_grpo_rollout(TINY, _GRPO),
    (PromptBatch(*_rows(2, 3)), None),
  ),
  "head": (make_head_step(TINY, _opt()), (FeaturePairBatch(*_features(2, 8)),)),
}


@pytest.mark.parametrize("name", [*STEPS_AND_STATES, "grpo_update"])
@pytest.mark.parametrize("state", ["params", "other_state", "none"])
def test_a_step_names_a_state_of_another_type(name, state):
  """The params dict as the state was "'dict' object has no attribute
  'params'"; a TrainState for PPO's state an AttributeError too."""
  if name == "grpo_update":
    step, *rest = _grpo_update_args()
  else:
    step, rest = STEPS_AND_STATES[name]
  kind = "PPOState" if name == "ppo" else "TrainState"
  params = models.init_params(TINY, jax.random.key(0))
  given = {
    "params": params,
    "other_state": (
      _state()
      if name == "ppo"
      else init_ppo_state(
        params,
        models.from_policy_params(params, TINY, jax.random.key(1)),
        _opt(),
        _opt(),
        jax.random.key(0),
        _PPO,
      )
    ),
    "none": None,
  }[state]
  got = {"params": "dict", "none": "NoneType"}.get(state)
  got = got or ("TrainState" if name == "ppo" else "PPOState")
  made = {
    "TrainState": "train.TrainState.create(params, optimizer, rng)",
    "PPOState": "train.init_ppo_state",
  }[kind]
  with pytest.raises(TypeError) as e:
    jax.eval_shape(step, given, *rest)
  assert str(e.value) == (
    f"the state must be a {kind} (made by {made}), got {got}"
  )


def test_the_head_step_names_params_that_are_no_head():
  """An LM's or a reward model's params in the state were flax's
  "Could not find parameter named "kernel"" from inside the head."""
  params = models.init_params(TINY, jax.random.key(0))
  rm = models.from_policy_params(params, TINY, jax.random.key(1))
  step = make_head_step(TINY, _opt())
  batch = FeaturePairBatch(*_features(2, TINY.hidden_size))
  jax.eval_shape(step, TrainState.create(rm["head"], _opt(), _key()), batch)
  for given, hint in (
    (rm, "; these are a reward model's: pass params['head']"),
    (params, "; these are an LM's: the head step trains a head on its"),
  ):
    state = TrainState.create(given, _opt(), _key())
    with pytest.raises(ValueError) as e:
      jax.eval_shape(step, state, batch)
    assert str(e.value).startswith(
      f"the head params hold {sorted(given)}: expected models.ScalarHead's "
      f"kernel and bias{hint}"
    )
  wide = {"kernel": jnp.zeros(3), "bias": jnp.zeros(())}
  with pytest.raises(ValueError) as e:
    jax.eval_shape(step, TrainState.create(wide, _opt(), _key()), batch)
  assert str(e.value) == (
    "the head params hold shapes {'kernel': (3,), 'bias': ()}: expected "
    f"kernel [{TINY.hidden_size}] (the backbone's hidden size) and bias []"
  )


def _key():
  return jax.random.key(0)


def test_configs_are_checked_when_the_step_is_built_not_traced():
  # The error comes from make_*_step itself: nothing was traced yet.
  config = dataclasses.replace(DPOConfig(), beta=-1.0)
  with pytest.raises(ValueError, match=r"^DPOConfig: beta=-1.0"):
    make_dpo_step(TINY, _opt(), config)


def test_forward_names_inputs_of_the_wrong_shape_or_dtype():
  # A [1, L] mask was broadcast over 2 rows; a [2, L-1] one failed inside
  # the attention ("mul got incompatible shapes"); 1-D ids an IndexError.
  config = TINY
  params = models.init_params(config, jax.random.key(0))
  ids, mask = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool)
  for args, message in (
    (
      (ids, mask[:1]),
      "attention_mask shape (1, 4): expected input_ids' (2, 4)",
    ),
    ((ids, mask[:, :3]), "attention_mask shape (2, 3): expected input_ids'"),
    ((ids[0], mask[0]), "input_ids shape (4,): expected [B, L]"),
    ((ids.astype(jnp.float32), mask), "input_ids dtype float32: expected int"),
    ((ids, mask.astype(jnp.float32)), "attention_mask dtype float32: expect"),
  ):
    with pytest.raises(ValueError, match=re.escape(message)):
      models.forward(params, *args, config=config)
  with pytest.raises(ValueError, match="position_ids shape"):
    models.forward(params, ids, mask, config=config, position_ids=ids[:, :2])
  # The other entry points check first too (a float mask was taken).
  rm = models.from_policy_params(params, config, jax.random.key(1))
  for fn, p in (
    (models.hidden_forward, params),
    (models.values_forward, rm),
    (models.reward_forward, rm),
  ):
    with pytest.raises(ValueError, match="attention_mask dtype float32"):
      fn(p, ids, mask.astype(jnp.float32), config=config)
    with pytest.raises(ValueError, match=re.escape("input_ids shape (4,)")):
      fn(p, ids[0], mask[0], config=config)
  assert models.forward(params, ids, mask, config=config).shape == (2, 4, 16)


def test_a_batch_larger_than_the_data_is_cut_and_said(capsys):
  """rm / dpo (feedback.train_batch_size) and kto say when --batch-size is
  cut to the training rows; a batch that fits is used as given, quietly."""
  from types import SimpleNamespace

  from rlhf_jax.stages import configs, kto
  from rlhf_jax.stages.feedback import train_batch_size

  checked = []
  placement = SimpleNamespace(
    is_primary=True, check_batch=lambda n, what: checked.append((n, what))
  )
  ctx = SimpleNamespace(placement=placement)
  prefs = {"train": [None] * 5}
  assert train_batch_size(ctx, 4, prefs, "--dpo.batch-size") == 4
  assert capsys.readouterr().out == "" and checked == []
  assert train_batch_size(ctx, 16, prefs, "--dpo.batch-size") == 5
  assert capsys.readouterr().out == (
    "dpo: --dpo.batch-size 16 is more than the 5 training pairs; each step "
    "takes 5\n"
  )
  assert checked == [(5, "--dpo.batch-size (cut to the 5 training pairs)")]
  # KTO: batches hold an even number of rows.
  lines = []
  config = configs.KTOStageConfig(batch_size=32)
  assert kto._batch_size(config, placement, 5, lines.append) == 4
  assert lines == [
    "kto: --batch-size 32 is more than the 4 usable rows (of 5); each step "
    "takes 4"
  ]


@pytest.mark.parametrize("temperature", [0.0, 1e-30, 0.0099])
def test_rl_configs_share_the_temperature_floor(temperature):
  # PPO and GRPO configs, and the CLI's --sampling.temperature, take one
  # floor: at 1e-30 a PPO run skipped every update (NaN gradients).
  from rlhf_jax.train import GRPOConfig  # noqa: PLC0415

  expected = "expected >= 0.01 (logprobs and their gradients scale"
  for config in (
    PPOConfig(0, 0, temperature=temperature),
    GRPOConfig(0, 0, temperature=temperature),
  ):
    (problem,) = config_problems(config)
    assert problem.startswith(f"temperature={temperature!r}: {expected}")
  assert config_problems(PPOConfig(0, 0, temperature=0.01)) == []
  assert config_problems(GRPOConfig(0, 0, temperature=0.01)) == []


def test_ppo_step_builds_with_a_wide_upper_clip():
  # The control of the cliprange cases: an upper clip of 1.5 is allowed
  # where cliprange_low sets the lower one.
  make_ppo_step(
    TINY, _opt(), _opt(), PPOConfig(0, 0, cliprange=1.5, cliprange_low=0.2)
  )


def test_params_of_another_model_are_named():
  """An LM's params are checked against the config at trace time: a
  reward model's {backbone, head}, another depth, an lm_head the config
  does not have or an entry the model has no parameter for failed inside
  flax or ran without an error."""
  params = models.init_params(TINY, jax.random.key(0))
  rm = models.from_policy_params(params, TINY, jax.random.key(1))
  deeper = dataclasses.replace(TINY, num_layers=2)
  assert not TINY.tie_word_embeddings  # its params hold an lm_head
  tied = dataclasses.replace(TINY, tie_word_embeddings=True)
  ids, mask = _rows(2, 4)
  for p, config, message in (
    (rm, TINY, "params hold ['backbone', 'head']: expected an LM's embed, "
     "final_norm and layers; these are a reward or value model's"),
    ({"params": params}, TINY, "pass flax's variables['params'], not the"),
    ({**params, "layers_0": params["layers"]}, TINY,
     "both the stacked and the split layout"),
    ({k: v for k, v in params.items() if k != "final_norm"}, TINY,
     "expected an LM's embed, final_norm and layers"),
    (params, deeper, "params hold [1] layers, the config 2"),
    (params, tied,
     "params hold an lm_head, but the config's tie_word_embeddings is True"),
    (models.init_params(tied, jax.random.key(0)), TINY,
     "params hold no lm_head, but the config's tie_word_embeddings is False"),
    ({**params, "value_head": params["final_norm"]}, TINY,
     "params hold ['value_head'] beside the LM's entries: not a parameter"),
    ({**params, "pos_embed": params["embed"]}, TINY,  # GPT-2's, not Llama's
     "params hold ['pos_embed'] beside the LM's entries"),
    ({**models.unstack_layers(params, TINY), "layers_x": params["embed"]},
     TINY, "params hold ['layers_x'] beside the LM's entries"),
  ):  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
      models.forward(p, ids, mask, config=config)
  # And the other way: an LM's params where a scalar model's go.
  for fn in (models.reward_forward, models.values_forward):
    with pytest.raises(ValueError, match="expected a reward or value model"):
      fn(params, ids, mask, config=TINY)
  # A DPO step with the reward model's params as its reference.
  batch = PreferenceBatch(*_rows(2, 3), *_rows(2, 4), *_rows(2, 4))
  step = make_dpo_step(TINY, _opt())
  with pytest.raises(ValueError, match=r"params hold \['backbone', 'head'\]"):
    jax.eval_shape(step, _state(), batch, rm)
  jax.eval_shape(step, _state(), batch, params)  # the control


def test_narrow_id_dtypes_embed_as_int32():
  """int16 ids with V = 40000 (V does not fit int16) were all taken for
  ids outside [0, V) and embedded from a wrong row."""
  wide = dataclasses.replace(TINY, vocab_size=40000)
  params = models.init_params(wide, jax.random.key(0))
  ids = jnp.array([[1, 2, 39999 - 20000]])
  mask = jnp.ones((1, 3), bool)
  want = models.forward(params, ids.astype(jnp.int32), mask, config=wide)
  got = models.forward(params, ids.astype(jnp.int16), mask, config=wide)
  np.testing.assert_array_equal(got, want)
  assert np.isfinite(want).all()


@pytest.mark.parametrize("bad", [-1, -100, TINY.vocab_size])
def test_a_token_id_outside_the_vocabulary_skips_the_step(bad):
  """A real token's id outside [0, V): -1 or -100 (Hugging Face's label
  pad) read the embedding of id + V and trained on a wrong finite loss;
  now its row is NaN and the step skips the update, counted. The same
  ids in pad slots are never read: the loss of pad id 0."""
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % TINY.vocab_size
  mask = jnp.ones((2, 6), bool)
  pad = jnp.broadcast_to(jnp.arange(6) >= 4, (2, 6))
  prompt = _rows(2, 3)
  step = jax.jit(make_sft_step(TINY, _opt()))
  state = _state()
  # SFT: a real response token (the last: a target, not an input).
  real = SFTBatch(*prompt, ids.at[1, 5].set(bad), mask)
  new, m = step(state, real)
  assert np.isnan(m["sft/loss"]) and m["train/skipped"] == 1
  for a, b in zip(
    *map(jax.tree.leaves, (new.params, state.params)), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  padded = [
    step(state, SFTBatch(*prompt, jnp.where(pad, v, ids), ~pad & mask))[1]
    for v in (0, bad)
  ]
  assert np.isfinite(padded[0]["sft/loss"]) and padded[1]["train/skipped"] == 0
  assert padded[0]["sft/loss"] == padded[1]["sft/loss"]
  # DPO (prompt and responses packed in one row): a prompt token.
  dpo = jax.jit(make_dpo_step(TINY, _opt()))
  params = models.init_params(TINY, jax.random.key(1))
  p_ids = prompt[0].at[0, 2].set(bad)
  batch = PreferenceBatch(p_ids, prompt[1], ids, mask, ids[::-1], mask)
  _, m = dpo(state, batch, params)
  assert np.isnan(m["dpo/loss"]) and m["train/skipped"] == 1


def test_frozen_params_a_step_needs_are_named():
  """PPO's and GRPO's frozen dict: a missing entry was a KeyError or a
  TypeError inside the reward model."""
  params = models.init_params(TINY, jax.random.key(0))
  rm = models.from_policy_params(params, TINY, jax.random.key(1))
  prompts = PromptBatch(*_rows(2, 3))
  ppo = make_ppo_step(
    TINY, _opt(), _opt(), PPOConfig(0, 0, max_new_tokens=2, num_minibatches=1)
  )
  state = init_ppo_state(
    params, rm, _opt(), _opt(), jax.random.key(0), PPOConfig(0, 0)
  )
  with pytest.raises(ValueError, match=r"frozen\['reward'\] missing: pass"):
    jax.eval_shape(ppo, state, prompts, {"ref": params})
  with pytest.raises(ValueError, match=r"frozen\['ref'\], frozen\['reward'\]"):
    jax.eval_shape(ppo, state, prompts, {})
  with pytest.raises(TypeError, match="frozen must be a dict"):
    jax.eval_shape(ppo, state, prompts, [params, rm])
  jax.eval_shape(ppo, state, prompts, {"ref": params, "reward": rm})
  cfg = GRPOConfig(0, 0, group_size=2, max_new_tokens=2, kl_penalty="off")
  grpo = make_grpo_step(TINY, _opt(), cfg)
  gstate = init_grpo_state(params, _opt(), jax.random.key(0))
  with pytest.raises(ValueError, match=r"frozen\['reward'\] missing: with"):
    jax.eval_shape(grpo, gstate, prompts, {"ref": params})
  # With a score_fn and no KL term, nothing frozen is needed: None passes.
  score = lambda _, ids, attn, resp: resp.sum(-1).astype(jnp.float32)
  grpo = make_grpo_step(TINY, _opt(), cfg, score_fn=score)
  jax.eval_shape(grpo, gstate, prompts, None)
  # A misspelt key was ignored: the run had no reference and no KL term.
  with pytest.raises(ValueError) as e:
    jax.eval_shape(grpo, gstate, prompts, {"refference": params})
  assert str(e.value).startswith(
    "frozen holds ['refference']: expected only ['ref', 'reward'] (with a "
    "score_fn: pass frozen={'ref': reference LM params})"
  )
  rollout = make_grpo_rollout(TINY, cfg)  # as the CLI's GRPO stage calls it
  with pytest.raises(ValueError, match=r"frozen holds \['refference'\]"):
    jax.eval_shape(rollout, gstate, prompts, {"refference": params})
  # Scores as a list were "'list' object has no attribute 'shape'".
  samples = jax.eval_shape(make_grpo_rollout(TINY, cfg), gstate, prompts)
  update = make_grpo_update(TINY, _opt(), cfg)
  with pytest.raises(TypeError, match=r"scores must be an array f32\[4\]"):
    jax.eval_shape(update, gstate, samples, [0.0, 1.0, 2.0, 3.0])
  jax.eval_shape(update, gstate, samples, jnp.arange(4.0))


def test_reward_model_step_takes_the_batch_of_its_loss():
  params = models.init_params(TINY, jax.random.key(0))
  rm = models.from_policy_params(params, TINY, jax.random.key(1))
  state = TrainState.create(rm, _opt(), jax.random.key(0))
  pairs = PreferenceBatch(*_rows(2, 3), *_rows(2, 4), *_rows(2, 4))
  ranked_step = make_reward_model_step(
    TINY, _opt(), RewardModelConfig(loss_type="best_of_k")
  )
  with pytest.raises(
    TypeError,
    match=r"must be of type RankedBatch, got PreferenceBatch "
    r"\(loss_type='best_of_k'; loss_type='pairwise' takes the other batch",
  ):
    jax.eval_shape(ranked_step, state, pairs)
  ids, mask = _rows(2, 3)
  resp = jnp.ones((2, 3, 4), jnp.int32), jnp.ones((2, 3, 4), bool)
  for ranks, message in (
    (jnp.array([[0.0, 1.0, 2.0]] * 2), "ranks must hold integers, got dtype"),
    (jnp.array([[0, 1]] * 2), "ranks shape (2, 2): expected [B, K] = (2, 3)"),
  ):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
      jax.eval_shape(ranked_step, state, RankedBatch(ids, mask, *resp, ranks))
  jax.eval_shape(
    ranked_step,
    state,
    RankedBatch(ids, mask, *resp, jnp.array([[2, 0, 1]] * 2)),
  )
  pair_step = make_reward_model_step(TINY, _opt())
  with pytest.raises(TypeError, match=r"got RankedBatch \(loss_type='pair"):
    jax.eval_shape(
      pair_step, state, RankedBatch(ids, mask, *resp, jnp.zeros((2, 3), int))
    )


def test_dpo_reference_logprobs_given_or_not_as_configured():
  """precomputed_ref=True with one of the two said "...=()"; logprobs
  given with precomputed_ref=False were replaced without a word."""
  batch = PreferenceBatch(*_rows(2, 3), *_rows(2, 4), *_rows(2, 4))
  refs = jnp.zeros(2)
  step = make_dpo_step(TINY, _opt(), DPOConfig(precomputed_ref=True))
  with pytest.raises(ValueError) as e:
    jax.eval_shape(step, _state(), batch.replace(ref_chosen_logprobs=refs))
  # The first line: jax may add a note about its traceback below.
  assert str(e.value).splitlines()[0] == (
    "DPOConfig.precomputed_ref=True needs batch.ref_chosen_logprobs and "
    "batch.ref_rejected_logprobs; batch.ref_rejected_logprobs is None"
  )
  both = batch.replace(ref_chosen_logprobs=refs, ref_rejected_logprobs=refs)
  jax.eval_shape(step, _state(), both)
  params = models.init_params(TINY, jax.random.key(0))
  step = make_dpo_step(TINY, _opt())
  with pytest.raises(
    ValueError,
    match=r"batch\.ref_chosen_logprobs is given but DPOConfig\.precomputed",
  ):
    jax.eval_shape(step, _state(), both, params)
  jax.eval_shape(step, _state(), batch, params)
