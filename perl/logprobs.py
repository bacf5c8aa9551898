"""Token log-probs and entropy of a causal LM, in sequence chunks under remat.

A [B, T, V] float32 logits tensor is the largest activation of RL and SFT
steps at real vocabularies (128k x 8k tokens x 4 B = 4.2 GB per sequence
batch row-set). Here the vocabulary projection runs on `chunk_size`
positions at a time inside a `lax.scan` whose body is `jax.checkpoint`-ed:
the forward keeps only [B, T] results, and the backward recomputes one
chunk's logits at a time. So [B, T, V] never exists, in either pass.

Logits are float32 from the matmul (see Transformer.logits) and divided by
`temperature` before the softmax: log-probs under the tempered policy are
what a sampler at that temperature drew from (temperature=1 is the raw
policy).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array], jax.Array]
# Default chunk: the most positions (a power of 2, at most 256) whose f32
# logits stay within 2**23 elements (32 MiB) per row: 256 at a 32k
# vocabulary, 64 at Llama 3's 128k, where 256 positions held 0.5 GiB per
# chunk on each v5e chip (benchmarks/tpu_aot.py, the 1B RL step).
MAX_CHUNK = 256
MAX_ROW_ELEMENTS = 2**23


def default_chunk_size(vocab_size: int) -> int:
  """Positions per chunk for a vocabulary (see MAX_ROW_ELEMENTS)."""
  c = MAX_CHUNK
  while c > 1 and c * vocab_size > MAX_ROW_ELEMENTS:
    c //= 2
  return c


def _chunk_stats(logits: jax.Array, targets: jax.Array, *, temperature: float,
                 with_entropy: bool, with_correct: bool) -> dict[str, jax.Array]:
  logits = logits.astype(jnp.float32) / temperature
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  out = {"logp": picked - log_z}
  if with_entropy:
    probs = jnp.exp(logits - log_z[..., None])
    out["entropy"] = log_z - jnp.sum(probs * logits, axis=-1)
  if with_correct:
    out["correct"] = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return out


def token_logprobs(
    logits_fn: LogitsFn,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    with_correct: bool = False,
) -> dict[str, jax.Array]:
  """log softmax(logits_fn(hidden) / temperature)[targets], chunk by chunk.

  logits_fn: [B, C, D] hidden -> [B, C, V] float32 logits, a pure function
    (e.g. `Transformer.logits_fn()`); it runs once per chunk (twice under
    grad: forward and the rematerialised backward).
  hidden: [B, T, D] hidden states at the positions that predict `targets`.
  targets: [B, T] int token ids.
  chunk_size: positions per chunk; None: default_chunk_size(V).
  Returns {"logp": [B, T]} plus "entropy" (of the tempered softmax) and
  "correct" (argmax == target, float) when asked.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  b, t, d = hidden.shape
  if targets.shape != (b, t):
    raise ValueError(f"targets {targets.shape} do not match hidden {hidden.shape}.")
  if chunk_size is None:
    vocab = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((b, 1, d), hidden.dtype))
    chunk_size = default_chunk_size(vocab.shape[-1])
  c = max(1, min(chunk_size, t))
  n = -(-t // c)
  pad = n * c - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hidden_chunks = hidden.reshape(b, n, c, d).swapaxes(0, 1)  # [n, B, C, D]
  target_chunks = targets.reshape(b, n, c).swapaxes(0, 1)

  @jax.checkpoint  # the backward recomputes this chunk's logits
  def one_chunk(h, y):
    return _chunk_stats(logits_fn(h), y, temperature=temperature,
                        with_entropy=with_entropy, with_correct=with_correct)

  def body(_, xs):
    return None, one_chunk(*xs)

  _, out = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  return {k: v.swapaxes(0, 1).reshape(b, n * c)[:, :t] for k, v in out.items()}
