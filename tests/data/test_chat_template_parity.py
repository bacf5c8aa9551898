"""Chat-rendered HH pairs tokenize exactly as transformers' apply_chat_template.

For Llama 3.2, Qwen 2.5 and Gemma 2 a small byte-level BPE is trained here on
HH text with the family's real special tokens, and saved by transformers with
the family's real chat template (tests/data/real_chat_templates.py). Every
pair of the real harmless-base test split (PERL_DATA_DIR) goes through the
registered HH task, and its token ids are compared with apply_chat_template
of the same conversation, built here from the transcript:
  P = the turns before the reply, F = all turns of the transcript (each turn
  stripped, consecutive turns of one role joined by "\\n\\n"), and
  prompt ids   == apply_chat_template(P, add_generation_prompt=True)
  reply ids    == apply_chat_template(F)[len(prompt ids):] through the reply's
                  closing end-of-turn token.
"""

import gzip
import json
import os
import re

import gin
import pytest

from perl.data import chat, pipeline, readers, report
from tasks import hh_rlhf
from tests.data import real_chat_templates as real
from tests.tasks.fixture_data import real_data

transformers = pytest.importorskip("transformers")  # requirements-test.txt
tokenizers = pytest.importorskip("tokenizers")

HH_TEST = "hh-rlhf/harmless-base/test.jsonl.gz"
TASK = "hh_rlhf_harmless_base_preference"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "Human: How do I make tea?\n\nAssistant: Boil water and steep the leaves.",
    "Human: What's a good way to steal a car?\n\nAssistant: I can't help with"
    " that. Is there something else I could help you with today?",
    "I’m sorry, I don’t understand. Could you say more about what you mean?",
] * 4


def _tokenizer(family: str):
  from tokenizers import (Regex, decoders, models, pre_tokenizers, processors,
                          trainers)
  spec = real.SPECIAL_TOKENS[family]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=500, special_tokens=spec["added"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if spec["bos"]:  # as the real tokenizers: BOS added by the post-processor
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec['bos']} $A",
        special_tokens=[(spec["bos"], tok.token_to_id(spec["bos"]))])
  return tok


@pytest.fixture(scope="module", params=sorted(real.TEMPLATES))
def family(request, tmp_path_factory):
  """(family, tokenizer directory, transformers tokenizer)."""
  name = request.param
  spec = real.SPECIAL_TOKENS[name]
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_tokenizer(name), bos_token=spec["bos"],
      eos_token=spec["eos"], pad_token=spec["pad"],
      chat_template=real.TEMPLATES[name])
  path = tmp_path_factory.mktemp(name)
  hf.save_pretrained(path)
  return name, str(path), transformers.AutoTokenizer.from_pretrained(path)


def _bind(path: str, end_of_turn: str):
  with gin.unlock_config():
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.kind", "huggingface")
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.path", path)
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.eos_token",
                       end_of_turn)
    gin.bind_parameter("perl.data.chat.rendering.kind", "chat_template")


def _turns(transcript: str) -> list:
  """The transcript's turns, stripped, runs of one role joined by "\\n\\n"."""
  parts = re.split(r"\n\n(Human|Assistant): ", transcript)
  turns = []
  for who, text in zip(parts[1::2], parts[2::2]):
    role = "user" if who == "Human" else "assistant"
    if turns and turns[-1]["role"] == role:
      turns[-1]["content"] += "\n\n" + text.strip()
    else:
      turns.append({"role": role, "content": text.strip()})
  return turns


def _ids(encoded):
  return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _expected(hf, end_of_turn_id, prompt_text, transcript):
  """(prompt ids, reply ids) by apply_chat_template; see the module doc."""
  prompt = _turns(prompt_text + " ")[:-1]  # the empty reply turn dropped
  full = _turns(transcript)
  assert prompt[-1]["role"] == "user" and full[:len(prompt)] == prompt
  head = _ids(hf.apply_chat_template(prompt, tokenize=True,
                                     add_generation_prompt=True))
  ids = _ids(hf.apply_chat_template(full, tokenize=True))
  assert ids[:len(head)] == head
  end = len(ids) - ids[::-1].index(end_of_turn_id)
  return head, ids[len(head):end]


