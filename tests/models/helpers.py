"""Shared helpers for model tests."""

import functools

from flax import nnx


@functools.partial(nnx.jit, static_argnames=("adapter",))
def forward(model, tokens, *, positions=None, segment_ids=None, cache=None,
            adapter=None):
  """model(...) under jit: tiny models run much faster compiled than eagerly."""
  return model(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
               adapter=adapter)
