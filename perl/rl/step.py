"""One RL iteration's maths on arrays: a rollout's advantages and the update loss.

Both are pure functions of arrays and an RLConfig; the configured algorithm
(perl.rl.algorithms) supplies the advantage estimator and the policy loss.
The policy trainer runs the model forwards and jits these.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from perl.rl import advantages as adv_lib
from perl.rl import algorithms
from perl.rl import kl as kl_lib
from perl.rl import objectives
from perl.rl.config import RLConfig


def advantages(
    *, scores: jax.Array, policy_logp: jax.Array, anchor_logp: jax.Array,
    entropy: jax.Array, values: jax.Array | None, mask: jax.Array,
    done: jax.Array, beta: jax.Array, config: RLConfig,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """(update arrays, rollout stats) of one rollout.

  scores, done: [B]; the rest [B, N] over response tokens; values None for
  an algorithm without a value model. The update arrays are what
  `update_loss` reads from its batch besides the tokens.
  """
  rl = config
  mask = mask.astype(jnp.float32)
  if rl.missing_eos_penalty is not None:
    scores = scores - jnp.where(done, 0.0, rl.missing_eos_penalty)
  # DAPO's overlong shaping is part of the reward; reward_mean stays the score.
  buffer = rl.overlong_buffer_tokens(mask.shape[1])
  overlong = adv_lib.overlong_penalty(mask.sum(axis=1), max_length=mask.shape[1],
                                      buffer=buffer, factor=rl.overlong_penalty)
  shaped = scores + overlong if buffer else scores
  kl_tok = kl_lib.kl_estimate(policy_logp, anchor_logp, rl.estimator) * mask
  seq_kl = kl_tok.sum(axis=1)
  # The true per-sequence KL estimate for logging, whatever the estimator.
  seq_kl_k1 = ((policy_logp - anchor_logp) * mask).sum(axis=1)
  scale = (1.0 - beta) if rl.scale_reward_by_one_minus_beta else 1.0
  in_reward = rl.kl_mode == "reward"
  scaled_scores = scale * shaped
  seq_return = scaled_scores - (beta * seq_kl if in_reward else 0.0)
  old_values = jnp.zeros_like(mask) if values is None else values
  algorithm = rl.algo
  adv, value_targets, value_mask = algorithm.advantages(
      algorithms.AdvantageInputs(
          scores=scores, scaled_scores=scaled_scores, seq_return=seq_return,
          kl_tok=kl_tok, beta=beta, values=old_values, mask=mask), rl)
  if rl.whitens:
    adv = adv_lib.masked_whiten(adv, mask)
  k = rl.samples_per_prompt
  stats = {
      "reward_mean": scores.mean(), "reward_std": scores.std(),
      "kl": seq_kl_k1.mean(), "kl_estimate": seq_kl.mean(),
      # TRL's objective/rlhf_reward: the score net of the KL penalty.
      "objective": (scores - beta * seq_kl_k1).mean(),
      "return_mean": seq_return.mean(),
      "advantage_mean": adv_lib.masked_mean(adv, mask),
      "advantage_std": jnp.sqrt(adv_lib.masked_mean(jnp.square(adv), mask)),
      "response_length": mask.sum(axis=1).mean(),
      "eos_rate": done.astype(jnp.float32).mean(),
      "truncation_rate": 1.0 - done.astype(jnp.float32).mean(),
      "entropy": adv_lib.masked_mean(entropy, mask),
  }
  if buffer:
    stats["overlong_penalty"] = overlong.mean()
  if k > 1:
    stats["zero_variance_groups"] = adv_lib.zero_variance_fraction(seq_return, k)
  if algorithm.uses_value:
    stats["explained_variance"] = objectives.explained_variance(
        old_values, value_targets, value_mask)
  update = {"advantages": adv, "value_targets": value_targets,
            "value_mask": value_mask, "old_values": old_values,
            "old_logp": policy_logp, "anchor_logp": anchor_logp}
  return update, stats


def _finite_or_one(x: jax.Array) -> jax.Array:
  """A min / max over no tokens (±inf) reads as ratio 1."""
  return jnp.where(jnp.isfinite(x), x, 1.0)


def update_loss(
    *, logp: jax.Array, entropy: jax.Array | None, values: jax.Array | None,
    batch: Mapping[str, jax.Array], config: RLConfig,
) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """(loss sum, denominator, {metric: (sum, count)}) of one update batch.

  The denominator is RLConfig.aggregation's (the token count for
  token-mean, the number of responses for the seq-mean modes).

  logp, entropy: the policy's [B, N] response log-probs and entropies under
  the parameters being trained (entropy may be None when entropy_coef is 0);
  values: the value model's [B, N] (None without one); batch: the arrays
  `advantages` returned plus response_mask, beta and policy_weight ([B]).
  """
  rl = config
  algorithm = rl.algo
  mask = batch["response_mask"].astype(jnp.float32)
  # 0 while the critic warms up: the policy terms give no gradient.
  policy_weight = batch["policy_weight"][0]
  token_loss, clipped = algorithm.policy_loss(
      logp, batch["old_logp"], batch["advantages"], mask, rl)
  # Every per-token term is aggregated with the same weights.
  weights, count = objectives.aggregation_weights(mask, rl.aggregation)
  loss_sum = (token_loss * weights).sum()
  tokens = objectives.token_count(mask)
  clipped = jax.lax.stop_gradient((clipped * mask).sum())
  diff = jax.lax.stop_gradient(logp - batch["old_logp"])
  ratio = jnp.exp(diff)
  live = mask > 0
  # Whole-batch min / max as (value·count, count) pairs: exact, since the
  # policy step never splits into micro-batches (grad_accum_steps=1).
  metrics = {
      "policy_loss": (loss_sum, count), "clip_fraction": (clipped, tokens),
      "approx_kl": ((0.5 * jnp.square(diff) * mask).sum(), tokens),
      "ratio_mean": ((ratio * mask).sum(), tokens),
      "ratio_min": (_finite_or_one(jnp.where(live, ratio, jnp.inf).min()) * tokens, tokens),
      "ratio_max": (_finite_or_one(jnp.where(live, ratio, -jnp.inf).max()) * tokens, tokens),
  }
  if rl.kl_mode == "loss":
    kl_sum = (kl_lib.kl_loss_terms(logp, batch["anchor_logp"], mask, rl.estimator)
              * weights).sum()
    loss_sum = loss_sum + batch["beta"][0] * kl_sum
    metrics["kl_loss"] = (kl_sum, count)
  if rl.entropy_coef:
    ent_sum = (entropy * weights).sum()
    loss_sum = loss_sum - rl.entropy_coef * ent_sum
  loss_sum = policy_weight * loss_sum
  if algorithm.uses_value:
    clip = rl.value_clip if algorithm.clips_value else None
    v_sum, v_count = objectives.value_loss(
        values, batch["value_targets"], batch["value_mask"],
        old_values=batch["old_values"], clip=clip)
    # Weighted per token so the (sum, denominator) total stays one mean.
    loss_sum = loss_sum + rl.value_coef * v_sum * count / jnp.maximum(v_count, 1.0)
    metrics["value_loss"] = (v_sum, v_count)
    if clip is not None:
      metrics["value_clip_fraction"] = (objectives.value_clip_count(
          values, batch["value_targets"], batch["value_mask"],
          old_values=batch["old_values"], clip=clip), v_count)
  return loss_sum, count, metrics
