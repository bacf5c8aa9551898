"""benchmarks/rl_memory.py lowers PolicyTrainer's own programs (tiny config, CPU)."""
import dataclasses
import types

import pytest
from flax import nnx

from perl import partitioning
from perl.models import config as model_config
from perl.models.separate import SeparateModels

CFG = model_config.tiny(vocab_size=64, embed_dim=32, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64)


def _mem(args, out, alias, temp):
  return types.SimpleNamespace(argument_size_in_bytes=args, output_size_in_bytes=out,
                               alias_size_in_bytes=alias, temp_size_in_bytes=temp)


@pytest.fixture(name="rl_memory")
def _rl_memory():
  from tests.benchmarks.conftest import load_benchmark
  return load_benchmark("rl_memory")


@pytest.mark.parametrize("setup", ["full-separate", "lora-separate", "lora-hydra"])
def test_each_setup_lowers_the_policy_trainers_programs(rl_memory, setup):
  partitioner = partitioning.Partitioner("data=-1")
  lowered, trainer = rl_memory.lower_rl(
      setup, CFG, partitioner=partitioner, batch_size=8, prompt_length=4,
      response_length=4, lora_rank=2)
  assert set(lowered) == {"score", "logprobs", "update"}
  # The update is the held core.Trainer's step, traced once by the lowering.
  assert trainer.num_traces == 1
  compiled = {name: low.compile() for name, low in lowered.items()}
  name, mem, peaks = rl_memory.highest_peak(compiled)
  assert peaks[name] == max(peaks.values()) == rl_memory.peak_bytes(mem)
  n_train = rl_memory._count(trainer.state.params)
  if setup == "full-separate":
    # Policy and value copies train whole: twice a transformer plus the head.
    module = SeparateModels(CFG, finetune="full", rngs=nnx.Rngs(0))
    assert n_train == rl_memory._count(nnx.state(module, module.trainable()))
  else:
    assert n_train < rl_memory._count(trainer.frozen) / 10


def test_separate_copies_hold_more_than_hydra(rl_memory):
  partitioner = partitioning.Partitioner("data=-1")
  frozen = {}
  for setup in ("full-separate", "lora-separate", "lora-hydra"):
    trainer = rl_memory.rl_trainer(setup, CFG, partitioner=partitioner, lora_rank=2,
                                   response_length=4, abstract=True)
    frozen[setup] = rl_memory._count(trainer.frozen) + rl_memory._count(trainer.state.params)
  # Four bases (and the reward head) against one base with three adapters.
  assert frozen["full-separate"] > 3.5 * frozen["lora-hydra"]
  assert frozen["lora-separate"] > 3.5 * frozen["lora-hydra"]


def test_highest_peak_names_the_program_a_device_must_hold(rl_memory):
  fake = lambda mem: types.SimpleNamespace(memory_analysis=lambda: mem)
  name, _, peaks = rl_memory.highest_peak({
      "score": fake(_mem(10, 1, 0, 5)), "update": fake(_mem(10, 8, 8, 9)),
      "logprobs": fake(_mem(10, 2, 0, 3))})
  assert name == "update" and peaks == {"score": 16, "update": 19, "logprobs": 15}


def test_unknown_setup_and_program_name_the_choices(rl_memory):
  with pytest.raises(ValueError, match="Unknown RL setup 'lora-shared'.*lora-hydra"):
    rl_memory.build_module("lora-shared", CFG, None)
  with pytest.raises(ValueError, match=r"Unknown RL programs \['decode'\].*update"):
    rl_memory.lower_rl("lora-hydra", dataclasses.replace(CFG, num_layers=1),
                       partitioner=partitioning.Partitioner("data=-1"), batch_size=8,
                       prompt_length=4, response_length=4, lora_rank=2,
                       programs=("decode",))


def test_tpu_aot_sums_cost_over_a_rows_programs(tpu_aot):
  fake = lambda f, b: types.SimpleNamespace(
      cost_analysis=lambda: {"flops": f, "bytes accessed": b})
  assert tpu_aot._cost({"score": fake(1.0, 2.0), "update": fake(10.0, 20.0)}) == (11.0, 22.0)
  assert tpu_aot._cost(fake(3.0, 4.0)) == (3.0, 4.0)
