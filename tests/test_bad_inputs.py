"""Bad input gives one clear error naming the thing and the fix, and nothing
already written is changed. Gin, flags, data, checkpoints, MODEL_DIR, run
settings; in-process where possible, a few through `python -m perl.main` for
the exit code and the one-line output."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import app
from flax import nnx

from perl import checkpoints, gin_utils, run_dir
from perl import main as perl_main
from perl.models import config as model_config
from perl.models.transformer import Transformer
from perl.trainers import loop, metrics, reward_model, runner, sft
from perl.utils import run_lock
from tests.files import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SFT_GIN = "experiments/synthetic_sft.gin"
TINY = model_config.tiny(vocab_size=259, num_layers=1, embed_dim=16,
                         num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
SFT_LENGTHS = {"inputs": 48, "targets": 32}




@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture
def written(tmp_path):
  """A MODEL_DIR holding an earlier run's files, to check they survive."""
  d = tmp_path / "earlier"
  (d / "checkpoints").mkdir(parents=True)
  (d / "config.gin").write_text("TRAIN_STEPS = 7\n")
  (d / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
  return str(d)


def _main(*args, env=None, timeout=300):
  env = dict(os.environ if env is None else env,
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # perl.main quiets TF by itself
  return subprocess.run(
      [sys.executable, "-m", "perl.main", "--jax_backend=cpu", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# -- gin ----------------------------------------------------------------------

GIN_CASES = [
    (["TRAIN_STEP = 5"],
     "Gin macro TRAIN_STEP is set (--gin.TRAIN_STEP=...) but no binding uses"
     " %TRAIN_STEP: misspelt? Did you mean TRAIN_STEPS?"),
    (["LEARNIN_RATE = 0.1"], "Did you mean LEARNING_RATE?"),
    (["perl.trainers.runner.train.eval_evry = 3"],
     "has no parameter 'eval_evry' (misspelt?). Did you mean 'eval_every'?"),
    (["perl.trainers.runner.trian.eval_every = 3"],
     "unknown configurable 'perl.trainers.runner.trian'"),
    (["EVAL_EVERY = %EVAL_EVRY"],
     "Gin macro %EVAL_EVRY is used but never defined"),
    (["TRAIN_STEPS = [1,"],
     "Gin binding 'TRAIN_STEPS = [1,' does not parse (EOF in multi-line"
     " statement)"),
    (["TRAIN_STEPS 5"], "Gin binding 'TRAIN_STEPS 5' does not parse"),
]


@pytest.mark.parametrize("bindings,message", GIN_CASES)
def test_bad_gin_binding(clean_gin, written, bindings, message):
  before = snapshot(written)
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin_flags([CONFIGS], [SFT_GIN],
                              [f"MODEL_DIR = {written!r}", *bindings])
  assert message in str(e.value)
  assert "\n" not in str(e.value)
  assert snapshot(written) == before


def test_missing_required_model_dir(clean_gin):
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin_flags([CONFIGS], [SFT_GIN], [])
  assert str(e.value) == (
      "Gin macro MODEL_DIR is %gin.REQUIRED but was never set: pass"
      " --gin.MODEL_DIR=<value> or bind it in a gin file.")


def test_missing_gin_file(clean_gin):
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"Gin file 'experiments/synthetic_sfft.gin' not"
                     r" found \(searched the working directory"):
    gin_utils.parse_gin_flags([CONFIGS], ["experiments/synthetic_sfft.gin"], [])


# -- flags ----------------------------------------------------------------------

def test_gin_flag_without_value():
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"must look like '--gin.NAME=VALUE', got "
                     r"'--gin.TRAIN_STEPS'"):
    gin_utils.rewrite_gin_args(["prog", "--gin.TRAIN_STEPS"])


def test_unexpected_positional_argument():
  with pytest.raises(app.UsageError, match=r"Unexpected arguments: \['300'\]"):
    perl_main.main(["prog", "300"])


def test_unknown_jax_backend_flag_exits_1_in_one_line():
  proc = _main("--jax_backend=tpuu", f"--gin_file={SFT_GIN}", timeout=120)
  assert proc.returncode == 1
  assert "--jax_backend must be one of" in proc.stderr or (
      "value should be one of" in proc.stderr), proc.stderr[-500:]


def test_misspelt_macro_through_main_exits_1_in_one_line(written):
  before = snapshot(written)
  proc = _main(f"--gin_file={SFT_GIN}", f"--gin.MODEL_DIR={written}",
               "--gin.TRAIN_STEP=5")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "perl.main: Gin macro TRAIN_STEP is set (--gin.TRAIN_STEP=...) but no"
      " binding uses %TRAIN_STEP: misspelt? Did you mean TRAIN_STEPS?"]
  assert proc.stdout == ""
  assert snapshot(written) == before


# -- data -----------------------------------------------------------------------

def test_unknown_task():
  with pytest.raises(ValueError, match=r"unknown task or mixture "
                     r"'synthetic_sfft'; known: \[.*'synthetic_sft'"):
    loop.check_inputs(task="synthetic_sfft", splits=("train",),
                      feature_lengths=SFT_LENGTHS)


def test_unknown_split():
  with pytest.raises(ValueError) as e:
    loop.check_inputs(task="synthetic_sft", splits=("train", "valdiation"),
                      feature_lengths=SFT_LENGTHS)
  assert str(e.value) == (
      "'synthetic_sft' has no split 'valdiation'; its splits are ['train',"
      " 'validation', 'test'] (set eval_split / the split to one of them).")


def test_data_dir_unset(monkeypatch):
  monkeypatch.delenv("PERL_DATA_DIR", raising=False)
  with pytest.raises(ValueError, match=r"split 'train' does not read: "
                     r".*MissingDataError: No data directory: set the "
                     r"PERL_DATA_DIR environment variable"):
    loop.check_inputs(task="taskmaster4_sft", splits=("train",),
                      feature_lengths={"inputs": 64, "targets": 32})


def test_data_dir_without_the_dataset(monkeypatch, tmp_path):
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  with pytest.raises(ValueError) as e:
    loop.check_inputs(task="taskmaster4_sft", splits=("train",),
                      feature_lengths={"inputs": 64, "targets": 32})
  assert (f"Taskmaster: expected {tmp_path}/taskmaster/TM-4-2024/data/*.json"
          " but it does not exist. Get the upstream files from") in str(e.value)
  assert os.listdir(tmp_path) == []


def test_malformed_data_file(monkeypatch, tmp_path):
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "taskmaster"),
                  tmp_path / "taskmaster")
  bad = tmp_path / "taskmaster" / "TM-4-2024" / "data" / "data_00.json"
  bad.write_text(bad.read_text()[:-40])  # cut short
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  before = snapshot(tmp_path)
  with pytest.raises(ValueError) as e:
    loop.check_inputs(task="taskmaster4_sft", splits=("train",),
                      feature_lengths={"inputs": 64, "targets": 32})
  assert "Task 'taskmaster4_sft', split 'train' does not read: " in str(e.value)
  assert "data_00.json" in str(e.value)
  assert snapshot(tmp_path) == before


