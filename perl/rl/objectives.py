"""Policy and value objectives, returned as (sum, denominator) pairs.

Returning the numerator and the token count separately (Tunix style) makes
gradient accumulation over micro-batches exact: Σ sums / Σ denominators equals
the big-batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_count(mask: jax.Array) -> jax.Array:
  return mask.astype(jnp.float32).sum()


def policy_gradient_loss(
    logp: jax.Array, advantages: jax.Array, mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """REINFORCE: −A·log π per token (A is [B] per sequence or [B, N] per token)."""
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jax.lax.stop_gradient(advantages)
  mask = mask.astype(logp.dtype)
  return -(advantages * logp * mask).sum(), token_count(mask)


def ppo_policy_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
    *, clip_ratio: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Clipped surrogate (Schulman et al. 2017). Returns (sum, count, clipped count)."""
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jax.lax.stop_gradient(advantages)
  mask = mask.astype(logp.dtype)
  ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
  loss = -jnp.minimum(unclipped, clipped)
  was_clipped = (clipped < unclipped).astype(logp.dtype) * mask
  return (loss * mask).sum(), token_count(mask), jax.lax.stop_gradient(was_clipped.sum())


# How a per-token loss becomes one number, with verl's `loss_agg_mode` names.
# TRL's GRPOConfig.loss_type: "bnpo" / "dapo" = token-mean, "grpo" =
# seq-mean-token-mean, "dr_grpo" = seq-mean-token-sum-norm.
#   token-mean               Σ_i Σ_t ℓ / Σ_i |y_i|            (DAPO, PPO)
#   seq-mean-token-sum       (1/B) Σ_i Σ_t ℓ
#   seq-mean-token-mean      (1/B) Σ_i (1/|y_i|) Σ_t ℓ         (GRPO paper, GSPO)
#   seq-mean-token-sum-norm  (1/B) Σ_i Σ_t ℓ / N, N the maximum response
#                            length (Dr.GRPO's constant normaliser)
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                "seq-mean-token-sum-norm")


def aggregation_weights(mask: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
  """(per-token weights [B, N], denominator): the loss is Σ w·ℓ / denominator.

  The (sum, denominator) form keeps minibatch sums exact, as every loss here.
  """
  mask = mask.astype(jnp.float32)
  if mode == "token-mean":
    return mask, token_count(mask)
  rows = jnp.float32(mask.shape[0])
  if mode == "seq-mean-token-sum":
    return mask, rows
  if mode == "seq-mean-token-mean":
    return mask / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0), rows
  if mode == "seq-mean-token-sum-norm":
    return mask / mask.shape[1], rows
  raise ValueError(f"RLConfig.loss_aggregation={mode!r}: choose one of {AGGREGATIONS}.")


def pg_token_loss(logp: jax.Array, advantages: jax.Array) -> jax.Array:
  """REINFORCE's per-token −A·log π ([B, N]; A [B] or [B, N])."""
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  return -(jax.lax.stop_gradient(advantages) * logp)


def clipped_token_loss(
    ratio: jax.Array, advantages: jax.Array, *, clip_low: float, clip_high: float,
) -> tuple[jax.Array, jax.Array]:
  """−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) per token and where the clip won.

  ε_low = ε_high is PPO; ε_high > ε_low is DAPO's clip-higher.
  """
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jax.lax.stop_gradient(advantages)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
  was_clipped = (clipped < unclipped).astype(ratio.dtype)
  return -jnp.minimum(unclipped, clipped), was_clipped


def sequence_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """GSPO's s_i = (π(y_i)/π_old(y_i))^(1/|y_i|) on every token of y_i, [B, N].

  Its value is s_i on each token; its gradient there is s_i·∇log π(y_t), so
  the seq-mean-token-mean of a loss in it has GSPO's gradient
  (1/B) Σ_i s_i·A_i·(1/|y_i|) Σ_t ∇log π(y_t) (as verl writes it).
  """
  mask = mask.astype(logp.dtype)
  diff = jnp.where(mask > 0, logp - jax.lax.stop_gradient(old_logp), 0.0)
  seq_log = (diff.sum(axis=1, keepdims=True)
             / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0))
  return jnp.exp(jax.lax.stop_gradient(seq_log) + logp - jax.lax.stop_gradient(logp))


def value_loss(
    values: jax.Array, returns: jax.Array, mask: jax.Array, *,
    old_values: jax.Array | None = None, clip: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """½(V − R)², with PPO's value clipping around the old values when clip is set."""
  returns = jax.lax.stop_gradient(returns)
  mask = mask.astype(values.dtype)
  loss = jnp.square(values - returns)
  if clip is not None and old_values is not None:
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    loss = jnp.maximum(loss, jnp.square(clipped - returns))
  return 0.5 * (loss * mask).sum(), token_count(mask)


def value_clip_count(
    values: jax.Array, returns: jax.Array, mask: jax.Array, *,
    old_values: jax.Array, clip: float,
) -> jax.Array:
  """Masked entries where the clipped value loss is the larger (the one used)."""
  mask = mask.astype(values.dtype)
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  used = jnp.square(clipped - returns) > jnp.square(values - returns)
  return jax.lax.stop_gradient((used.astype(values.dtype) * mask).sum())


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Per-position entropy of softmax(logits): [..., V] → [...]."""
  logp = jax.nn.log_softmax(logits)
  return -(jnp.exp(logp) * logp).sum(-1)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 − Var(R − V)/Var(R) over masked entries (1 is perfect, ≤ 0 useless)."""
  mask = mask.astype(values.dtype)
  n = jnp.maximum(mask.sum(), 1.0)
  mean_r = (returns * mask).sum() / n
  var_r = (jnp.square(returns - mean_r) * mask).sum() / n
  diff = (returns - values) * mask
  mean_d = diff.sum() / n
  var_d = (jnp.square(diff - mean_d) * mask).sum() / n
  return 1.0 - var_d / jnp.maximum(var_r, 1e-8)
