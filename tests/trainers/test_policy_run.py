"""RL through the gin entry function: Hydra RM loading, eval, export, resume."""

import dataclasses
import json
import os

import numpy as np
import pytest

from perl import checkpoints, decoding, run_dir
from perl.rl import kl as kl_lib
from perl.models import config as model_config
from perl.trainers import core, policy, policy_stage, reward_model, runner
from tasks import synthetic

TINY = model_config.tiny(vocab_size=259, num_layers=1, embed_dim=32, num_heads=2,
                         num_kv_heads=1, head_dim=16, mlp_dim=64)
LORA = model_config.LoRAConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("rm"))
  runner.train(
      objective=reward_model.RewardModelObjective(lora=LORA),
      model_dir=path, train_steps=2, mixture_or_task_name="synthetic_preference",
      task_feature_lengths={"prompt": 48, "response": 32}, batch_size=8,
      model_config=TINY, eval_max_batches=1, export=True, log_every=100)
  return path


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _run(model_dir, reward_dir, steps, **overrides):
  stage = dict(
      model_dir=model_dir, train_steps=steps, mixture_or_task_name="synthetic_prompts",
      task_feature_lengths={"prompt": 48}, batch_size=4, model_config=TINY,
      optimizer=core.OptimizerConfig(learning_rate=1e-4),
      eval_max_batches=1, eval_batch_size=4, log_every=100, mesh="data=4,model=2")
  objective = dict(
      reward_checkpoint=reward_dir, reward_lora=LORA, policy_lora=LORA,
      # An adaptive β that moves every step: resume must continue it.
      rl=policy.RLConfig(algorithm="reinforce", kl=kl_lib.KLControllerConfig(
          init_coef=0.05, target=1e-4, horizon=8)),
      sampling=decoding.SamplingConfig(max_new_tokens=8, temperature=0.7),
      ground_truth=synthetic.ground_truth_reward)
  fields = {f.name for f in dataclasses.fields(policy_stage.PolicyObjective)}
  for key, value in overrides.items():
    (objective if key in fields else stage)[key] = value
  return runner.train(objective=policy_stage.PolicyObjective(**objective),
                      **stage)


def test_policy_run_on_shared_backbone_evaluates_exports_and_resumes(tmp_path, reward_dir):
  straight = str(tmp_path / "straight")
  out = _run(straight, reward_dir, 4)
  assert out["step"] == 4
  for key in ("eval/reward_model_score", "eval/reward_model_score_sft", "eval/win_rate",
              "eval/kl", "eval/ground_truth_reward", "eval/ground_truth_reward_sft"):
    assert np.isfinite(out[key]), key
  assert 0.0 <= out["eval/ground_truth_reward"] <= 1.0
  assert 0.0 <= out["eval/win_rate"] <= 1.0
  assert os.path.isdir(os.path.join(straight, run_dir.EXPORT))
  # Adapter-only saves: no base kernel in the train-state checkpoint.
  ckpt = os.path.join(straight, "checkpoints", "4")
  assert os.path.isdir(ckpt)
  # Exact resume: stopped after 2 of 4 steps, rerun == 4 steps straight.
  resumed = str(tmp_path / "resumed")
  assert _run(resumed, reward_dir, 4, stop_at_step=2)["step"] == 2
  _run(resumed, reward_dir, 4)
  a = [m["train/reward_mean"] for m in _metrics(straight) if "train/reward_mean" in m]
  b = [m["train/reward_mean"] for m in _metrics(resumed) if "train/reward_mean" in m]
  assert len(a) == 4 and a == b
  a = [m["train/kl_coef"] for m in _metrics(straight) if "train/kl_coef" in m]
  b = [m["train/kl_coef"] for m in _metrics(resumed) if "train/kl_coef" in m]
  assert len(set(a)) == 4 and a == b
  # A few decoded samples of the final eval, in the run directory.
  with open(os.path.join(straight, "eval_samples", "4.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 4 and {"prompt", "policy", "sft", "ground_truth_reward"} <= set(rows[0])


def test_policy_run_with_separate_reward_backbone(tmp_path, reward_dir):
  out = _run(str(tmp_path / "sep"), reward_dir, 1, reward_model_config=TINY,
             rl=policy.RLConfig(algorithm="rloo", samples_per_prompt=2), export=False)
  assert out["step"] == 1 and np.isfinite(out["train/reward_mean"])


def test_wrong_reward_adapter_rank_is_a_clear_error(tmp_path, reward_dir):
  with pytest.raises(checkpoints.CheckpointMismatchError, match="reward_lora"):
    _run(str(tmp_path / "bad"), reward_dir, 1,
         reward_lora=model_config.LoRAConfig(rank=8))


def test_missing_reward_checkpoint_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="REWARD_CHECKPOINT"):
    _run(str(tmp_path / "x"), str(tmp_path / "nowhere"), 1)


def test_prompts_task_required(tmp_path, reward_dir):
  with pytest.raises(ValueError, match="prompts task"):
    _run(str(tmp_path / "x"), reward_dir, 1, mixture_or_task_name="synthetic_preference")
