"""The rollout's jitted programs over explicit (params, frozen) states.

  sample    prefill + KV-cache decoding of responses (perl.decoding.generate)
  score     [B] rewards of [prompt | response] rows: the Hydra reward adapter
            + head, a separate RewardModule, or a programmatic reward_fn
  logprobs  policy and anchor log-probs, the policy's entropy and the values
            of the response tokens: the policy's of the sampled distribution,
            softmax(logits / temperature) over the top-k / top-p kept set;
            the anchor's of the whole tempered softmax (KL to it is finite)

Each program is compiled once per key (sampling config, prompt length, ...)
and can be lowered on abstract shapes, so a benchmark lowers exactly what
training runs.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from perl import decoding, partitioning
from perl.models.hydra import POLICY, HydraModule, sequence_positions

# reward_fn(tokens, segment_ids) -> [B] scores of [prompt | response] rows.
RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


class Rollout:
  """Builds and caches the rollout programs of one Hydra model."""

  def __init__(
      self, *, graphdef: nnx.GraphDef, partitioner: partitioning.Partitioner,
      params_shardings: Any, frozen_shardings: Any, uses_value: bool,
      reward_module: nnx.Module | None = None, reward_fn: RewardFn | None = None,
      abstract: bool = False,
  ):
    self.graphdef = graphdef
    self.partitioner = partitioner
    self.params_shardings = params_shardings
    self.frozen_shardings = frozen_shardings
    self.uses_value = uses_value
    self.reward_fn = reward_fn
    self.reward_graphdef = self.reward_state = None
    if reward_module is not None:
      self.reward_graphdef, state = nnx.split(reward_module)
      self.reward_state = state if abstract else partitioner.shard_state(state)
    self._programs: dict[Hashable, Callable] = {}

  def _jit(self, key, fn, *arg_shardings):
    if key not in self._programs:
      self._programs[key] = self.partitioner.jit(fn, in_shardings=arg_shardings)
    return self._programs[key]

  def _merge(self, params, frozen) -> HydraModule:
    return nnx.merge(self.graphdef, params, frozen)

  def sample_program(self, config: decoding.SamplingConfig, adapter: str | None = POLICY):
    """fn(params, frozen, prompts, mask, rng) -> decoding.DecodeOutput."""
    bs = self.partitioner.batch_sharding()

    def fn(params, frozen, prompts, mask, rng):
      model = self._merge(params, frozen)
      return decoding.generate(model.backbone, prompts, mask, rng, config=config,
                               adapter=adapter)

    replicated = NamedSharding(self.partitioner.mesh, P())
    return self._jit(("sample", config, adapter), fn, self.params_shardings,
                     self.frozen_shardings, bs, bs, replicated)

  def score_inputs(self, params, frozen) -> tuple:
    """The score program's arguments before (tokens, segment_ids)."""
    if self.reward_fn is not None:
      return ()
    if self.reward_state is not None:
      return (self.reward_state,)
    return (params, frozen)

  def score_program(self):
    """fn(*score_inputs(params, frozen), tokens, segment_ids) -> [B] scores."""
    bs = self.partitioner.batch_sharding()
    if self.reward_fn is not None:
      return self._jit("score_fn", self.reward_fn, bs, bs)
    if self.reward_state is not None:
      def separate(state, tokens, seg):
        module = nnx.merge(self.reward_graphdef, state)
        return module(tokens, positions=sequence_positions(seg), segment_ids=seg)
      return self._jit("score_separate", separate,
                       self.partitioner.state_shardings(self.reward_state), bs, bs)

    def shared(params, frozen, tokens, seg):
      return self._merge(params, frozen).reward(
          tokens, positions=sequence_positions(seg), segment_ids=seg)
    return self._jit("score", shared, self.params_shardings, self.frozen_shardings,
                     bs, bs)

  def logprobs_program(self, prompt_length: int, temperature: float,
                       top_k: int = 0, top_p: float = 1.0):
    """fn(params, frozen, tokens, segment_ids) -> {policy_logp, anchor_logp,
    entropy[, values]}, each [B, N] over the response tokens.

    The policy's log-probs and entropy are of softmax(logits / temperature)
    renormalised over the top_k / top_p kept set (what the sampler drew
    from); the anchor's are of the untruncated tempered softmax, whose
    support covers the policy's, so KL(π_sampled ‖ π_anchor) is finite."""
    bs = self.partitioner.batch_sharding()
    uses_value = self.uses_value

    def fn(params, frozen, tokens, seg):
      model = self._merge(params, frozen)
      pos = sequence_positions(seg)
      fwd = dict(positions=pos, segment_ids=seg, prompt_length=prompt_length)
      # Chunked under remat (perl/logprobs.py): the [B, N, V] logits never
      # exist.
      policy = model.response_logprobs(tokens, adapter=POLICY, with_entropy=True,
                                       temperature=temperature, top_k=top_k,
                                       top_p=top_p, **fwd)
      anchor = model.response_logprobs(tokens, adapter=None, temperature=temperature,
                                       **fwd)
      out = {"policy_logp": policy["logp"], "anchor_logp": anchor["logp"],
             "entropy": policy["entropy"]}
      if uses_value:
        values = model.values(tokens, positions=pos, segment_ids=seg)
        out["values"] = values[:, prompt_length - 1:-1]
      return out

    return self._jit(("logprobs", prompt_length, temperature, top_k, top_p), fn,
                     self.params_shardings, self.frozen_shardings, bs, bs)
