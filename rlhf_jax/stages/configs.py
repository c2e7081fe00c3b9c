"""Typed, frozen configs of the `rlhf-jax` subcommands (parsed by tyro).

Every setting is declared once, with its meaning in the docstring under
the field (``rlhf-jax <subcommand> --help`` prints them): the stage's own
settings here, the algorithm's in the library config a stage holds
(``--rm.loss.*`` is ``train.RewardModelConfig``, ``--dpo.loss.*``
``train.DPOConfig``, ``--ppo.algo.*`` ``train.PPOConfig``), with the
library's defaults; presets set the values a pipeline is tuned to. Presets
(presets.py) are functions returning instances of these classes; the
command line overrides single fields (``--ppo.iterations 20``).

Stage configs live beside the stages that read them (the CLI only parses
them); the mesh options (``--mesh.data`` ...) are the runner's
``MeshConfig``. ``PipelineConfig`` drives ``run`` (the whole pipeline) and
the stage subcommands ``rm``, ``ppo`` and ``dpo`` (which run the stages
they need of the same pipeline); ``SFTConfig``, ``GenerateConfig``,
``EvalConfig`` and ``ExportConfig`` drive the other subcommands.
"""

import dataclasses
from typing import Literal

from rlhf_jax.models.lora import LoraConfig
from rlhf_jax.runner.mesh import DistributedConfig, MeshConfig
from rlhf_jax.train import DPOConfig, KTOConfig, PPOConfig, RewardModelConfig
from rlhf_jax.train.grpo_config import GRPOConfig

# Fields of the library configs the stages fill in themselves (the
# tokenizer's ids, the --sampling group): not command-line options.
FROM_TOKENIZER = -1
DERIVED_FIELDS = {
  ("rm", "loss"): ("loss_type", "axis_name"),
  ("dpo", "loss"): ("precomputed_ref", "axis_name"),
  ("ppo", "algo"): (
    "eos_token_id",
    "pad_token_id",
    "max_new_tokens",
    "temperature",
    "exact_sampling",
    "axis_name",
  ),
  ("grpo", "algo"): (
    "eos_token_id",
    "pad_token_id",
    "max_new_tokens",
    "temperature",
    "exact_sampling",
    "axis_name",
  ),
}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Prompts of the "make TinyStories happier" task."""

  sampled_stories: int = 96
  """Stories sampled from the initial policy (from BOS alone) whose opening
  words become extra prompts, beside tasks.STORY_OPENINGS."""
  prefix_min_words: int = 3
  """Shortest prompt cut from a sampled story, in words."""
  prefix_max_words: int = 8
  """Longest prompt cut from a sampled story, in words."""
  eval_fraction: float = 0.25
  """Fraction of prompts held out for evaluation (never trained on)."""
  max_prompt_length: int = 24
  """P: prompt tokens (BOS included); a longer task prompt is an error, a
  longer --data / --prompts prompt keeps its last P tokens (counted)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How continuations are sampled (feedback, PPO rollouts, evaluation)."""

  max_new_tokens: int = 32
  """T: response tokens per continuation (EOS included)."""
  temperature: float = 1.0
  """Sampling temperature, >= 0.01 (also used for training logprobs)."""
  batch_size: int = 64
  """Rows per sampling call outside PPO (one compiled shape)."""
  exact_sampling: bool = False
  """PPO/GRPO rollouts with the training forward instead of the KV cache: the
  sampler/trainer logprob mismatch is exactly 0 (with the cache it is
  float32 rounding), at one full forward per new token."""


@dataclasses.dataclass(frozen=True)
class FeedbackConfig:
  """Simulated human feedback on pairs of continuations."""

  group_size: int = 4
  """Continuations sampled together for one prompt; the annotator labels
  every pair among them (K (K - 1) / 2 pairs per group)."""
  groups_per_prompt: int = 20
  """Groups per training prompt (reward-model and DPO data). Sampling is
  cheap; with fewer pairs the reward model overfits."""
  eval_groups_per_prompt: int = 4
  """Groups per held-out prompt (reward-model held-out accuracy)."""
  annotator_beta: float = 20.0
  """Bradley-Terry inverse temperature of the simulated annotator on the
  VADER gold score: P(a > b) = sigmoid(beta * (g_a - g_b)); lower = noisier
  labels, inf = the noiseless gold order."""


@dataclasses.dataclass(frozen=True)
class RewardStageConfig:
  """Reward-model training (Bradley-Terry loss, Ouyang et al. 2022 eq. 1)."""

  steps: int = 112
  """Optimizer steps."""
  batch_size: int = 64
  """Pairs per step."""
  learning_rate: float = 3e-3
  """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
  warmup_steps: int = 10
  """Linear warmup steps."""
  weight_decay: float = 0.0
  """AdamW decoupled weight decay."""
  max_grad_norm: float = 1.0
  """Global-norm gradient clipping."""
  eval_every: int = 28
  """Steps between held-out accuracy evaluations (and at the end)."""
  loss: RewardModelConfig = RewardModelConfig()
  """The loss (rlhf_jax.train.RewardModelConfig; PPO scores with the same
  pooling)."""


