"""The real upstream files under PERL_DATA_DIR (CI: ../shared/data).

Skipped, with the reason printed by `pytest -rs`, only when PERL_DATA_DIR is
unset; CI always sets it so these run there.
"""
import collections

from perl.data import pipeline, report
from tasks import hh_rlhf, taskmaster
from tests.tasks.fixture_data import real_data


def _task_rows(task: str, split: str) -> list:
  """Rows a task emits after the quality checks (text, before tokenizing)."""
  ds = pipeline.get_task(task).source.get_dataset(split=split, shuffle=False)
  return list(pipeline.numpy_iterator(ds))


@real_data
def test_tm4_reward_set_counts():
  labels = collections.Counter(
      e["label"] for e in taskmaster.reward_examples("taskmaster4", "all"))
  assert labels == {1.0: 2775, 0.0: 453}
  assert len(list(taskmaster.reward_prompts("taskmaster4", "all"))) == 2254
  # Through the task, nothing is dropped: every upstream row and label.
  report.reset()
  rows = _task_rows("taskmaster4_pointwise", "all")
  assert collections.Counter(float(r["label"]) for r in rows) == {
      1.0: 2775, 0.0: 453}
  assert report.counts("taskmaster4_pointwise/all") == {"examples": 3228}


@real_data
def test_tm4_reward_splits_are_held_out():
  from perl.data import inspect

  report.reset()
  sizes = {split: len(list(taskmaster.reward_examples("taskmaster4", split)))
           for split in ("train", "validation", "test")}
  duplicates = sum(report.counts(f"taskmaster4/reward/{split}").get(
      "duplicate_rows", 0) for split in sizes)
  assert sizes == {"train": 2740, "validation": 131, "test": 126}
  assert sum(sizes.values()) + duplicates == 3228
  leaks = inspect.leakage_report("taskmaster4_pointwise")
  for (a, b), counts in leaks.items():
    for key in ("prompt_in_train", "prompt_prefix_of_train_prompt",
                "pair_in_train", "pair_prefix_of_train_prompt"):
      assert counts[key] == 0, (a, b, key)
  # The one train prompt that starts held-out prompts is the empty context.
  train = {e["prompt"] for e in taskmaster.reward_examples("taskmaster4",
                                                           "train")}
  for e in taskmaster.reward_examples("taskmaster4", "validation"):
    assert [t for t in train if e["prompt"].startswith(t)] == ["agent:"]


@real_data
def test_tm4_dialogs():
  dialogs = list(taskmaster._records("taskmaster4", "data",
                                     taskmaster._DIALOG_FIELDS, "all"))
  assert len(dialogs) == 3710
  examples = list(taskmaster.dialog_sft_examples("taskmaster4", "all"))
  assert len(examples) == 22315
  assert examples[0]["inputs"] == (
      "agent: " + taskmaster.OPENING_TURNS["taskmaster4"]["text"]
      + "\nuser: one Chai Latte please\nagent:")
  assert examples[0]["targets"] == (
      ' [api] {"get_menu_items": {"query": "Chai Latte"}}')


@real_data
def test_hh_harmless_base_test_pairs():
  report.reset()
  pairs = list(hh_rlhf.pairs("harmless-base", "test"))
  assert len(pairs) == 2312
  assert report.counts("hh_rlhf/harmless-base/test") == {"prompt_mismatch": 5}
  assert all(p["prompt"].endswith("\n\nAssistant:") for p in pairs)


@real_data
def test_hh_harmless_base_test_task_keeps_every_pair():
  report.reset()
  rows = _task_rows("hh_rlhf_harmless_base_preference", "test")
  assert len(rows) == 2312
  assert report.counts("hh_rlhf_harmless_base_preference/test") == {
      "examples": 2312, "empty_responses": 4}


@real_data
def test_hh_preference_pipeline_on_real_data():
  batch = next(pipeline.get_batches(
      task="hh_rlhf_harmless_base_preference", split="test",
      feature_lengths={"prompt": 256, "response": 128}, batch_size=4, seed=0))
  assert batch["chosen_tokens"].shape == (4, 384)
  assert (batch["chosen_response_mask"].sum(1) > 0).all()
