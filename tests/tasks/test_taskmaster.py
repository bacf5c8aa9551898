"""Taskmaster dialogs and reward sets, on fixtures in the upstream format."""
import json
import os

import numpy as np
import pytest

from perl.data import paths, pipeline, readers, report
from tasks import taskmaster
from tests.tasks.fixture_data import (  # noqa: F401
    FIXTURES, fixture_data, real_data)


def fixture_data_dir():
  return FIXTURES

PROMPT_R1 = ("agent: Welcome to the Coffee Bar. What can I get for you?\n"
             "user: can i get an espresso please\nagent:")


GREETING = ("agent: Welcome to the Coffee Bar where you can order coffee, "
            "tea, espresso, and other drinks ahead of time. What can I get "
            "for you?\n")


def test_tm4_dialog_becomes_sft_examples(fixture_data):
  examples = list(taskmaster.dialog_sft_examples("taskmaster4", "all"))
  assert len(examples) == 6
  # Dialogs open with the app's greeting, as the reward contexts do.
  assert examples[0] == {
      "inputs": GREETING + "user: one mocha please\nagent:",
      "targets": ' [api] {"get_menu_items": {"query": "mocha"}}'}
  assert examples[1]["inputs"].endswith(
      'api: {"get_menu_items": {"menu_items": [{"menu_item_id": "mocha-0006", '
      '"name": "Mocha"}]}}\nagent:')
  assert examples[2]["targets"] == "anything else?".join([" ", ""])
  # finish_order has no request annotation: empty args.
  assert examples[3]["targets"] == ' [api] {"finish_order": {}}'
  assert examples[4]["targets"] == " your mocha will be ready soon."
  assert examples[5] == {"inputs": GREETING + "user: hi\nagent:",
                         "targets": " hello, what can I get you?"}


def test_tm3_api_calls_precede_the_agent_words(fixture_data):
  examples = list(taskmaster.dialog_sft_examples("taskmaster3", "all"))
  assert [e["targets"] for e in examples] == [
      ' [api] {"find_showtimes": {"name.movie": "Dune", "date.showing": "tonight"}}',
      " Dune is at 7pm at Cinema One. Shall I book?",
      ' [api] {"book_tickets": {"num.tickets": "2"}}',
      " Booked."]
  assert examples[1]["inputs"].splitlines()[2] == (
      'api: {"find_showtimes": {"showtimes": ["7:00pm"], "name.theater": '
      '"Cinema One"}}')


def test_reward_set_pointwise_and_prompts(fixture_data):
  examples = list(taskmaster.reward_examples("taskmaster4", "all"))
  assert [e["label"] for e in examples] == [1.0, 0.0, 1.0]
  assert examples[0]["prompt"] == PROMPT_R1
  assert examples[1]["response"] == " Sure, a latte coming up."
  prompts = list(taskmaster.reward_prompts("taskmaster4", "all"))
  assert len(prompts) == 2  # r1 and r2 share a context.


def test_splits_partition_conversations(fixture_data):
  sizes = [len(list(taskmaster.reward_examples("taskmaster4", split)))
           for split in ("train", "validation", "test")]
  assert sum(sizes) == 3


def _dialog_rows(num_dialogs: int, turns: int):
  """Reward rows as released: every row its own conversation_id, each
  dialog giving one row per agent turn, each context extending the last."""
  rows = []
  for d in range(num_dialogs):
    context = []
    for t in range(turns):
      context = context + [{"role": "user", "text": f"dialog {d} asks {t}"}]
      rows.append({"conversation_id": f"dlg-row-{d}-{t}",
                   "context": json.dumps(context),
                   "generation": json.dumps({"role": "agent",
                                             "text": f"answer {d}.{t}"}),
                   "reward": float(t % 2)})
      context = context + [{"role": "agent", "text": f"answer {d}.{t}"}]
  return rows


def _write_reward_rows(tmp_path, rows, version="TM-4-2024"):
  folder = tmp_path / "taskmaster" / version / "reward"
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "reward_00.json").write_text(json.dumps(rows, indent=4))


