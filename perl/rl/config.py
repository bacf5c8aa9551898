"""RLConfig: the RL algorithm and its knobs (gin: perl.rl.config.RLConfig)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import gin

from perl.rl import algorithms
from perl.rl import kl as kl_lib


@gin.configurable(module="perl.rl.config")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """The RL algorithm and its knobs."""

  # A name registered in perl.rl.algorithms: "reinforce" (PERL: REINFORCE,
  # learned value baseline), "rloo", "grpo", "ppo".
  algorithm: str = "reinforce"
  # Responses sampled per prompt (RLOO and GRPO need at least 2).
  samples_per_prompt: int = 1
  # KL coefficient β: fixed (PERL: 0.05) or adaptive towards a target KL.
  kl: kl_lib.KLControllerConfig = kl_lib.KLControllerConfig()
  # KL(π‖π_anchor) estimator (perl.rl.kl): "k1", "k2", "k3", "k3+" or "seq".
  # None: "k1" in the reward (the policy gradient is then exact for
  # E[R] − β·KL) and "seq" in the loss (KL-to-go × score function: exact for
  # whole responses). "k2" / "k3+" in the loss are verl / OpenRLHF's per-token
  # losses: exact for one token, biased for longer responses (they drop how
  # a token changes the later contexts). The loss refuses k1 and k3 (their
  # gradients are 0 and ∇KL(π_anchor‖π)); the reward refuses "seq".
  kl_estimator: Literal["k1", "k2", "k3", "k3+", "seq"] | None = None
  # "reward": −β·KL is part of the return; "loss": β·KL is added to the loss.
  kl_mode: Literal["reward", "loss"] = "reward"
  # PERL's objective (1−β)·r − β·KL; False gives r − β·KL.
  scale_reward_by_one_minus_beta: bool = True
  # Whiten advantages over the batch. None: the algorithm's default (REINFORCE
  # and PPO, whose advantages use a learned baseline; not RLOO, whose are
  # centred per group); GRPO's are already normalised (never whitened).
  whiten_advantages: bool | None = None
  # Weight of the value loss.
  value_coef: float = 0.5
  # Weight of the entropy bonus (0 disables).
  entropy_coef: float = 0.0
  # PPO: clip range of the probability ratio.
  clip_ratio: float = 0.2
  # PPO: clip range of value updates around the rollout values (None: off).
  value_clip: float | None = 0.2
  # PPO: passes over each rollout batch.
  ppo_epochs: int = 2
  # PPO: stop this rollout's remaining updates once a minibatch's approx_kl
  # (mean ½(log π − log π_old)²) exceeds it (None: off).
  target_kl: float | None = None
  # PPO: minibatches per pass.
  num_minibatches: int = 1
  # GAE discount (PPO).
  gamma: float = 1.0
  # GAE λ (PPO).
  lam: float = 0.95
  # Subtracted from the score of responses that end without EOS, as TRL does
  # (a positive number penalises truncation; None: off).
  missing_eos_penalty: float | None = None
  # First RL steps in which only the value model learns (policy frozen), so the
  # baseline is fitted before the policy moves (OpenRLHF freezing_actor_steps).
  critic_warmup_steps: int = 0
  # Start the value head (and the value adapter, when its rank and targets
  # match) from the reward model's on the shared backbone: V starts near the
  # score instead of at random (the reward head is read at the last token).
  value_from_reward: bool = True

  @property
  def algo(self) -> algorithms.Algorithm:
    """The registered algorithm this config selects."""
    return algorithms.get(self.algorithm)

  @property
  def whitens(self) -> bool:
    """Whether the update whitens advantages (whiten_advantages resolved)."""
    if self.algo.never_whiten:
      return False
    if self.whiten_advantages is None:
      return self.algo.whiten_default
    return self.whiten_advantages

  def __post_init__(self):
    need = algorithms.get(self.algorithm).min_samples_per_prompt
    if self.samples_per_prompt < need:
      raise ValueError(
          f"{self.algorithm} compares samples of the same prompt: set "
          f"RLConfig.samples_per_prompt >= {need} (got {self.samples_per_prompt}).")
    if self.kl_estimator is not None and self.kl_estimator not in kl_lib.ESTIMATORS:
      raise ValueError(f"RLConfig.kl_estimator={self.kl_estimator!r}: choose one "
                       f"of {kl_lib.ESTIMATORS}.")
    if self.kl_mode == "loss":
      kl_lib.check_loss_estimator(self.estimator)
    else:
      kl_lib.check_reward_estimator(self.estimator)
    if self.scale_reward_by_one_minus_beta and self.kl.init_coef >= 1.0:
      raise ValueError(
          f"KL coefficient β={self.kl.init_coef} with PERL's (1−β)·r objective "
          "(scale_reward_by_one_minus_beta=True) weights the reward by "
          f"{1.0 - self.kl.init_coef:g}: the policy would learn the opposite of "
          "the reward model. Use β < 1, or set "
          "RLConfig.scale_reward_by_one_minus_beta=False for r − β·KL.")
    if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
      raise ValueError(
          f"RLConfig.missing_eos_penalty={self.missing_eos_penalty}: it is "
          "subtracted from the score of truncated responses (TRL's sign), so a "
          f"negative value rewards truncation. Use {-self.missing_eos_penalty}.")

  @property
  def estimator(self) -> str:
    if self.kl_estimator is not None:
      return self.kl_estimator
    return "seq" if self.kl_mode == "loss" else "k1"

  @property
  def uses_value(self) -> bool:
    return self.algo.uses_value

  @property
  def epochs(self) -> int:
    """Passes over each rollout batch."""
    return self.algo.epochs(self)

  @property
  def minibatches(self) -> int:
    """Updates per pass over a rollout batch."""
    return self.algo.minibatches(self)

  @property
  def updates_per_rollout(self) -> int:
    return self.epochs * self.minibatches
