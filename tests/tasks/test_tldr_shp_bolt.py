"""TL;DR, SHP and BOLT tasks on fixtures in the upstream formats."""
import json

import numpy as np

from perl.data import pipeline, report
from tasks import bolt, bolt_convert, shp, tldr
from tests.tasks.fixture_data import fixture_data  # noqa: F401

TLDR_PROMPT = ("SUBREDDIT: r/relationships\nTITLE: My roommate keeps eating my "
               "food\nPOST: We share a fridge. Every week my groceries vanish "
               "and he says it was not him.\nTL;DR:")


def test_tldr_filtered_posts(fixture_data):
  posts = list(tldr.filtered_posts("train"))
  assert len(posts) == 2
  assert posts[0] == {"prompt": TLDR_PROMPT, "summary":
                      " roommate eats my food and denies it, how do I bring it up?"}
  assert [len(list(tldr.filtered_posts(s))) for s in ("validation", "test")] == [1, 1]


def test_tldr_comparisons_follow_choice_and_split(fixture_data):
  (train,) = list(tldr.comparisons("train"))
  assert train == {"prompt": TLDR_PROMPT,
                   "chosen": " roommate keeps eating my food and denies it",
                   "rejected": " roommate eats my food"}
  (validation,) = list(tldr.comparisons("validation"))
  assert (validation["chosen"], validation["rejected"]) == (" pay off car loan?", " car")
  (test,) = list(tldr.comparisons("test"))
  assert test["chosen"] == " rice burns"


def test_tldr_sft_batch(fixture_data):
  batch = next(pipeline.get_batches(
      task="tldr_sft", split="validation",
      feature_lengths={"inputs": 128, "targets": 64}, batch_size=1))
  vocab = pipeline.vocabulary("tldr_sft")
  targets = batch["decoder_target_tokens"][0]
  weights = batch["decoder_loss_weights"][0].astype(bool)
  assert vocab.decode(targets[weights].tolist()) == (
      " my rice burns at the bottom, what am I doing wrong?")


def test_shp_pairs_use_labels(fixture_data):
  pairs = list(shp.pairs("train"))
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [
      (" Use plenty of water and stir early.", " Add oil."),
      (" Salt the water and stir.", " Don't cook it."),
      (" Rayleigh scattering favours short wavelengths.", " Because.")]
  assert pairs[0]["prompt"] == "POST: How do I keep pasta from sticking?\n\nResponse:"
  assert len(list(shp.distinct_prompts("train"))) == 2
  assert len(list(shp.pairs("test"))) == 1


def test_shp_preference_batch(fixture_data):
  batch = next(pipeline.get_batches(
      task="shp_preference", split="train",
      feature_lengths={"prompt": 64, "response": 64}, batch_size=3, shuffle=False))
  np.testing.assert_array_equal(batch["chosen_response_mask"].sum(1),
                                [37, 26, 48])  # bytes + EOS


def test_bolt_prompts_and_sft(fixture_data):
  conversations = list(bolt.conversations("train"))
  assert conversations[0]["prompt"] == (
      "CONVERSATION:\nA: running late, 10 min\nB: ok see you at the cafe\nSUMMARY:")
  sft = list(bolt.summarised("train"))
  assert sft == [{"inputs": conversations[0]["prompt"],
                  "targets": " A will be 10 minutes late to meet B at the cafe."}]
  assert report.counts("bolt/train")["without_summary"] == 1


def test_bolt_converter_reads_ldc_style_xml(tmp_path):
  ldc = tmp_path / "LDC2018T19" / "data" / "sms"
  ldc.mkdir(parents=True)
  (ldc / "fixture.xml").write_text(
      '<?xml version="1.0" encoding="UTF-8"?>\n<conversations>\n'
      '<conversation id="sms-fx-1"><messages>\n'
      '<message id="m0" datetime="2012-01-01 10:00" participant="p1">'
      '<body>hey</body></message>\n'
      '<message id="m1" datetime="2012-01-01 10:01" participant="p2">'
      '<body>hi there</body></message>\n'
      '</messages></conversation>\n</conversations>\n')
  summaries = tmp_path / "summaries.jsonl"
  summaries.write_text(json.dumps({"conversation_id": "sms-fx-1",
                                   "summary": "p1 and p2 greet."}) + "\n")
  out = tmp_path / "bolt-sms-chat" / "perl"
  counts = bolt_convert.convert(ldc_root=str(tmp_path / "LDC2018T19"),
                                out_dir=str(out), summaries_path=str(summaries))
  assert sum(counts.values()) == 1
  split = bolt_convert.split_of("sms-fx-1")
  (line,) = (out / f"{split}.jsonl").read_text().splitlines()
  record = json.loads(line)
  assert record["medium"] == "sms" and record["summary"] == "p1 and p2 greet."
  assert [m["text"] for m in record["messages"]] == ["hey", "hi there"]
  assert record["messages"][1]["participant"] == "p2"


def test_mixture_of_taskmaster_reward_sets(fixture_data):
  batches = list(pipeline.get_batches(
      task="taskmaster_pointwise", split="all",
      feature_lengths={"prompt": 32, "response": 32}, batch_size=1, seed=0,
      shuffle=False))
  assert len(batches) == 4  # 3 TM-4 + 1 TM-3 records.
  assert sorted(b["label"][0] for b in batches) == [0.0, 1.0, 1.0, 1.0]