def _overlap(held_out, train):
  """Held-out prompts equal to, or a prefix of, a train prompt; and
  held-out prompt+response pairs found in train (exactly or as a prefix)."""
  train_prompts = [e["prompt"] for e in train]
  prompts = {e["prompt"] for e in held_out}
  pairs = {e["prompt"] + e["response"] for e in held_out}
  return (sum(any(t.startswith(p) for t in train_prompts) for p in prompts),
          sum(any(t.startswith(p) for t in train_prompts)
              or p in {e["prompt"] + e["response"] for e in train}
              for p in pairs))


def test_held_out_prompts_never_occur_in_train(monkeypatch, tmp_path):
  # 60 dialogs x 4 turns: under a per-row conversation_id hash, rows of one
  # dialog land in different splits, so held-out contexts continue in train.
  _write_reward_rows(tmp_path, _dialog_rows(60, 4))
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  train = list(taskmaster.reward_examples("taskmaster4", "train"))
  held_out = [split for split in taskmaster.SPLITS
              if split not in ("train", "all")]
  total = len(train)
  for split in held_out:
    examples = list(taskmaster.reward_examples("taskmaster4", split))
    total += len(examples)
    assert examples, split  # the fixture is big enough to hold some out
    assert _overlap(examples, train) == (0, 0), split
    assert len(examples) % 4 == 0  # whole dialogs only
  assert total == 240


def test_exact_duplicates_are_removed_and_counted(monkeypatch, tmp_path):
  rows = _dialog_rows(30, 2)
  rows += [dict(r, conversation_id=r["conversation_id"] + "-again")
           for r in rows[:6]]
  _write_reward_rows(tmp_path, rows)
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  report.reset()
  assert len(list(taskmaster.reward_examples("taskmaster4", "all"))) == 66
  kept = sum(len(list(taskmaster.reward_examples("taskmaster4", split)))
             for split in ("train", "validation", "test"))
  assert kept == 60
  removed = sum(report.counts(f"taskmaster4/reward/{split}").get(
      "duplicate_rows", 0) for split in ("train", "validation", "test"))
  assert removed == 6


def test_group_rows_joins_prefixes_and_shared_ids():
  a = ('{"t": 1}',)
  ab = ('{"t": 1}', '{"t": 2}')
  c = ('{"t": 3}',)
  splits = taskmaster.group_rows([ab, c, a, (), c + ('{"t": 4}',)],
                                 ["x", "y", "z", "w", "y"])
  assert splits[0] == splits[2]  # a is a prefix of ab
  assert splits[1] == splits[4]  # shared id (and prefix)
  assert splits[3] == "train"  # the empty context is a prefix of all


def test_tm3_official_dialog_splits_are_used(monkeypatch, tmp_path):
  import shutil

  shutil.copytree(os.path.join(fixture_data_dir(), "taskmaster"),
                  tmp_path / "taskmaster")
  splits = tmp_path / "taskmaster" / "TM-3-2020" / "splits"
  for folder, ids in (("train", []), ("dev", ["dlg-fixture-tm3-0001"]),
                      ("test", [])):
    (splits / folder).mkdir(parents=True)
    (splits / folder / f"{folder}-00.tsv").write_text(
        "".join(f"<U>ctx\t[A]target\t{i}\n" for i in ids))
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  assert len(list(taskmaster.dialog_sft_examples("taskmaster3", "validation"))) == 4
  assert not list(taskmaster.dialog_sft_examples("taskmaster3", "train"))
  assert not list(taskmaster.dialog_sft_examples("taskmaster3", "test"))


def test_pointwise_batches_through_the_pipeline(fixture_data):
  batch = next(pipeline.get_batches(
      task="taskmaster4_pointwise", split="all",
      feature_lengths={"prompt": 64, "response": 64}, batch_size=3,
      shuffle=False))
  np.testing.assert_array_equal(batch["label"], [1.0, 0.0, 1.0])
  vocab = pipeline.vocabulary("taskmaster4_pointwise")
  tokens, mask = batch["tokens"][1], batch["response_mask"][1].astype(bool)
  assert vocab.decode(tokens[mask].tolist()) == " Sure, a latte coming up."
  # The 110-byte prompt was cut on the left to its last 64 bytes.
  prompt_ids = tokens[:64].tolist()
  assert vocab.decode(prompt_ids) == PROMPT_R1[-64:]
  assert report.counts("taskmaster4_pointwise/all")["truncated_prompt"] == 3


