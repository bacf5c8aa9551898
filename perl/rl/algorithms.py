"""RL algorithms: one registered definition each, selected by RLConfig.algorithm.

An `Algorithm` says everything the policy trainer needs to know about it:
  advantages     AdvantageInputs, RLConfig → (advantages, value targets,
                 value-loss mask), all [B, N]
  policy_loss    (logp, old_logp, advantages, mask, RLConfig) →
                 (per-token loss, per-token "the clip was active"), both [B, N];
                 perl.rl.step aggregates them by RLConfig.aggregation
  uses_value     whether it learns a value model (value adapter + head)
  min_samples_per_prompt   the k its advantages compare (RLOO, GRPO: 2)
  whiten_default / never_whiten   advantage whitening (over the whole
                 rollout batch) when RLConfig.whiten_advantages is None /
                 whatever it says
  clips_value    whether the value loss clips around the rollout's values
  epochs, minibatches   updates per rollout, from the config
  clip_range     default (ε_low, ε_high) of a clipped policy loss
  loss_aggregation   default RLConfig.loss_aggregation
  overlong_buffer_fraction   default DAPO overlong buffer, as a fraction of
                 the maximum response length (0: no overlong shaping)
  filter_groups  dynamic sampling: groups whose k scores are all equal are
                 dropped and replaced by freshly sampled ones (PolicyTrainer)
  kl_penalty     whether RLConfig.kl=None means the default KL penalty (β =
                 KLControllerConfig().init_coef) or none (β = 0)

Adding an algorithm is one `register(Algorithm(...))` call: RLConfig, the
trainer and the loss read only these fields, never the name.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from perl.rl import advantages as adv_lib
from perl.rl import objectives

if TYPE_CHECKING:
  from perl.rl.config import RLConfig


class AdvantageInputs(NamedTuple):
  """One rollout's arrays, as every algorithm's `advantages` receives them."""

  scores: jax.Array         # [B] reward-model scores (missing-EOS penalty applied)
  scaled_scores: jax.Array  # [B] (1−β)·scores under PERL's scaling, else scores
  seq_return: jax.Array     # [B] scaled_scores − β·KL (KL only when kl_mode="reward")
  kl_tok: jax.Array         # [B, N] per-token KL estimate, 0 off the response
  beta: jax.Array           # [] KL coefficient
  values: jax.Array         # [B, N] rollout values (0 without a value model)
  mask: jax.Array           # [B, N] float, 1 on response tokens


Targets = tuple[jax.Array, jax.Array, jax.Array]
AdvantageFn = Callable[[AdvantageInputs, "RLConfig"], Targets]
PolicyLossFn = Callable[..., tuple[jax.Array, jax.Array]]


def pg_loss(logp, old_logp, advantages, mask, config):
  """−A·log π per token; nothing is clipped."""
  del old_logp, config
  return objectives.pg_token_loss(logp, advantages), jnp.zeros_like(mask)


def ppo_clip_loss(logp, old_logp, advantages, mask, config):
  """PPO's clipped surrogate over RLConfig.clip_range (ε_low, ε_high)."""
  del mask
  low, high = config.clip_range
  ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
  return objectives.clipped_token_loss(ratio, advantages, clip_low=low, clip_high=high)


def gspo_loss(logp, old_logp, advantages, mask, config):
  """GSPO's clipped surrogate in the length-normalised sequence ratio s_i.

  The clip is per sequence: every token of y_i carries the same s_i.
  """
  low, high = config.clip_range
  ratio = objectives.sequence_ratio(logp, old_logp, mask)
  return objectives.clipped_token_loss(ratio, advantages, clip_low=low, clip_high=high)


