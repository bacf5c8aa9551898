"""The RL stage: a LoRA policy trained against a reward model (PERL).

    perl.trainers.runner.train.objective = @perl.trainers.policy_stage.PolicyObjective()

`PolicyObjective` builds the Hydra backbone (policy and value adapters, and
the reward adapter where the reward model shares the base), loads the reward
model, and gives `perl.trainers.runner.train` a `PolicyTrainer`; evaluation
samples the held-out prompts (`policy_eval`); export/ holds the merged
policy backbone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import gin
from flax import nnx

from perl import decoding, partitioning
from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.heads import RewardModule
from perl.models.hydra import POLICY, HydraModule
from perl.rl.config import RLConfig
from perl.run_dir import RunDir, recorded_reward_lora
from perl.trainers import loop, policy_eval, runner
from perl.trainers.policy import PolicyTrainer
from perl.trainers.policy_init import init_value_from_reward, load_reward_adapter


@gin.configurable(module="perl.trainers.policy_stage")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyObjective(runner.Objective):
  """RL of a LoRA policy against a reward model, on a prompts task.

  reward_model_config None: the reward model shares the policy's base (Hydra:
  its adapter + head are loaded onto the policy's backbone from
  reward_checkpoint). Otherwise it is a separate RewardModule of that config
  loaded from reward_checkpoint's export/ (PERL's setup with a larger RM).
  The runner's train_steps count RL iterations (rollout + updates).
  """

  task_kinds: ClassVar[tuple[str, ...]] = ("prompts",)
  task_needs: ClassVar[str] = ("RL needs a prompts task (e.g. "
                                "synthetic_prompts, taskmaster4_prompts).")
  headline: ClassVar[tuple[str, ...]] = ("reward_mean", "kl")
  # MODEL_DIR of the reward-model (or Hydra-SFT) run.
  reward_checkpoint: str = gin.REQUIRED
  # None: the reward model shares the policy's base; a TransformerConfig: a
  # separate reward backbone of that architecture.
  reward_model_config: TransformerConfig | None = None
  # The reward run's adapter (shared base only); None: the LoRAConfig that
  # run recorded in reward_checkpoint/config.gin.
  reward_lora: LoRAConfig | None = None
  # The policy adapter (None: LoRAConfig()).
  policy_lora: LoRAConfig | None = None
  # The value adapter (None: the policy's; PERL uses the policy's rank).
  value_lora: LoRAConfig | None = None
  # Algorithm, samples per prompt, KL control, update settings.
  rl: RLConfig = RLConfig()
  # How rollouts are sampled: the distribution that is trained.
  sampling: decoding.SamplingConfig = decoding.SamplingConfig(
      max_new_tokens=32, temperature=0.7)
  # How eval responses are sampled (None: as the rollouts are).
  eval_sampling: decoding.SamplingConfig | None = None
  # Responses sampled per held-out prompt.
  eval_samples_per_prompt: int = 1
  # A (prompt, response) -> float truth the eval reports, where a task has one.
  ground_truth: Callable[[str, str], float] | None = None
  # Eval metric whose highest value keeps its state under MODEL_DIR/best.
  best_metric: str | None = None

  def describe(self, stage: runner.Stage) -> str:
    return f"policy ({self.rl.algorithm})"

  def check(self, stage: runner.Stage) -> tuple[str | None, ...]:
    if stage.grad_accum_steps != 1:
      raise ValueError(
          f"grad_accum_steps={stage.grad_accum_steps}: an RL step does not "
          "accumulate micro-batches. Fix: grad_accum_steps=1; split the update "
          "with RLConfig.num_minibatches (ppo) or lower BATCH_SIZE.")
    return (None if self.reward_model_config is None
            else self.reward_checkpoint,)

  def _sampling(self, stage: runner.Stage,
                config: decoding.SamplingConfig) -> decoding.SamplingConfig:
    eos_id = None if stage.vocabulary is None else stage.vocabulary.eos_id
    return dataclasses.replace(config, eos_id=eos_id)

  def build(self, stage: runner.Stage, partitioner: partitioning.Partitioner,
            *, abstract: bool = False) -> PolicyTrainer:
    rl, seed = self.rl, stage.seed
    shared = self.reward_model_config is None
    reward_lora = self.reward_lora
    if shared and reward_lora is None:
      # The adapter the reward-model run trained, as its config.gin records it.
      reward_lora = recorded_reward_lora(self.reward_checkpoint)
    policy_lora = self.policy_lora or LoRAConfig()
    module = stage.create_model(
        partitioner, lambda: HydraModule(
            stage.model_config, policy_lora=policy_lora,
            # PERL: the value model is a LoRA adapter of the policy's rank.
            value_lora=(self.value_lora or policy_lora) if rl.uses_value else None,
            with_value_head=rl.uses_value,
            reward_lora=reward_lora if shared else None, rngs=nnx.Rngs(seed)),
        base=lambda m: m.backbone, abstract=abstract)
    reward_module = None
    if not shared:
      reward_module = dataclasses.replace(
          stage, base_checkpoint=self.reward_checkpoint).create_model(
              partitioner, lambda: RewardModule(self.reward_model_config,
                                                rngs=nnx.Rngs(seed)),
              abstract=abstract)
      if not abstract:
        print(f"reward model: separate backbone from {self.reward_checkpoint}",
              flush=True)
    elif not abstract:
      source = load_reward_adapter(self.reward_checkpoint, module,
                                   stage.base_checkpoint)
      print(f"reward model: adapter + head from {source} on the shared "
            "backbone", flush=True)
      if rl.uses_value and rl.value_from_reward:
        copied = init_value_from_reward(module)
        if copied:
          print(f"value model: {' and '.join(copied)} from the reward model",
                flush=True)
    return PolicyTrainer(
        module=module, rl=rl, sampling=self._sampling(stage, self.sampling),
        optimizer=stage.optimizer, total_steps=stage.train_steps,
        partitioner=partitioner, reward_module=reward_module,
        abstract=abstract)

  def evaluator(self, stage: runner.Stage, trainer: PolicyTrainer,
                partitioner: partitioning.Partitioner):
    return policy_eval.make_evaluate(
        trainer, prompt_batches=stage.eval_batches(partitioner),
        sampling=self._sampling(stage, self.eval_sampling or self.sampling),
        vocabulary=stage.vocabulary, ground_truth=self.ground_truth,
        samples_dir=RunDir(stage.model_dir).eval_samples,
        samples_per_prompt=self.eval_samples_per_prompt)

  def on_finish(self, stage: runner.Stage):
    return loop.export_on_finish(stage.model_dir, POLICY,
                                 part=lambda m: m.backbone,
                                 base_checkpoint=stage.base_checkpoint)
