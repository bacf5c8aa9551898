"""Packed preference rows: the same pairs and the same reward-model loss as
one pair per row, with far fewer padding positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl.data import pipeline
from perl.models import config as model_config
from perl.models.config import LoRAConfig
from perl.models.heads import RewardModule, packed_pair_scores
from perl.trainers import reward_model

TASK = "synthetic_preference"
# Rows of 4 unpacked pairs' slots, so that several synthetic pairs share one.
LENGTHS = {"prompt": 48, "response": 48, "packed": 768}
TINY = model_config.tiny(vocab_size=259, num_layers=2, embed_dim=32,
                         num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)


def _batches(pack, batch_size):
  return pipeline.get_batches(task=TASK, split="validation", shuffle=False,
                              feature_lengths=LENGTHS, batch_size=batch_size,
                              pack=pack)


def _sequences(batch, row):
  seg = batch["segment_ids"][row]
  return {s: batch["tokens"][row][seg == s].tolist() for s in np.unique(seg) if s}


def test_packed_rows_hold_the_same_pairs_in_order():
  packed = next(_batches(True, 4))
  assert packed["tokens"].shape == (4, 768)
  expected = []
  for batch in _batches(False, 16):
    for i in range(16):
      c = batch["chosen_tokens"][i][batch["chosen_segment_ids"][i] > 0].tolist()
      r = batch["rejected_tokens"][i][batch["rejected_segment_ids"][i] > 0].tolist()
      expected.append((c, r))
    if len(expected) > 64:
      break
  got = []
  for row in range(4):
    seqs = _sequences(packed, row)
    assert sorted(seqs) == list(range(1, len(seqs) + 1))  # 1, 2, ..., 2n
    assert len(seqs) % 2 == 0  # a pair never straddles two rows
    got += [(seqs[2 * k + 1], seqs[2 * k + 2]) for k in range(len(seqs) // 2)]
    # Positions restart with every sequence; the response mask marks replies.
    seg = packed["segment_ids"][row]
    starts = np.flatnonzero((seg > 0) & (np.diff(seg, prepend=0) != 0))
    assert (packed["positions"][row][starts] == 0).all()
  assert len(got) >= 2 * 4  # several pairs per row
  assert got == expected[:len(got)]
  real = (packed["segment_ids"] > 0).mean()
  unpacked = next(_batches(False, 16))
  unpacked_real = (unpacked["chosen_segment_ids"] > 0).mean()
  assert real > 0.8 > unpacked_real


def test_packed_pair_scores_reads_each_sequence_at_its_last_token():
  seg = jnp.array([[1, 1, 2, 2, 2, 3, 4, 4, 0, 0]])
  scores = jnp.arange(10, dtype=jnp.float32)[None] * 10
  chosen, rejected, mask = packed_pair_scores(scores, seg)
  assert chosen.shape == (1, 5)
  np.testing.assert_array_equal(np.asarray(mask[0]), [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(chosen[0, :2]), [10.0, 50.0])
  np.testing.assert_array_equal(np.asarray(rejected[0, :2]), [40.0, 70.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_loss_equals_one_pair_per_row(dtype):
  """Bradley-Terry sum and pair count of packed rows = the unpacked ones."""
  config = model_config.TransformerConfig(
      **{**vars(TINY), "dtype": dtype, "param_dtype": jnp.float32})
  module = RewardModule(config, adapters={"reward": LoRAConfig(rank=4)},
                        rngs=nnx.Rngs(0))
  rm = reward_model.RewardModel(kind="preference", centering=0.01)
  packed = {k: jnp.asarray(v) for k, v in next(_batches(True, 2)).items()}
  n_pairs = int(np.sum(packed_pair_scores(
      jnp.zeros(packed["tokens"].shape), packed["segment_ids"])[2]))
  unpacked = {k: jnp.asarray(v) for k, v in next(_batches(False, n_pairs)).items()}
  loss_fn = jax.jit(lambda m, b: rm.loss_fn(m, b, None)[:2])
  packed_sum, packed_n = loss_fn(module, packed)
  sum_, n = loss_fn(module, unpacked)
  assert float(packed_n) == float(n) == n_pairs
  tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(packed_sum), float(sum_), rtol=tolerance)
