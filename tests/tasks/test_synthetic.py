"""Synthetic coffee-order tasks: determinism, truth, kinds, converted batches."""
import random
import time

import numpy as np
import pytest

from perl.data import pipeline
from tasks import common, synthetic

LENGTHS = synthetic.FEATURE_LENGTHS
SMALL = synthetic.SyntheticConfig(num_train=400, num_validation=100, seed=0)


def test_ground_truth_reward_exact_and_robust():
  prompt = "order: 2 latte, 1 mocha\nconfirm:"
  assert synthetic.ground_truth_reward(prompt, " 2 latte, 1 mocha") == 1.0
  assert synthetic.ground_truth_reward(prompt, " 2 latte, 1 mocha</s>") == 1.0
  assert synthetic.ground_truth_reward(prompt, " 2 latte, 1 mocha \n") == 1.0
  assert synthetic.ground_truth_reward(prompt, "1 mocha, 2 latte") == 1.0
  for wrong in (" 2 latte", " 3 latte, 1 mocha", " 2 latte, 1 tea",
                " 2 latte, 1 mocha, 1 chai", "", " 2 latte, 1 mocha, 1 mocha",
                " two latte, 1 mocha"):
    assert synthetic.ground_truth_reward(prompt, wrong) == 0.0, wrong


def test_generation_is_deterministic_short_and_fast():
  start = time.perf_counter()
  records = list(synthetic.generate("sft", "train"))
  assert time.perf_counter() - start < 1.5  # ~0.4 s; slack for busy CI
  assert len(records) == 20_000
  assert records[:50] == list(synthetic.generate("sft", "train"))[:50]
  assert max(len(r["inputs"]) for r in records) <= 48
  assert max(len(r["targets"]) for r in records) <= 32
  prompts = [r["prompt"] for r in synthetic.generate("prompts", "train", SMALL)]
  assert prompts[0].startswith("order: ") and prompts[0].endswith("\nconfirm:")


def test_split_orders_are_disjoint_and_cover_the_space():
  sets = {split: {items for per_count in synthetic.split_item_sets(split)
                  for items in per_count} for split in synthetic.SPLITS}
  assert not sets["train"] & sets["validation"]
  assert not sets["train"] & sets["test"]
  assert not sets["validation"] & sets["test"]
  assert sum(len(v) for v in sets.values()) == 15 + 90 + 270
  assert [synthetic.distinct_prompts(s) for s in synthetic.SPLITS] == [
      1089, 363, 363]
  # Every split has 1-, 2- and 3-item orders.
  for split in synthetic.SPLITS:
    assert all(synthetic.split_item_sets(split))


def test_held_out_prompts_and_pairs_never_occur_in_train():
  config = synthetic.SyntheticConfig()  # the demo's sizes
  train = {r["prompt"] for r in synthetic.generate("prompts", "train", config)}
  assert len(train) == 1088  # of 1,089: 20k draws miss one 3-item order
  for split in ("validation", "test"):
    pairs = list(synthetic.generate("preference", split, config))
    assert len(pairs) == 1000  # the RM eval's 1,000 pairs
    assert not {p["prompt"] for p in pairs} & train
    # Item order does not rescue a train prompt either.
    rng = random.Random(0)
    for _ in range(50):
      order = synthetic.split_order(rng, synthetic.split_item_sets(split))
      shuffled = tuple(rng.sample(order, len(order)))
      assert synthetic.split_of(shuffled) == split
    prompts = [r["prompt"] for r in synthetic.generate("prompts", split,
                                                       config)][:256]
    assert not set(prompts) & train and len(set(prompts)) > 100


def test_sft_targets_are_imperfect_about_half_the_time():
  records = list(synthetic.generate("sft", "train", SMALL))
  rewards = [synthetic.ground_truth_reward(r["inputs"], r["targets"])
             for r in records]
  assert 0.4 < np.mean(rewards) < 0.6


def test_preference_and_pointwise_follow_the_truth():
  for r in synthetic.generate("preference", "train", SMALL):
    assert synthetic.ground_truth_reward(r["prompt"], r["chosen"]) == 1.0
    assert synthetic.ground_truth_reward(r["prompt"], r["rejected"]) == 0.0
  labels = []
  for r in synthetic.generate("pointwise", "validation", SMALL):
    assert synthetic.ground_truth_reward(r["prompt"], r["response"]) == r["label"]
    labels.append(r["label"])
  assert sum(labels) == 50


