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

Splits, by the unit that leaks ("all" is every row exactly as published):
  dialogs (SFT): one dialog is one conversation_id. TM-3 publishes official
      splits (splits/{train,dev,test}/*.tsv, the dialog id in the last
      column; dev is "validation"); they are used when present, and a dialog
      they do not list is in "all" only. Otherwise crc32(conversation_id)
      % 20 is 0 for "validation", 1 for "test", else "train".
  reward sets: conversation_id is unique per *row*, while one dialog gives
      many rows whose contexts extend one another. Rows are grouped (union-
      find) when one context is a prefix of the other, the contexts are
      equal or the conversation_id is shared; a group goes to one split by
      crc32 of its shortest context, as above. The empty context (the
      dialog's opening) is a prefix of every context, so its rows stay in
      "train". Exact duplicate rows (same prompt, response and label) are
      removed from train/validation/test and counted as "duplicate_rows";
      (prompt, response) pairs labelled both 1.0 and 0.0 are kept and
      counted as "conflicting_labels", in every split.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import zlib
from typing import (Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

from perl.data import paths, readers, report, vocabularies
from tasks import common

SOURCE = paths.DataSourceInfo(
    name="Taskmaster", folder="taskmaster",
    origin="https://github.com/google-research-datasets/Taskmaster")
SPLITS = ("train", "validation", "test", "all")
VERSIONS = {"taskmaster4": "TM-4-2024", "taskmaster3": "TM-3-2020"}
_BUCKETS = 20
_BUCKET_SPLITS = {0: "validation", 1: "test"}  # other buckets: train
# Official split folders (TM-3) -> our split names.
_OFFICIAL_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
_REWARD_FIELDS = {"conversation_id": str, "context": str, "generation": str,
                  "reward": (int, float)}
_DIALOG_FIELDS = {"conversation_id": str, "utterances": list}
_SPEAKER_ROLES = {"user": "user", "assistant": "agent", "agent": "agent"}

Turn = Dict[str, object]
# The app's greeting, said before the user's first words: it opens 3,218 of
# the 3,228 TM-4 reward contexts, while the TM-4 dialogs start at the user.
# SFT dialogs that open with the user get it too, so SFT, reward-model and
# RL prompts all start the way the reward contexts (and RL prompts) do.
OPENING_TURNS: Dict[str, Turn] = {"taskmaster4": {
    "role": "agent",
    "text": ("Welcome to the Coffee Bar where you can order coffee, tea, "
             "espresso, and other drinks ahead of time. What can I get for "
             "you?")}}


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Taskmaster tasks have splits {SPLITS}, not {split!r}")


def bucket_split(key: str) -> str:
  """The split of a dialog id or reward-row group key, by a stable hash."""
  return _BUCKET_SPLITS.get(zlib.crc32(key.encode()) % _BUCKETS, "train")


def in_split(conversation_id: str, split: str) -> bool:
  """Hash split of one dialog (no official split file)."""
  _check_split(split)
  return split == "all" or bucket_split(conversation_id) == split


def official_splits(version: str) -> Optional[Dict[str, str]]:
  """{dialog id: split} from the release's splits/ folder, or None."""
  root = os.path.join(paths.data_dir(), SOURCE.folder, VERSIONS[version],
                      "splits")
  if not os.path.isdir(root):
    return None
  return _read_official_splits(root)


@functools.lru_cache(maxsize=4)
def _read_official_splits(root: str) -> Dict[str, str]:
  assignment: Dict[str, str] = {}
  for folder, split in _OFFICIAL_SPLITS.items():
    for path in sorted(glob.glob(os.path.join(root, folder, "*.tsv"))):
      for line_number, line in enumerate(readers.read_text_lines(path), 1):
        dialog_id = line.rstrip("\n").rsplit("\t", 1)[-1].strip()
        if not dialog_id.startswith("dlg-"):
          raise readers.MalformedRowError(
              f"{path}:{line_number}: malformed row: the last column should "
              f"be a dialog id (dlg-...), got {dialog_id[:40]!r}")
        previous = assignment.setdefault(dialog_id, split)
        if previous != split:
          raise readers.MalformedRowError(
              f"{path}:{line_number}: dialog {dialog_id} is listed in both "
              f"{previous} and {split}")
  return assignment


def _string(value: object, what: str) -> str:
  """`value` when it is a string; a null or other value is a malformed row
  (it would otherwise render as the text "None")."""
  if not isinstance(value, str):
    found = "null" if value is None else type(value).__name__
    raise ValueError(f"{what} should be a string, got {found}")
  return value


def turn_body(turn: Turn) -> str:
  """The text of one turn: words, an API call, or an API response."""
  if not isinstance(turn, dict):
    raise ValueError(f"a turn should be an object, got {type(turn).__name__}")
  for field in ("text", "api", "response"):
    if field in turn and turn[field] is None:
      raise ValueError(f"turn field {field!r} is null")
  if "text" in turn:
    return _string(turn["text"], "turn field 'text'")
  if "api" in turn:
    return "[api] " + json.dumps(turn["api"], ensure_ascii=False)
  if "response" in turn:
    return json.dumps(turn["response"], ensure_ascii=False)
  raise ValueError(f"turn has none of text/api/response: {turn}")


def render_prompt(context: List[Turn]) -> str:
  lines = []
  for turn in context:
    body = turn_body(turn)
    role = _string(turn.get("role"), "turn field 'role'")
    lines.append(f"{role}: {body}")
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
    context = _string(annotation.get("context"), "annotation field 'context'")
    number = context.rsplit("_", 1)[-1]
    call = calls.setdefault(number, {})
    name = _string(annotation.get("name"), "annotation field 'name'")
    _string(annotation.get("value"), f"annotation {name!r} field 'value'")
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
    _string(api.get("name"), "api field 'name'")
    turns.append({"role": "agent", "api": {api["name"]: api.get("args", {})}})
    if "response" in api:
      turns.append({"role": "api", "response": {api["name"]: api["response"]}})
  return turns


def dialog_turns(dialog: dict, opening: Optional[Turn] = None) -> List[Turn]:
  """A TM-4 or TM-3 dialog as the reward sets' turn list, led by `opening`
  when the dialog starts with the user.

  API calls follow a user utterance (the agent acts on what it heard) and
  precede an agent utterance's words (the agent speaks after the result).
  """
  turns: List[Turn] = []
  for utterance in sorted(dialog["utterances"], key=lambda u: u["index"]):
    speaker = utterance["speaker"]
    if speaker not in _SPEAKER_ROLES:
      raise ValueError(f"utterance {utterance['index']}: speaker should be "
                       f"one of {sorted(_SPEAKER_ROLES)}, got {speaker!r}")
    role = _SPEAKER_ROLES[speaker]
    api_turns = (_tm4_api_turns(utterance.get("annotations") or [])
                 + _tm3_api_turns(utterance.get("apis") or []))
    text = _string(utterance.get("text"),
                   f"utterance {utterance['index']} field 'text'")
    spoken = {"role": role, "text": text}
    turns.extend([spoken] + api_turns if role == "user" else api_turns + [spoken])
  if opening is not None and turns and turns[0]["role"] == "user":
    turns.insert(0, dict(opening))
  return turns


def sft_records(dialog: dict, opening: Optional[Turn] = None
                ) -> Iterator[dict]:
  """One example per agent turn: everything before it -> that turn."""
  turns = dialog_turns(dialog, opening)
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


def _files(version: str, subdir: str) -> Sequence[str]:
  files = paths.dataset_files(SOURCE, f"{VERSIONS[version]}/{subdir}/*.json")
  readers.check_files_open(files, readers.ARRAY)
  return files


def check_files(version: str, subdir: str) -> None:
  """Every file of one part opens and is complete (before the graph)."""
  _files(version, subdir)


def _records(version: str, subdir: str, required, split: str
             ) -> Iterator[tuple]:
  _check_split(split)
  scope = f"{version}/{subdir}/{split}"
  official = official_splits(version) if subdir == "data" else None
  for path in _files(version, subdir):
    for where, record in readers.read_json_array(path, required=required,
                                                 scope=scope):
      conversation_id = str(record["conversation_id"])
      if official is not None:
        keep = split == "all" or official.get(conversation_id) == split
      else:
        keep = subdir != "data" or in_split(conversation_id, split)
      if keep:
        yield where, record, scope


def dialog_sft_examples(version: str, split: str) -> Iterator[dict]:
  for where, dialog, scope in _records(version, "data", _DIALOG_FIELDS, split):
    examples = readers.parse_or_bad_row(
        where, lambda: list(sft_records(dialog, OPENING_TURNS.get(version))),
        scope=scope)
    yield from examples or ()


def _context_key(record: dict) -> Tuple[str, ...]:
  """A reward row's context as a tuple of canonical turns (for prefixes)."""
  return tuple(json.dumps(turn, sort_keys=True, ensure_ascii=False)
               for turn in json.loads(record["context"]))


def group_rows(contexts: Sequence[Tuple[str, ...]],
               conversation_ids: Sequence[str]) -> List[str]:
  """Per row, the split of its group: rows whose contexts are equal or
  prefixes of one another, or that share a conversation_id, get one split."""
  parent = list(range(len(contexts)))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  def union(i: int, j: int) -> None:
    parent[find(i)] = find(j)

  first: Dict[object, int] = {}
  for i, (context, cid) in enumerate(zip(contexts, conversation_ids)):
    for key in (("context", context), ("id", cid)):
      if key in first:
        union(i, first[key])
      else:
        first[key] = i
  for i, context in enumerate(contexts):
    # Proper, non-empty prefixes: the empty one is shared by every dialog.
    for length in range(1, len(context)):
      j = first.get(("context", context[:length]))
      if j is not None:
        union(i, j)
  shortest: Dict[int, Tuple[str, ...]] = {}
  for i, context in enumerate(contexts):
    root = find(i)
    if root not in shortest or (len(context), context) < (
        len(shortest[root]), shortest[root]):
      shortest[root] = context
  splits = []
  for i in range(len(contexts)):
    key = shortest[find(i)]
    splits.append(bucket_split(json.dumps(key)) if key else "train")
  return splits


def reward_examples(version: str, split: str) -> Iterator[dict]:
  scope = f"{version}/reward/{split}"
  rows = []
  for where, record, _ in _records(version, "reward", _REWARD_FIELDS, split):
    example = readers.parse_or_bad_row(
        where, lambda: (parse_reward_record(record), _context_key(record)),
        scope=scope)
    if example is not None:
      rows.append((example, str(record["conversation_id"])))
  if split == "all":  # as published: every row, duplicates included
    yield from report.counting_label_conflicts(
        scope, (example for (example, _), _ in rows))
    return
  row_splits = group_rows([context for (_, context), _ in rows],
                          [cid for _, cid in rows])
  yield from report.counting_label_conflicts(
      scope, _deduplicated(scope, (example for ((example, _), _), row_split
                                   in zip(rows, row_splits)
                                   if row_split == split)))


def _deduplicated(scope: str, examples: Iterable[dict]) -> Iterator[dict]:
  """`examples` without exact repeats, counted as "duplicate_rows"."""
  seen = set()
  for example in examples:
    key = (example["prompt"], example["response"], example["label"])
    if key in seen:
      report.count(scope, "duplicate_rows")
      continue
    seen.add(key)
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
        records_fn=lambda split, v=version: dialog_sft_examples(v, split),
        preflight=lambda split, v=version: check_files(v, "data"))
    common.register_task(
        f"{version}_pointwise", kind=common.POINTWISE, splits=SPLITS,
        vocabulary=vocabulary,
        records_fn=lambda split, v=version: reward_examples(v, split),
        preflight=lambda split, v=version: check_files(v, "reward"))
    common.register_task(
        f"{version}_prompts", kind=common.PROMPTS, splits=SPLITS,
        vocabulary=vocabulary,
        records_fn=lambda split, v=version: reward_prompts(v, split),
        preflight=lambda split, v=version: check_files(v, "reward"))