def _one(config) -> int:
  del config
  return 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm:
  """One RL algorithm (see the module docstring for each field)."""

  name: str
  advantages: AdvantageFn
  policy_loss: PolicyLossFn = pg_loss
  uses_value: bool = False
  min_samples_per_prompt: int = 1
  whiten_default: bool = False
  never_whiten: bool = False
  clips_value: bool = False
  epochs: Callable[["RLConfig"], int] = _one
  minibatches: Callable[["RLConfig"], int] = _one
  clip_range: tuple[float, float] = (0.2, 0.2)
  loss_aggregation: str = "token-mean"
  overlong_buffer_fraction: float = 0.0
  filter_groups: bool = False
  kl_penalty: bool = True


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
  """Adds `algorithm` under its name (RLConfig(algorithm=name) selects it)."""
  old = _REGISTRY.get(algorithm.name)
  if old is not None and old != algorithm:
    raise ValueError(f"RL algorithm {algorithm.name!r} is already registered; "
                     "give the new one another name.")
  _REGISTRY[algorithm.name] = algorithm
  return algorithm


def unregister(name: str) -> None:
  """Removes a registration (a temporary algorithm of a notebook or test)."""
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Algorithm:
  if name not in _REGISTRY:
    raise ValueError(f"RLConfig.algorithm={name!r}: choose one of {names()} "
                     "(or register one with perl.rl.algorithms.register).")
  return _REGISTRY[name]


# -- the built-in algorithms ---------------------------------------------------


def _reinforce(x: AdvantageInputs, config) -> Targets:
  """PERL: the sequence return minus a learned V(prompt), read at the last
  prompt token; V regresses on the return there."""
  del config
  b, n = x.mask.shape
  baseline = x.values[:, 0]
  advantages = (x.seq_return - baseline)[:, None] * x.mask
  value_targets = jnp.broadcast_to(x.seq_return[:, None], (b, n))
  value_mask = jnp.zeros_like(x.mask).at[:, 0].set(1.0)
  return advantages, value_targets, value_mask


def _rloo(x: AdvantageInputs, config) -> Targets:
  """The return minus the mean of the prompt's other k−1 returns."""
  k = config.samples_per_prompt
  advantages = (x.seq_return - adv_lib.rloo_baseline(x.seq_return, k))[:, None] * x.mask
  return advantages, jnp.zeros_like(x.mask), jnp.zeros_like(x.mask)


def _grpo(x: AdvantageInputs, config) -> Targets:
  """The return normalised within the prompt's group of k."""
  k = config.samples_per_prompt
  advantages = adv_lib.group_normalized(x.seq_return, k)[:, None] * x.mask
  return advantages, jnp.zeros_like(x.mask), jnp.zeros_like(x.mask)


def _ppo(x: AdvantageInputs, config) -> Targets:
  """GAE over per-token rewards: the score on the last token, −β·KL on each
  token when the KL is in the reward."""
  rewards = adv_lib.last_token_rewards(x.scaled_scores, x.mask)
  if config.kl_mode == "reward":
    rewards = rewards - x.beta * x.kl_tok
  advantages, value_targets = adv_lib.gae(
      rewards, x.values, x.mask, gamma=config.gamma, lam=config.lam)
  return advantages, value_targets, x.mask


REINFORCE = register(Algorithm(
    name="reinforce", advantages=_reinforce, uses_value=True, whiten_default=True))
# RLOO's advantages are centred per group already; whitening would shift a
# group of identical samples off 0 and scale a batch's few informative
# groups by 1/std (TRL's RLOO default is off too).
RLOO = register(Algorithm(name="rloo", advantages=_rloo, min_samples_per_prompt=2))
GRPO = register(Algorithm(name="grpo", advantages=_grpo, min_samples_per_prompt=2,
                          never_whiten=True))
PPO = register(Algorithm(
    name="ppo", advantages=_ppo, policy_loss=ppo_clip_loss, uses_value=True,
    whiten_default=True, clips_value=True,
    epochs=lambda config: config.ppo_epochs,
    minibatches=lambda config: config.num_minibatches))


def _minibatches(config) -> int:
  return config.num_minibatches


