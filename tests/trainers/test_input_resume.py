"""A resumed run restores the input pipeline's position instead of replaying
the batches it had already consumed, and still trains bit-identically."""

import json
import os
import shutil

import numpy as np
import tensorflow as tf

from perl import checkpoints, run_dir
from perl.data import pipeline
from perl.models import config as model_config
from perl.trainers import loop, reward_model, runner

TINY = model_config.tiny(vocab_size=259, num_layers=1, embed_dim=32,
                         num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
STEPS = 24


def _counting(monkeypatch):
  """Counts the train batches the input pipeline produces."""
  produced = {"train": 0}
  original = pipeline.get_dataset

  def get_dataset(**kwargs):
    ds = original(**kwargs)
    if kwargs.get("split") != "train":
      return ds

    def count():
      produced["train"] += 1
      return 0

    return ds.map(lambda b: (b, tf.py_function(count, [], tf.int32))[0])

  monkeypatch.setattr(pipeline, "get_dataset", get_dataset)
  return produced


def _train(model_dir, train_steps, stop_at_step=None):
  return runner.train(
      objective=reward_model.RewardModelObjective(),
      model_dir=str(model_dir), train_steps=train_steps,
      mixture_or_task_name="synthetic_preference",
      task_feature_lengths={"prompt": 48, "response": 32}, batch_size=8,
      model_config=TINY, checkpoint=checkpoints.CheckpointConfig(save_every=STEPS),
      stop_at_step=stop_at_step, log_every=1, export=False, eval_max_batches=1)


def _losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def test_resume_restores_the_input_position_without_replay(tmp_path, monkeypatch):
  produced = _counting(monkeypatch)
  _train(tmp_path / "ref", STEPS + 3)
  reference = _losses(tmp_path / "ref")

  _train(tmp_path / "run", STEPS + 3, stop_at_step=STEPS)
  assert os.path.exists(loop.input_state_prefix(str(tmp_path / "run"), STEPS) + ".index")
  produced["train"] = 0
  _train(tmp_path / "run", STEPS + 3)
  # Three steps' batches plus what the prefetch buffer read ahead; a replay
  # would first produce all STEPS earlier batches again.
  assert produced["train"] < STEPS // 2, produced
  resumed = _losses(tmp_path / "run")
  for step in range(STEPS + 1, STEPS + 4):
    assert resumed[step] == reference[step], step


def test_without_a_saved_position_resume_replays_exactly(tmp_path, monkeypatch):
  produced = _counting(monkeypatch)
  _train(tmp_path / "run", STEPS + 2, stop_at_step=STEPS)
  shutil.rmtree(tmp_path / "run" / run_dir.INPUT_STATE)  # as an older run left it
  produced["train"] = 0
  _train(tmp_path / "run", STEPS + 2)
  assert produced["train"] >= STEPS + 2
  _train(tmp_path / "ref", STEPS + 2)
  assert _losses(tmp_path / "run")[STEPS + 2] == _losses(tmp_path / "ref")[STEPS + 2]


def test_resume_on_a_prepared_source_seeks_without_rereading(tmp_path,
                                                              monkeypatch):
  """TM-4 pointwise prepared into ArrayRecord files (real data): the resumed
  run reads none of the rows the first run had read before it stopped."""
  from tasks import prepare
  from tasks import prepared
  from tests.tasks.fixture_data import REAL_DATA_REASON
  import pytest

  if not os.environ.get("PERL_DATA_DIR"):
    pytest.skip(REAL_DATA_REASON)
  tfds_dir = str(tmp_path / "tfds")
  prepare.prepare(task="taskmaster4_pointwise", data_dir=tfds_dir,
                  manual_dir=os.environ["PERL_DATA_DIR"],
                  splits=["train", "validation"], num_shards=4)
  monkeypatch.setenv("PERL_TFDS_DIR", tfds_dir)
  reads = []
  original = prepared.read_records

  def spy(path, rows):
    if "-train." in os.path.basename(path):
      reads.extend((path, row) for row in rows)
    return original(path, rows)

  monkeypatch.setattr(prepared, "read_records", spy)

  def run(model_dir, stop_at_step=None):
    return runner.train(
        objective=reward_model.RewardModelObjective(),
        model_dir=str(model_dir), train_steps=STEPS + 3,
        mixture_or_task_name="taskmaster4_pointwise_prepared",
        task_feature_lengths={"prompt": 48, "response": 32}, batch_size=8,
        model_config=TINY,
        checkpoint=checkpoints.CheckpointConfig(save_every=STEPS),
        stop_at_step=stop_at_step, log_every=1, export=False,
        eval_max_batches=1)

  loop.check_inputs(task="taskmaster4_pointwise_prepared",
                    splits=("train", "validation"),
                    feature_lengths={"prompt": 48, "response": 32})
  start_up = set(reads)  # the one-example check every run makes first
  reads.clear()
  run(tmp_path / "run", stop_at_step=STEPS)
  before = set(reads) - start_up
  assert len(before) >= STEPS * 8  # the batches, the shuffle buffer, prefetch
  reads.clear()
  run(tmp_path / "run")
  after = set(reads) - start_up
  # A replay would read every row of `before` again, in the same order. The
  # restored buffers (shuffle, prefetch) may hold all three steps' rows.
  assert not after & before, len(after & before)
  # It trained on: the same batches as an uninterrupted run is pinned at the
  # pipeline level (tests/tasks/test_prepared.py), bit-identical losses for
  # the in-memory source above.
  resumed = _losses(tmp_path / "run")
  assert sorted(resumed)[-3:] == [STEPS + 1, STEPS + 2, STEPS + 3]
  assert all(np.isfinite(resumed[s]) for s in range(STEPS + 1, STEPS + 4))
