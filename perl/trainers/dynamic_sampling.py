"""Dynamic sampling (DAPO's filter on groups): the policy trainer's refill.

Used by perl.trainers.policy.PolicyTrainer.train_step for an algorithm with
`filter_groups` (perl.rl.algorithms).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from perl.rl import advantages as adv_lib


def filter_groups(trainer, shard, out, scores, step_rng, timings):
  """Dynamic sampling (DAPO): a batch of groups whose k scores differ.

  Groups whose reward scores (before any shaping) are all equal carry no
  group-relative signal; they are dropped and the batch is refilled from
  more sampling rounds of the same step's prompts, with fresh random
  draws, up to RLConfig.max_sampling_rounds rounds in all. DAPO draws new
  prompts instead; the loop hands a step one batch of prompts, so here a
  prompt that gave a mixed group can fill the batch more than once. If
  the rounds still leave the batch short, it is filled with the first
  round's all-equal groups (their advantages are 0: they add no
  gradient), so the update keeps its shape; `filled_groups` counts them.
  Each kept group travels with its prompt rows. Returns (out, tokens, seg,
  scores, metrics) of the kept rows.
  """
  rl, k = trainer.rl, trainer.rl.samples_per_prompt
  local_prompts, local_mask = trainer._to_local((shard["p"], shard["m"]))
  n_groups = local_prompts.shape[0] // k
  kept, spare = [], []  # per group: its rows of prompt, prompt mask, out, scores
  drawn = rounds = 0
  for rounds in range(1, rl.max_sampling_rounds + 1):
    if rounds > 1:
      t = time.perf_counter()
      out = jax.block_until_ready(trainer.sample(
          shard["p"], shard["m"], jax.random.fold_in(step_rng, rounds - 1)))
      timings["time_sample"] += time.perf_counter() - t
      t = time.perf_counter()
      scores = jax.block_until_ready(trainer.score(
          jnp.concatenate([shard["p"], out.tokens], axis=1),
          jnp.concatenate([shard["m"], out.mask], axis=1)))
      timings["time_score"] += time.perf_counter() - t
    arrays = (local_prompts, local_mask) + tuple(trainer._to_local(
        (out.tokens, out.mask, out.logprobs, scores)))
    flat = adv_lib.zero_variance_groups(np.asarray(arrays[-1], np.float64), k)
    for g in range(n_groups):
      group = tuple(a[g * k:(g + 1) * k] for a in arrays)
      (spare if flat[g] else kept).append(group)
    drawn += n_groups
    # Every host samples the same rounds: stop once all are full.
    if _global_sum(max(n_groups - len(kept), 0)) == 0:
      break
  filled = max(n_groups - len(kept), 0)
  groups = kept[:n_groups] + spare[:filled]
  new = trainer.partitioner.shard_batch({
      name: np.concatenate([g[i] for g in groups])
      for i, name in enumerate(("p", "m", "r", "rm", "lp", "s"))})
  out = dataclasses.replace(out, tokens=new["r"], mask=new["rm"], logprobs=new["lp"],
                            lengths=new["rm"].sum(axis=1))
  tokens = jnp.concatenate([new["p"], out.tokens], axis=1)
  seg = jnp.concatenate([new["m"], out.mask], axis=1)
  metrics = {"sampling_rounds": float(rounds),
             "sampled_groups": float(_global_sum(drawn)),
             "filled_groups": float(_global_sum(filled))}
  return out, tokens, seg, new["s"], metrics


def _global_sum(x: int) -> int:
  """x summed over hosts."""
  if jax.process_count() == 1:
    return int(x)
  return int(np.sum(multihost_utils.process_allgather(np.int32(x))))
