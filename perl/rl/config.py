"""RLConfig: the RL algorithm and its knobs (gin: perl.rl.config.RLConfig)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import gin

from perl.rl import algorithms
from perl.rl import kl as kl_lib
from perl.rl.objectives import AGGREGATIONS


@gin.configurable(module="perl.rl.config")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """The RL algorithm and its knobs.

  Every policy log-prob, entropy and KL is of the distribution sampled
  (perl.decoding.SamplingConfig): softmax(logits / temperature) renormalised
  over the top-k / top-p kept set. The anchor's log-probs are of the
  untruncated tempered softmax, whose support covers the policy's, so
  KL(π_sampled ‖ π_anchor) is finite; a token that leaves the policy's kept
  set after an update gets log-prob ≈ finfo(float32).min there.
  """

  # A name registered in perl.rl.algorithms: "reinforce" (PERL: REINFORCE,
  # learned value baseline), "rloo", "grpo", "ppo", "dapo", "dr_grpo",
  # "gspo", "reinforce_pp" (REINFORCE++).
  algorithm: str = "reinforce"
  # Responses sampled per prompt (RLOO and GRPO need at least 2).
  samples_per_prompt: int = 1
  # KL coefficient β: fixed (PERL: 0.05) or adaptive towards a target KL.
  # None: KLControllerConfig()'s, or β = 0 for an algorithm without a KL
  # penalty (DAPO, as its paper).
  kl: kl_lib.KLControllerConfig | None = None
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
  # Clipped losses (PPO, DAPO, Dr.GRPO, GSPO, REINFORCE++): ε_low, the ratio's
  # clip below 1 − ε_low. None: the algorithm's (0.2; GSPO 3e-4).
  clip_ratio: float | None = None
  # ε_high, the clip above 1 + ε_high. None: the algorithm's (DAPO's
  # clip-higher 0.28, GSPO 4e-4) when clip_ratio is None too, else clip_ratio.
  clip_ratio_high: float | None = None
  # How per-token losses make the update loss (verl's loss_agg_mode; see
  # perl.rl.objectives.AGGREGATIONS for each and TRL's names): "token-mean",
  # "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm".
  # None: the algorithm's (token-mean; Dr.GRPO seq-mean-token-sum-norm, GSPO
  # seq-mean-token-mean). The KL-in-loss and entropy terms are aggregated alike.
  loss_aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                            "seq-mean-token-sum-norm"] | None = None
  # DAPO's soft overlong punishment: responses longer than max length − this
  # many tokens lose up to overlong_penalty, linearly (0: off). None: the
  # algorithm's fraction of the max length (DAPO 20%; others off).
  overlong_buffer: int | None = None
  # The penalty at the maximum response length.
  overlong_penalty: float = 1.0
  # Dynamic sampling (DAPO): sampling rounds per step at most, the first
  # included, to replace the groups whose scores are all equal.
  max_sampling_rounds: int = 4
  # PPO: clip range of value updates around the rollout values (None: off).
  value_clip: float | None = 0.2
  # PPO: passes over each rollout batch.
  ppo_epochs: int = 2
  # PPO: stop this rollout's remaining updates once a minibatch's approx_kl
  # (mean ½(log π − log π_old)²) exceeds it (None: off).
  target_kl: float | None = None
  # PPO, DAPO, Dr.GRPO, GSPO, REINFORCE++: minibatches per pass.
  num_minibatches: int = 1
  # Discount of GAE (PPO) and of REINFORCE++'s return-to-go.
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
    if self.scale_reward_by_one_minus_beta and self.kl_config.init_coef >= 1.0:
      raise ValueError(
          f"KL coefficient β={self.kl_config.init_coef} with PERL's (1−β)·r objective "
          "(scale_reward_by_one_minus_beta=True) weights the reward by "
          f"{1.0 - self.kl_config.init_coef:g}: the policy would learn the opposite of "
          "the reward model. Use β < 1, or set "
          "RLConfig.scale_reward_by_one_minus_beta=False for r − β·KL.")
    if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
      raise ValueError(
          f"RLConfig.missing_eos_penalty={self.missing_eos_penalty}: it is "
          "subtracted from the score of truncated responses (TRL's sign), so a "
          f"negative value rewards truncation. Use {-self.missing_eos_penalty}.")

    if self.loss_aggregation is not None and self.loss_aggregation not in AGGREGATIONS:
      raise ValueError(f"RLConfig.loss_aggregation={self.loss_aggregation!r}: choose "
                       f"one of {AGGREGATIONS}.")
    for name in ("clip_ratio", "clip_ratio_high"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"RLConfig.{name}={value}: the clip range must be > 0 "
                         "(None: the algorithm's).")
    if self.overlong_buffer is not None and self.overlong_buffer < 0:
      raise ValueError(f"RLConfig.overlong_buffer={self.overlong_buffer}: a number "
                       "of tokens >= 0 (0: no overlong shaping).")
    if self.max_sampling_rounds < 1:
      raise ValueError(f"RLConfig.max_sampling_rounds={self.max_sampling_rounds}: "
                       "at least 1 (the first round).")

  @property
  def kl_config(self) -> kl_lib.KLControllerConfig:
    """The KL coefficient's config (kl resolved)."""
    if self.kl is not None:
      return self.kl
    if self.algo.kl_penalty:
      return kl_lib.KLControllerConfig()
    return kl_lib.KLControllerConfig(init_coef=0.0)

  @property
  def clip_range(self) -> tuple[float, float]:
    """(ε_low, ε_high) of the clipped policy losses (clip_ratio* resolved)."""
    if self.clip_ratio is None and self.clip_ratio_high is None:
      return self.algo.clip_range
    low = self.algo.clip_range[0] if self.clip_ratio is None else self.clip_ratio
    return low, low if self.clip_ratio_high is None else self.clip_ratio_high

  @property
  def aggregation(self) -> str:
    """RLConfig.loss_aggregation resolved."""
    return self.loss_aggregation or self.algo.loss_aggregation

  def overlong_buffer_tokens(self, max_length: int) -> int:
    """DAPO's L_cache for responses of at most max_length tokens (resolved)."""
    if self.overlong_buffer is not None:
      return min(self.overlong_buffer, max_length)
    return int(round(self.algo.overlong_buffer_fraction * max_length))

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
