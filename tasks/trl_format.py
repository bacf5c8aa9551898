"""Preference data in TRL's dataset format, from the user's own files.

TRL's DPO/Reward trainers read rows of
  explicit prompt:  {"prompt": ..., "chosen": ..., "rejected": ...}
  implicit prompt:  {"chosen": ..., "rejected": ...}  (the shared turns are the prompt)
where each value is plain text ("standard") or a list of {"role", "content"}
messages ("conversational"). Files are JSON lines (optionally .gz), a JSON
array, Parquet (the shards a Hugging Face `datasets` download holds) or Arrow
(the data-*.arrow of `datasets.save_to_disk`), one path or glob per split,
named in gin:

  tasks.trl_format.data_files.files = {'train': '/data/train.jsonl',
                                       'test': '/data/test.jsonl'}

Tasks: trl_preference (pairs), trl_sft (prompt -> chosen) and trl_prompts.
Conversational rows need `perl.data.chat.rendering.kind = 'chat_template'`
(the model's template turns messages into text); standard rows work either way.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator, Mapping, Optional

import gin

from perl.data import chat, readers, vocabularies
from tasks import common

SPLITS = ("train", "validation", "test")
PREFERENCE_TASK = "trl_preference"


@gin.configurable(module="tasks.trl_format")
def data_files(files: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """{split: path} of the TRL-format files."""
  return dict(files or {})


def _files(split: str) -> list[str]:
  files = data_files()
  if split not in files:
    raise FileNotFoundError(
        f"{PREFERENCE_TASK}: no file for split {split!r} (given: "
        f"{sorted(files) or 'none'}). Fix: bind tasks.trl_format.data_files."
        f"files = {{'{split}': '/path/to/{split}.jsonl', ...}}.")
  pattern = os.path.expanduser(files[split])
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise FileNotFoundError(f"{PREFERENCE_TASK}: {pattern} (split {split!r}) "
                            "matches no file; fix tasks.trl_format.data_files.")
  return paths


TABLE_SUFFIXES = (".parquet", ".arrow")


def _read_table(path: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if path.endswith(".parquet"):
    return pq.read_table(path)
  # `datasets.save_to_disk` / the datasets cache: Arrow IPC streams.
  with pa.memory_map(path) as source:
    try:
      return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      source.seek(0)
      return pa.ipc.open_file(source).read_all()


def _parquet_rows(path: str, scope: str):
  """(where, record) of a Parquet or Arrow file (a Hugging Face `datasets`
  Hub shard, or a `save_to_disk` folder's data-*.arrow)."""
  try:
    table = _read_table(path)
  except Exception as e:  # pyarrow raises several types for bad files
    kind = "Parquet" if path.endswith(".parquet") else "Arrow"
    raise ValueError(f"{path}: not a readable {kind} file ({e}).") from None
  for index, record in enumerate(table.to_pylist()):
    where = f"{path} row {index}"
    problem = readers.require_fields(record, ("chosen", "rejected"))
    if problem:
      readers.handle_bad_row(where, problem, scope=scope)
      continue
    yield where, record


def _is_messages(value) -> bool:
  return isinstance(value, list)


def parse_row(record: Mapping) -> dict:
  """One TRL row -> {prompt, chosen, rejected[, prompt_messages]}."""
  chosen, rejected = record["chosen"], record["rejected"]
  prompt = record.get("prompt")
  if _is_messages(chosen) != _is_messages(rejected) or (
      prompt is not None and _is_messages(prompt) != _is_messages(chosen)):
    raise ValueError("prompt, chosen and rejected mix text and message lists")
  if not _is_messages(chosen):
    if prompt is None:  # implicit prompt in text: the longest common prefix
      prompt = os.path.commonprefix([chosen, rejected])
      chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
  if chat.rendering() is None:
    raise ValueError(
        "a conversational row (lists of messages): set "
        "perl.data.chat.rendering.kind = 'chat_template' so that the model's "
        "chat template renders it")
  if prompt is None:  # implicit prompt: the messages both conversations share
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
      n += 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  for side, messages in (("chosen", chosen), ("rejected", rejected)):
    if not messages or any(m.get("role") != "assistant" for m in messages):
      raise ValueError(f"{side} must be assistant turn(s) after the prompt, got "
                       f"roles {[m.get('role') for m in messages]}")
  text = " ".join(m.get("content", "") for m in prompt)
  return {"prompt": text, "prompt_messages": prompt,
          "chosen": chosen, "rejected": rejected}


def pairs(split: str) -> Iterator[dict]:
  scope = f"{PREFERENCE_TASK}/{split}"
  for path in _files(split):
    rows = (_parquet_rows(path, scope) if path.endswith(TABLE_SUFFIXES) else
            readers.read_json_records(path, required=("chosen", "rejected"),
                                      scope=scope))
    for where, record in rows:
      row = readers.parse_or_bad_row(where, lambda: parse_row(record),
                                     scope=scope)
      if row is not None:
        yield row


def register(vocabulary: Optional[object] = None) -> None:
  vocabulary = vocabulary or vocabularies.ConfiguredVocabulary()
  common.register_task(PREFERENCE_TASK, kind=common.PREFERENCE, splits=SPLITS,
                       vocabulary=vocabulary, records_fn=pairs)
  common.register_task(
      "trl_sft", kind=common.SFT, splits=SPLITS, vocabulary=vocabulary,
      records_fn=lambda split: (
          {"inputs": p["prompt"], "targets": p["chosen"],
           **{k: p[k] for k in ("prompt_messages",) if k in p}}
          for p in pairs(split)))
  common.register_task(
      "trl_prompts", kind=common.PROMPTS, splits=SPLITS, vocabulary=vocabulary,
      records_fn=lambda split: (
          {k: p[k] for k in ("prompt", "prompt_messages") if k in p}
          for p in pairs(split)))
