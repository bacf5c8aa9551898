"""Chat-templated tasks tokenize exactly as transformers' apply_chat_template.

Two tiny byte-level BPE tokenizers are trained here (no downloads) with the
special tokens and the turn layout of Llama 3 (BOS, header ids, <|eot_id|>)
and of Qwen2.5 (ChatML, a default system turn, no BOS); each is saved with
transformers' save_pretrained together with a chat template of that layout,
and perl reads the saved directory as a user's gin run would.
"""

import gin
import numpy as np
import pytest

from perl.data import chat, pipeline, vocabularies
from tasks import common

transformers = pytest.importorskip("transformers")  # requirements-test.txt
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
FLAVOURS = {
    "llama3": dict(template=LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
                   specials=["<|begin_of_text|>", "<|end_of_text|>",
                             "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"]),
    "qwen2_5": dict(template=QWEN_TEMPLATE, bos=None, eos="<|im_end|>",
                    specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
}
CORPUS = ["Can you book a table for four at 7:30pm tonight?",
          "Sure, which restaurant would you like?",
          "A large latte and two mochas, please.",
          "You are a helpful assistant."] * 5
PROMPT = [{"role": "system", "content": "You take coffee orders."},
          {"role": "user", "content": "Two lattes, please."},
          {"role": "assistant", "content": "Hot or iced?"},
          {"role": "user", "content": "Iced, and one mocha."}]
CHOSEN = "Two iced lattes and one mocha: confirmed."
REJECTED = "One hot latte."


def _tokenizer(flavour):
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  spec = FLAVOURS[flavour]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=spec["specials"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if spec["bos"]:  # Llama 3's tokenizer adds BOS itself
    bos = tok.token_to_id(spec["bos"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec['bos']} $A", special_tokens=[(spec["bos"], bos)])
  return tok


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def tokenizer_dir(request, tmp_path_factory):
  spec = FLAVOURS[request.param]
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_tokenizer(request.param), bos_token=spec["bos"],
      eos_token=spec["eos"], chat_template=spec["template"])
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return request.param, str(path), transformers.AutoTokenizer.from_pretrained(path)


def _ids(encoded):
  return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_render_equals_apply_chat_template(tokenizer_dir):
  _, path, hf = tokenizer_dir
  template = chat.ChatTemplate.from_pretrained(path)
  for generation_prompt in (False, True):
    assert template.render(PROMPT, add_generation_prompt=generation_prompt) == \
        hf.apply_chat_template(PROMPT, tokenize=False,
                               add_generation_prompt=generation_prompt)


@pytest.fixture
def chat_task(tokenizer_dir):
  flavour, path, hf = tokenizer_dir
  name = f"test_chat_{flavour}"
  vocab = vocabularies.ConfiguredVocabulary()
  records = [{"prompt": "unused in chat mode", "prompt_messages": PROMPT,
              "chosen": CHOSEN, "rejected": REJECTED}]
  common.register_task(name, kind=common.PREFERENCE, splits=["train"],
                       records_fn=lambda split: iter(records), vocabulary=vocab)
  with gin.unlock_config():
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.kind", "huggingface")
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.path", path)
  yield flavour, name, hf
  gin.clear_config()


def _first(name):
  ds = pipeline.get_dataset(task=name, split="train", shuffle=False,
                            feature_lengths={"prompt": 96, "response": 32})
  return next(ds.as_numpy_iterator())


def _real(ex, side):
  return ex[f"{side}_tokens"][ex[f"{side}_segment_ids"] > 0].tolist()


def test_chat_templated_pairs_tokenize_like_apply_chat_template(chat_task):
  flavour, name, hf = chat_task
  with gin.unlock_config():
    gin.bind_parameter("perl.data.chat.rendering.kind", "chat_template")
  ex = _first(name)
  for side, text in (("chosen", CHOSEN), ("rejected", REJECTED)):
    full = _ids(hf.apply_chat_template(
        PROMPT + [{"role": "assistant", "content": text}], tokenize=True))
    # Up to the end-of-turn token that closes the response (Qwen's template
    # writes a newline after it, which the model never has to produce).
    end = len(full) - full[::-1].index(hf.eos_token_id)
    assert _real(ex, side) == full[:end], side
    prompt = _ids(hf.apply_chat_template(PROMPT, tokenize=True,
                                         add_generation_prompt=True))
    mask = ex[f"{side}_response_mask"][ex[f"{side}_segment_ids"] > 0]
    assert int(np.sum(mask == 0)) == len(prompt)  # reward/loss mask: the reply only
  bos = FLAVOURS[flavour]["bos"]
  starts = _real(ex, "chosen")[:2]
  if bos:  # exactly one BOS: the template's, none added on top
    assert starts[0] == hf.convert_tokens_to_ids(bos) and starts[1] != starts[0]
  else:
    assert hf.convert_tokens_to_ids("<|im_start|>") == starts[0]


def test_raw_prompts_start_with_bos_where_the_model_expects_one(chat_task):
  flavour, name, hf = chat_task
  ex = _first(name)
  tokens = _real(ex, "chosen")
  raw = hf.encode("unused in chat mode", add_special_tokens=True)
  # As `tokenizer(text)` gives it: BOS for Llama 3, none for Qwen2.5.
  assert tokens[:len(raw)] == raw
  assert (tokens[0] == hf.bos_token_id) == (FLAVOURS[flavour]["bos"] is not None)


def test_hh_transcripts_become_messages():
  text = ("\n\nHuman: Can I get an iced latte?\n\nAssistant: Sure, what size?"
          "\n\nHuman: Large.\n\nAssistant:")
  assert chat.hh_messages(text) == [
      {"role": "user", "content": "Can I get an iced latte?"},
      {"role": "assistant", "content": "Sure, what size?"},
      {"role": "user", "content": "Large."}]
  with pytest.raises(ValueError, match="not an HH transcript"):
    chat.hh_messages("no turns here")


def test_a_template_that_is_not_prefix_stable_is_named(tmp_path):
  path = tmp_path / "odd.jinja"
  path.write_text("{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}")
  template = chat.ChatTemplate.from_pretrained(str(path))
  with pytest.raises(ValueError, match="does not render the prompt as a prefix"):
    template.split(PROMPT, [{"role": "assistant", "content": "x"}], eos_text=None)


def test_a_malformed_message_is_named():
  template = chat.ChatTemplate(template="{{ messages[0]['content'] }}")
  with pytest.raises(ValueError, match="message 1 .* needs a 'role'"):
    template.render([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])


def test_a_tokenizer_without_a_chat_template_is_one_error(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match="No chat template in .*rendering='raw'"):
    chat.ChatTemplate.from_pretrained(str(tmp_path))


def _write_jsonl(path, rows):
  import json  # pylint: disable=g-import-not-at-top
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_trl_conversational_rows_are_rendered_by_the_template(tokenizer_dir, tmp_path):
  """TRL's explicit- and implicit-prompt conversational rows give the same ids."""
  _, path, hf = tokenizer_dir
  chosen = [{"role": "assistant", "content": CHOSEN}]
  rejected = [{"role": "assistant", "content": REJECTED}]
  explicit = {"prompt": PROMPT, "chosen": chosen, "rejected": rejected}
  implicit = {"chosen": PROMPT + chosen, "rejected": PROMPT + rejected}
  train = _write_jsonl(tmp_path / "train.jsonl", [explicit, implicit])
  with gin.unlock_config():
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.kind", "huggingface")
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.path", path)
    gin.bind_parameter("perl.data.chat.rendering.kind", "chat_template")
    gin.bind_parameter("tasks.trl_format.data_files.files", {"train": train})
  try:
    ds = pipeline.get_dataset(task="trl_preference", split="train", shuffle=False,
                              feature_lengths={"prompt": 96, "response": 32})
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 2
    full = _ids(hf.apply_chat_template(PROMPT + chosen, tokenize=True))
    end = len(full) - full[::-1].index(hf.eos_token_id)
    for ex in rows:
      assert _real(ex, "chosen") == full[:end]
    with pytest.raises(Exception, match="no file for split 'test'"):
      next(pipeline.get_dataset(task="trl_preference", split="test",
                                feature_lengths={"prompt": 8, "response": 8}
                                ).as_numpy_iterator())
  finally:
    gin.clear_config()


def test_trl_conversational_rows_without_a_template_are_one_error(tmp_path):
  row = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}
  train = _write_jsonl(tmp_path / "train.jsonl", [row])
  with gin.unlock_config():
    gin.bind_parameter("tasks.trl_format.data_files.files", {"train": train})
  try:
    with pytest.raises(Exception, match=r"train.jsonl:1: malformed row: .*"
                       "rendering.kind = 'chat_template'"):
      next(pipeline.get_dataset(task="trl_preference", split="train",
                                feature_lengths={"prompt": 8, "response": 8}
                                ).as_numpy_iterator())
  finally:
    gin.clear_config()


def test_trl_rows_from_parquet_shards(tmp_path):
  """A Hugging Face `datasets` download (Parquet shards), standard format."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = [{"prompt": f"order {i}:", "chosen": " yes", "rejected": " no"}
          for i in range(5)]
  for shard in range(2):
    pq.write_table(pa.Table.from_pylist(rows[shard * 3:(shard + 1) * 3]),
                   str(tmp_path / f"train-0000{shard}-of-00002.parquet"))
  with gin.unlock_config():
    gin.bind_parameter("tasks.trl_format.data_files.files",
                       {"train": str(tmp_path / "train-*.parquet")})
  try:
    ds = pipeline.get_dataset(task="trl_preference", split="train", shuffle=False,
                              feature_lengths={"prompt": 16, "response": 8})
    examples = list(ds.as_numpy_iterator())
  finally:
    gin.clear_config()
  assert len(examples) == 5
  byte = vocabularies.byte_vocabulary()
  assert _real(examples[4], "chosen") == byte.encode("order 4: yes") + [1]


def test_trl_rows_from_a_datasets_save_to_disk_folder(tmp_path):
  """`datasets.save_to_disk` writes Arrow IPC streams (data-*.arrow)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  rows = [{"prompt": f"order {i}:", "chosen": " yes", "rejected": " no"}
          for i in range(4)]
  table = pa.Table.from_pylist(rows)
  with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  (tmp_path / "broken.arrow").write_bytes(b"not arrow")
  with gin.unlock_config():
    gin.bind_parameter("tasks.trl_format.data_files.files",
                       {"train": str(tmp_path / "data-*.arrow"),
                        "test": str(tmp_path / "broken.arrow")})
  try:
    ds = pipeline.get_dataset(task="trl_preference", split="train", shuffle=False,
                              feature_lengths={"prompt": 16, "response": 8})
    examples = list(ds.as_numpy_iterator())
    with pytest.raises(ValueError, match="broken.arrow: not a readable Arrow"):
      pipeline.get_dataset(task="trl_preference", split="test", shuffle=False,
                           feature_lengths={"prompt": 16, "response": 8})
  finally:
    gin.clear_config()
  assert len(examples) == 4
  byte = vocabularies.byte_vocabulary()
  assert _real(examples[3], "chosen") == byte.encode("order 3: yes") + [1]


def test_runs_of_one_role_are_merged_and_a_split_reply_rejoined():
  template = chat.ChatTemplate(template=QWEN_TEMPLATE)
  prompt = [{"role": "user", "content": "Tea?"},
            {"role": "assistant", "content": "Hot or iced?"},
            {"role": "assistant", "content": "We have both."},
            {"role": "user", "content": "Iced."}]
  head, reply = template.split(prompt, [{"role": "assistant", "content": "Done."}],
                               eos_text="<|im_end|>")
  assert "<|im_start|>assistant\nHot or iced?\n\nWe have both.<|im_end|>\n" in head
  assert head.count("<|im_start|>assistant") == 2 and reply == "Done."
  # A prompt that ends in an assistant turn: that turn opens the reply.
  head, reply = template.split(prompt[:3], [{"role": "assistant", "content": "Ok."}],
                               eos_text="<|im_end|>")
  assert head.endswith("<|im_start|>user\nTea?<|im_end|>\n<|im_start|>assistant\n")
  assert reply == "Hot or iced?\n\nWe have both.\n\nOk."


def test_text_turns_are_stripped_for_every_template():
  """Qwen's template keeps a content's spaces: the raw-text joiner must go."""
  template = chat.ChatTemplate(template=QWEN_TEMPLATE)
  record = {"prompt": "Tea?\n", "chosen": " Iced.", "rejected": "\nHot. "}
  out = chat.render_record(record, ("prompt", "chosen", "rejected"), template,
                           eos_text="<|im_end|>")
  assert out["prompt"].endswith("<|im_start|>user\nTea?<|im_end|>\n"
                                "<|im_start|>assistant\n")
  assert (out["chosen"], out["rejected"]) == ("Iced.", "Hot.")


def test_hh_replies_with_further_turns_become_messages():
  assert chat.hh_reply_messages(" Sure.\n\nHuman: Large.\n\nAssistant:  Ok. ") == [
      {"role": "assistant", "content": "Sure."},
      {"role": "user", "content": "Large."},
      {"role": "assistant", "content": "Ok."}]
  assert chat.hh_reply_messages(" ") == [{"role": "assistant", "content": ""}]


def test_template_errors_are_one_value_error_naming_the_template(tmp_path):
  path = tmp_path / "bad.jinja"
  path.write_text("{% for m in messages %}{{ m['content'] }")
  with pytest.raises(ValueError, match="bad.jinja is not valid Jinja"):
    chat.ChatTemplate.from_pretrained(str(path)).check()
  strict = chat.ChatTemplate(template="{{ raise_exception('no ' + messages[0]"
                                      "['role']) }}", source="strict.jinja")
  with pytest.raises(chat.ChatTemplateError,
                     match=r"strict.jinja cannot render .*\(roles system\): no system"):
    strict.render([{"role": "system", "content": "x"}])
  assert issubclass(chat.ChatTemplateError, ValueError)  # the bad-row policy's
