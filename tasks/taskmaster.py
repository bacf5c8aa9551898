"""Taskmaster (google-research-datasets/Taskmaster), as released with PERL.

Files under {data_dir}/taskmaster/ (upstream layout; each file one JSON array):
  TM-4-2024/data/*.json    coffee dialogs: conversation_id, vertical, scenario,
      instructions, utterances[index, speaker, text, segments, annotations].
      API calls are annotations on the user utterance after which the agent
      makes them: api_call(value=name) + request(value=args JSON), then
      api_response(value=name) + response(value=JSON), grouped by context
      "api_call_N" / "api_response_N".
  TM-3-2020/data/*.json    ticketing dialogs: utterances carry
      apis[name, index, args, response].
  TM-*/reward/*.json       {conversation_id, context (JSON string: list of
      turns {role: agent|user|api, text|api|response}), generation (JSON
      string: one agent turn), reward 1.0|0.0}.

Every dialog is first turned into the reward sets' turn list, so SFT targets,
reward-model inputs and RL prompts share one text rendering:
  prompt   = "user: hi\nagent: [api] {...}\napi: {...}\nagent:"
  response = " " + the next agent turn's body
Upstream has no splits: a conversation is in "validation" when
crc32(conversation_id) % 20 == 0, else in "train"; "all" holds both.
"""
from __future__ import annotations

import json
import zlib
from typing import Dict, Iterator, List, Optional

from perl.data import paths, readers, vocabularies
from tasks import common

SOURCE = paths.DataSourceInfo(
    name="Taskmaster", folder="taskmaster",
    origin="https://github.com/google-research-datasets/Taskmaster")
SPLITS = ("train", "validation", "all")
VERSIONS = {"taskmaster4": "TM-4-2024", "taskmaster3": "TM-3-2020"}
_VALIDATION_BUCKETS = 20
_REWARD_FIELDS = ("conversation_id", "context", "generation", "reward")
_DIALOG_FIELDS = ("conversation_id", "utterances")
_SPEAKER_ROLES = {"user": "user", "assistant": "agent", "agent": "agent"}

Turn = Dict[str, object]


def in_split(conversation_id: str, split: str) -> bool:
  if split == "all":
    return True
  is_validation = zlib.crc32(conversation_id.encode()) % _VALIDATION_BUCKETS == 0
  return is_validation == (split == "validation")


def turn_body(turn: Turn) -> str:
  """The text of one turn: words, an API call, or an API response."""
  if "text" in turn:
    return str(turn["text"])
  if "api" in turn:
    return "[api] " + json.dumps(turn["api"], ensure_ascii=False)
  if "response" in turn:
    return json.dumps(turn["response"], ensure_ascii=False)
  raise ValueError(f"turn has none of text/api/response: {turn}")


def render_prompt(context: List[Turn]) -> str:
  lines = [f"{turn['role']}: {turn_body(turn)}" for turn in context]
  return "\n".join(lines + ["agent:"])


def render_response(turn: Turn) -> str:
  return " " + turn_body(turn)


def _json_or_text(value: str) -> object:
  """Parsed JSON; crowd-written values that are not valid JSON (72 of
  ~30k in TM-4) stay raw text, rendered as written, rather than dropping a dialog."""
  try:
    return json.loads(value)
  except json.JSONDecodeError:
    return value


def _tm4_api_turns(annotations: List[dict]) -> List[Turn]:
  """Agent API calls and API responses from one TM-4 utterance's annotations."""
  calls: Dict[str, Dict[str, object]] = {}
  for annotation in annotations:
    context = annotation["context"]
    number = context.rsplit("_", 1)[-1]
    call = calls.setdefault(number, {})
    name = annotation["name"]
    if name in ("api_call", "api_response"):
      call["name"] = annotation["value"]
    elif name == "request":
      call["args"] = _json_or_text(annotation["value"])
    elif name == "response":
      call["response"] = _json_or_text(annotation["value"])
  turns: List[Turn] = []
  for number in sorted(calls, key=lambda n: int(n) if n.isdigit() else n):
    call = calls[number]
    turns.append({"role": "agent", "api": {call["name"]: call.get("args", {})}})
    if "response" in call:
      turns.append({"role": "api", "response": {call["name"]: call["response"]}})
  return turns


