"""SeparateModels: RL's policy, value, anchor and reward as four copies."""

import jax
import numpy as np
import pytest
from flax import nnx

from perl.models import config as model_config
from perl.models import lora as lora_lib
from perl.models.heads import RewardModule
from perl.models.hydra import sequence_positions
from perl.models.separate import SeparateModels
from perl.models.transformer import Transformer

CFG = model_config.tiny(vocab_size=32, embed_dim=32, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64)
LORA = model_config.LoRAConfig(rank=4, alpha=8.0)
TOKENS = np.array([[3, 4, 5, 6, 7, 8], [0, 9, 10, 11, 12, 13]], np.int32)
SEG = (TOKENS != 0).astype(np.int32)
FWD = dict(positions=sequence_positions(SEG), segment_ids=SEG)


def _count(state):
  return sum(int(x.size) for x in jax.tree.leaves(state))


def test_full_trains_the_policy_and_value_copies_and_the_value_head():
  module = SeparateModels(CFG, finetune="full", rngs=nnx.Rngs(0))
  _, train, frozen = nnx.split(module, module.trainable(), ...)
  base = _count(nnx.state(Transformer(CFG, rngs=nnx.Rngs(0))))
  reward = _count(nnx.state(RewardModule(CFG, rngs=nnx.Rngs(0))))
  head = CFG.embed_dim + 1
  assert _count(train) == 2 * base + head
  assert _count(frozen) == base + reward  # the anchor and the reward model
  assert {path[0] for path, _ in nnx.to_flat_state(train)} == {
      "policy_model", "value_model", "value_head"}


def test_lora_trains_two_adapters_and_the_value_head():
  module = SeparateModels(CFG, finetune="lora", lora=LORA, rngs=nnx.Rngs(0))
  _, train, frozen = nnx.split(module, module.trainable(), ...)
  one_adapter = _count(nnx.state(
      Transformer(CFG, adapters={"policy": LORA}, rngs=nnx.Rngs(0)), nnx.LoRAParam))
  assert one_adapter > 0
  assert _count(train) == 2 * one_adapter + CFG.embed_dim + 1
  # Four bases stay frozen: policy, value, anchor and the reward model's.
  base = _count(nnx.state(Transformer(CFG, rngs=nnx.Rngs(0))))
  assert _count(frozen) == 4 * base + CFG.embed_dim + 1
  assert not jax.tree.leaves(nnx.state(module.anchor_model, nnx.LoRAParam))


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_policy_and_anchor_log_probs_come_from_their_own_copies(finetune):
  module = SeparateModels(CFG, finetune=finetune, lora=LORA, rngs=nnx.Rngs(0))
  # A trained policy: its adapter (LoRA) or its weights (full) moved.
  moved = nnx.state(module.policy_model,
                    lora_lib.adapter_filter("policy") if finetune == "lora" else nnx.Param)
  for i, (_, v) in enumerate(nnx.to_flat_state(moved)):
    v[...] = v[...] + 0.3 * jax.random.normal(jax.random.key(i), v[...].shape, v[...].dtype)
  policy = module.response_logprobs(TOKENS, prompt_length=3, **FWD)["logp"]
  anchor = module.response_logprobs(TOKENS, prompt_length=3, adapter=None, **FWD)["logp"]
  # The anchor's log-probs are the anchor copy's own next-token log-probs.
  logits, _ = module.anchor_model(TOKENS, **FWD)
  expect = jax.nn.log_softmax(logits[:, 2:-1], -1)
  expect = np.take_along_axis(np.asarray(expect), TOKENS[:, 3:, None], -1)[..., 0]
  np.testing.assert_allclose(anchor, expect, atol=1e-5)
  assert np.abs(np.asarray(policy) - np.asarray(anchor)).max() > 1e-3
  # Sampling reads the policy copy under the "policy" adapter, as on Hydra.
  sampled, _ = module.backbone(TOKENS, adapter="policy", **FWD)
  own = jax.nn.log_softmax(sampled[:, 2:-1], -1)
  own = np.take_along_axis(np.asarray(own), TOKENS[:, 3:, None], -1)[..., 0]
  np.testing.assert_allclose(policy, own, atol=1e-5)


def test_values_and_reward_read_their_own_models():
  module = SeparateModels(CFG, finetune="lora", lora=LORA, rngs=nnx.Rngs(0))
  assert module.values(TOKENS, **FWD).shape == TOKENS.shape
  np.testing.assert_allclose(module.reward(TOKENS, **FWD),
                             module.reward_model(TOKENS, **FWD), atol=1e-6)


def test_bad_arguments_name_the_fix():
  with pytest.raises(ValueError, match="finetune='lora'.*needs lora"):
    SeparateModels(CFG, finetune="lora", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use one of"):
    SeparateModels(CFG, finetune="qlora", rngs=nnx.Rngs(0))
  module = SeparateModels(CFG, finetune="full", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="adapter 'reward'"):
    module.response_logprobs(TOKENS, prompt_length=3, adapter="reward", **FWD)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_policy_trainer_trains_the_policy_and_value_copies_only(finetune):
  from perl import decoding, partitioning
  from perl.rl.config import RLConfig
  from perl.trainers import core, policy

  partitioner = partitioning.Partitioner("data=-1")
  with partitioner:
    module = partitioner.create_sharded_model(
        lambda: SeparateModels(CFG, finetune=finetune, lora=LORA, rngs=nnx.Rngs(0)))
  before = jax.tree.map(np.asarray, nnx.state(module))
  trainer = policy.PolicyTrainer(
      module=module, rl=RLConfig(), partitioner=partitioner, total_steps=4,
      sampling=decoding.SamplingConfig(max_new_tokens=3, temperature=1.0),
      optimizer=core.OptimizerConfig(learning_rate=1e-2, decay="constant"),
      trainable=module.trainable())
  prompts = np.array([[3, 4, 5], [0, 6, 7]] * 4, np.int32)
  for i in range(2):
    metrics = trainer.train_step({"prompt_tokens": prompts,
                                  "prompt_mask": (prompts != 0).astype(np.int32)},
                                 jax.random.key(i))
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["value_loss"])
  after = nnx.state(trainer.model())
  moved = lambda part: max(
      float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
      for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])))
  assert moved("policy_model") > 0 and moved("value_model") > 0 and moved("value_head") > 0
  assert moved("anchor_model") == 0 and moved("reward_model") == 0