def test_mistakes_cover_every_kind():
  import random

  rng = random.Random(0)
  order = ((2, "latte"), (1, "mocha"))
  seen = {synthetic.format_items(synthetic.mistaken_order(order, rng))
          for _ in range(200)}
  assert "2 latte" in seen or "1 mocha" in seen  # dropped item
  assert any(s.count(",") == 2 for s in seen)  # extra item
  assert "3 latte, 1 mocha" in seen or "2 latte, 2 mocha" in seen  # count
  # A drink confirmed twice: the reward model must see it rejected, or RL
  # drifts to it (" 1 mocha, 1 mocha" scored above the correct response).
  assert "2 mocha, 1 mocha" in seen or "2 latte, 1 latte" in seen
  single = ((2, "tea"),)
  seen_single = {synthetic.format_items(synthetic.mistaken_order(single, rng))
                 for _ in range(200)}
  assert any(s.count("tea") == 2 for s in seen_single)
  assert synthetic.format_items(order) not in seen
  for s in seen | seen_single:  # every mistake is wrong and fits the lengths
    assert len(" " + s) <= 26


def test_registered_tasks_and_vocabulary():
  import seqio

  import tasks  # noqa: F401
  import importlib

  importlib.reload(tasks)  # Registering twice must not crash.
  for kind in common.KINDS:
    task = seqio.get_mixture_or_task(f"synthetic_{kind}")
    assert pipeline.task_kind(f"synthetic_{kind}") == kind
    assert set(task.splits) == {"train", "validation", "test"}
  assert synthetic.vocabulary().vocab_size == 259
  assert pipeline.vocabulary("synthetic_preference") is synthetic.vocabulary()


@pytest.fixture
def small_config(monkeypatch):
  monkeypatch.setattr(synthetic, "SyntheticConfig", lambda: SMALL)


def test_preference_batches_decode_to_prompt_and_responses(small_config):
  batch = next(pipeline.get_batches(
      task="synthetic_preference", split="validation", feature_lengths=LENGTHS,
      batch_size=4))
  assert sorted(batch) == sorted(
      f"{side}_{key}" for side in ("chosen", "rejected")
      for key in ("tokens", "segment_ids", "positions", "response_mask"))
  first = next(synthetic.generate("preference", "validation", SMALL))
  vocab = synthetic.vocabulary()
  for side in ("chosen", "rejected"):
    tokens = batch[f"{side}_tokens"][0]
    assert tokens.shape == (80,) and tokens.dtype == np.int32
    mask = batch[f"{side}_response_mask"][0].astype(bool)
    n = int(batch[f"{side}_segment_ids"][0].sum())
    assert vocab.decode(tokens[:n][~mask[:n]].tolist()) == first["prompt"]
    response_ids = tokens[mask].tolist()
    assert response_ids[-1] == 1  # EOS is part of the response.
    assert vocab.decode(response_ids) == first[side]
    np.testing.assert_array_equal(batch[f"{side}_positions"][0][:n],
                                  np.arange(n))
    assert not tokens[n:].any()


def test_prompt_batches_are_left_padded(small_config):
  batch = next(pipeline.get_batches(
      task="synthetic_prompts", split="validation",
      feature_lengths={"prompt": 48}, batch_size=2))
  assert sorted(batch) == ["prompt_mask", "prompt_tokens"]
  first = next(synthetic.generate("prompts", "validation", SMALL))["prompt"]
  row, mask = batch["prompt_tokens"][0], batch["prompt_mask"][0]
  assert mask[-1] == 1 and mask.sum() == len(first)
  assert not row[: 48 - len(first)].any()
  assert synthetic.vocabulary().decode(row[mask == 1].tolist()) == first


def test_pointwise_and_sft_batches(small_config):
  batch = next(pipeline.get_batches(
      task="synthetic_pointwise", split="validation", feature_lengths=LENGTHS,
      batch_size=4))
  assert batch["label"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], [1.0, 0.0, 1.0, 0.0])
  sft = next(pipeline.get_batches(
      task="synthetic_sft", split="train", feature_lengths=synthetic.SFT_FEATURE_LENGTHS,
      batch_size=2, shuffle=False))
  assert sft["decoder_target_tokens"].shape == (2, 80)
  # Loss only on target tokens: each packed example's loss span ends in EOS.
  targets = sft["decoder_target_tokens"][0]
  weights = sft["decoder_loss_weights"][0]
  assert set(targets[weights == 1][targets[weights == 1] == 1]) == {1}
  assert weights.sum() < sft["decoder_segment_ids"][0].astype(bool).sum()


def test_sharding_splits_examples_between_hosts(small_config):
  def prompts(index):
    batches = pipeline.get_batches(
        task="synthetic_prompts", split="validation",
        feature_lengths={"prompt": 48}, batch_size=10, shard_info=(index, 2))
    return [tuple(row) for b in batches for row in b["prompt_tokens"]]

  first, second = prompts(0), prompts(1)
  assert len(first) == len(second) == 50
  all_prompts = [tuple(synthetic.vocabulary().encode(r["prompt"]))
                 for r in synthetic.generate("prompts", "validation", SMALL)]
  assert [tuple(t for t in row if t) for row in first] == all_prompts[0::2]


def test_sizes_are_gin_configurable():
  import gin

  with gin.unlock_config():
    gin.parse_config(["tasks.synthetic.SyntheticConfig.num_validation = 7"])
  try:
    assert len(list(synthetic.generate("prompts", "validation"))) == 7
  finally:
    gin.clear_config()