def test_sft_on_a_preference_task(written):
  before = snapshot(written)
  with pytest.raises(ValueError, match=r"Task 'synthetic_preference' is a "
                     r"'preference' task; SFT needs an sft task"):
    runner.train(objective=sft.SftObjective(), model_dir=written,
                 train_steps=2, mixture_or_task_name="synthetic_preference",
                 task_feature_lengths={"prompt": 48, "response": 32},
                 batch_size=8, model_config=TINY)
  assert snapshot(written) == before


def test_reward_model_on_an_sft_task(written):
  before = snapshot(written)
  with pytest.raises(ValueError, match=r"a reward model needs a preference "
                     r"or pointwise task"):
    runner.train(objective=reward_model.RewardModelObjective(),
                 model_dir=written, train_steps=2,
                 mixture_or_task_name="synthetic_sft",
                 task_feature_lengths=SFT_LENGTHS, batch_size=8,
                 model_config=TINY)
  assert snapshot(written) == before


def test_missing_data_through_main_is_one_line_and_leaves_no_model_dir(
    tmp_path):
  model_dir = tmp_path / "tm4"
  env = {k: v for k, v in os.environ.items() if k != "PERL_DATA_DIR"}
  proc = _main("--gin_file=experiments/tm4_sft.gin",
               f"--gin.MODEL_DIR={model_dir}", env=env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "perl.main: Task 'taskmaster4_sft', split 'train' does not read:"
      " perl.data.paths.MissingDataError: No data directory: set the"
      " PERL_DATA_DIR environment variable or bind"
      " `perl.data.paths.data_dir.root` in gin (e.g."
      " PERL_DATA_DIR=../shared/data)."]
  assert not model_dir.exists()


# -- checkpoints ------------------------------------------------------------------

def _state(scale=1.0, shape=(4, 3)):
  return {"w": jnp.full(shape, scale, jnp.float32),
          "b": jnp.arange(3, dtype=jnp.float32)}


def _saved(model_dir, steps=(1,), **config):
  manager = checkpoints.CheckpointManager(
      model_dir, checkpoints.CheckpointConfig(**config))
  for s in steps:
    manager.save(s, _state(float(s)), extra={"consumed_batches": s})
  manager.close()
  return model_dir


