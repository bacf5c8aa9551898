"""Stanford Human Preferences (stanfordnlp/SHP), under {data_dir}/SHP/ as on
https://huggingface.co/datasets/stanfordnlp/SHP: one folder per domain
(subreddit), each with {train,validation,test}.json in JSON lines:
post_id, domain, upvote_ratio, history, c_root_id_A/B, created_at_utc_A/B,
score_A/B, human_ref_A/B, labels (1 when A is preferred), seconds_difference,
score_ratio. All domains are read, in sorted folder order.
"""
from __future__ import annotations

from typing import Iterator, Optional

from perl.data import paths, readers, vocabularies
from tasks import common

SOURCE = paths.DataSourceInfo(
    name="SHP", folder="SHP",
    origin="https://huggingface.co/datasets/stanfordnlp/SHP")
SPLITS = ("train", "validation", "test")
_FIELDS = {"post_id": str, "history": str, "human_ref_A": str,
           "human_ref_B": str, "labels": int}


def format_prompt(history: str) -> str:
  return f"POST: {history.strip()}\n\nResponse:"


def _pair(record: dict) -> dict:
  label = int(record["labels"])
  if label not in (0, 1):
    raise ValueError(f"labels must be 0 or 1, got {label}")
  a, b = record["human_ref_A"], record["human_ref_B"]
  chosen, rejected = (a, b) if label == 1 else (b, a)
  return {"post_id": record["post_id"],
          "prompt": format_prompt(record["history"]),
          "chosen": " " + chosen.strip(), "rejected": " " + rejected.strip()}


def pairs(split: str) -> Iterator[dict]:
  scope = f"shp/{split}"
  for path in paths.dataset_files(SOURCE, f"*/{split}.json"):
    for where, record in readers.read_json_lines(path, required=_FIELDS,
                                                 scope=scope):
      pair = readers.parse_or_bad_row(where, lambda: _pair(record), scope=scope)
      if pair is not None:
        yield pair


def check_files(split: str) -> None:
  """Every domain's file of the split exists and opens (before the graph)."""
  readers.check_files_open(paths.dataset_files(SOURCE, f"*/{split}.json"),
                           readers.LINES)


def distinct_prompts(split: str) -> Iterator[dict]:
  """One prompt per post (SHP has several comment pairs per post)."""
  seen = set()
  for pair in pairs(split):
    if pair["post_id"] not in seen:
      seen.add(pair["post_id"])
      yield {"prompt": pair["prompt"]}


def register(vocabulary: Optional[object] = None) -> None:
  vocabulary = vocabulary or vocabularies.ConfiguredVocabulary()
  common.register_task("shp_preference", kind=common.PREFERENCE, splits=SPLITS,
                       vocabulary=vocabulary, records_fn=pairs,
                       preflight=check_files)
  common.register_task(
      "shp_sft", kind=common.SFT, splits=SPLITS, vocabulary=vocabulary,
      records_fn=lambda split: ({"inputs": p["prompt"], "targets": p["chosen"]}
                                for p in pairs(split)),
      preflight=check_files)
  common.register_task("shp_prompts", kind=common.PROMPTS, splits=SPLITS,
                       vocabulary=vocabulary, records_fn=distinct_prompts,
                       preflight=check_files)
