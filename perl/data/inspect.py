"""Print counts, leakage between splits and a few decoded examples of a task
or mixture.

    python -m perl.data.inspect --task=synthetic_preference --split=validation \\
        --num_examples=3 [--feature_lengths=prompt:48,response:32] [--no_leakage]

Counts: examples after conversion, and the data report (skipped rows, empty
responses, identical pairs, duplicate rows, prompt mismatches, truncations).
Leakage, per pair of splits (train vs validation, train vs test, validation
vs test): how many distinct held-out prompts, and prompt+response pairs, also
occur in the other split exactly or as a prefix of one of its prompts (a
dialog context that continues in train), and how many held-out prompts
extend one of its prompts. Beside them, a turn-level measure: the share of
distinct held-out dialog turns (lines of the prompts and responses, such as
"user: one latte") that are also turns in the other split; a shared opening
line makes every prompt share a prefix, while turns show what else recurs.
Computed on the text, before tokenization.
"""
from __future__ import annotations

import argparse
import bisect
import itertools
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from perl.data import pipeline, registry, report

DEFAULT_LENGTHS = {
    "preference": {"prompt": 512, "response": 256},
    "pointwise": {"prompt": 512, "response": 256},
    "prompts": {"prompt": 512},
    "sft": {"inputs": 512, "targets": 256},
}


def parse_lengths(text: Optional[str], kind: str, task: str) -> Dict[str, int]:
  if text:
    return {k: int(v) for k, v in (p.split(":") for p in text.split(","))}
  return dict(registry.SUGGESTED_LENGTHS.get(task, DEFAULT_LENGTHS[kind]))


def describe(example: Dict[str, np.ndarray], kind: str, vocab) -> List[str]:
  """Readable lines for one converted (unbatched) example."""
  decode = lambda ids: repr(vocab.decode([int(i) for i in ids]))  # noqa: E731
  if kind == "prompts":
    return [f"prompt: {decode(example['prompt_tokens'][example['prompt_mask'] == 1])}"]
  if kind == "sft":
    lines = []
    segments = example["decoder_segment_ids"]
    for segment in sorted(set(segments.tolist()) - {0}):
      here = segments == segment
      weights = example["decoder_loss_weights"] == 1
      tokens = example["decoder_target_tokens"]
      lines.append(f"inputs:  {decode(tokens[here & ~weights])}")
      lines.append(f"targets: {decode(tokens[here & weights])}")
    return lines
  sides = ("chosen", "rejected") if kind == "preference" else ("",)
  lines = []
  for side in sides:
    prefix = f"{side}_" if side else ""
    tokens = example[f"{prefix}tokens"]
    real = example[f"{prefix}segment_ids"] == 1
    response = example[f"{prefix}response_mask"] == 1
    if not lines:
      lines.append(f"prompt: {decode(tokens[real & ~response])}")
    lines.append(f"{side or 'response'}: {decode(tokens[response])}")
  if kind == "pointwise":
    lines.append(f"label: {float(example['label'])}")
  return lines


def split_texts(task: str, split: str) -> Tuple[List[str], List[Tuple[str, str]]]:
  """(prompts, (prompt, response) pairs) of one split, every member task."""
  prompts: List[str] = []
  pairs: List[Tuple[str, str]] = []
  for member in pipeline.member_tasks(task):
    source = pipeline.get_task(member).source
    kind = pipeline.task_kind(member)
    prompt_key = "inputs" if kind == registry.SFT else "prompt"
    response_keys = [f for f in registry.TEXT_FIELDS[kind] if f != prompt_key]
    ds = source.get_dataset(split=split, shuffle=False)
    for row in pipeline.numpy_iterator(ds):
      prompt = row[prompt_key].decode("utf-8")
      prompts.append(prompt)
      pairs.extend((prompt, row[k].decode("utf-8")) for k in response_keys)
  return prompts, pairs


def _is_prefix_of_any(text: str, ordered: Sequence[str]) -> bool:
  """True when `text` is a proper prefix of a string in sorted `ordered`."""
  i = bisect.bisect_right(ordered, text)
  return i < len(ordered) and ordered[i].startswith(text) and ordered[i] != text


def _extends_any(text: str, members: Set[str], ends: Set[str],
                 lengths: Sequence[int]) -> bool:
  """True when a string of `members` is a proper prefix of `text` (checked at
  the lengths of `members` ending in one of their final characters)."""
  return any(length < len(text) and text[length - 1] in ends
             and text[:length] in members for length in lengths)


_CUE = re.compile(r"\w+:")  # a speaker name alone: the cue for the reply