def _restore(model_dir, template=None, **config):
  manager = checkpoints.CheckpointManager(
      model_dir, checkpoints.CheckpointConfig(**config))
  try:
    return manager.restore(_state() if template is None else template)
  finally:
    manager.close()


def test_restore_into_other_shapes_names_parameter(tmp_path):
  d = _saved(str(tmp_path / "run"))
  before = snapshot(d)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    _restore(d, template=_state(shape=(4, 5)))
  assert str(e.value).startswith(
      f"Checkpoint {d}/checkpoints/1: parameter 'w' has shape (4, 3) but the"
      " model expects (4, 5).")
  assert snapshot(d) == before


def test_only_checkpoint_corrupt_names_it_and_how_to_remove_it(tmp_path):
  d = _saved(str(tmp_path / "run"))
  open(os.path.join(d, "checkpoints", "1", "state", "_METADATA"), "w").close()
  before = snapshot(d)
  with pytest.raises(checkpoints.CorruptCheckpointError) as e:
    _restore(d)
  assert str(e.value).startswith(f"Checkpoint {d}/checkpoints/1 does not"
                                 " restore (")
  assert f"Remove it (rm -rf {d}/checkpoints/1)" in str(e.value)
  assert snapshot(d) == before


def test_changed_array_fails_its_digest(tmp_path):
  d = _saved(str(tmp_path / "run"), steps=(1, 2))
  # Rewrite step 2's digests as if its bytes had changed after the save.
  path = os.path.join(d, "checkpoints", "2", "extra", "metadata")
  extra = json.load(open(path))
  extra["_digests"]["w"] = "0" * 64
  json.dump(extra, open(path, "w"))
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=r"checkpoints/2: array 'w' does not match the digest"):
    _restore(d, on_corrupt="fail")
  state, extra = _restore(d)  # fallback
  assert extra == {"consumed_batches": 1}
  np.testing.assert_array_equal(state["w"], np.ones((4, 3)))


def test_saving_non_finite_state_is_refused(tmp_path):
  d = str(tmp_path / "run")
  manager = checkpoints.CheckpointManager(d)
  state = _state()
  state["b"] = state["b"].at[1].set(jnp.nan)
  with pytest.raises(checkpoints.NonFiniteError,
                     match=r"Checkpoint of step 3: array 'b' holds NaN/Inf"):
    manager.save(3, state)
  manager.close()
  assert snapshot(d) == {}


def test_non_finite_eval_metric_is_never_best(tmp_path):
  d = str(tmp_path / "run")
  manager = checkpoints.CheckpointManager(d, best_metric="accuracy")
  assert not manager.save_best(1, _state(), {"accuracy": float("nan")})
  assert manager.best_step() is None
  manager.close()
  assert not os.path.exists(os.path.join(d, "best"))


def _module(**overrides):
  cfg = model_config.tiny(**{**dict(vocab_size=259, num_layers=1, embed_dim=16,
                                    num_heads=2, num_kv_heads=1, head_dim=8,
                                    mlp_dim=32), **overrides})
  return Transformer(cfg, rngs=nnx.Rngs(0))


def test_export_of_non_finite_model_is_refused(tmp_path):
  module = _module()
  module.embedder.embedding.value = module.embedder.embedding.value.at[0, 0].set(
      jnp.inf)
  path = tmp_path / "export"
  with pytest.raises(checkpoints.NonFiniteError,
                     match=r"Export to .*export: array 'embedder.embedding' holds"
                     r" NaN/Inf values"):
    checkpoints.export_merged(str(path), module, None)
  assert not path.exists()


def test_base_checkpoint_with_non_finite_weights_is_refused(tmp_path):
  state = checkpoints.flatten(nnx.state(_module(), checkpoints.BASE_PARAMS))
  state["embedder.embedding"] = state["embedder.embedding"].at[1, 1].set(jnp.nan)
  path = str(tmp_path / "run" / "export")
  with ocp.StandardCheckpointer() as ckpt:  # as a pre-guard run wrote it
    ckpt.save(path, state)
  before = snapshot(tmp_path / "run")
  target = _module()
  kept = np.asarray(target.embedder.embedding.value)
  with pytest.raises(checkpoints.NonFiniteError,
                     match=r"BASE_CHECKPOINT .*export: array 'embedder.embedding'"):
    checkpoints.load_base(str(tmp_path / "run"), target)
  np.testing.assert_array_equal(target.embedder.embedding.value, kept)
  assert snapshot(tmp_path / "run") == before


