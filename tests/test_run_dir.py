"""perl.run_dir: the MODEL_DIR layout and reading an earlier run's config.gin."""

import os

import pytest

from perl import run_dir
from perl.models import config as model_config
from perl.models.config import LoRAConfig
from perl.run_dir import RecordedConfig, RecordedConfigError, RunDir

# What perl.main writes for experiments/synthetic_reward_model.gin (gin's
# config_str: shortest unambiguous selectors, macros kept as %NAME).
RM_CONFIG = """\
import perl.models.config
import perl.trainers.reward_model as perl5

# Macros:
# ==============================================================================
FINETUNE = 'lora'
MODEL_CONFIG = @perl.models.config.TransformerConfig()
RANK = 4

# Parameters for LoRAConfig:
# ==============================================================================
LoRAConfig.alpha = 8.0
LoRAConfig.rank = %RANK
LoRAConfig.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')

# Parameters for policy/LoRAConfig:
# ==============================================================================
policy/LoRAConfig.dropout = 0.5

# Parameters for train:
# ==============================================================================
train.finetune = %FINETUNE
train.lora = @perl.models.config.LoRAConfig()
train.model_config = %MODEL_CONFIG

# Parameters for TransformerConfig:
# ==============================================================================
TransformerConfig.embed_dim = 64
TransformerConfig.num_layers = 2
"""


def _run(tmp_path, text, name="rm"):
  d = tmp_path / name
  d.mkdir()
  (d / "config.gin").write_text(text)
  return str(d)


def test_layout_paths_and_steps(tmp_path):
  run = RunDir(str(tmp_path))
  assert run.config_gin == os.path.join(tmp_path, "config.gin")
  assert run.metrics_jsonl == os.path.join(tmp_path, "metrics.jsonl")
  assert run.export == os.path.join(tmp_path, "export")
  assert run.export_peft == os.path.join(tmp_path, "export_peft")
  assert run.lock == os.path.join(tmp_path, ".lock")
  assert run.input_state(30, 1) == os.path.join(
      tmp_path, "input_state", "30", "process_1")
  assert run.state_item(7, best=True) == os.path.join(
      tmp_path, "best", "7", "state")
  assert run.steps() == [] and run.latest_step() is None
  assert run.latest_state_item() is None
  for name in ("10", "200", "30", "40.orbax-checkpoint-tmp-1"):
    os.makedirs(os.path.join(run.checkpoints, name))
  os.makedirs(run.step_dir(30, best=True))
  assert run.steps() == [10, 30, 200]  # numeric order; Orbax tmp dirs skipped
  assert run.latest_step() == 200 and run.latest_step(best=True) == 30
  assert run.latest_state_item() == os.path.join(tmp_path, "best", "30", "state")
  assert run.latest_state_item(best_first=False) == os.path.join(
      tmp_path, "checkpoints", "200", "state")


def test_reward_run_recorded_lora_is_read_back(tmp_path):
  lora = run_dir.recorded_reward_lora(_run(tmp_path, RM_CONFIG))
  # Macros resolved; the policy/ scope's dropout is not the stage's adapter.
  assert lora == LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=(
      "q", "k", "v", "o", "gate", "up", "down"))


def test_scoped_reference_falls_back_to_unscoped_bindings(tmp_path):
  text = RM_CONFIG.replace("train.lora = @perl.models.config.LoRAConfig()",
                           "train.lora = @reward/perl.models.config.LoRAConfig()")
  text += "reward/LoRAConfig.rank = 16\n"
  lora = run_dir.recorded_reward_lora(_run(tmp_path, text))
  assert (lora.rank, lora.alpha, lora.dropout) == (16, 8.0, 0.0)
  recorded = RecordedConfig.read(str(tmp_path / "rm"))
  assert recorded.find("perl.models.config.TransformerConfig",
                       "embed_dim") == 64
  assert recorded.find("TransformerConfig", "vocab_size", default=-1) == -1


def test_missing_config_names_the_file_and_fix(tmp_path):
  with pytest.raises(RecordedConfigError) as e:
    run_dir.recorded_reward_lora(str(tmp_path / "nowhere"))
  message = str(e.value)
  assert "\n" not in message
  assert os.path.join(tmp_path, "nowhere", "config.gin") in message
  assert "REWARD_CHECKPOINT must be the MODEL_DIR" in message


def test_run_without_a_lora_stage_is_one_line_error(tmp_path):
  sft = _run(tmp_path, "train.finetune = 'lora'\ntrain.model_dir = '/x'\n")
  with pytest.raises(RecordedConfigError, match=r"binds no stage `lora`.*"
                     r"bind the policy stage's reward_lora") as e:
    run_dir.recorded_reward_lora(sft)
  assert "\n" not in str(e.value) and sft in str(e.value)


def test_full_finetune_reward_run_is_refused(tmp_path):
  full = _run(tmp_path, RM_CONFIG.replace("FINETUNE = 'lora'",
                                          "FINETUNE = 'full'"))
  with pytest.raises(RecordedConfigError, match="finetune='full'.*"
                     "REWARD_MODEL_CONFIG"):
    run_dir.recorded_reward_lora(full)


def test_unbound_macro_is_named(tmp_path):
  broken = _run(tmp_path, RM_CONFIG.replace("RANK = 4\n", ""))
  with pytest.raises(RecordedConfigError, match="macro %RANK"):
    run_dir.recorded_reward_lora(broken)


class _Built(Exception):
  """Stops the policy stage once its model is built."""


def test_policy_stage_takes_the_reward_adapter_from_the_rm_config(
    tmp_path, monkeypatch):
  from flax import nnx
  from perl.models import lora as lora_lib
  from perl.trainers import policy_stage, runner
  rm = _run(tmp_path, RM_CONFIG)  # rank 4, every projection
  seen = {}

  def load_reward_adapter(reward_checkpoint, module, base_checkpoint=None):
    state = nnx.state(module, lora_lib.adapter_filter("reward"))
    seen["paths"] = [".".join(str(k) for k in path)
                     for path, _ in nnx.to_flat_state(state)]
    seen["shapes"] = {v[...].shape for _, v in nnx.to_flat_state(state)}
    raise _Built

  monkeypatch.setattr(policy_stage, "load_reward_adapter", load_reward_adapter)
  with pytest.raises(_Built):
    runner.train(
        objective=policy_stage.PolicyObjective(reward_checkpoint=rm),
        model_dir=str(tmp_path / "policy"), train_steps=1,
        mixture_or_task_name="synthetic_prompts",
        task_feature_lengths={"prompt": 48}, batch_size=4,
        model_config=model_config.tiny(vocab_size=259), mesh="data=-1")
  projections = {p.split(".")[-4] for p in seen["paths"]}  # <proj>.lora.reward.lora_a
  assert projections == {"q", "k", "v", "o", "gate", "up", "down"}, seen["paths"]
  assert all(4 in shape for shape in seen["shapes"]), seen["shapes"]