@dataclasses.dataclass(frozen=True)
class PPOStageConfig:
  """PPO against the reward model with an adaptive KL penalty."""

  iterations: int = 24
  """RLHF iterations (each: sample, score, GAE, PPO epochs)."""
  batch_size: int = 32
  """Prompts per iteration."""
  learning_rate: float = 2e-4
  """Policy Adam learning rate (constant after warmup)."""
  value_learning_rate: float = 1e-3
  """Critic Adam learning rate."""
  warmup_steps: int = 4
  """Optimizer updates of linear warmup."""
  max_grad_norm: float = 1.0
  """Global-norm gradient clipping (policy and critic)."""
  eval_every: int = 6
  """Iterations between held-out evaluations (and at the end)."""
  algo: PPOConfig = PPOConfig(
    eos_token_id=FROM_TOKENIZER, pad_token_id=FROM_TOKENIZER
  )
  """The RLHF iteration (rlhf_jax.train.PPOConfig): KL penalty and its
  controller, GAE, clipping, epochs. Token ids, max_new_tokens, temperature
  and exact_sampling come from the tokenizer and --sampling.*."""


@dataclasses.dataclass(frozen=True)
class GRPOStageConfig:
  """Critic-free RL (GRPO, Dr. GRPO, RLOO) against --reward functions."""

  iterations: int = 30
  """Iterations (each: sample G per prompt, score on the host, update)."""
  batch_size: int = 8
  """Prompts per iteration (x algo.group_size sampled rows)."""
  learning_rate: float = 5e-4
  """Policy Adam learning rate (constant after warmup)."""
  warmup_steps: int = 2
  """Optimizer updates of linear warmup."""
  max_grad_norm: float = 1.0
  """Global-norm gradient clipping."""
  eval_every: int = 10
  """Iterations between held-out evaluations (and at the end)."""
  algo: GRPOConfig = GRPOConfig(
    eos_token_id=FROM_TOKENIZER, pad_token_id=FROM_TOKENIZER
  )
  """The iteration (rlhf_jax.train.GRPOConfig): advantage estimator, KL
  penalty, clipping, epochs. Token ids, max_new_tokens and temperature come
  from the tokenizer and --sampling.*."""


@dataclasses.dataclass(frozen=True)
class DPOStageConfig:
  """DPO on the same preference pairs (Rafailov et al. 2023)."""

  steps: int = 70
  """Optimizer steps (70 x 32 pairs ends near PPO's KL, for the matched-KL
  comparison)."""
  batch_size: int = 32
  """Pairs per step."""
  learning_rate: float = 5e-4
  """Adam learning rate (linear warmup, then constant)."""
  warmup_steps: int = 5
  """Linear warmup steps."""
  max_grad_norm: float = 1.0
  """Global-norm gradient clipping."""
  eval_every: int = 10
  """Steps between held-out evaluations (and at the end)."""
  loss: DPOConfig = DPOConfig()
  """The loss (rlhf_jax.train.DPOConfig: beta, loss_type, ...)."""


