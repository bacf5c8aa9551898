"""Reddit TL;DR (openai/summarize-from-feedback), under
{data_dir}/summarize-from-feedback/ as published in the public blob
(https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset):

  tldr_3_filtered/{train,valid,test}.jsonl  {id, subreddit, title, post, summary}
  comparisons/batch*.json  JSON lines: {info{id, post, title, subreddit},
      summaries[{text, policy, note}], choice, worker, batch, split
      (train|valid1|valid2), extra{confidence}}

Splits: filtered posts train/valid/test -> train/validation/test; comparisons
train/valid1/valid2 -> train/validation/test. Prompts use the format of
Stiennon et al. (2020): "SUBREDDIT: r/..\\nTITLE: ..\\nPOST: ..\\nTL;DR:".
"""
from __future__ import annotations

from typing import Iterator, Optional

from perl.data import paths, readers, vocabularies
from tasks import common

SOURCE = paths.DataSourceInfo(
    name="Reddit TL;DR (summarize-from-feedback)",
    folder="summarize-from-feedback",
    origin=("https://openaipublic.blob.core.windows.net/summarize-from-feedback"
            "/dataset (see github.com/openai/summarize-from-feedback)"))
SPLITS = ("train", "validation", "test")
FILTERED_FILES = {"train": "train", "validation": "valid", "test": "test"}
COMPARISON_SPLITS = {"train": "train", "validation": "valid1", "test": "valid2"}


def format_prompt(*, post: str, title: Optional[str] = None,
                  subreddit: Optional[str] = None) -> str:
  lines = []
  if subreddit:
    lines.append(f"SUBREDDIT: r/{subreddit}")
  if title:
    lines.append(f"TITLE: {title}")
  lines.append(f"POST: {post.strip()}")
  return "\n".join(lines) + "\nTL;DR:"


def format_summary(text: str) -> str:
  return " " + text.strip()


def filtered_posts(split: str) -> Iterator[dict]:
  scope = f"tldr/filtered/{split}"
  path = paths.dataset_file(
      SOURCE, f"tldr_3_filtered/{FILTERED_FILES[split]}.jsonl")
  yield from (
      {"prompt": format_prompt(post=r["post"], title=r.get("title"),
                               subreddit=r.get("subreddit")),
       "summary": format_summary(r["summary"])}
      for _, r in readers.read_json_lines(
          path, required=("post", "summary"), scope=scope))


def _comparison(record: dict) -> dict:
  info = record["info"]
  # CNN/DM comparison batches carry "article" instead of "post".
  post = info.get("post") or info["article"]
  texts = [s["text"] for s in record["summaries"]]
  choice = int(record["choice"])
  if len(texts) != 2 or choice not in (0, 1):
    raise ValueError(f"expected 2 summaries and choice 0|1, got {len(texts)} "
                     f"summaries and choice {choice}")
  return {"prompt": format_prompt(post=post, title=info.get("title"),
                                  subreddit=info.get("subreddit")),
          "chosen": format_summary(texts[choice]),
          "rejected": format_summary(texts[1 - choice])}


def comparisons(split: str) -> Iterator[dict]:
  scope = f"tldr/comparisons/{split}"
  wanted = COMPARISON_SPLITS[split]
  for path in paths.dataset_files(SOURCE, "comparisons/batch*.json"):
    for where, record in readers.read_json_lines(
        path, required=("info", "summaries", "choice", "split"), scope=scope):
      if record["split"] != wanted:
        continue
      example = readers.parse_or_bad_row(where, lambda: _comparison(record),
                                         scope=scope)
      if example is not None:
        yield example


def register(vocabulary: Optional[object] = None) -> None:
  vocabulary = vocabulary or vocabularies.ConfiguredVocabulary()
  common.register_task(
      "tldr_sft", kind=common.SFT, splits=SPLITS, vocabulary=vocabulary,
      records_fn=lambda split: ({"inputs": p["prompt"], "targets": p["summary"]}
                                for p in filtered_posts(split)))
  common.register_task(
      "tldr_prompts", kind=common.PROMPTS, splits=SPLITS, vocabulary=vocabulary,
      records_fn=lambda split: ({"prompt": p["prompt"]}
                                for p in filtered_posts(split)))
  common.register_task(
      "tldr_preference", kind=common.PREFERENCE, splits=SPLITS,
      vocabulary=vocabulary, records_fn=comparisons)
