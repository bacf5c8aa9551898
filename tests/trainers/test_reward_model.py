"""Reward-model training end to end: gin configs, exact resume, the
synthetic SFT -> LoRA RM accuracy bar, and real TM-4 pointwise data."""
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from perl import gin_utils
from perl.models import config as model_config
from perl.trainers import reward_model, runner, sft

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
CONFIGS = os.path.join(ROOT, "configs")
TINY = model_config.tiny(vocab_size=259, num_layers=2, embed_dim=32,
                         num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _main(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="")
  return subprocess.run(
      [sys.executable, "-m", "perl.main", "--jax_backend=cpu",
       "--verbosity=-1", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_experiment_gin_missing_required_macro_names_it(clean_gin):
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin_flags(
        [CONFIGS], ["experiments/synthetic_reward_model.gin"],
        ["BASE_CHECKPOINT = '/tmp/sft'"])
  assert str(e.value) == (
      "Gin macro MODEL_DIR is %gin.REQUIRED but was never set: pass"
      " --gin.MODEL_DIR=<value> or bind it in a gin file.")


def test_experiment_gin_misspelt_binding_names_it(clean_gin):
  with pytest.raises(gin_utils.GinConfigError,
                     match="has no parameter 'eval_evry'.*'eval_every'"):
    gin_utils.parse_gin_flags(
        [CONFIGS], ["experiments/synthetic_reward_model.gin"],
        ["MODEL_DIR = '/tmp/x'", "BASE_CHECKPOINT = '/tmp/sft'",
         "perl.trainers.runner.train.eval_evry = 3"])


def test_resumed_run_reproduces_uninterrupted_run_exactly(tmp_path):
  kwargs = dict(objective=reward_model.RewardModelObjective(),
                mixture_or_task_name="synthetic_preference",
                task_feature_lengths={"prompt": 48, "response": 32},
                batch_size=8, model_config=TINY, mesh="data=4,model=2",
                eval_max_batches=1, export=False, log_every=100)
  straight = str(tmp_path / "straight")
  runner.train(model_dir=straight, train_steps=6, **kwargs)
  resumed = str(tmp_path / "resumed")
  # Preempted after 3 of 6 steps (cosine schedule still spans 6), rerun.
  runner.train(model_dir=resumed, train_steps=6, stop_at_step=3, **kwargs)
  out = runner.train(model_dir=resumed, train_steps=6, **kwargs)
  assert out["step"] == 6
  a = [m["train/loss"] for m in _metrics(straight) if "train/loss" in m]
  b = [m["train/loss"] for m in _metrics(resumed) if "train/loss" in m]
  assert len(a) == 6 and len(b) == 6
  assert a == b  # bit-exact: same state, same batches after the resume
  assert len(set(a)) == 6  # and the batches really differ step to step
  steps = sorted(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints"))
                 if s.isdigit())
  assert steps == [3, 6]


def test_synthetic_sft_then_lora_reward_model_beats_080(tmp_path):
  """The PERL claim in miniature: SFT a tiny base through perl.main, then a
  LoRA-only RM on the frozen base reaches >= 80% pair accuracy on held-out
  orders. With LoRA on q,k,v,o only this was a coin flip: 0.873 0.864 0.873
  0.922 over RM seeds 0-3, and 0.797 / 0.783 at seed 0 after two changes of
  float summation order (a custom LoRA VJP, a blocked attention kernel). The
  experiment now adapts every projection (configs/experiments/
  synthetic_reward_model.gin): 0.898 0.840 0.923 0.901 over seeds 0-3. The
  old 0.90 bar was met on a validation split whose prompts were almost all
  training prompts."""
  sft_dir, rm_dir = str(tmp_path / "sft"), str(tmp_path / "rm")
  proc = _main("--gin_file=experiments/synthetic_sft.gin",
               f"--gin.MODEL_DIR={sft_dir}", "--gin.TRAIN_STEPS=300",
               "--gin.EVAL_EVERY=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isdir(os.path.join(sft_dir, "export"))
  assert "MIXTURE_OR_TASK_NAME = 'synthetic_sft'" in open(
      os.path.join(sft_dir, "config.gin")).read()
  proc = _main("--gin_file=experiments/synthetic_reward_model.gin",
               f"--gin.MODEL_DIR={rm_dir}", f"--gin.BASE_CHECKPOINT={sft_dir}",
               "--gin.TRAIN_STEPS=1000", "--gin.EVAL_EVERY=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "trainable" in proc.stdout and "step 1000/1000" in proc.stdout
  final = [m for m in _metrics(rm_dir) if "eval/accuracy" in m][-1]
  assert final["eval/num_examples"] == 1000
  assert final["eval/accuracy"] >= 0.80, final
  assert final["eval/reward_chosen"] > final["eval/reward_rejected"]
  train = [m for m in _metrics(rm_dir) if "train/loss" in m]
  for key in ("train/grad_norm", "train/learning_rate", "train/tokens_per_sec",
              "train/margin", "train/accuracy"):
    assert np.isfinite(train[-1][key]), key
  assert os.listdir(os.path.join(rm_dir, "tensorboard"))
  assert os.listdir(os.path.join(rm_dir, "best"))


@pytest.mark.skipif(not os.environ.get("PERL_DATA_DIR"),
                    reason="PERL_DATA_DIR is unset (real TM-4 reward data)")
def test_tm4_pointwise_reward_model_reports_auc_and_baseline(tmp_path):
  out = runner.train(
      objective=reward_model.RewardModelObjective(),
      model_dir=str(tmp_path), train_steps=4,
      mixture_or_task_name="taskmaster4_pointwise",
      task_feature_lengths={"prompt": 96, "response": 32}, batch_size=16,
      model_config=TINY, mesh="data=8", export=False, eval_max_batches=None)
  n = out["eval/num_examples"]
  assert n == 131  # the validation dialog groups, duplicates removed
  assert 0.0 <= out["eval/auc"] <= 1.0
  assert 0.0 <= out["eval/accuracy"] <= 1.0
  # 109 of the 131 held-out labels are 1.0: the majority class is "good".
  assert 0.75 <= out["eval/majority_baseline"] <= 0.95
  assert out["eval/majority_baseline"] == out["eval/positive_rate"]
  assert np.isfinite(out["train/loss"]) and np.isfinite(out["eval/loss"])


def test_reward_model_rejects_sft_task_with_clear_error(tmp_path):
  with pytest.raises(ValueError, match="needs a preference or pointwise task"):
    runner.train(objective=reward_model.RewardModelObjective(),
                 model_dir=str(tmp_path), train_steps=1,
                 mixture_or_task_name="synthetic_sft",
                 task_feature_lengths={"inputs": 8, "targets": 8},
                 batch_size=8, model_config=TINY)


def test_sft_rejects_reward_task_with_clear_error(tmp_path):
  with pytest.raises(ValueError, match="SFT needs an sft task"):
    runner.train(objective=sft.SftObjective(), model_dir=str(tmp_path),
                 train_steps=1, mixture_or_task_name="synthetic_preference",
                 task_feature_lengths={"prompt": 8, "response": 8},
                 batch_size=8, model_config=TINY)
