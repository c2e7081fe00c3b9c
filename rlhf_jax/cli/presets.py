"""Named presets: functions returning a subcommand's config.

``PRESETS[subcommand][name]()`` is the starting config that command-line
flags then override. "default" is what ``rlhf-jax <subcommand>`` runs with
no arguments; "smoke" is a seconds-long version for tests; "hh-rlhf" (rm
only) is the Anthropic HH-RLHF reward-model job (cli/hh_rm.py).
"""

import dataclasses
from collections.abc import Callable

from rlhf_jax.stages import configs as C
from rlhf_jax.tasks import TASK_DATA
from rlhf_jax.train import KTOConfig, RewardModelConfig

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
  """The run's own samples per held-out prompt (needs --run-dir)."""
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


def hh_rlhf_smollm2_rm():
  """The HH-RLHF job on SmolLM2-135M-Instruct (scripts/setup_smollm2.py):
  chat-rendered pairs, frozen backbone, a mean-pooled head trained on
  features computed once (3000 train pairs; about half an hour on 2 CPU
  cores, most of it the one forward over every pair)."""
  from rlhf_jax.stages.hh_rm import HHRewardModelConfig

  return HHRewardModelConfig(
    backbone="smollm2",
    freeze_backbone=True,
    pooling="mean",
    max_prompt_length=64,
    max_response_length=64,
    max_train_pairs=3000,
    batch_size=64,
    epochs=20,
    learning_rate=3e-3,
    warmup_steps=20,
    eval_batch_size=32,
    log_every=20,
    checkpoint_every=200,
  )


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


def default_kto() -> C.KTOStageConfig:
  """--data FILE: KTO on its rows; without --data the accept-rate task at
  the sizes of "accept-rate"."""
  return accept_rate_kto(preset="default")


def accept_rate_kto(preset: str = "accept-rate") -> C.KTOStageConfig:
  """The accept-rate task (online KTO beside GRPO): minutes on 2 cores."""
  return C.KTOStageConfig(
    preset=preset,
    batch_size=32,
    learning_rate=5e-4,
    # Late in the loop rejections are rare (~20%): a heavier lambda_U
    # keeps them pushing (Ethayarajh et al. 2024: weight the rarer kind).
    loss=KTOConfig(beta=1.0, undesirable_weight=2.0),
    task=C.TaskConfig(sampled_stories=32),
    sampling=C.SamplingConfig(max_new_tokens=24, batch_size=64),
    eval=C.EvalStageConfig(samples_per_prompt=8),
    grpo=dataclasses.replace(C.GRPOStageConfig(), learning_rate=1e-3),
    accept=C.AcceptRateConfig(),
  )


def smoke_kto() -> C.KTOStageConfig:
  """Tiny sizes (seconds): --data or the accept-rate task."""
  return C.KTOStageConfig(
    preset="smoke",
    steps=3,
    batch_size=4,
    eval_every=2,
    checkpoint_every=2,
    max_prompt_length=32,
    max_response_length=16,
    task=C.TaskConfig(sampled_stories=8, eval_fraction=0.2),
    sampling=C.SamplingConfig(max_new_tokens=8, batch_size=16),
    eval=C.EvalStageConfig(samples_per_prompt=1, report_samples=2),
    # The GRPO arm makes one update per round: warm up over the first.
    grpo=C.GRPOStageConfig(warmup_steps=1),
    accept=C.AcceptRateConfig(
      calibration_samples=1,
      rounds=2,
      prompts_per_round=4,
      samples_per_prompt=2,
      eval_every=1,
    ),
  )


# ------------------------------------------------------------ SmolLM2


def _smollm2_base() -> C.PipelineConfig:
  """SmolLM2-135M-Instruct (scripts/setup_smollm2.py) with LoRA rank 8 on
  every projection, sized for minutes on 2 CPU cores."""
  from rlhf_jax.models.lora import LoraConfig
  from rlhf_jax.stages.environment import smollm2_dir

  return C.PipelineConfig(
    preset="smollm2",
    model=str(smollm2_dir()),
    lora=LoraConfig(rank=8, alpha=16.0),
    checkpoint_every=10,
    task=C.TaskConfig(max_prompt_length=64, eval_fraction=0.25),
    sampling=C.SamplingConfig(max_new_tokens=24, batch_size=32),
    max_response_length=48,
    eval=C.EvalStageConfig(samples_per_prompt=1, report_samples=4),
  )


def smollm2_dpo() -> C.PipelineConfig:
  """DPO with LoRA on HH-RLHF helpful-online pairs rendered with SmolLM2's
  chat template (held out: a tenth of the file)."""
  from rlhf_jax.stages.environment import SHARED_DATA

  return dataclasses.replace(
    _smollm2_base(),
    data=str(SHARED_DATA / "hh-rlhf" / "helpful-online-test.jsonl.gz"),
    dpo=C.DPOStageConfig(
      steps=30,
      batch_size=8,
      learning_rate=1e-3,
      warmup_steps=3,
      eval_every=15,
    ),
  )


def smollm2_grpo() -> C.PipelineConfig:
  """GRPO with LoRA on an instruct task: "Describe X in exactly N words."
  (rlhf_jax/tasks/data/word_count_prompts.jsonl), reward minus the distance
  to N words (rlhf_jax.tasks.rewards:word_count)."""
  return dataclasses.replace(
    _smollm2_base(),
    prompts=str(TASK_DATA / "word_count_prompts.jsonl"),
    reward=("rlhf_jax.tasks.rewards:word_count",),
    grpo=C.GRPOStageConfig(
      iterations=12,
      batch_size=4,
      learning_rate=5e-4,
      warmup_steps=1,
      eval_every=6,
      algo=dataclasses.replace(PIPELINE_GRPO.algo, group_size=4),
    ),
  )


def smollm2_sft() -> C.SFTConfig:
  """SFT with LoRA on the chosen replies of HH-RLHF helpful-online pairs
  (chat template applied; the loss is on the reply tokens only)."""
  from rlhf_jax.models.lora import LoraConfig
  from rlhf_jax.stages.environment import SHARED_DATA, smollm2_dir

  return C.SFTConfig(
    data=str(SHARED_DATA / "hh-rlhf" / "helpful-online-test.jsonl.gz"),
    preset="smollm2",
    model=str(smollm2_dir()),
    steps=30,
    batch_size=8,
    learning_rate=1e-3,
    max_prompt_length=64,
    max_response_length=48,
    checkpoint_every=10,
    lora=LoraConfig(rank=8, alpha=16.0),
  )


HH_PRESETS = ("hh-rlhf", "hh-rlhf-smoke", "hh-rlhf-smollm2")
PIPELINE_COMMANDS = C.PIPELINE_COMMANDS

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
PRESETS["kto"] = {
  "default": default_kto,
  "smoke": smoke_kto,
  "accept-rate": accept_rate_kto,
}
PRESETS["sft"]["smollm2"] = smollm2_sft
PRESETS["dpo"]["smollm2"] = smollm2_dpo
PRESETS["grpo"]["smollm2"] = smollm2_grpo
PRESETS["rm"]["hh-rlhf"] = hh_rlhf_rm
PRESETS["rm"]["hh-rlhf-smoke"] = hh_rlhf_smoke_rm
PRESETS["rm"]["hh-rlhf-smollm2"] = hh_rlhf_smollm2_rm


def default_audit() -> C.AuditConfig:
  """Audit --data (exact minimum FAS up to 16 responses per component)."""
  return C.AuditConfig()


PRESETS["audit"] = {"default": default_audit}
