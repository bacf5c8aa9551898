"""BOLT English SMS/Chat (LDC2018T19, licensed) as a summarisation task.

The LDC release (UTF-8 XML) is not redistributable and its exact layout could
not be checked here, so tasks read a documented JSON-lines schema produced by
`python -m tasks.bolt_convert --ldc_root=... ` from a local LDC copy:

  {data_dir}/bolt-sms-chat/perl/{train,validation,test}.jsonl, one line per
  conversation:
    conversation_id: str           LDC conversation id
    medium: "sms" | "chat"
    messages: [{id: str, participant: str, datetime: str, text: str}, ...]
    summary: str (optional)        a reference summary, when one exists

Prompt: "CONVERSATION:\\n{participant}: {text}\\n...\\nSUMMARY:"; SFT target:
" " + summary (conversations without a summary are counted and left out of
bolt_sft; they still serve as RL prompts in bolt_prompts).
"""
from __future__ import annotations

from typing import Iterator, List, Optional

from perl.data import paths, readers, report, vocabularies
from tasks import common

SOURCE = paths.DataSourceInfo(
    name="BOLT English SMS/Chat", folder="bolt-sms-chat",
    origin=("LDC catalog LDC2018T19 (https://catalog.ldc.upenn.edu/LDC2018T19, "
            "licensed); convert it with `python -m tasks.bolt_convert`"))
SPLITS = ("train", "validation", "test")
_FIELDS = ("conversation_id", "messages")


def format_prompt(messages: List[dict]) -> str:
  lines = [f"{m['participant']}: {m['text'].strip()}" for m in messages]
  return "CONVERSATION:\n" + "\n".join(lines) + "\nSUMMARY:"


def conversations(split: str) -> Iterator[dict]:
  scope = f"bolt/{split}"
  path = paths.dataset_file(SOURCE, f"perl/{split}.jsonl")
  for where, record in readers.read_json_lines(path, required=_FIELDS,
                                               scope=scope):
    prompt = readers.parse_or_bad_row(
        where, lambda: format_prompt(record["messages"]), scope=scope)
    if prompt is not None:
      yield {"prompt": prompt, "summary": record.get("summary")}


def summarised(split: str) -> Iterator[dict]:
  for conversation in conversations(split):
    if conversation["summary"]:
      yield {"inputs": conversation["prompt"],
             "targets": " " + conversation["summary"].strip()}
    else:
      report.count(f"bolt/{split}", "without_summary")


def register(vocabulary: Optional[object] = None) -> None:
  vocabulary = vocabulary or vocabularies.ConfiguredVocabulary()
  common.register_task(
      "bolt_prompts", kind=common.PROMPTS, splits=SPLITS, vocabulary=vocabulary,
      records_fn=lambda split: ({"prompt": c["prompt"]}
                                for c in conversations(split)))
  common.register_task("bolt_sft", kind=common.SFT, splits=SPLITS,
                       vocabulary=vocabulary, records_fn=summarised)