@dataclasses.dataclass(frozen=True)
class EvalStageConfig:
  """Evaluation of policies on the held-out prompts."""

  samples_per_prompt: int = 2
  """Continuations per held-out prompt (pair i of two policies shares its
  prompt and random key)."""
  report_samples: int = 6
  """Sample stories shown in report.md."""


# The subcommands whose runs hold a PipelineConfig (config.json "command").
PIPELINE_COMMANDS = ("run", "rm", "ppo", "dpo", "grpo")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The pipeline "make TinyStories happier" (Ziegler et al. 2019,
  sentiment task): prompts -> simulated feedback -> reward model -> PPO and
  DPO -> evaluation -> report.md; each subcommand runs the stages it needs
  (grpo: prompts -> initial evaluation -> GRPO against the --reward
  functions -> report.md)."""

  preset: str = "default"
  """Named preset the other defaults come from (listed above the options)."""
  model: str | None = None
  """Policy/reference checkpoint (HF directory). Default: $RLHF_JAX_MODEL_DIR,
  else ../shared/data/models/tinystories-656k next to the repository."""
  run_dir: str | None = None
  """Output directory. Default: runs/<subcommand>-<preset>."""
  resume: bool = False
  """Continue the run in run_dir from its checkpoints."""
  overwrite: bool = False
  """Delete an existing run in run_dir and start again."""
  seed: int = 0
  """Seed of every random choice (prompts, samples, labels, init, order)."""
  dry_run: bool = False
  """Build every training step on the mesh without weights, compile it
  ahead of time, print per-device memory and FLOPs, and stop (reads only
  the model's config.json)."""
  data: str | None = None
  """rm/dpo: preference file (.jsonl, .jsonl.gz, .parquet; explicit, HH-RLHF
  or conversational rows) to train on instead of the simulated feedback."""
  eval_data: str | None = None
  """rm/dpo with --data: held-out preference file (default: a tenth of
  --data, at least one pair)."""
  prompts: str | None = None
  """ppo, grpo: prompt file (.jsonl, .jsonl.gz, .parquet; plain or
  conversational prompts, or any rows with a prompt) instead of the task's
  prompts; ppo needs --reward-model; grpo passes the other fields of
  {prompt, ...} rows to the --reward functions as columns (of pairs or
  {prompt, completion} rows only the prompt is read)."""
  reward: tuple[str, ...] = ()
  """grpo: reward functions as module:function (an importable module or a
  .py file path before the colon), several after one flag, each called as
  fn(prompts, completions, **columns) -> list[float | None] on the host
  (None: not applicable to that row); their weighted sum is the reward.
  Default: the task's VADER sentiment (rlhf_jax.tasks.rewards:sentiment)."""
  reward_weights: tuple[float, ...] = ()
  """grpo: one weight per --reward function (default: all 1)."""
  reward_model: str | None = None
  """ppo: a reward model (a `rlhf-jax rm` run directory or its export)
  instead of training one on the task's simulated feedback."""
  strict: bool = False
  """Raise on droppable data rows instead of dropping and counting them."""
  max_response_length: int = 48
  """T of --data responses (longer ones are cut from the right, counted)."""
  data_max_dropped_frac: float = 0.5
  """Stop before training when more than this fraction of the rows of
  --data, --eval-data or --prompts is dropped (counted per reason in
  summary.json and report.md), pairs whose chosen and rejected tokenize
  identically (or once cut to --max-response-length) included; 1 never
  stops."""
  checkpoint_every: int = 10
  """Steps between in-stage checkpoints (and on SIGINT)."""
  keep_checkpoints: int = 2
  """Checkpoints kept per stage (the latest ones); --resume falls back to an
  older one when the latest is damaged."""
  max_skipped_fraction: float = 0.5
  """Stop a stage (keeping its last good checkpoint) once more than this
  fraction of its updates so far were skipped for non-finite loss or
  gradients (checked from the 4th step on; 1 = never stop)."""
  tensorboard: bool = True
  """Also write TensorBoard event files."""
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedConfig = DistributedConfig()
  task: TaskConfig = TaskConfig()
  sampling: SamplingConfig = SamplingConfig()
  feedback: FeedbackConfig = FeedbackConfig()
  rm: RewardStageConfig = RewardStageConfig()
  ppo: PPOStageConfig = PPOStageConfig()
  dpo: DPOStageConfig = DPOStageConfig()
  grpo: GRPOStageConfig = GRPOStageConfig()
  eval: EvalStageConfig = EvalStageConfig()
  lora: LoraConfig = LoraConfig()
  """LoRA on the trained policy (PPO, DPO, GRPO; Hu et al. 2021):
  --lora.rank > 0 trains adapters on a frozen base, whose reference is the
  base itself (adapters off); exports are merged HF models plus
  outputs/<policy>/adapter/. The reward model and the PPO critic stay fully
  trained."""


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Supervised fine-tuning on demonstrations from a file."""

  data: str
  """Demonstration file (.jsonl/.jsonl.gz/.parquet): {prompt, completion}
  rows (with an optional label: false rows are left out), {messages}
  conversations (the last assistant message is the target; the model's
  chat template renders them), or preference rows (the chosen response is
  the target)."""
  preset: str = "default"
  """Named preset."""
  model: str | None = None
  """Initial checkpoint (as for `run`)."""
  run_dir: str | None = None
  """Output directory. Default: runs/sft-<preset>."""
  dry_run: bool = False
  """Build the SFT step on the mesh without weights, compile it ahead of
  time, print per-device memory and FLOPs, and stop (needs no --data)."""
  resume: bool = False
  """Continue from the run's checkpoints."""
  overwrite: bool = False
  """Delete an existing run in run_dir and start again."""
  seed: int = 0
  """Seed of the data order."""
  strict: bool = False
  """Raise on droppable rows instead of dropping them."""
  data_max_dropped_frac: float = 0.5
  """Stop before training when more than this fraction of the rows of
  --data is dropped (counted per reason in summary.json and report.md);
  1 never stops."""
  max_prompt_length: int = 64
  """P (longer prompts keep their last P tokens, counted)."""
  max_response_length: int = 64
  """T (longer responses are cut from the right, counted)."""
  steps: int = 100
  """Optimizer steps."""
  batch_size: int = 16
  """Examples per step."""
  learning_rate: float = 1e-4
  """Adam learning rate."""
  checkpoint_every: int = 50
  """Steps between checkpoints."""
  keep_checkpoints: int = 2
  """Checkpoints kept (the latest ones); --resume falls back to an older
  one when the latest is damaged."""
  max_skipped_fraction: float = 0.5
  """Stop (keeping the last good checkpoint) once more than this fraction
  of the steps so far were skipped for non-finite loss or gradients
  (checked from the 4th step on; 1 = never stop)."""
  tensorboard: bool = True
  """Also write TensorBoard event files."""
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedConfig = DistributedConfig()
  lora: LoraConfig = LoraConfig()
  """LoRA (Hu et al. 2021): --lora.rank > 0 trains adapters on a frozen
  base; the export is the merged HF model plus outputs/sft/adapter/."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Sample continuations of prompts from a policy."""

  prompts: tuple[str, ...] | None = None
  """Prompts to continue (default: the first four story openings)."""
  preset: str = "default"
  """Named preset."""
  model: str | None = None
  """Checkpoint directory to sample from (default: as for `run`)."""
  run_dir: str | None = None
  """A pipeline run; with --policy, sample from its trained policy."""
  policy: Literal["initial", "ppo", "dpo", "grpo", "sft", "kto"] = "initial"
  """Which policy of --run-dir (initial = the reference model; a warning
  then names the run's trained ones)."""
  num_samples: int = 1
  """Continuations per prompt."""
  batch_size: int = 64
  """Rows (prompts x --num-samples) sampled at once; memory grows with it."""
  max_new_tokens: int = 48
  """Tokens per continuation."""
  max_prompt_length: int = 32
  """P (longer prompts are an error)."""
  temperature: float | None = None
  """Sampling temperature, >= 0.01 (default 1.0; not with --greedy)."""
  greedy: bool = False
  """Argmax decoding instead of sampling."""
  chat: bool = False
  """Send each prompt as a user turn through the model's chat template
  (with the assistant's generation prompt), as instruct models expect;
  without it the prompt text is continued as given."""
  seed: int = 0
  """Sampling seed."""
  output: str | None = None
  """Also write the samples as JSON lines to this file (see --overwrite)."""
  overwrite: bool = False
  """Replace an existing --output file (refused otherwise)."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluate a policy on the task's held-out prompts (gold, KL, diversity);
  the metrics and samples go to eval_<policy>.json in the run directory."""

  run_dir: str
  """A pipeline run directory (its prompts, reference and reward model)."""
  preset: str = "default"
  """Named preset."""
  policy: Literal["initial", "ppo", "dpo", "grpo", "sft", "kto"] = "ppo"
  """Which policy of the run to evaluate."""
  samples_per_prompt: int | None = None
  """Continuations per held-out prompt; default: the run's own (its
  eval.samples_per_prompt), so with --seed 0 the figures are the run's."""
  seed: int = 0
  """Sampling seed."""
  overwrite: bool = False
  """Replace the run directory's eval_<policy>.json from an earlier eval
  (without it, an existing one is kept and eval stops before any work)."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """Export a run's trained policy or reward model as a Hugging Face dir."""

  run_dir: str
  """The run directory."""
  out: str
  """Output directory (config.json, model.safetensors, tokenizer files)."""
  preset: str = "default"
  """Named preset."""
  what: Literal["ppo", "dpo", "grpo", "sft", "kto", "rm"] = "ppo"
  """Which model: a policy, or the reward model (a transformers
  *ForSequenceClassification directory; a mean-pooled head: the
  rlhf_jax-only causal LM plus reward_head/model.safetensors)."""
  overwrite: bool = False
  """Replace a non-empty --out that an earlier export wrote
  (files added to it too); a folder without the export's
  .rlhf_jax_export file is refused. The new export is written
  beside it, then renamed into place."""


@dataclasses.dataclass(frozen=True)
class AcceptRateConfig:
  """The accept-rate task (online KTO): a simulated user accepts a
  continuation with probability sigmoid(beta * (gold - threshold))
  (rlhf_jax.tasks.accept), the threshold set so that the initial policy's
  expected accept rate is --accept.initial-rate; each round samples the
  policy, has the user label every sample and trains KTO on the labels."""

  user_beta: float = 10.0
  """Inverse temperature of the simulated user on the VADER gold score."""
  initial_rate: float = 0.3
  """Expected accept rate of the initial policy (calibrates the threshold)."""
  target_rate: float = 0.8
  """The accept rate the product aims at (the report's target line)."""
  calibration_samples: int = 4
  """Samples per training prompt from the initial policy for calibration."""
  rounds: int = 40
  """Online rounds (each: sample, label, train); GRPO runs as many
  iterations on the same number of samples."""
  prompts_per_round: int = 16
  """Prompts per round."""
  samples_per_prompt: int = 4
  """Continuations per prompt per round (GRPO's group size)."""
  epochs: int = 2
  """KTO passes over each round's labelled samples."""
  eval_every: int = 4
  """Rounds between held-out evaluations (accept rate, KL; and at the end)."""
  arms: Literal["both", "kto", "grpo"] = "both"
  """Which arms run: online KTO, GRPO with the accept probability as its
  reward, or both (the comparison)."""


@dataclasses.dataclass(frozen=True)
class KTOStageConfig:
  """KTO (Ethayarajh et al. 2024) on accept/reject feedback: --data FILE
  of {prompt, completion, label} rows, or without --data the accept-rate
  task (online KTO from a simulated user's labels, beside GRPO)."""

  data: str | None = None
  """File of {prompt, completion, label} rows (.jsonl, .jsonl.gz,
  .parquet); a tenth of the distinct rows (at least 2; a repeated row's
  copies on one side) is held out. Without it: the accept-rate task."""
  preset: str = "default"
  """Named preset (listed above the options)."""
  model: str | None = None
  """Policy/reference checkpoint (as for `run`)."""
  run_dir: str | None = None
  """Output directory. Default: runs/kto-<preset>."""
  resume: bool = False
  """Continue the run in run_dir from its checkpoints (--data only)."""
  overwrite: bool = False
  """Delete an existing run in run_dir and start again."""
  seed: int = 0
  """Seed of every random choice (data order, samples, labels)."""
  strict: bool = False
  """Raise on droppable rows instead of dropping and counting them."""
  data_max_dropped_frac: float = 0.5
  """Stop before training when more than this fraction of the rows of
  --data is dropped; 1 never stops."""
  max_prompt_length: int = 64
  """--data: P (longer prompts keep their last P tokens, counted)."""
  max_response_length: int = 64
  """--data: T (longer completions are cut from the right, counted)."""
  steps: int = 100
  """--data: optimizer steps."""
  batch_size: int = 32
  """Rows per step (an even number: adjacent rows are the KL estimate's
  mismatched pairs)."""
  learning_rate: float = 5e-4
  """Adam learning rate (linear warmup, then constant)."""
  warmup_steps: int = 2
  """Linear warmup steps."""
  max_grad_norm: float = 1.0
  """Global-norm gradient clipping."""
  eval_every: int = 25
  """--data: steps between held-out evaluations (and at the end)."""
  checkpoint_every: int = 50
  """Steps between checkpoints (and on SIGINT)."""
  keep_checkpoints: int = 2
  """Checkpoints kept (the latest ones); --resume falls back to an older
  one when the latest is damaged."""
  max_skipped_fraction: float = 0.5
  """Stop (keeping the last good checkpoint) once more than this fraction
  of the steps so far were skipped for non-finite loss or gradients
  (checked from the 4th step on; 1 = never stop)."""
  tensorboard: bool = True
  """Also write TensorBoard event files."""
  loss: KTOConfig = KTOConfig()
  """The loss (rlhf_jax.train.KTOConfig: beta, desirable/undesirable
  weights, micro-batches)."""
  accept: AcceptRateConfig = AcceptRateConfig()
  task: TaskConfig = TaskConfig()
  sampling: SamplingConfig = SamplingConfig()
  grpo: GRPOStageConfig = GRPOStageConfig()
  """The GRPO comparison arm of the accept-rate task (its iterations,
  batch size and group size come from --accept.*)."""
  eval: EvalStageConfig = EvalStageConfig()
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedConfig = DistributedConfig()
  lora: LoraConfig = LoraConfig()
  """LoRA on the policy (Hu et al. 2021): adapters on the frozen base,
  whose reference is the base itself."""


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  """Consistency audit of a preference file (rlhf_jax.audit): intransitive
  cycles, the fewest judgements to drop for one scalar ordering per prompt
  (minimum feedback arc set), rationalisability, label noise, annotators;
  with --reward-model, the model's agreement, calibration and length
  sensitivity. Writes report.md, results.json and plots/ into --out."""

  data: str | None = None
  """Preference file (.jsonl, .jsonl.gz, .parquet): explicit
  {prompt, chosen, rejected}, HH-RLHF, conversational or ranked rows;
  cycles need prompts whose responses recur across pairs (or ranked rows)."""
  preset: str = "default"
  """Named preset."""
  reward_model: str | None = None
  """Also audit this reward model (a `rlhf-jax rm` run directory or its
  export, or a *ForSequenceClassification directory)."""
  out: str | None = None
  """Output directory (report.md, results.json, plots/). Default:
  runs/audit-<preset>."""
  overwrite: bool = False
  """Replace an earlier audit in --out (only what rlhf-jax wrote)."""
  annotator_field: str = "annotator"
  """Row field holding the annotator id (used when the rows have it)."""
  strict: bool = False
  """Raise on droppable rows instead of dropping and counting them."""
  exact_max_nodes: int = 16
  """Strongly connected components up to this many responses get an exact
  minimum feedback arc set (DP over subsets, 2..20); larger ones the
  Eades-Lin-Smyth heuristic (flagged approximate)."""
  max_cycles: int = 10000
  """Cycles enumerated at most, 1..10^6 (then reported as a lower bound)."""
  max_prompt_length: int = 256
  """--reward-model: prompt tokens (longer prompts keep their last ones)."""
  max_response_length: int = 256
  """--reward-model: response tokens (longer ones are cut, counted)."""
  batch_size: int = 32
  """--reward-model: pairs per scoring call."""