def test_base_checkpoint_of_another_model_size(tmp_path):
  path = checkpoints.export_merged(str(tmp_path / "run" / "export"),
                                   _module(), None)
  before = snapshot(path)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"parameter 'blocks.0.attn.k.kernel' has shape \(16, 8\)"
                     r" but the model expects \(32, 8\).*MODEL_CONFIG"):
    checkpoints.load_base(str(tmp_path / "run"), _module(embed_dim=32))
  assert snapshot(path) == before


def test_base_checkpoint_missing(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"BASE_CHECKPOINT '.*nowhere' holds no exported"
                     r" model .*Point it at the MODEL_DIR of a finished SFT"):
    loop.check_inputs(task="synthetic_sft", splits=(),
                      feature_lengths=SFT_LENGTHS,
                      base_checkpoints=(str(tmp_path / "nowhere"),))


def test_base_checkpoint_is_a_run_without_export(tmp_path, written):
  with pytest.raises(FileNotFoundError, match=r"holds no exported model"):
    checkpoints.check_base_checkpoint(written)


def test_base_checkpoint_with_emptied_metadata(tmp_path):
  path = checkpoints.export_merged(str(tmp_path / "run" / "export"),
                                   _module(), None)
  open(os.path.join(path, "_METADATA"), "w").close()
  before = snapshot(path)
  with pytest.raises(checkpoints.CorruptCheckpointError) as e:
    checkpoints.check_base_checkpoint(str(tmp_path / "run"))
  assert str(e.value).startswith(f"BASE_CHECKPOINT {path} does not read (")
  assert "Rerun the run that wrote it" in str(e.value)
  assert snapshot(path) == before


# -- MODEL_DIR and run settings ------------------------------------------------------

def test_locked_model_dir_names_holder_and_writes_nothing(written):
  with open(os.path.join(written, run_dir.LOCK), "w") as f:
    json.dump({"pid": 4242, "host": "tpu-vm-7", "started": "earlier"}, f)
  before = snapshot(written)
  with pytest.raises(run_lock.ModelDirLockedError) as e:
    run_lock.acquire(written)
  assert str(e.value).startswith(
      f"MODEL_DIR {written} is in use by pid 4242 on host tpu-vm-7 (since"
      " earlier): wait for that run to end")
  assert snapshot(written) == before


def test_locked_model_dir_through_main_fails_fast(written):
  holder = subprocess.Popen(["sleep", "60"])
  try:
    with open(os.path.join(written, run_dir.LOCK), "w") as f:
      json.dump({"pid": holder.pid, "host": socket.gethostname()}, f)
    before = snapshot(written)
    t0 = time.monotonic()
    proc = _main(f"--gin_file={SFT_GIN}", f"--gin.MODEL_DIR={written}")
    elapsed = time.monotonic() - t0
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"perl.main: MODEL_DIR {written} is in use by pid {holder.pid} on host"
      f" {socket.gethostname()} (since ?): wait for that run to end, stop it,"
      f" or use another MODEL_DIR. If it is dead, delete"
      f" {written}/{run_dir.LOCK}."]
  assert elapsed < 10, elapsed
  assert snapshot(written) == before


def test_zero_train_steps():
  with pytest.raises(ValueError, match=r"TRAIN_STEPS must be >= 1, got 0"):
    loop.fit(trainer=None, model_dir="/nonexistent", train_steps=0,
             train_batches=None)


def test_non_finite_metrics_are_strict_json_null(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=2)
  writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"),
                   "accuracy": 0.5})
  writer.close()
  text = (tmp_path / "metrics.jsonl").read_text()
  assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
      "step": 1, "train/loss": None, "train/grad_norm": None,
      "train/accuracy": 0.5}


def test_diverging_run_through_main_exits_nonzero_with_step(tmp_path):
  """--gin.LEARNING_RATE=1e30: stops at the first non-finite step k with exit
  code 1 and one line; checkpoints of steps < k stay, no export."""
  d = tmp_path / "run"
  proc = _main(f"--gin_file={SFT_GIN}", f"--gin.MODEL_DIR={d}",
               "--gin.TRAIN_STEPS=12", "--gin.LEARNING_RATE=1e30",
               "--gin.BATCH_SIZE=8",
               "--gin.perl.checkpoints.CheckpointConfig.save_every=1")
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("perl.main: Step "), proc.stderr[-2000:]
  k = int(last.split()[2].rstrip(":"))
  assert "non-finite grad_norm=nan" in last
  assert f"nothing of step {k} saved" in last
  steps = sorted(int(s) for s in os.listdir(d / "checkpoints") if s.isdigit())
  assert steps and max(steps) == k - 1
  assert not (d / "export").exists()
  rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text(
      ).splitlines()]
  assert rows[-1]["step"] == k and rows[-1]["train/grad_norm"] is None
  assert not (d / run_dir.LOCK).exists()
