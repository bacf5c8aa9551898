"""Losses as (sum, denominator) pairs.

Every loss returns the *sum* of per-example (or per-token) losses and the
count it should be divided by. A train step sums both over micro-batches and
divides once at the end, so gradient accumulation gives exactly the gradient
of the big batch (Tunix style), whatever the padding in each micro-batch.

`weights` masks examples or tokens (0 = ignore); None means all count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SumAndDenom = tuple[jax.Array, jax.Array]


def _weights(like: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return jnp.ones(like.shape, jnp.float32)
  return weights.astype(jnp.float32)


def bradley_terry(
    chosen: jax.Array,
    rejected: jax.Array,
    *,
    weights: jax.Array | None = None,
    centering: float = 0.0,
) -> SumAndDenom:
  """Pairwise loss -log σ(r_c − r_r) [+ centering · (r_c + r_r)²].

  The centering term (PERL's reward centering) pins the mean reward near zero
  so rewards of different runs are comparable; 0 disables it.
  """
  chosen = chosen.astype(jnp.float32)
  rejected = rejected.astype(jnp.float32)
  w = _weights(chosen, weights)
  per_example = -jax.nn.log_sigmoid(chosen - rejected)
  if centering:
    per_example = per_example + centering * jnp.square(chosen + rejected)
  return jnp.sum(per_example * w), jnp.sum(w)


def sigmoid_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> SumAndDenom:
  """Pointwise loss for 0/1 (or soft) labels: BCE(σ(logits), labels)."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  w = _weights(logits, weights)
  per_example = (jax.nn.softplus(logits) - labels * logits)  # stable BCE
  return jnp.sum(per_example * w), jnp.sum(w)


def token_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> SumAndDenom:
  """Next-token cross-entropy over [B, T, V] logits and [B, T] targets.

  With SFT batches, `weights` is decoder_loss_weights (1 on target tokens,
  0 on inputs and padding), so the loss is on targets only.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  w = _weights(targets, weights)
  return jnp.sum((log_z - target_logit) * w), jnp.sum(w)


def token_accuracy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> SumAndDenom:
  """(correct argmax tokens, counted tokens)."""
  w = _weights(targets, weights)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(correct * w), jnp.sum(w)