def test_missing_file_names_path_and_origin(monkeypatch, tmp_path):
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  with pytest.raises(paths.MissingDataError) as error:
    list(taskmaster.reward_examples("taskmaster3", "all"))
  message = str(error.value)
  assert str(tmp_path / "taskmaster" / "TM-3-2020" / "reward" / "*.json") in message
  assert "github.com/google-research-datasets/Taskmaster" in message


def test_malformed_reward_row_fails_or_is_skipped(monkeypatch, tmp_path):
  import gin

  folder = tmp_path / "taskmaster" / "TM-4-2024" / "reward"
  folder.mkdir(parents=True)
  good = {"conversation_id": "a", "context": "[]",
          "generation": '{"role": "agent", "text": "hi"}', "reward": 1.0}
  bad = dict(good, conversation_id="b", context="[not json")
  (folder / "reward_00.json").write_text(json.dumps([good, bad]))
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  with pytest.raises(readers.MalformedRowError, match="reward_00.json record 1"):
    list(taskmaster.reward_examples("taskmaster4", "all"))
  report.reset()
  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", "skip")
  try:
    assert len(list(taskmaster.reward_examples("taskmaster4", "all"))) == 1
  finally:
    gin.clear_config()
  assert report.counts("taskmaster4/reward/all") == {"skipped_malformed_rows": 1}


def _bind_policy(policy):
  import gin

  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", policy)


GOOD_ROW = {"conversation_id": "a",
            "context": '[{"role": "user", "text": "one tea"}]',
            "generation": '{"role": "agent", "text": "sure"}', "reward": 1.0}


@pytest.mark.parametrize("bad, problem", [
    (dict(GOOD_ROW, context='[{"role": "user", "text": null}]'),
     "turn field 'text' is null"),
    (dict(GOOD_ROW, context='[{"role": null, "text": "one tea"}]'),
     "turn field 'role' should be a string, got null"),
    (dict(GOOD_ROW, generation='{"role": "agent", "text": null}'),
     "turn field 'text' is null"),
    (dict(GOOD_ROW, generation='{"role": "agent", "api": null}'),
     "turn field 'api' is null"),
])
def test_nested_null_in_a_reward_row_is_a_malformed_row(monkeypatch, tmp_path,
                                                        bad, problem):
  import gin

  rows = [GOOD_ROW, dict(bad, conversation_id="b")]
  _write_reward_rows(tmp_path, rows)
  path = tmp_path / "taskmaster" / "TM-4-2024" / "reward" / "reward_00.json"
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  with pytest.raises(readers.MalformedRowError) as error:
    list(taskmaster.reward_examples("taskmaster4", "all"))
  assert str(error.value).startswith(
      f"{path} record 1 (line 8): malformed row: ValueError: {problem}")
  assert "\n" not in str(error.value)
  report.reset()
  _bind_policy("skip")
  try:
    examples = list(taskmaster.reward_examples("taskmaster4", "all"))
  finally:
    gin.clear_config()
  assert [e["prompt"] for e in examples] == ["user: one tea\nagent:"]
  assert report.counts("taskmaster4/reward/all") == {"skipped_malformed_rows": 1}


def _dialog(cid, utterances):
  return {"conversation_id": cid, "utterances": [
      dict({"index": i, "segments": [], "annotations": []}, **u)
      for i, u in enumerate(utterances)]}


