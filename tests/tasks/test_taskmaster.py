"""Taskmaster dialogs and reward sets, on fixtures in the upstream format."""
import json

import numpy as np
import pytest

from perl.data import paths, pipeline, readers, report
from tasks import taskmaster
from tests.tasks.fixture_data import fixture_data  # noqa: F401

PROMPT_R1 = ("agent: Welcome to the Coffee Bar. What can I get for you?\n"
             "user: can i get an espresso please\nagent:")


def test_tm4_dialog_becomes_sft_examples(fixture_data):
  examples = list(taskmaster.dialog_sft_examples("taskmaster4", "all"))
  assert len(examples) == 6
  assert examples[0] == {
      "inputs": "user: one mocha please\nagent:",
      "targets": ' [api] {"get_menu_items": {"query": "mocha"}}'}
  assert examples[1]["inputs"].endswith(
      'api: {"get_menu_items": {"menu_items": [{"menu_item_id": "mocha-0006", '
      '"name": "Mocha"}]}}\nagent:')
  assert examples[2]["targets"] == "anything else?".join([" ", ""])
  # finish_order has no request annotation: empty args.
  assert examples[3]["targets"] == ' [api] {"finish_order": {}}'
  assert examples[4]["targets"] == " your mocha will be ready soon."
  assert examples[5] == {"inputs": "user: hi\nagent:",
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
  train = list(taskmaster.reward_examples("taskmaster4", "train"))
  validation = list(taskmaster.reward_examples("taskmaster4", "validation"))
  assert len(train) + len(validation) == 3


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
