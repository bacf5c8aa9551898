"""The one stage runner: every objective through `runner.train`, the shared
arguments available to every stage, and objectives built for lowering."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from perl import partitioning
from perl.models import config as model_config
from perl.trainers import hydra_sft, policy_stage, reward_model, runner, sft

TINY = model_config.tiny(vocab_size=259, num_layers=1, embed_dim=32,
                         num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
PAIR_LENGTHS = {"prompt": 48, "response": 32}


def _train(model_dir, objective, task, lengths, **overrides):
  kwargs = dict(objective=objective, model_dir=str(model_dir), train_steps=1,
                mixture_or_task_name=task, task_feature_lengths=lengths,
                batch_size=8, model_config=TINY, eval_max_batches=1,
                log_every=100)
  kwargs.update(overrides)
  return runner.train(**kwargs)


@pytest.mark.parametrize("objective, task, lengths, message", [
    (sft.SftObjective(), "synthetic_preference", PAIR_LENGTHS,
     r"'preference' task; SFT needs an sft task .*e\.g\. synthetic_sft"),
    (reward_model.RewardModelObjective(), "synthetic_prompts", {"prompt": 48},
     r"'prompts' task; a reward model needs a preference or pointwise task "
     r".*synthetic_preference"),
    (hydra_sft.HydraSftObjective(), "synthetic_sft",
     {"inputs": 48, "targets": 32},
     r"'sft' task; Hydra-SFT needs a preference task .*synthetic_preference"),
    (policy_stage.PolicyObjective(reward_checkpoint="/nonexistent"), "synthetic_sft",
     {"inputs": 48, "targets": 32},
     r"'sft' task; RL needs a prompts task .*synthetic_prompts"),
])
def test_wrong_task_kind_names_an_example_and_writes_nothing(
    tmp_path, objective, task, lengths, message):
  model_dir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    _train(model_dir, objective, task, lengths)
  assert not model_dir.exists()


def test_rl_refuses_gradient_accumulation_with_the_fix(tmp_path):
  with pytest.raises(ValueError, match=r"grad_accum_steps=2.*num_minibatches"):
    _train(tmp_path / "run", policy_stage.PolicyObjective(reward_checkpoint="/x"),
           "synthetic_prompts", {"prompt": 48}, grad_accum_steps=2)
  assert not (tmp_path / "run").exists()


def test_sft_takes_export_and_grad_accum_like_every_stage(tmp_path):
  out = _train(tmp_path / "sft", sft.SftObjective(), "synthetic_sft",
               {"inputs": 48, "targets": 32}, export=False, grad_accum_steps=2,
               train_steps=2, stop_at_step=1)
  assert out["step"] == 1 and "eval/loss" not in out
  assert not os.path.exists(tmp_path / "sft" / "export")
  out = _train(tmp_path / "sft", sft.SftObjective(), "synthetic_sft",
               {"inputs": 48, "targets": 32}, export=True, grad_accum_steps=2,
               train_steps=2)
  assert out["step"] == 2 and np.isfinite(out["eval/loss"])
  assert os.listdir(tmp_path / "sft" / "export")


def test_objective_builds_abstractly_for_lowering_with_the_real_shapes():
  stage = runner.Stage(model_dir="/unused", train_steps=4,
                       task="synthetic_preference", kind="preference",
                       feature_lengths=PAIR_LENGTHS, batch_size=8,
                       model_config=TINY,
                       # Never read: an abstract build loads nothing.
                       base_checkpoint="/nonexistent/checkpoint")
  partitioner = partitioning.Partitioner("data=-1")
  objective = reward_model.RewardModelObjective()
  abstract = objective.build(stage, partitioner, abstract=True)
  leaves = jax.tree.leaves(abstract.state.params)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  real = objective.build(
      dataclasses.replace(stage, base_checkpoint=None), partitioner)
  assert ([(x.shape, x.dtype) for x in leaves]
          == [(x.shape, x.dtype) for x in jax.tree.leaves(real.state.params)])
  rows = np.zeros((8, 80), np.int32)
  batch = {f"{side}_{key}": rows for side in ("chosen", "rejected")
           for key in ("tokens", "positions", "segment_ids")}
  compiled = abstract.lower(batch).compile()
  assert compiled.memory_analysis() is not None
