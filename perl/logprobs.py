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
policy). With `top_k` / `top_p`, the softmax is renormalised over the kept
set that `kept_set` decides, the one function the sampler
(perl.decoding.process_logits) also uses: the log-probs are those of the
distribution actually sampled.
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


# Candidates lax.top_k hands to top-p before any full-vocabulary sort.
TOP_P_CANDIDATES = 256


def _top_p_cutoff_sorted(logits: jax.Array, top_p: float) -> jax.Array:
  """Reference nucleus cutoff of [..., V] logits: sorts the whole vocabulary."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Mass strictly before each sorted token; keep tokens while it is < top_p,
  # so the most likely token always survives.
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  return jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)


def _largest(logits: jax.Array, k: int, by_sort: bool) -> jax.Array:
  """The k largest of [..., V] logits, descending: lax.top_k or a full sort.

  Both give the same values. XLA's SPMD partitioner keeps a sort sharded
  along the leading (batch) axes but gathers lax.top_k's whole operand onto
  every device (seen with jax 0.10.2 on CPU), so the learner, whose operand is
  a [B, C, V] chunk, sorts.
  """
  if by_sort:
    return jnp.flip(jnp.sort(logits, axis=-1)[..., -k:], axis=-1)
  return jax.lax.top_k(logits, k)[0]


def _top_p_cutoff(logits: jax.Array, top_p: float, candidates: int,
                  by_sort: bool = False) -> jax.Array:
  """Nucleus cutoff of [..., V] logits from lax.top_k candidates; exact.

  The nucleus is almost always far smaller than the vocabulary, so the
  `candidates` most likely tokens (lax.top_k: a partial selection, not a
  sort of all V) decide it. Only when some row's candidates hold less than
  `top_p` of the mass does the full sort run (lax.cond), so the result equals
  `_top_p_cutoff_sorted` in every case.
  """
  k = min(candidates, logits.shape[-1])
  values = _largest(logits, k, by_sort)
  probs = jnp.exp(values - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  cutoff = jnp.min(jnp.where(keep, values, jnp.inf), axis=-1, keepdims=True)
  covered = jnp.all(jnp.sum(probs, axis=-1) >= top_p) | (k == logits.shape[-1])
  return jax.lax.cond(covered, lambda: cutoff,
                      lambda: _top_p_cutoff_sorted(logits, top_p))


def kept_set(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0,
             by_sort: bool = False) -> jax.Array | None:
  """[..., V] bool: the tokens a top-k / top-p sampler may draw; None: all.

  `logits` are already tempered. Top-k keeps every token tied with the k-th
  largest logit; top-p then keeps the smallest prefix of the (top-k
  renormalised) sorted distribution whose mass reaches top_p, the most
  likely token always included. The sampler and the learner both call this,
  so they agree on the support token for token. by_sort: see `_largest`
  (the same set either way).
  """
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_k={top_k}, top_p={top_p}: need top_k >= 0 (0 disables) "
                     "and 0 < top_p <= 1 (1 disables).")
  keep = None
  neg = jnp.finfo(logits.dtype).min
  if top_k:
    kth = _largest(logits, top_k, by_sort)[..., -1:]
    keep = logits >= kth
    logits = jnp.where(keep, logits, neg)
  if top_p < 1.0:
    # After top-k only top_k tokens have mass: they are the candidates.
    candidates = min(top_k, TOP_P_CANDIDATES) if top_k else TOP_P_CANDIDATES
    in_nucleus = logits >= _top_p_cutoff(logits, top_p, candidates, by_sort)
    keep = in_nucleus if keep is None else keep & in_nucleus
  return keep


def truncate(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Tempered logits with finfo.min outside `kept_set` (softmax: renormalised)."""
  keep = kept_set(logits, top_k=top_k, top_p=top_p)
  if keep is None:
    return logits
  return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)


def _chunk_stats(logits: jax.Array, targets: jax.Array, *, temperature: float,
                 top_k: int, top_p: float, with_entropy: bool,
                 with_correct: bool) -> dict[str, jax.Array]:
  logits = logits.astype(jnp.float32) / temperature
  # The support is a step function of the logits: no gradient flows through
  # its choice, only through the kept logits.
  keep = kept_set(jax.lax.stop_gradient(logits), top_k=top_k, top_p=top_p,
                  by_sort=True)
  if keep is not None:
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  out = {"logp": picked - log_z}
  if with_entropy:
    probs = jnp.exp(logits - log_z[..., None])
    # Excluded tokens have probability 0 exactly; leaving their finfo.min
    # logits out keeps 0 · finfo.min from the sum.
    kept = logits if keep is None else jnp.where(keep, logits, 0.0)
    out["entropy"] = log_z - jnp.sum(probs * kept, axis=-1)
  if with_correct:
    out["correct"] = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return out


def token_logprobs(
    logits_fn: LogitsFn,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    with_correct: bool = False,
) -> dict[str, jax.Array]:
  """log softmax(logits_fn(hidden) / temperature)[targets], chunk by chunk.

  With top_k > 0 or top_p < 1 the softmax is renormalised over `kept_set`
  of each position's tempered logits (computed per chunk, by one sort over
  V per position; see `_largest`): the distribution a sampler with that
  SamplingConfig drew from. A
  target outside the kept set gets log-prob ≈ finfo(float32).min
  (probability 0, finite so masked sums and ratios stay finite).

  logits_fn: [B, C, D] hidden -> [B, C, V] float32 logits, a pure function
    (e.g. `Transformer.logits_fn()`); it runs once per chunk (twice under
    grad: forward and the rematerialised backward).
  hidden: [B, T, D] hidden states at the positions that predict `targets`.
  targets: [B, T] int token ids.
  chunk_size: positions per chunk; None: default_chunk_size(V).
  Returns {"logp": [B, T]} plus "entropy" (of the same distribution) and
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
    return _chunk_stats(logits_fn(h), y, temperature=temperature, top_k=top_k,
                        top_p=top_p, with_entropy=with_entropy, with_correct=with_correct)

  def body(_, xs):
    return None, one_chunk(*xs)

  _, out = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  return {k: v.swapaxes(0, 1).reshape(b, n * c)[:, :t] for k, v in out.items()}
