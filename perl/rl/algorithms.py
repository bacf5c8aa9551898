"""RL algorithms: one registered definition each, selected by RLConfig.algorithm.

An `Algorithm` says everything the policy trainer needs to know about it:
  advantages     AdvantageInputs, RLConfig → (advantages, value targets,
                 value-loss mask), all [B, N]
  policy_loss    (logp, old_logp, advantages, mask, RLConfig) →
                 (loss sum, token count, clipped-token count)
  uses_value     whether it learns a value model (value adapter + head)
  min_samples_per_prompt   the k its advantages compare (RLOO, GRPO: 2)
  whiten_default / never_whiten   advantage whitening when
                 RLConfig.whiten_advantages is None / whatever it says
  clips_value    whether the value loss clips around the rollout's values
  epochs, minibatches   updates per rollout, from the config

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
PolicyLossFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def pg_loss(logp, old_logp, advantages, mask, config):
  """−A·log π per token; nothing is clipped."""
  del old_logp, config
  loss_sum, count = objectives.policy_gradient_loss(logp, advantages, mask)
  return loss_sum, count, jnp.zeros(())


def ppo_clip_loss(logp, old_logp, advantages, mask, config):
  """PPO's clipped surrogate at RLConfig.clip_ratio."""
  return objectives.ppo_policy_loss(logp, old_logp, advantages, mask,
                                    clip_ratio=config.clip_ratio)


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


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
  """Adds `algorithm` under its name (RLConfig(algorithm=name) selects it)."""
  old = _REGISTRY.get(algorithm.name)
  if old is not None and old != algorithm:
    raise ValueError(f"RL algorithm {algorithm.name!r} is already registered; "
                     "give the new one another name.")
  _REGISTRY[algorithm.name] = algorithm
  return algorithm


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
