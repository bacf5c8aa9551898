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