def _tm3_api_turns(apis: List[dict]) -> List[Turn]:
  turns: List[Turn] = []
  for api in sorted(apis, key=lambda a: a.get("index", 0)):
    turns.append({"role": "agent", "api": {api["name"]: api.get("args", {})}})
    if "response" in api:
      turns.append({"role": "api", "response": {api["name"]: api["response"]}})
  return turns


def dialog_turns(dialog: dict) -> List[Turn]:
  """A TM-4 or TM-3 dialog as the reward sets' turn list.

  API calls follow a user utterance (the agent acts on what it heard) and
  precede an agent utterance's words (the agent speaks after the result).
  """
  turns: List[Turn] = []
  for utterance in sorted(dialog["utterances"], key=lambda u: u["index"]):
    role = _SPEAKER_ROLES[utterance["speaker"]]
    api_turns = (_tm4_api_turns(utterance.get("annotations") or [])
                 + _tm3_api_turns(utterance.get("apis") or []))
    spoken = {"role": role, "text": utterance["text"]}
    turns.extend([spoken] + api_turns if role == "user" else api_turns + [spoken])
  return turns


def sft_records(dialog: dict) -> Iterator[dict]:
  """One example per agent turn: everything before it -> that turn."""
  turns = dialog_turns(dialog)
  for i, turn in enumerate(turns):
    if turn["role"] == "agent" and i > 0:
      yield {"inputs": render_prompt(turns[:i]),
             "targets": render_response(turn)}


def parse_reward_record(record: dict) -> dict:
  context = json.loads(record["context"])
  generation = json.loads(record["generation"])
  if not isinstance(context, list) or not isinstance(generation, dict):
    raise ValueError("context must hold a JSON list and generation an object")
  reward = float(record["reward"])
  if reward not in (0.0, 1.0):
    raise ValueError(f"reward must be 0.0 or 1.0, got {reward}")
  return {"prompt": render_prompt(context),
          "response": render_response(generation), "label": reward}


def _records(version: str, subdir: str, required, split: str
             ) -> Iterator[tuple]:
  scope = f"{version}/{subdir}/{split}"
  for path in paths.dataset_files(SOURCE, f"{VERSIONS[version]}/{subdir}/*.json"):
    for where, record in readers.read_json_array(path, required=required,
                                                 scope=scope):
      if in_split(str(record["conversation_id"]), split):
        yield where, record, scope


def dialog_sft_examples(version: str, split: str) -> Iterator[dict]:
  for where, dialog, scope in _records(version, "data", _DIALOG_FIELDS, split):
    examples = readers.parse_or_bad_row(
        where, lambda: list(sft_records(dialog)), scope=scope)
    yield from examples or ()


def reward_examples(version: str, split: str) -> Iterator[dict]:
  for where, record, scope in _records(version, "reward", _REWARD_FIELDS, split):
    example = readers.parse_or_bad_row(
        where, lambda: parse_reward_record(record), scope=scope)
    if example is not None:
      yield example


def reward_prompts(version: str, split: str) -> Iterator[dict]:
  """Distinct reward-set contexts, in file order: RL prompts."""
  seen = set()
  for example in reward_examples(version, split):
    if example["prompt"] not in seen:
      seen.add(example["prompt"])
      yield {"prompt": example["prompt"]}


def register(vocabulary: Optional[object] = None) -> None:
  vocabulary = vocabulary or vocabularies.ConfiguredVocabulary()
  for version in VERSIONS:
    common.register_task(
        f"{version}_sft", kind=common.SFT, splits=SPLITS, vocabulary=vocabulary,
        records_fn=lambda split, v=version: dialog_sft_examples(v, split))
    common.register_task(
        f"{version}_pointwise", kind=common.POINTWISE, splits=SPLITS,
        vocabulary=vocabulary,
        records_fn=lambda split, v=version: reward_examples(v, split))
    common.register_task(
        f"{version}_prompts", kind=common.PROMPTS, splits=SPLITS,
        vocabulary=vocabulary,
        records_fn=lambda split, v=version: reward_prompts(v, split))
