"""Hydra-SFT: the joint loss, what trains, that both heads learn, and that
the exported run is the RL stage's policy base and reward model."""
import json
import os

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from perl import checkpoints, gin_utils, losses, partitioning
from perl.data import pipeline
from perl.models import config as model_config
from perl.models.heads import RewardModule
from perl.models.hydra import HydraModule
from perl.trainers import core, hydra_sft, loop, policy, reward_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
CONFIGS = os.path.join(ROOT, "configs")
TINY = model_config.tiny(vocab_size=259, num_layers=2, embed_dim=32,
                         num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
LORA = model_config.LoRAConfig(rank=8, alpha=16.0)
LENGTHS = {"prompt": 48, "response": 32}
TASK = "synthetic_preference"


def _flat(module, filt=nnx.Param):
  return {k: np.array(v) for k, v in
          checkpoints.flatten(nnx.state(module, filt)).items()}


def _noise(make):
  """A module of `make`'s structure filled with noise (no init compile), so
  a weight that a loader leaves alone shows."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(0)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jax.device_put(rng.normal(size=x.shape).astype(x.dtype)),
      state))


@pytest.fixture(scope="module")
def setup():
  partitioner = partitioning.Partitioner("data=-1")
  module = reward_model.build(
      model_config=TINY, finetune="lora", lora=LORA, partitioner=partitioner,
      seed=0, base_checkpoint=None, adapter=hydra_sft.ADAPTER)
  held_out = next(pipeline.get_batches(task=TASK, split="validation",
                                       feature_lengths=LENGTHS, batch_size=64))
  return partitioner, module, held_out


def test_loss_is_weighted_sum_of_token_ce_and_bradley_terry(setup):
  _, module, held_out = setup
  batch = {k: v[:8] for k, v in held_out.items()}
  perturbed = nnx.clone(module)  # non-zero LoRA B, so the adapter matters
  rng = np.random.default_rng(1)
  nnx.update(perturbed, jax.tree.map(
      lambda x: jax.device_put(
          np.asarray(x) + rng.normal(0.0, 0.2, x.shape).astype(x.dtype),
          x.sharding), nnx.state(perturbed, nnx.LoRAParam)))
  graphdef, state = nnx.split(perturbed)
  weights = dict(sft_weight=0.7, reward_weight=1.3, centering=0.05)
  model = hydra_sft.HydraSftModel(response_length=32, **weights)
  every_position = hydra_sft.HydraSftModel(**weights)  # LM head everywhere

  @jax.jit
  def compute(state, batch):
    m = nnx.merge(graphdef, state)
    out = {"loss": model.loss_fn(m, batch, None),
           "rows": every_position.forward(m, batch)}
    # Independently: LM logits of the chosen rows, scores of each side.
    side = lambda s: dict(positions=batch[s + "_positions"],
                          segment_ids=batch[s + "_segment_ids"], adapter="hydra")
    logits = m.backbone(batch["chosen_tokens"], **side("chosen"))[0]
    tokens, mask = batch["chosen_tokens"], batch["chosen_response_mask"]
    out["ce"] = [losses.token_cross_entropy(logits[i, :-1], tokens[i, 1:],
                                            weights=mask[i, 1:])
                 for i in range(tokens.shape[0])]
    out["bt"] = losses.bradley_terry(m(tokens, **side("chosen")),
                                     m(batch["rejected_tokens"],
                                       **side("rejected")), centering=0.05)
    return out

  out = jax.device_get(compute(state, batch))
  ce = np.mean([s / d for s, d in out["ce"]])  # per-pair mean token NLL
  bt = out["bt"][0] / out["bt"][1]
  loss_sum, pairs, metrics = out["loss"]
  assert pairs == 8
  np.testing.assert_allclose(loss_sum / pairs, 0.7 * ce + 1.3 * bt, rtol=1e-5)
  np.testing.assert_allclose(metrics["sft_loss"][0] / 8, ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["bt_loss"][0] / 8, bt, rtol=1e-5)
  # Only response tokens count (never the prompt), all of them.
  assert metrics["token_nll"][1] == batch["chosen_response_mask"][:, 1:].sum()
  np.testing.assert_allclose(
      metrics["token_nll"][0], sum(s for s, _ in out["ce"]), rtol=1e-5)
  # The loss is a sum of per-pair terms over the pair count, so micro-batch
  # (sum, denominator) pairs add up exactly; the per-pair terms here come from
  # the LM head on every position, the loss from response positions only.
  rows = out["rows"]
  c, r = rows["chosen"].astype(np.float64), rows["rejected"].astype(np.float64)
  per_pair = (0.7 * rows["nll"] / rows["tokens"]
              + 1.3 * (np.logaddexp(0.0, r - c) + 0.05 * (c + r) ** 2))
  np.testing.assert_allclose(loss_sum, per_pair.sum(), rtol=1e-5)
  assert 0.0 < ce < 10.0 and 0.0 < bt < 5.0


@pytest.fixture(scope="module")
def trained(setup):
  """60 LoRA steps from the shared module; snapshots before/after."""
  partitioner, module, held_out = setup
  model = hydra_sft.HydraSftModel(response_length=LENGTHS["response"])
  trainer = core.Trainer(
      model=module,
      trainable=reward_model.trainable_filter("lora", hydra_sft.ADAPTER),
      loss_fn=model.loss_fn, partitioner=partitioner, total_steps=60,
      optimizer=core.OptimizerConfig(learning_rate=1e-2, decay="constant"))
  evaluate = trainer.jit_eval(model.eval_outputs)
  metrics = lambda: model.eval_metrics(jax.device_get(evaluate(held_out)))
  before, eval_before = _flat(module), metrics()
  batches = loop.train_batches(task=TASK, feature_lengths=LENGTHS, batch_size=8,
                               partitioner=partitioner, seed=0)(0)
  for _ in range(2):
    trainer.train_step(next(batches), jax.random.PRNGKey(0))
  after_two = _flat(trainer.model())
  trainable = set(checkpoints.flatten(trainer.state.params))
  for _ in range(58):
    trainer.train_step(next(batches), jax.random.PRNGKey(0))
  return dict(before=before, after_two=after_two, trainable=trainable,
              after=_flat(trainer.model()), eval_before=eval_before,
              eval_after=metrics())


def test_only_hydra_adapter_and_reward_head_train(trained):
  before, after = trained["before"], trained["after_two"]
  assert trained["trainable"] and all(
      ".lora.hydra." in k or k.startswith("head.") for k in trained["trainable"])
  assert any(k.startswith("head.") for k in trained["trainable"])
  assert set(before) == set(after)
  for name in before:
    if name == "head.proj.bias":  # BT is shift-invariant: no gradient
      assert np.array_equal(before[name], after[name])
    elif name in trained["trainable"]:
      assert not np.array_equal(before[name], after[name]), name
    else:  # the frozen base: bit-identical
      assert np.array_equal(before[name], after[name]), name
  assert len(set(before) - trained["trainable"]) > 10  # the base is checked


def test_short_run_lowers_sft_and_bradley_terry_losses(trained):
  # Measured (seed 0, 64 held-out pairs, random base, 60 steps): SFT 5.87 ->
  # 2.66, BT 0.652 -> 0.488, accuracy 0.703 -> 0.734.
  e0, e1 = trained["eval_before"], trained["eval_after"]
  assert e1["sft_loss"] < 0.7 * e0["sft_loss"], (e0, e1)
  assert e1["token_nll"] < 0.7 * e0["token_nll"], (e0, e1)
  assert e1["bt_loss"] < e0["bt_loss"] - 0.1, (e0, e1)
  assert e1["accuracy"] > e0["accuracy"], (e0, e1)
  assert e0["num_examples"] == 64 and e0["response_tokens"] > 64


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_experiment_through_perl_main_feeds_rl_loaders(tmp_path, clean_gin):
  from perl import main as perl_main  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / "hydra")
  gin_utils.parse_gin_flags(
      [CONFIGS], ["experiments/synthetic_hydra_sft.gin"],
      [f"MODEL_DIR = '{model_dir}'", "BASE_CHECKPOINT = None",
       "TRAIN_STEPS = 3", "EVAL_EVERY = 0", "BATCH_SIZE = 8",
       "perl.trainers.runner.train.eval_max_batches = 1"])
  config = gin.get_configurable("perl.models.config.TransformerConfig")()
  out = perl_main.run()  # pylint: disable=no-value-for-parameter
  assert out["step"] == 3
  assert "hydra_sft.HydraSftObjective" in open(os.path.join(model_dir, "config.gin")).read()
  assert os.listdir(os.path.join(model_dir, "checkpoints")) == ["3"]
  assert not os.path.exists(os.path.join(model_dir, "best"))
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    final = [json.loads(line) for line in f][-1]
  batch = next(pipeline.get_batches(task=TASK, split="validation",
                                    feature_lengths=LENGTHS, batch_size=8))

  # RL, shared backbone: BASE_CHECKPOINT = REWARD_CHECKPOINT = model_dir.
  lora = model_config.LoRAConfig(rank=4)
  hydra = _noise(lambda: HydraModule(config, policy_lora=lora, reward_lora=lora,
                                     with_value_head=False, rngs=nnx.Rngs(1)))
  checkpoints.load_base(model_dir, hydra.backbone)
  source = policy.load_reward_adapter(model_dir, hydra,
                                      base_checkpoint=model_dir)
  assert source.endswith(os.path.join("checkpoints", "3", "state"))
  # RL, separate reward backbone (REWARD_MODEL_CONFIG = MODEL_CONFIG).
  separate = _noise(lambda: RewardModule(config, rngs=nnx.Rngs(2)))
  checkpoints.load_base(model_dir, separate)

  @jax.jit
  def score(hydra_state, separate_state, batch):
    h = nnx.merge(nnx.graphdef(hydra), hydra_state)
    r = nnx.merge(nnx.graphdef(separate), separate_state)
    side = lambda s: dict(positions=batch[s + "_positions"],
                          segment_ids=batch[s + "_segment_ids"])
    out = {s: h.reward(batch[s + "_tokens"], **side(s))
           for s in ("chosen", "rejected")}
    out["separate"] = r(batch["chosen_tokens"], **side("chosen"))
    # The anchor (base, no adapter) is the Hydra-SFT policy.
    logits = h.logits(batch["chosen_tokens"], adapter=None, **side("chosen"))
    out["nll"] = losses.token_cross_entropy(
        logits[:, :-1], batch["chosen_tokens"][:, 1:],
        weights=batch["chosen_response_mask"][:, 1:])
    return out

  out = jax.device_get(score(nnx.state(hydra), nnx.state(separate), batch))
  np.testing.assert_allclose(out["chosen"], out["separate"], atol=1e-5)
  # Both equal the trained model's own eval on this batch (adapter unmerged).
  np.testing.assert_allclose(np.mean(out["chosen"]),
                             final["eval/reward_chosen"], atol=1e-4)
  assert np.mean(out["chosen"] > out["rejected"]) == final["eval/accuracy"]
  np.testing.assert_allclose(out["nll"][0] / out["nll"][1],
                             final["eval/token_nll"], rtol=1e-4)
  # The head alone rides on this run's export: any other base is refused.
  with pytest.raises(ValueError, match="set BASE_CHECKPOINT"):
    policy.load_reward_adapter(model_dir, hydra, base_checkpoint=None)
