"""Held-out evaluation of an RL policy against its SFT starting point.

On held-out prompts, the policy (policy adapter) and the SFT policy (the
anchor: no adapter) each sample one response per prompt. Reported:
  reward_model_score / reward_model_score_sft   mean learned reward
  win_rate        P(RM prefers the policy's response over the SFT one), ties ½
  kl              mean Σ_t log π − log π_anchor over the policy's samples
  ground_truth_reward / ground_truth_reward_sft   the task's programmatic
                  truth (e.g. the synthetic task's), when one is given
  response_length
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from perl import decoding
from perl.trainers.policy import POLICY, PolicyTrainer

TruthFn = Callable[[str, str], float]


def decode_rows(vocab: seqio.Vocabulary, tokens: np.ndarray, mask: np.ndarray,
                eos_id: int | None) -> list[str]:
  """Text of each row's real tokens, stopping before EOS."""
  out = []
  for row, m in zip(np.asarray(tokens), np.asarray(mask)):
    ids = [int(t) for t, keep in zip(row, m) if keep]
    if eos_id is not None and eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    out.append(vocab.decode(ids))
  return out


def make_evaluate(
    trainer: PolicyTrainer, *, prompt_batches: Callable[[], Iterator[tuple[dict, int]]],
    sampling: decoding.SamplingConfig, vocabulary: seqio.Vocabulary,
    ground_truth: TruthFn | None = None, seed: int = 1234,
) -> Callable[[], dict[str, float]]:
  """() -> metrics over one pass of the held-out prompts."""

  def evaluate() -> dict[str, float]:
    sums: dict[str, float] = {}
    count = 0
    for i, (batch, n) in enumerate(prompt_batches()):
      rng = jax.random.fold_in(jax.random.key(seed), i)
      shard = trainer.partitioner.shard_batch(
          {"p": batch["prompt_tokens"], "m": batch["prompt_mask"]})
      prompt_length = batch["prompt_tokens"].shape[1]
      results = {}
      for name, adapter in (("policy", POLICY), ("sft", None)):
        out = trainer.sample(shard["p"], shard["m"], rng, config=sampling, adapter=adapter)
        tokens = jnp.concatenate([shard["p"], out.tokens], axis=1)
        seg = jnp.concatenate([shard["m"], out.mask], axis=1)
        results[name] = (out, np.asarray(trainer.score(tokens, seg))[:n], tokens, seg)
      out, score, tokens, seg = results["policy"]
      _, score_sft, _, _ = results["sft"]
      lp = trainer.logprobs(tokens, seg, prompt_length)
      mask = np.asarray(out.mask)[:n]
      kl = ((np.asarray(lp["policy_logp"]) - np.asarray(lp["anchor_logp"]))[:n] * mask).sum(1)
      part = {
          "reward_model_score": score.sum(),
          "reward_model_score_sft": score_sft.sum(),
          "win_rate": ((score > score_sft) + 0.5 * (score == score_sft)).sum(),
          "kl": kl.sum(),
          "response_length": mask.sum(),
      }
      if ground_truth is not None:
        prompts = decode_rows(vocabulary, batch["prompt_tokens"][:n],
                              batch["prompt_mask"][:n], None)
        for name in ("policy", "sft"):
          o = results[name][0]
          texts = decode_rows(vocabulary, np.asarray(o.tokens)[:n],
                              np.asarray(o.mask)[:n], sampling.eos_id)
          key = "ground_truth_reward" + ("" if name == "policy" else "_sft")
          part[key] = sum(ground_truth(p, r) for p, r in zip(prompts, texts))
      for key, v in part.items():
        sums[key] = sums.get(key, 0.0) + float(v)
      count += n
    if not count:
      raise ValueError("The held-out prompt split gave no batches.")
    return {key: v / count for key, v in sums.items()}

  return evaluate
