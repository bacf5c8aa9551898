"""Prefill + KV-cache sampling as one jitted program.

`generate` runs the prompt through the model once (prefill), then a
`lax.while_loop` of single-token steps over a static-shape KV cache, stopping
early once every row has emitted EOS. It returns the sampled tokens, their
log-probabilities under the distribution they were sampled from,
softmax(logits / temperature) renormalised over the top-k / top-p kept set
(the policy RL trains; untempered and untruncated when greedy), and a
response mask. Prompts are left-padded so every row's last prompt
token sits in the last column; RoPE positions skip the padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import gin
import jax
import jax.numpy as jnp
from flax import nnx

from perl import logprobs as logprobs_lib
from perl.models.transformer import KVCache, Transformer


@gin.configurable(module="perl.decoding")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """How to pick each next token.

  The sampled distribution, softmax(logits / temperature) renormalised over
  the top-k / top-p kept set (perl.logprobs.kept_set), is also the one the
  RL learner scores: the rollout's and the update's policy log-probs and
  entropy. The anchor (LoRA off) is scored untruncated at the same
  temperature, so KL(π_sampled ‖ π_anchor) stays finite.
  """

  # Number of tokens to generate after the prompt (the static response length).
  max_new_tokens: int
  # Softmax temperature for sampling (ignored when greedy).
  temperature: float = 1.0
  # Keep only the k most likely tokens (0 disables); ties with the k-th kept.
  # RL trains the renormalised distribution over them (the anchor stays whole).
  top_k: int = 0
  # Keep the smallest set of tokens whose probability reaches top_p (1 disables).
  # RL trains the renormalised distribution over them (the anchor stays whole).
  top_p: float = 1.0
  # Take the argmax instead of sampling.
  greedy: bool = False
  # Token that ends a response; None never stops early.
  eos_id: int | None = 1
  # Token written after a row has finished.
  pad_id: int = 0


@flax.struct.dataclass
class DecodeOutput:
  # [B, N] sampled tokens (pad_id after EOS).
  tokens: jax.Array
  # [B, N] log softmax(process_logits(logits))[token] (0 where mask is 0): the
  # tempered policy renormalised over the top-k / top-p kept set, i.e. the
  # distribution the token was drawn from (untempered softmax when greedy).
  logprobs: jax.Array
  # [B, N] 1 on response tokens, EOS included; 0 after it.
  mask: jax.Array
  # [B] number of response tokens (EOS included).
  lengths: jax.Array


def scoring_temperature(config: SamplingConfig) -> float:
  """The temperature of the distribution the samples come from (1 when greedy)."""
  return 1.0 if config.greedy else max(float(config.temperature), 1e-6)


def scoring_truncation(config: SamplingConfig) -> dict[str, Any]:
  """top_k / top_p of the distribution the samples come from (none when greedy)."""
  if config.greedy:
    return {"top_k": 0, "top_p": 1.0}
  return {"top_k": int(config.top_k), "top_p": float(config.top_p)}


def prompt_positions(prompt_mask: jax.Array) -> jax.Array:
  """RoPE positions of left-padded prompts: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)


