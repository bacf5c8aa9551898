"""Held-out policy eval: several samples per prompt, each pass with its own keys."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from perl import decoding, partitioning
from perl.trainers import policy_eval

VOCAB = seqio.ByteVocabulary()
A, B = VOCAB.encode("a")[0], VOCAB.encode("b")[0]


class FakePolicy:
  """Samples 'a' or 'b' from the key (the SFT policy with the same key the
  same); records every key it was given."""

  def __init__(self):
    self.partitioner = partitioning.Partitioner(
        partitioning.create_mesh("data=1", devices=jax.devices()[:1]))
    self.step = 0
    self.keys = []

  def sample(self, prompts, mask, rng, *, config=None, adapter=None):
    self.keys.append(tuple(np.asarray(jax.random.key_data(rng)).ravel()))
    pick = jax.random.bernoulli(rng, 0.5, (prompts.shape[0], 1))
    tokens = jnp.where(pick, A, B).astype(jnp.int32)
    return types.SimpleNamespace(tokens=tokens, mask=jnp.ones_like(tokens))

  def score(self, tokens, segment_ids):
    return jnp.zeros(tokens.shape[0])

  def logprobs(self, tokens, segment_ids, prompt_length, *, sampling=None):
    self.scored_with = sampling
    z = jnp.zeros((tokens.shape[0], tokens.shape[1] - prompt_length))
    return {"policy_logp": z, "anchor_logp": z}


def _batches(num_batches=3, rows=8):
  def gen():
    for _ in range(num_batches):
      yield ({"prompt_tokens": np.full((rows, 2), A, np.int32),
              "prompt_mask": np.ones((rows, 2), np.int32)}, rows)
  return gen


def _evaluate(policy, samples_per_prompt):
  return policy_eval.make_evaluate(
      policy, prompt_batches=_batches(), vocabulary=VOCAB,
      sampling=decoding.SamplingConfig(max_new_tokens=1, temperature=0.7, eos_id=None),
      ground_truth=lambda prompt, response: float(response == "a"),
      samples_per_prompt=samples_per_prompt)()


def test_samples_per_prompt_averages_passes_with_fresh_keys():
  one = FakePolicy()
  m1 = _evaluate(one, 1)
  four = FakePolicy()
  m4 = _evaluate(four, 4)
  # Policy and SFT share each key; every pass has its own keys.
  assert len(one.keys) == 2 * 3 and len(four.keys) == 2 * 12
  assert len(set(four.keys)) == 12
  # Pass 0 is the one-pass eval, unchanged.
  assert four.keys[:6] == one.keys
  # The 4-pass mean is the mean of 96 draws, not 24 draws repeated: it equals
  # the average of the four single passes.
  truths = []
  for rep in range(4):
    p = FakePolicy()
    passes = policy_eval.make_evaluate(
        p, prompt_batches=_batches(), vocabulary=VOCAB,
        sampling=decoding.SamplingConfig(max_new_tokens=1, eos_id=None),
        ground_truth=lambda prompt, response: float(response == "a"),
        samples_per_prompt=rep + 1)()
    truths.append(passes["ground_truth_reward"] * (rep + 1))
  per_pass = np.diff([0.0] + truths)
  assert len(set(np.round(per_pass, 6))) > 1  # the passes really differ
  np.testing.assert_allclose(m4["ground_truth_reward"], per_pass.mean(), atol=1e-9)
  assert m4["ground_truth_reward"] == m4["ground_truth_reward_sft"]
  assert m1["ground_truth_reward"] == pytest.approx(per_pass[0])


def test_eval_kl_is_scored_under_the_distribution_the_eval_samples():
  """With top-k / top-p on, the eval's KL takes the log-probs of the truncated
  distribution it sampled from, not the untruncated softmax."""
  policy = FakePolicy()
  sampling = decoding.SamplingConfig(max_new_tokens=1, temperature=0.7, top_p=0.9,
                                     top_k=5, eos_id=None)
  policy_eval.make_evaluate(policy, prompt_batches=_batches(), vocabulary=VOCAB,
                            sampling=sampling)()
  assert policy.scored_with == sampling


def test_samples_per_prompt_must_be_positive():
  with pytest.raises(ValueError, match="samples_per_prompt must be >= 1"):
    _evaluate(FakePolicy(), 0)
