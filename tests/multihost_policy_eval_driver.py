"""The held-out policy eval over 9 prompts on one process or several.

Used by tests/test_multihost_eval.py (not a test itself):

    python multihost_policy_eval_driver.py OUT_JSON [PORT PROCESS_COUNT INDEX]

Prompt r (r = 0..8) is the two bytes chr(ord('a') + r); process p reads the
prompts r with r % num_shards == p, 8 / num_shards a batch, through
`eval_rows.lockstep`, so the shards hold 5 and 4 rows and one process has a
batch more than the other. The fake policy is a deterministic function of
each row (no sampling noise): the policy answers its prompt's first byte,
the SFT policy always 'b'; the reward is the response byte; the policy's
log-prob per response token is a hundredth of that byte, the anchor's 0. The
metrics are thus known exactly (see the test). Process 0 writes them to
OUT_JSON.
"""
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

NUM_PROMPTS, BATCH = 9, 8


class FakePolicy:

  def __init__(self, partitioner, vocab):
    self.partitioner = partitioner
    self.step = 0
    self.sft_token = vocab.encode('b')[0]

  def sample(self, prompts, mask, rng, *, config=None, adapter=None):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    del mask, rng, config
    first = prompts[:, :1]
    tokens = first if adapter else jnp.full_like(first, self.sft_token)
    return types.SimpleNamespace(tokens=tokens, mask=jnp.ones_like(tokens))

  def score(self, tokens, segment_ids):
    del segment_ids
    return tokens[:, -1].astype('float32')

  def logprobs(self, tokens, segment_ids, prompt_length, *, sampling=None):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    del segment_ids, sampling
    response = tokens[:, prompt_length:].astype(jnp.float32)
    return {'policy_logp': response / 100, 'anchor_logp': jnp.zeros_like(response)}


def main(out_path, port=None, process_count=1, index=0):
  import jax  # pylint: disable=g-import-not-at-top
  if process_count > 1:
    jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                               num_processes=process_count, process_id=index)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from perl import decoding, partitioning  # pylint: disable=g-import-not-at-top
  from perl.trainers import eval_rows, policy_eval  # pylint: disable=g-import-not-at-top

  vocab = seqio.ByteVocabulary()
  partitioner = partitioning.Partitioner(f'data={jax.device_count()}')
  shard, num_shards = partitioner.data_shard_info()
  local = BATCH // num_shards
  a = vocab.encode('a')[0]
  mine = np.array([[a + r] * 2 for r in range(NUM_PROMPTS)
                   if r % num_shards == shard], np.int32)

  def batches():
    for start in range(0, len(mine), local):
      p = mine[start:start + local]
      yield {'prompt_tokens': p, 'prompt_mask': np.ones_like(p)}

  def padding():
    z = np.zeros((local, 2), np.int32)
    return {'prompt_tokens': z, 'prompt_mask': z}

  evaluate = policy_eval.make_evaluate(
      FakePolicy(partitioner, vocab),
      prompt_batches=lambda: eval_rows.lockstep(batches(), rows=local,
                                                padding=padding),
      sampling=decoding.SamplingConfig(max_new_tokens=1, eos_id=None),
      vocabulary=vocab,
      ground_truth=lambda prompt, response: float(prompt[:1] == response),
      num_samples=NUM_PROMPTS)
  values = evaluate()
  if jax.process_index() == 0:
    with open(out_path, 'w') as f:
      json.dump({'metrics': values, 'process_count': jax.process_count(),
                 'num_shards': num_shards}, f)


if __name__ == '__main__':
  args = sys.argv[1:]
  main(args[0], *(int(x) for x in args[1:]))