@pytest.mark.parametrize("utterance, problem", [
    ({"speaker": "assistant", "text": None},
     "utterance 1 field 'text' should be a string, got null"),
    ({"speaker": None, "text": "hi"},
     "utterance 1: speaker should be one of"),
    ({"speaker": "assistant", "text": "ok", "annotations": [
        {"name": "api_call", "value": None, "context": "api_call_0"}]},
     "annotation 'api_call' field 'value' should be a string, got null"),
])
def test_nested_null_in_a_dialog_is_a_malformed_row(monkeypatch, tmp_path,
                                                    utterance, problem):
  import gin

  good = _dialog("dlg-good", [{"speaker": "user", "text": "a tea"},
                              {"speaker": "assistant", "text": "sure"}])
  bad = _dialog("dlg-bad", [{"speaker": "user", "text": "a tea"}, utterance])
  folder = tmp_path / "taskmaster" / "TM-4-2024" / "data"
  folder.mkdir(parents=True)
  (folder / "data_00.json").write_text(json.dumps([good, bad], indent=4))
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  with pytest.raises(readers.MalformedRowError) as error:
    list(taskmaster.dialog_sft_examples("taskmaster4", "all"))
  assert str(error.value).startswith(
      f"{folder / 'data_00.json'} record 1 (line 21): malformed row: "
      f"ValueError: {problem}")
  report.reset()
  _bind_policy("skip")
  try:
    examples = list(taskmaster.dialog_sft_examples("taskmaster4", "all"))
  finally:
    gin.clear_config()
  assert [e["targets"] for e in examples] == [" sure"]
  assert "None" not in examples[0]["inputs"]
  assert report.counts("taskmaster4/data/all") == {"skipped_malformed_rows": 1}


def test_conflicting_labels_are_counted_in_every_split(monkeypatch, tmp_path):
  rows = _dialog_rows(30, 2)
  # The same (prompt, response) labelled both ways: kept, and counted.
  rows += [dict(r, conversation_id=r["conversation_id"] + "-flip",
                reward=1.0 - r["reward"]) for r in rows[:4]]
  _write_reward_rows(tmp_path, rows)
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  report.reset()
  assert len(list(taskmaster.reward_examples("taskmaster4", "all"))) == 64
  assert report.counts("taskmaster4/reward/all") == {"conflicting_labels": 4}
  kept = sum(len(list(taskmaster.reward_examples("taskmaster4", split)))
             for split in ("train", "validation", "test"))
  assert kept == 64
  assert sum(report.counts(f"taskmaster4/reward/{split}").get(
      "conflicting_labels", 0) for split in ("train", "validation", "test")) == 4


@real_data
def test_tm4_sft_and_reward_prompts_open_the_same_way():
  import collections

  firsts = collections.Counter(
      e["prompt"].split("\n", 1)[0]
      for e in taskmaster.reward_examples("taskmaster4", "all"))
  assert firsts.most_common(1) == [(GREETING.rstrip("\n"), 3218)]
  sft_firsts = collections.Counter(
      e["inputs"].split("\n", 1)[0]
      for e in taskmaster.dialog_sft_examples("taskmaster4", "all"))
  assert sft_firsts == {GREETING.rstrip("\n"): 22315}


def _gin_value(name: str, macro: str):
  import ast
  import re

  path = os.path.join(os.path.dirname(FIXTURES), "..", "configs",
                      "experiments", name)
  with open(path) as f:
    match = re.search(rf"^{macro} = (.+)$", f.read(), re.MULTILINE)
  return ast.literal_eval(match.group(1))


def _p95(texts) -> int:
  """The 95th percentile of the UTF-8 byte lengths, rounded up to 64."""
  lengths = [len(t.encode("utf-8")) for t in texts]
  return int(-(-np.percentile(lengths, 95) // 64) * 64)


@real_data
def test_tm4_experiment_lengths_are_the_95th_percentile_of_train():
  rows = list(taskmaster.reward_examples("taskmaster4", "train"))
  prompt, response = (_p95(e["prompt"] for e in rows),
                      _p95(e["response"] for e in rows))
  assert (prompt, response) == (1920, 256)
  assert _gin_value("tm4_reward_model.gin", "TASK_FEATURE_LENGTHS") == {
      "prompt": prompt, "response": response}
  rl_prompts = [p["prompt"] for p in taskmaster.reward_prompts("taskmaster4",
                                                               "train")]
  assert _gin_value("tm4_policy.gin", "TASK_FEATURE_LENGTHS") == {
      "prompt": _p95(rl_prompts)}
  assert _gin_value("tm4_policy.gin", "MAX_NEW_TOKENS") == response
  sft = list(taskmaster.dialog_sft_examples("taskmaster4", "train"))
  assert _gin_value("tm4_sft.gin", "TASK_FEATURE_LENGTHS") == {
      "inputs": _p95(e["inputs"] for e in sft),
      "targets": _p95(e["targets"] for e in sft)}
