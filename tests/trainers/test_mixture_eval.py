"""Evaluating a mixture reads every member to exhaustion: the eval counts
equal the sum of the members' (a sampled SeqIO mixture stops at the first
member that runs out), with metrics per member and combined."""
import numpy as np

from perl import partitioning
from perl.trainers import loop, reward_model
from tests.tasks.fixture_data import fixture_data  # noqa: F401

LENGTHS = {"prompt": 64, "response": 32}


def _rows(task, partitioner, batch_size=2, **kwargs):
  batches = loop.eval_batches(task=task, feature_lengths=LENGTHS,
                              batch_size=batch_size, partitioner=partitioner,
                              split="all", **kwargs)
  return sum(n for _, n, *_ in batches())


def test_mixture_eval_counts_equal_the_sum_of_members(fixture_data):
  partitioner = partitioning.Partitioner("data=-1")
  tm4 = _rows("taskmaster4_pointwise", partitioner)
  tm3 = _rows("taskmaster3_pointwise", partitioner)
  assert (tm4, tm3) == (3, 1)
  assert _rows("taskmaster_pointwise", partitioner) == tm4 + tm3
  assert _rows("taskmaster_pointwise", partitioner, batch_size=4) == tm4 + tm3


def test_mixture_metrics_per_member_and_combined(fixture_data):
  partitioner = partitioning.Partitioner("data=-1")
  batches = loop.eval_batches(task="taskmaster_pointwise",
                              feature_lengths=LENGTHS, batch_size=2,
                              partitioner=partitioner, split="all",
                              with_member=True)

  def step(batch):  # a "reward model" scoring every row +1
    return {"score": np.ones(len(batch["label"]), np.float32)}

  evaluate = loop.row_evaluate(
      step, batches, batch_keys=("label",),
      metrics=lambda outs: reward_model.eval_metrics(
          "pointwise", outs, outs.pop("label")))
  values = evaluate()
  assert values["num_examples"] == 4
  assert values["taskmaster4_pointwise/num_examples"] == 3
  assert values["taskmaster3_pointwise/num_examples"] == 1
  # Fixture labels: TM-4 1, 0, 1; TM-3 1. Scoring all positive is right on 3.
  assert values["accuracy"] == 0.75
  assert values["taskmaster4_pointwise/accuracy"] == 2 / 3
  assert values["taskmaster3_pointwise/accuracy"] == 1.0
