"""Advantage estimators over [batch, response_length] token arrays.

Conventions: `mask` is 1 on response tokens (EOS included); sequence-level
scores are [batch]; samples of the same prompt are adjacent (k per prompt,
row i belongs to prompt i // k), as `jnp.repeat(prompts, k, axis=0)` makes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  mask = mask.astype(x.dtype)
  return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Zero mean, unit variance over the masked entries; 0 elsewhere."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def last_token_rewards(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Places each sequence's score on its last response token: [B] → [B, N]."""
  lengths = mask.sum(axis=1)
  last = jnp.maximum(lengths - 1, 0)
  onehot = jax.nn.one_hot(last, mask.shape[1], dtype=scores.dtype)
  return onehot * scores[:, None] * (lengths > 0)[:, None]


def rloo_baseline(scores: jax.Array, k: int) -> jax.Array:
  """Leave-one-out mean of the other k−1 samples of the same prompt."""
  if k < 2:
    raise ValueError(f"RLOO needs at least 2 samples per prompt, got k={k}.")
  grouped = scores.reshape(-1, k)
  baseline = (grouped.sum(axis=1, keepdims=True) - grouped) / (k - 1)
  return baseline.reshape(-1)


def group_normalized(scores: jax.Array, k: int, eps: float = 1e-4) -> jax.Array:
  """GRPO: (score − mean of its group) / (sample std of its group + eps).

  The sample (k−1) std, as TRL's GRPOTrainer (torch.std) and the GRPO paper;
  eps = 1e-4 as TRL keeps groups of equal scores at 0 instead of 0/0.
  """
  if k < 2:
    raise ValueError(f"GRPO needs at least 2 samples per prompt, got k={k}.")
  grouped = scores.reshape(-1, k)
  mean = grouped.mean(axis=1, keepdims=True)
  std = grouped.std(axis=1, keepdims=True, ddof=1)
  return ((grouped - mean) / (std + eps)).reshape(-1)


def group_centered(scores: jax.Array, k: int) -> jax.Array:
  """Dr.GRPO: score − mean of its group of k (no division by the group's std)."""
  if k < 2:
    raise ValueError(f"Dr.GRPO needs at least 2 samples per prompt, got k={k}.")
  grouped = scores.reshape(-1, k)
  return (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)


def overlong_penalty(lengths: jax.Array, *, max_length: int, buffer: int,
                     factor: float = 1.0) -> jax.Array:
  """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), [B] → [B].

  0 up to max_length − buffer tokens, then falling linearly to −factor at
  max_length: factor·((max_length − buffer) − |y|) / buffer. Responses are
  never longer than max_length here (the sampler stops there), so Eq. 13's
  −1 beyond it is the value at max_length.
  """
  if buffer <= 0:
    return jnp.zeros_like(lengths, jnp.float32)
  over = (lengths.astype(jnp.float32) - (max_length - buffer)) / buffer
  return -factor * jnp.clip(over, 0.0, 1.0)


def zero_variance_groups(scores, k: int, tol: float = 1e-6):
  """[B/k] bool: whether each prompt's k scores are all equal (numpy or jax)."""
  grouped = scores.reshape(-1, k)
  return grouped.max(axis=1) - grouped.min(axis=1) <= tol


def zero_variance_fraction(scores: jax.Array, k: int, tol: float = 1e-6) -> jax.Array:
  """Fraction of prompts whose k scores are all equal: no RLOO/GRPO signal."""
  grouped = scores.reshape(-1, k)
  spread = grouped.max(axis=1) - grouped.min(axis=1)
  return (spread <= tol).astype(jnp.float32).mean()


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) per token.

  rewards, values, mask: [B, N]; the value after the last response token is 0.
  Returns (advantages, returns = advantages + values), zero where mask is 0.
  """
  mask = mask.astype(rewards.dtype)
  values = values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def step(carry, xs):
    delta, m = xs
    adv = (delta + gamma * lam * carry) * m
    return adv, adv

  _, advantages = jax.lax.scan(
      step, jnp.zeros(rewards.shape[0], rewards.dtype),
      (deltas.T, mask.T), reverse=True,
  )
  advantages = advantages.T
  return advantages, (advantages + values) * mask