def dialog_turns(prompts: Iterable[str], pairs: Iterable[Tuple[str, str]]
                 ) -> Set[str]:
  """Distinct turns (non-blank lines, stripped) of the prompts and of the
  prompt+response texts, less bare speaker cues such as "agent:"."""
  turns: Set[str] = set()
  texts = itertools.chain(prompts, (p + r for p, r in pairs))
  for text in texts:
    turns.update(line.strip() for line in text.splitlines())
  return {t for t in turns if t and not _CUE.fullmatch(t)}


def leakage(prompts_a: Iterable[str], pairs_a: Iterable[Tuple[str, str]],
            prompts_b: Iterable[str], pairs_b: Iterable[Tuple[str, str]]
            ) -> Dict[str, int]:
  """How much of split b (held out) also occurs in split a, distinct rows
  and distinct dialog turns."""
  prompts_a, pairs_a = list(prompts_a), list(pairs_a)
  prompts_b, pairs_b = list(prompts_b), list(pairs_b)
  train_turns = dialog_turns(prompts_a, pairs_a)
  eval_turns = dialog_turns(prompts_b, pairs_b)
  train_prompts = set(prompts_a)
  ordered = sorted(train_prompts)
  train_pairs = set(pairs_a)
  ends = {p[-1] for p in train_prompts if p}
  lengths = sorted({len(p) for p in train_prompts if p})
  eval_prompts = set(prompts_b)
  eval_pairs = set(pairs_b)
  return {
      "eval_prompts": len(eval_prompts),
      "prompt_in_train": sum(p in train_prompts for p in eval_prompts),
      "prompt_prefix_of_train_prompt": sum(
          _is_prefix_of_any(p, ordered) for p in eval_prompts),
      "train_prompt_prefix_of_prompt": sum(
          _extends_any(p, train_prompts, ends, lengths) for p in eval_prompts),
      "eval_pairs": len(eval_pairs),
      "pair_in_train": sum(p in train_pairs for p in eval_pairs),
      "pair_prefix_of_train_prompt": sum(
          _is_prefix_of_any(p + r, ordered) for p, r in eval_pairs),
      "eval_turns": len(eval_turns),
      "turn_in_train": len(eval_turns & train_turns),
  }


def leakage_report(task: str) -> Dict[Tuple[str, str], Mapping[str, int]]:
  """{(split a, held-out split b): leakage counts} for the task's splits."""
  names = [s for s in pipeline.splits(task) if s != "all"]
  texts = {split: split_texts(task, split) for split in names}
  return {(a, b): leakage(*texts[a], *texts[b])
          for a, b in itertools.combinations(names, 2)}


def inspect(*, task: str, split: str, num_examples: int = 3,
            feature_lengths: Optional[Dict[str, int]] = None,
            with_leakage: bool = True) -> str:
  kind = pipeline.task_kind(task)
  lengths = feature_lengths or parse_lengths(None, kind, task)
  vocab = pipeline.vocabulary(task)
  report.reset()
  shown: List[str] = []
  total = 0
  for batch in pipeline.get_batches(task=task, split=split,
                                    feature_lengths=lengths, batch_size=64,
                                    drop_remainder=False, shuffle=False):
    size = len(next(iter(batch.values())))
    for i in range(size):
      if total + i < num_examples:
        shown.append(f"--- example {total + i}")
        shown.extend(describe({k: v[i] for k, v in batch.items()}, kind, vocab))
    total += size
  lines = [f"task: {task}  kind: {kind}  split: {split}",
           f"feature lengths: {lengths}  vocab_size: {vocab.vocab_size}",
           f"converted {'packed rows' if kind == 'sft' else 'examples'}: {total}"]
  for scope, counts in sorted(report.all_counts().items()):
    lines.append(f"report {scope}: {counts}")
  if with_leakage:
    for (a, b), counts in leakage_report(task).items():
      lines.append(f"leakage {b} in {a}: {dict(counts)}")
      share = counts["turn_in_train"] / max(counts["eval_turns"], 1)
      lines.append(f"turn overlap {b} in {a}: {counts['turn_in_train']} of "
                   f"{counts['eval_turns']} distinct {b} turns ({share:.1%}) "
                   f"are also turns in {a}")
  return "\n".join(lines + shown)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Inspect a SeqIO task.")
  parser.add_argument("--task", required=True)
  parser.add_argument("--split", default="validation")
  parser.add_argument("--num_examples", type=int, default=3)
  parser.add_argument("--feature_lengths", default=None,
                      help="e.g. prompt:64,response:64")
  parser.add_argument("--no_leakage", action="store_true",
                      help="skip the split-overlap report (reads every split)")
  args = parser.parse_args(argv)
  kind = pipeline.task_kind(args.task)
  print(inspect(task=args.task, split=args.split,
                num_examples=args.num_examples,
                with_leakage=not args.no_leakage,
                feature_lengths=parse_lengths(args.feature_lengths, kind,
                                              args.task)))


if __name__ == "__main__":
  main()
