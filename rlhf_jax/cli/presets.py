"""Named presets: functions returning a subcommand's config.

``PRESETS[subcommand][name]()`` is the starting config that command-line
flags then override. "default" is what ``rlhf-jax <subcommand>`` runs with
no arguments; "smoke" is a seconds-long version for tests; "hh-rlhf" (rm
only) is the Anthropic HH-RLHF reward-model job (cli/hh_rm.py).
"""

import dataclasses
from collections.abc import Callable

from rlhf_jax.stages import configs as C
from rlhf_jax.train import RewardModelConfig

# The algorithm settings the pipeline is tuned to (the rest are the
# library's defaults).
PIPELINE_RM_LOSS = RewardModelConfig(
  # A bag-of-features reward learns sentiment spread over the text from
  # far fewer pairs than the last token's features.
  pooling="mean",
  center_rewards_coef=0.01,
)
PIPELINE_PPO = dataclasses.replace(
  C.PPOStageConfig().algo,
  kl_coef=0.15,
  target_kl=5.0,
  kl_horizon=128,
  normalize_reward=True,
  ppo_epochs=2,
  num_minibatches=2,
)

PIPELINE_GRPO = C.GRPOStageConfig()


def default_pipeline() -> C.PipelineConfig:
  """The default "make TinyStories happier" run."""
  return C.PipelineConfig(
    rm=C.RewardStageConfig(loss=PIPELINE_RM_LOSS),
    ppo=C.PPOStageConfig(algo=PIPELINE_PPO),
  )


def smoke_pipeline() -> C.PipelineConfig:
  """Tiny sizes: every stage runs a handful of steps (seconds)."""
  return C.PipelineConfig(
    preset="smoke",
    checkpoint_every=2,
    tensorboard=True,
    task=C.TaskConfig(sampled_stories=8, eval_fraction=0.2),
    sampling=C.SamplingConfig(max_new_tokens=8, batch_size=16),
    feedback=C.FeedbackConfig(
      group_size=2, groups_per_prompt=1, eval_groups_per_prompt=2
    ),
    rm=C.RewardStageConfig(
      steps=4,
      batch_size=8,
      warmup_steps=1,
      eval_every=2,
      loss=PIPELINE_RM_LOSS,
    ),
    ppo=C.PPOStageConfig(
      iterations=6,
      batch_size=8,
      warmup_steps=1,
      eval_every=3,
      algo=dataclasses.replace(PIPELINE_PPO, kl_horizon=64),
    ),
    dpo=C.DPOStageConfig(steps=4, batch_size=8, warmup_steps=1, eval_every=2),
    eval=C.EvalStageConfig(samples_per_prompt=1, report_samples=2),
  )


def _named(fn: Callable[[], C.PipelineConfig], name: str):
  def preset() -> C.PipelineConfig:
    return dataclasses.replace(fn(), preset=name)

  preset.__doc__ = fn.__doc__
  return preset


def default_sft() -> C.SFTConfig:
  """SFT needs --data; these are its sizes."""
  return C.SFTConfig(data="")


def smoke_sft() -> C.SFTConfig:
  """A few tiny steps."""
  return C.SFTConfig(
    data="",
    preset="smoke",
    steps=3,
    batch_size=4,
    max_prompt_length=32,
    max_response_length=16,
    checkpoint_every=2,
  )


def default_generate() -> C.GenerateConfig:
  """Sample 48 tokens per prompt at temperature 1."""
  return C.GenerateConfig()


def smoke_generate() -> C.GenerateConfig:
  """Short samples."""
  return C.GenerateConfig(preset="smoke", max_new_tokens=8)


def default_eval() -> C.EvalConfig:
  """Two samples per held-out prompt (needs --run-dir)."""
  return C.EvalConfig(run_dir="")


def smoke_eval() -> C.EvalConfig:
  """One sample per held-out prompt."""
  return C.EvalConfig(run_dir="", preset="smoke", samples_per_prompt=1)


def default_export() -> C.ExportConfig:
  """Export the PPO policy (needs --run-dir and --out)."""
  return C.ExportConfig(run_dir="", out="")


def hh_rlhf_rm():
  """The HH-RLHF reward-model job (returns stages.hh_rm.HHRewardModelConfig)."""
  from rlhf_jax.stages.hh_rm import HHRewardModelConfig

  return HHRewardModelConfig()


def hh_rlhf_smoke_rm():
  """The HH-RLHF job at toy size (tiny model, 64 pairs; for tests)."""
  from rlhf_jax.stages.hh_rm import HHRewardModelConfig

  return HHRewardModelConfig.smoke()


def default_grpo() -> C.PipelineConfig:
  """GRPO on the task's prompts with the VADER sentiment as a plain-Python
  reward (rlhf_jax.tasks.rewards:sentiment)."""
  return dataclasses.replace(default_pipeline(), grpo=PIPELINE_GRPO)


def smoke_grpo() -> C.PipelineConfig:
  """GRPO at toy size (seconds)."""
  return dataclasses.replace(
    smoke_pipeline(),
    grpo=C.GRPOStageConfig(
      iterations=4,
      batch_size=4,
      warmup_steps=1,
      eval_every=2,
      algo=dataclasses.replace(PIPELINE_GRPO.algo, group_size=4),
    ),
  )


HH_PRESETS = ("hh-rlhf", "hh-rlhf-smoke")
PIPELINE_COMMANDS = ("run", "rm", "ppo", "dpo", "grpo")

PRESETS: dict[str, dict[str, Callable]] = {
  **{
    cmd: {"default": default_pipeline, "smoke": _named(smoke_pipeline, "smoke")}
    for cmd in PIPELINE_COMMANDS
  },
  "sft": {"default": default_sft, "smoke": smoke_sft},
  "generate": {"default": default_generate, "smoke": smoke_generate},
  "eval": {"default": default_eval, "smoke": smoke_eval},
  "export": {"default": default_export},
}
PRESETS["grpo"] = {
  "default": default_grpo,
  "smoke": _named(smoke_grpo, "smoke"),
}
PRESETS["rm"]["hh-rlhf"] = hh_rlhf_rm
PRESETS["rm"]["hh-rlhf-smoke"] = hh_rlhf_smoke_rm