def process_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature, then top-k / top-p (perl.logprobs.truncate) on [B, V] logits."""
  logits = logits / jnp.maximum(config.temperature, 1e-6)
  return logprobs_lib.truncate(logits, top_k=config.top_k, top_p=config.top_p)


def _choose(logits: jax.Array, rng: jax.Array, config: SamplingConfig
            ) -> tuple[jax.Array, jax.Array]:
  """The next token and its log-prob under the distribution it came from."""
  logits = logits.astype(jnp.float32)
  if config.greedy:
    token, scored = jnp.argmax(logits, axis=-1), jax.nn.log_softmax(logits)
  else:
    processed = process_logits(logits, config)
    token = jax.random.categorical(rng, processed)
    scored = jax.nn.log_softmax(processed)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(scored, token[:, None], axis=-1)[:, 0]


def prefill(
    model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array, *,
    max_length: int, adapter: str | None,
) -> tuple[jax.Array, KVCache, jax.Array]:
  """Runs the prompt; returns last-position logits, the cache and next positions."""
  batch = prompt_tokens.shape[0]
  cache = KVCache.init(model.config, batch_size=batch, max_length=max_length)
  positions = prompt_positions(prompt_mask)
  hidden, cache = model.hidden_states(
      prompt_tokens, positions=positions, segment_ids=prompt_mask.astype(jnp.int32),
      cache=cache, adapter=adapter,
  )
  # Only the last position predicts the first response token: projecting the
  # other P-1 onto the vocabulary ([B, P, V]) would be pure waste.
  return model.logits(hidden[:, -1]), cache, positions[:, -1] + 1


def generate(
    model: Transformer,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    config: SamplingConfig,
    adapter: str | None = None,
) -> DecodeOutput:
  """Samples `config.max_new_tokens` tokens per prompt (trace under jit)."""
  batch, prompt_len = prompt_tokens.shape
  steps = config.max_new_tokens
  logits, cache, next_pos = prefill(
      model, prompt_tokens, prompt_mask, max_length=prompt_len + steps,
      adapter=adapter,
  )
  graphdef, state = nnx.split(model)

  def cond(carry):
    i, done = carry[0], carry[3]
    return (i < steps) & ~jnp.all(done)

  # The parameters ride in the loop carry (unchanged) because nnx transforms
  # inside the body (scan over layers) refuse Variables from an outer trace.
  def body(carry):
    i, logits, cache, done, pos, rng, tokens, logprobs, mask, state = carry
    rng, step_rng = jax.random.split(rng)
    token, logp = _choose(logits, step_rng, config)
    live = ~done
    token = jnp.where(live, token, config.pad_id)
    tokens = tokens.at[:, i].set(token)
    logprobs = logprobs.at[:, i].set(jnp.where(live, logp, 0.0))
    mask = mask.at[:, i].set(live.astype(jnp.int32))
    if config.eos_id is not None:
      done = done | (token == config.eos_id)
    step_model = nnx.merge(graphdef, state)
    logits, cache = step_model(
        token[:, None], positions=pos[:, None],
        segment_ids=jnp.ones((batch, 1), jnp.int32), cache=cache, adapter=adapter,
    )
    return (i + 1, logits[:, 0], cache, done, pos + 1, rng, tokens, logprobs,
            mask, state)

  init = (
      jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((batch,), bool), next_pos,
      rng,
      jnp.full((batch, steps), config.pad_id, jnp.int32),
      jnp.zeros((batch, steps), jnp.float32),
      jnp.zeros((batch, steps), jnp.int32),
      state,
  )
  out = jax.lax.while_loop(cond, body, init)
  tokens, logprobs, mask = out[6], out[7], out[8]
  return DecodeOutput(tokens=tokens, logprobs=logprobs, mask=mask,
                      lengths=mask.sum(axis=1))


def make_generate_fn(
    graphdef: nnx.GraphDef, *, config: SamplingConfig, adapter: str | None = None,
    jit_kwargs: dict[str, Any] | None = None,
):
  """A jitted `fn(state, prompt_tokens, prompt_mask, rng) -> DecodeOutput`.

  The model travels as explicit state (nnx.split) so the compiled program is
  reused across parameter updates: one compilation per prompt shape.
  """

  def fn(state, prompt_tokens, prompt_mask, rng):
    model = nnx.merge(graphdef, state)
    return generate(model, prompt_tokens, prompt_mask, rng, config=config,
                    adapter=adapter)

  return jax.jit(fn, **(jit_kwargs or {}))


def make_prefill_fn(graphdef: nnx.GraphDef, *, max_length: int,
                    adapter: str | None = None):
  """A jitted prefill alone, for throughput measurement."""

  def fn(state, prompt_tokens, prompt_mask):
    model = nnx.merge(graphdef, state)
    logits, cache, _ = prefill(model, prompt_tokens, prompt_mask,
                               max_length=max_length, adapter=adapter)
    return logits, cache

  return jax.jit(fn)
