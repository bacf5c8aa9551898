"""Anthropic HH on a fixture in the upstream format.

tests/fixtures/hh-rlhf/harmless-base/test.jsonl.gz holds four hand-written
lines: a normal pair, a pair whose prompts differ (chosen has one more turn),
an identical pair and a pair with an empty chosen response.
"""
import gzip

import pytest

from perl.data import pipeline, readers, report
from tasks import hh_rlhf
from tests.tasks.fixture_data import fixture_data  # noqa: F401


def test_split_pair_shared_prompt():
  assert hh_rlhf.split_pair("\n\nHuman: a\n\nAssistant: b",
                            "\n\nHuman: a\n\nAssistant: c") == (
      "\n\nHuman: a\n\nAssistant:", " b", " c", False)


def test_split_pair_documented_rule_when_prompts_differ():
  prompt, chosen, rejected, differed = hh_rlhf.split_pair(
      "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye!",
      "\n\nHuman: Hi\n\nAssistant: What?")
  assert differed and prompt == "\n\nHuman: Hi\n\nAssistant:"
  assert chosen == " Hello!\n\nHuman: Bye\n\nAssistant: Goodbye!"
  assert rejected == " What?"
  with pytest.raises(ValueError, match="share no prompt"):
    hh_rlhf.split_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: z\n\nAssistant: b")


def test_fixture_counts_and_text(fixture_data):
  pairs = list(hh_rlhf.pairs("harmless-base", "test"))
  assert len(pairs) == 4
  assert report.counts("hh_rlhf/harmless-base/test") == {"prompt_mismatch": 1}
  assert pairs[0] == {"prompt": "\n\nHuman: How do I make tea?\n\nAssistant:",
                      "chosen": " Boil water and steep the leaves.",
                      "rejected": " I don't know."}


def test_preference_batches_keep_empty_count_and_drop_identical(fixture_data):
  batches = list(pipeline.get_batches(
      task="hh_rlhf_harmless_base_preference", split="test",
      feature_lengths={"prompt": 48, "response": 48}, batch_size=1))
  # The pair with an empty chosen reply is a real label: kept and counted.
  assert len(batches) == 3
  counts = report.counts("hh_rlhf_harmless_base_preference/test")
  assert counts["identical_pairs"] == 1 and counts["empty_responses"] == 1
  assert counts["examples"] == 3
  vocab = pipeline.vocabulary("hh_rlhf_harmless_base_preference")
  first = batches[0]
  mask = first["rejected_response_mask"][0].astype(bool)
  assert vocab.decode(first["rejected_tokens"][0][mask].tolist()) == " I don't know."
  assert first["chosen_tokens"].shape == (1, 96)


def test_dropping_empty_responses_is_an_option(fixture_data):
  import gin

  with gin.unlock_config():
    gin.bind_parameter("tasks.common.QualityPolicy.drop_empty_responses", True)
  try:
    batches = list(pipeline.get_batches(
        task="hh_rlhf_harmless_base_preference", split="test",
        feature_lengths={"prompt": 48, "response": 48}, batch_size=1))
  finally:
    gin.clear_config()
  assert len(batches) == 2
  counts = report.counts("hh_rlhf_harmless_base_preference/test")
  assert counts["empty_responses"] == 1 and counts["examples"] == 2


def test_missing_eval_split_names_the_splits_that_exist(fixture_data):
  with pytest.raises(ValueError) as error:
    pipeline.get_dataset(task="hh_rlhf_harmless_base_preference",
                         split="validation",
                         feature_lengths={"prompt": 48, "response": 48})
  assert str(error.value) == (
      "'hh_rlhf_harmless_base_preference' has no split 'validation'; its "
      "splits are ['train', 'test'] (set eval_split / the split to one of "
      "them).")


def test_malformed_line_names_file_and_line(monkeypatch, tmp_path):
  folder = tmp_path / "hh-rlhf" / "helpful-base"
  folder.mkdir(parents=True)
  with gzip.open(folder / "train.jsonl.gz", "wt") as f:
    f.write('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": '
            '"\\n\\nHuman: a\\n\\nAssistant: c"}\n{"chosen": "oops"}\n')
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  with pytest.raises(readers.MalformedRowError, match=r"train.jsonl.gz:2: .*rejected"):
    list(hh_rlhf.pairs("helpful-base", "train"))