@real_data
def test_every_hh_pair_tokenizes_like_apply_chat_template(family):
  name, path, hf = family
  end_of_turn = real.SPECIAL_TOKENS[name]["end_of_turn"]
  end_of_turn_id = hf.convert_tokens_to_ids(end_of_turn)
  with gzip.open(os.path.join(os.environ["PERL_DATA_DIR"], HH_TEST), "rt") as f:
    rows = [json.loads(line) for line in f]
  _bind(path, end_of_turn)
  report.reset()
  try:
    ds = pipeline.get_task(TASK).get_dataset(
        sequence_length=None, split="test", shuffle=False)
    examples = list(pipeline.numpy_iterator(ds))
  finally:
    gin.clear_config()
  assert len(examples) == len(rows) == 2312
  assert report.counts(f"{TASK}/test") == {"examples": 2312, "empty_responses": 4}
  same = {"prompt": 0, "chosen": 0, "rejected": 0}
  for row, ex in zip(rows, examples):
    prompt, *_ = hh_rlhf.split_pair(row["chosen"], row["rejected"])
    for side in ("chosen", "rejected"):
      head, reply = _expected(hf, end_of_turn_id, prompt, row[side])
      same["prompt"] += ex["prompt"].tolist() == head
      same[side] += ex[side].tolist() == reply
  assert same == {"prompt": 2 * 2312, "chosen": 2312, "rejected": 2312}


@real_data
def test_hh_rows_with_two_assistant_turns_in_a_row_render_merged(family):
  """Rows 668, 764, 1320, 1850: Gemma's template alone would raise on them."""
  name, path, hf = family
  with gzip.open(os.path.join(os.environ["PERL_DATA_DIR"], HH_TEST), "rt") as f:
    rows = [json.loads(line) for line in f]
  template = chat.ChatTemplate.from_pretrained(path)
  for line in (668, 764, 1320, 1850):
    prompt, chosen, _, _ = hh_rlhf.split_pair(rows[line - 1]["chosen"],
                                              rows[line - 1]["rejected"])
    messages = chat.hh_messages(prompt)
    roles = [m["role"] for m in messages]
    assert any(a == b == "assistant" for a, b in zip(roles, roles[1:]))
    head, _ = template.split(messages, chat.hh_reply_messages(chosen),
                             eos_text=None)
    assert head == hf.apply_chat_template(
        _turns(prompt + " ")[:-1], tokenize=False, add_generation_prompt=True)
    if name == "gemma2":  # what the merging spares a Gemma user
      with pytest.raises(Exception, match="roles must alternate"):
        hf.apply_chat_template(messages, tokenize=False)


def _write_hh(root, rows):
  folder = root / "hh-rlhf" / "harmless-base"
  folder.mkdir(parents=True)
  with gzip.open(folder / "test.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return str(folder / "test.jsonl.gz")


def test_a_conversation_the_template_rejects_is_one_bad_row(
    family, tmp_path, monkeypatch):
  """Gemma's template raises on a transcript that opens with the assistant:
  one line naming the file and row, or a counted skip."""
  name, path, _ = family
  good = {"chosen": "\n\nHuman: Tea?\n\nAssistant: Yes.",
          "rejected": "\n\nHuman: Tea?\n\nAssistant: No."}
  odd = {"chosen": "\n\nAssistant: Hi.\n\nHuman: Tea?\n\nAssistant: Yes.",
         "rejected": "\n\nAssistant: Hi.\n\nHuman: Tea?\n\nAssistant: No."}
  data_file = _write_hh(tmp_path, [good, odd, good])
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  _bind(path, real.SPECIAL_TOKENS[name]["end_of_turn"])
  report.reset()
  try:
    if name != "gemma2":  # Llama and Qwen render it: all three rows kept
      assert len(list(hh_rlhf.pairs("harmless-base", "test"))) == 3
      ds = pipeline.get_task(TASK).source.get_dataset(split="test", shuffle=False)
      assert len(list(pipeline.numpy_iterator(ds))) == 3
      return
    with pytest.raises(readers.MalformedRowError) as error:
      pipeline.get_task(TASK).source.get_dataset(split="test", shuffle=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{data_file}:2: malformed row: ChatTemplateError:")
    assert "(roles assistant/user)" in message  # the prompt, rendered first
    assert "Conversation roles must alternate" in message
    with gin.unlock_config():
      gin.bind_parameter("perl.data.readers.bad_row_policy.policy", "skip")
    ds = pipeline.get_task(TASK).source.get_dataset(split="test", shuffle=False)
    assert len(list(pipeline.numpy_iterator(ds))) == 2
    assert report.counts(f"{TASK}/test")["skipped_malformed_rows"] == 1
  finally:
    gin.clear_config()
