"""Anthropic HH (anthropics/hh-rlhf): {subset}/{train,test}.jsonl.gz under
{data_dir}/hh-rlhf/, one JSON object per line: {chosen, rejected}, each a whole
transcript "\\n\\nHuman: ...\\n\\nAssistant: ...".

Each pair is split into the shared prompt (through "\\n\\nAssistant:") and two
responses. Rule when the two transcripts' prompts differ (5 of 2,312 pairs in
harmless-base test): the prompt is the longest common prefix of the two
transcripts that ends in "\\n\\nAssistant:", and each response is the rest of
its transcript (it may then hold further turns). Such pairs are counted as
"prompt_mismatch"; a pair with no common "\\n\\nAssistant:" is a malformed row.

With perl.data.chat.rendering.kind='chat_template' the prompt's turns become
`prompt_messages` and each response's turns `chosen_messages` /
`rejected_messages` (an assistant turn, then any further turns); the template
renders them as `perl.data.chat` describes (runs of one role merged), and a
conversation the template rejects is a malformed row named by file and line.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

from perl.data import chat, paths, readers, report, vocabularies
from tasks import common

SOURCE = paths.DataSourceInfo(
    name="Anthropic HH", folder="hh-rlhf",
    origin="https://github.com/anthropics/hh-rlhf")
SUBSETS = ("harmless-base", "helpful-base", "helpful-online",
           "helpful-rejection-sampled")
SPLITS = ("train", "test")
ASSISTANT = "\n\nAssistant:"


def _last_prompt_end(text: str) -> int:
  index = text.rfind(ASSISTANT)
  return -1 if index < 0 else index + len(ASSISTANT)


def split_pair(chosen: str, rejected: str) -> Tuple[str, str, str, bool]:
  """(prompt, chosen response, rejected response, prompts_differed)."""
  end_chosen, end_rejected = _last_prompt_end(chosen), _last_prompt_end(rejected)
  if end_chosen < 0 or end_rejected < 0:
    raise ValueError(f"a transcript has no {ASSISTANT!r}")
  if chosen[:end_chosen] == rejected[:end_rejected]:
    return chosen[:end_chosen], chosen[end_chosen:], rejected[end_rejected:], False
  common_length = 0
  limit = min(len(chosen), len(rejected))
  while common_length < limit and chosen[common_length] == rejected[common_length]:
    common_length += 1
  end = chosen.rfind(ASSISTANT, 0, common_length)
  if end < 0:
    raise ValueError(f"chosen and rejected share no prompt ending in {ASSISTANT!r}")
  end += len(ASSISTANT)
  return chosen[:end], chosen[end:], rejected[end:], True


def pairs(subset: str, split: str) -> Iterator[dict]:
  scope = f"hh_rlhf/{subset}/{split}"
  # With a chat template the transcript's turns become messages.
  as_chat = chat.rendering() is not None
  path = paths.dataset_file(SOURCE, f"{subset}/{split}.jsonl.gz")
  for where, record in readers.read_json_lines(
      path, required={"chosen": str, "rejected": str}, scope=scope):
    parts = readers.parse_or_bad_row(
        where, lambda: split_pair(record["chosen"], record["rejected"]),
        scope=scope)
    if parts is None:
      continue
    prompt, chosen, rejected, differed = parts
    if differed:
      report.count(scope, "prompt_mismatch")
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if as_chat:  # a reply may hold further turns (see the module doc)
      pair[common.WHERE] = where  # names the row if the template fails on it
      pair["prompt_messages"] = readers.parse_or_bad_row(
          where, lambda: chat.hh_messages(prompt), scope=scope)
      if pair["prompt_messages"] is None:
        continue
      pair["chosen_messages"] = chat.hh_reply_messages(chosen)
      pair["rejected_messages"] = chat.hh_reply_messages(rejected)
    yield pair


def check_files(subset: str, split: str) -> None:
  """The split's file exists, opens and is complete (before the graph)."""
  readers.check_file(paths.dataset_file(SOURCE, f"{subset}/{split}.jsonl.gz"),
                     readers.LINES)


def task_name(subset: str, kind: str) -> str:
  return f"hh_rlhf_{subset.replace('-', '_')}_{kind}"


def register(vocabulary: Optional[object] = None) -> None:
  vocabulary = vocabulary or vocabularies.ConfiguredVocabulary()
  for subset in SUBSETS:
    common.register_task(
        task_name(subset, common.PREFERENCE), kind=common.PREFERENCE,
        splits=SPLITS, vocabulary=vocabulary,
        records_fn=lambda split, s=subset: pairs(s, split),
        preflight=lambda split, s=subset: check_files(s, split))
    common.register_task(
        task_name(subset, common.SFT), kind=common.SFT, splits=SPLITS,
        vocabulary=vocabulary,
        records_fn=lambda split, s=subset: (
            {"inputs": p["prompt"], "targets": p["chosen"],
             **({"prompt_messages": p["prompt_messages"],
                 "targets_messages": p["chosen_messages"],
                 common.WHERE: p[common.WHERE]}
                if "prompt_messages" in p else {})}
            for p in pairs(s, split)),
        preflight=lambda split, s=subset: check_files(s, split))
    common.register_task(
        task_name(subset, common.PROMPTS), kind=common.PROMPTS, splits=SPLITS,
        vocabulary=vocabulary,
        records_fn=lambda split, s=subset: (
            {k: v for k, v in p.items()
             if k in ("prompt", "prompt_messages", common.WHERE)}
            for p in pairs(s, split)),
        preflight=lambda split, s=subset: check_files(s, split))