def _dr_grpo(x: AdvantageInputs, config) -> Targets:
  """The return minus its group's mean, not divided by the group's std."""
  advantages = adv_lib.group_centered(x.seq_return, config.samples_per_prompt)
  return advantages[:, None] * x.mask, jnp.zeros_like(x.mask), jnp.zeros_like(x.mask)


def _reinforce_pp(x: AdvantageInputs, config) -> Targets:
  """REINFORCE++: the return-to-go of per-token rewards (the score on the
  last token, −β·KL on each when the KL is in the reward), no critic; the
  batch-wide normalisation is the whitening (whiten_default)."""
  rewards = adv_lib.last_token_rewards(x.scaled_scores, x.mask)
  if config.kl_mode == "reward":
    rewards = rewards - x.beta * x.kl_tok
  advantages, _ = adv_lib.gae(rewards, jnp.zeros_like(x.mask), x.mask,
                              gamma=config.gamma, lam=1.0)
  return advantages, jnp.zeros_like(x.mask), jnp.zeros_like(x.mask)


# DAPO (Yu et al. 2025, arXiv 2503.14476): GRPO's group-normalised
# advantages with clip-higher (ε_low 0.2, ε_high 0.28), token-mean loss,
# soft overlong punishment over the last 20% of the response length (the
# paper's 4,096 of 20,480 tokens), dynamic sampling, and no KL penalty.
# Its gradient is GRPO's (biased by the std normalisation), and dynamic
# sampling conditions each step on groups whose scores differ.
DAPO = register(Algorithm(
    name="dapo", advantages=_grpo, policy_loss=ppo_clip_loss,
    min_samples_per_prompt=2, never_whiten=True, minibatches=_minibatches,
    clip_range=(0.2, 0.28), loss_aggregation="token-mean",
    overlong_buffer_fraction=0.2, filter_groups=True, kl_penalty=False))
# Dr.GRPO (Liu et al. 2025, arXiv 2503.20783): the group-mean baseline
# without std normalisation, and the token sum of each response divided by
# a constant (the maximum response length), not by its own length.
# Unbiased up to a constant: E[(R_i − mean_k R)·∇log π(y_i)] = (k−1)/k·∇E[R],
# so the step is (k−1)/k·∇J / max length (the KL-in-loss part unscaled).
DR_GRPO = register(Algorithm(
    name="dr_grpo", advantages=_dr_grpo, policy_loss=ppo_clip_loss,
    min_samples_per_prompt=2, never_whiten=True, minibatches=_minibatches,
    loss_aggregation="seq-mean-token-sum-norm"))
# GSPO (Zheng et al. 2025, arXiv 2507.18071): group-normalised advantages,
# the length-normalised sequence ratio clipped per sequence at the paper's
# (3e-4, 4e-4), each sequence's loss weighted equally (its tokens by 1/|y|):
# biased by design, like GRPO, by the std normalisation and the 1/|y|.
GSPO = register(Algorithm(
    name="gspo", advantages=_grpo, policy_loss=gspo_loss,
    min_samples_per_prompt=2, never_whiten=True, minibatches=_minibatches,
    clip_range=(3e-4, 4e-4), loss_aggregation="seq-mean-token-mean"))
# REINFORCE++ (Hu 2025, arXiv 2501.03262): per-token k1 KL in the reward,
# the return-to-go (γ = RLConfig.gamma, 1 by default as the paper), the
# advantages whitened over the whole rollout batch, PPO's clip, no critic.
# Without whitening the return-to-go gives ∇J exactly (/ E[length], token
# mean); whitening divides the reward's part by a batch std, an effective
# learning-rate change (×0.86 with k1 in the reward on
# tests/rl/test_exact_gradient.py's setup).
REINFORCE_PP = register(Algorithm(
    name="reinforce_pp", advantages=_reinforce_pp, policy_loss=ppo_clip_loss,
    whiten_default=True, minibatches=_minibatches))
