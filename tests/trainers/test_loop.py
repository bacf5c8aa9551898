"""loop.fit's robustness: the non-finite guard, SIGTERM preemption, verified
checkpoints with fallback, resumed logs without repeats, the MODEL_DIR lock."""
import json
import os
import signal

import numpy as np
import pytest
from flax import nnx

from perl import checkpoints, partitioning, run_dir
from perl.models import config as model_config
from perl.models.transformer import Transformer
from perl.trainers import core, loop, sft
from perl.utils import run_lock
from tests.files import snapshot

TINY = model_config.tiny(vocab_size=259, num_layers=1, embed_dim=16,
                         num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
LENGTHS = {"inputs": 48, "targets": 32}


def _trainer(steps, **optimizer):
  partitioner = partitioning.Partitioner("data=-1")
  module = partitioner.create_sharded_model(
      lambda: Transformer(TINY, rngs=nnx.Rngs(0)))
  return core.Trainer(
      model=module, trainable=nnx.Param, loss_fn=sft.SftModel().loss_fn,
      optimizer=core.OptimizerConfig(learning_rate=1e-2, **optimizer),
      total_steps=steps, partitioner=partitioner), partitioner


def _batches(partitioner, *, nan_at=None, sigterm_at=None):
  """The synthetic_sft train batches; batch `nan_at` (0-based, counted from
  the start of the run) gets NaN loss weights, drawing batch `sigterm_at`
  sends this process SIGTERM."""
  make = loop.train_batches(task="synthetic_sft", feature_lengths=LENGTHS,
                            batch_size=8, partitioner=partitioner, seed=0)

  def factory(skip):
    for i, batch in enumerate(make(skip), start=skip):
      if i == nan_at:
        batch = dict(batch)
        batch["decoder_loss_weights"] = np.full(
            batch["decoder_loss_weights"].shape, np.nan, np.float32)
      if i == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  return factory


def _fit(model_dir, steps, *, save_every=2, keep=5, on_corrupt="fallback",
         optimizer=None, **batch_kwargs):
  trainer, partitioner = _trainer(steps, **(optimizer or {}))
  return loop.fit(
      trainer=trainer, model_dir=model_dir, train_steps=steps,
      train_batches=_batches(partitioner, **batch_kwargs),
      checkpoint=checkpoints.CheckpointConfig(save_every=save_every, keep=keep,
                                              on_corrupt=on_corrupt),
      log_every=100,
      on_finish=loop.export_on_finish(model_dir, None)), trainer


def _rows(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _steps(model_dir, sub="checkpoints"):
  return sorted(int(s) for s in os.listdir(os.path.join(model_dir, sub))
                if s.isdigit())




def test_nan_at_step_k_stops_there_saves_nothing_of_it_and_no_export(tmp_path):
  d = str(tmp_path / "run")
  with pytest.raises(checkpoints.NonFiniteError) as e:
    _fit(d, 8, nan_at=4)  # batch 4 is step 5
  msg = str(e.value)
  assert msg.startswith("Step 5: non-finite grad_norm=nan, loss=nan;"), msg
  assert "the last checkpoint is step 4" in msg
  assert _steps(d) == [2, 4]
  assert not os.path.exists(os.path.join(d, run_dir.EXPORT))
  assert not os.path.exists(os.path.join(d, run_dir.LOCK))
  text = open(os.path.join(d, "metrics.jsonl")).read()
  assert "NaN" not in text
  rows = [json.loads(l) for l in text.splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert rows[-1]["train/loss"] is None and rows[-2]["train/loss"] > 0
  # Steps < k are untouched and verify: a rerun resumes from step 4.
  before = snapshot(os.path.join(d, "checkpoints"))
  out, trainer = _fit(d, 4)
  assert trainer.step == 4 and out["step"] == 4
  assert snapshot(os.path.join(d, "checkpoints")) == before


def test_skip_nonfinite_skips_and_counts_the_update(tmp_path):
  d = str(tmp_path / "run")
  out, trainer = _fit(d, 4, nan_at=1, optimizer=dict(skip_nonfinite=True))
  assert out["step"] == 4
  rows = _rows(d)
  assert [r["train/skipped_updates"] for r in rows] == [0, 1, 1, 1]
  assert [r["train/consecutive_skips"] for r in rows] == [0, 1, 0, 0]
  flat = checkpoints.flatten(trainer.state.params)
  checkpoints.check_finite(flat, where="params")  # the NaN step left no trace
  assert os.path.isdir(os.path.join(d, run_dir.EXPORT))


def test_sigterm_saves_at_step_boundary_and_restart_equals_straight_run(
    tmp_path):
  straight = str(tmp_path / "straight")
  _fit(straight, 6, save_every=100)
  d = str(tmp_path / "preempted")
  previous = signal.getsignal(signal.SIGTERM)
  out, trainer = _fit(d, 6, save_every=100, sigterm_at=2)  # during step 3
  assert out["preempted"] is True and out["step"] == 3 and trainer.step == 3
  assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
  assert _steps(d) == [3]
  assert not os.path.exists(os.path.join(d, run_dir.EXPORT))
  out, _ = _fit(d, 6, save_every=100)
  assert out["step"] == 6
  a = [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in _rows(straight)]
  b = [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in _rows(d)]
  assert len(a) == 6 and a == b  # bit-exact, every step once
  assert len({x[1] for x in a}) == 6


def test_resumed_run_logs_each_step_once(tmp_path):
  d = str(tmp_path / "run")
  _fit(d, 6, save_every=2, keep=5)
  assert [r["step"] for r in _rows(d)] == [1, 2, 3, 4, 5, 6]
  # As after a kill -9 between the save of step 4 and the end: rows 5 and 6
  # were logged but their checkpoints never written.
  import shutil
  shutil.rmtree(os.path.join(d, "checkpoints", "6"))
  shutil.rmtree(os.path.join(d, run_dir.EXPORT))
  first = {r["step"]: r["train/loss"] for r in _rows(d)}
  _fit(d, 6, save_every=2, keep=5)
  rows = _rows(d)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {r["step"]: r["train/loss"] for r in rows} == first
  # TensorBoard: the resumed writer's file starts with a purge of the steps
  # past the restored one (TensorBoard drops older events at step >= 5).
  import tensorflow as tf
  tb = os.path.join(d, "tensorboard")
  files = sorted(os.listdir(tb), key=lambda f: os.path.getmtime(
      os.path.join(tb, f)))
  assert len(files) == 2
  first = [e for e in tf.compat.v1.train.summary_iterator(
      os.path.join(tb, files[0]))]
  second = [e for e in tf.compat.v1.train.summary_iterator(
      os.path.join(tb, files[1]))]
  assert not any(e.HasField("session_log") for e in first)
  starts = [e.step for e in second if e.HasField("session_log")]
  assert starts == [5]
  assert sorted({e.step for e in second if e.summary.value}) == [5, 6]


def _state_data_files(step_dir):
  out = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      p = os.path.join(root, f)
      if "/d/" in p and os.path.getsize(p) > 64:
        out.append(p)
  assert out, step_dir
  return out


def _flip_byte(step_dir):
  """64 single-byte flips spread over each data file (as in issue 11): one
  flip alone can land in bytes that no array reads, and which of OCDBT's
  files hold live arrays varies from run to run."""
  for path in _state_data_files(step_dir):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      for i in range(1, 65):
        f.seek(size * i // 65)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(step_dir):
  """Every data file cut in half (a save killed mid-write)."""
  for path in _state_data_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _empty_metadata(step_dir):
  open(os.path.join(step_dir, "state", "_METADATA"), "w").close()


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, _empty_metadata])
def test_damaged_newest_checkpoint_falls_back_to_previous_step(
    tmp_path, damage, capsys):
  d = str(tmp_path / "run")
  _fit(d, 4, save_every=2)
  assert _steps(d) == [2, 4]
  damage(os.path.join(d, "checkpoints", "4"))
  trainer, _ = _trainer(4)
  manager = checkpoints.CheckpointManager(
      d, checkpoints.CheckpointConfig(on_corrupt="fallback"))
  state, extra = manager.restore(trainer.state)
  manager.close()
  assert int(state.step) == 2 and extra == {"consumed_batches": 2}
  out = capsys.readouterr().out
  assert out.count("WARNING: Checkpoint ") == 1
  assert f"{d}/checkpoints/4" in out and "Falling back to step 2" in out
  assert _steps(d) == [2]
  assert os.path.isdir(os.path.join(d, "corrupt", "checkpoints-4"))


def test_damaged_newest_checkpoint_fails_naming_step_when_configured(tmp_path):
  d = str(tmp_path / "run")
  _fit(d, 4, save_every=2)
  _flip_byte(os.path.join(d, "checkpoints", "4"))
  before = snapshot(d)
  with pytest.raises(checkpoints.CorruptCheckpointError) as e:
    _fit(d, 6, save_every=2, on_corrupt="fail")
  msg = str(e.value)
  assert msg.startswith(f"Checkpoint {d}/checkpoints/4 ")
  assert f"rm -rf {d}/checkpoints/4" in msg
  assert "\n" not in msg
  assert snapshot(d) == before  # nothing written, nothing moved


def test_second_run_on_locked_model_dir_fails_and_writes_nothing(tmp_path):
  d = str(tmp_path / "run")
  os.makedirs(d)
  with open(os.path.join(d, run_dir.LOCK), "w") as f:
    json.dump({"pid": 1, "host": "other-host", "started": "then"}, f)
  before = snapshot(d)
  with pytest.raises(run_lock.ModelDirLockedError,
                     match="in use by pid 1 on host other-host"):
    _fit(d, 2)
  assert snapshot(d) == before


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
  import socket
  import subprocess
  dead = subprocess.Popen(["true"])
  dead.wait()
  d = str(tmp_path / "run")
  os.makedirs(d)
  with open(os.path.join(d, run_dir.LOCK), "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
  out, _ = _fit(d, 2)
  assert out["step"] == 2
  assert not os.path.exists(os.path.join(d, run_dir.LOCK))
