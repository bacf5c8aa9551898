"""Print counts and a few decoded examples of a task or mixture.

    python -m perl.data.inspect --task=synthetic_preference --split=validation \\
        --num_examples=3 [--feature_lengths=prompt:48,response:32]

Counts: examples after conversion, and the data report (skipped rows, empty
responses, identical pairs, prompt mismatches, truncations).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import numpy as np

from perl.data import pipeline, report

DEFAULT_LENGTHS = {
    "preference": {"prompt": 512, "response": 256},
    "pointwise": {"prompt": 512, "response": 256},
    "prompts": {"prompt": 512},
    "sft": {"inputs": 512, "targets": 256},
}


def parse_lengths(text: Optional[str], kind: str, task: str) -> Dict[str, int]:
  if text:
    return {k: int(v) for k, v in (p.split(":") for p in text.split(","))}
  if task.startswith("synthetic_"):
    from tasks import synthetic

    return dict(synthetic.SFT_FEATURE_LENGTHS if kind == "sft"
                else {k: v for k, v in synthetic.FEATURE_LENGTHS.items()
                      if kind != "prompts" or k == "prompt"})
  return DEFAULT_LENGTHS[kind]


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


def inspect(*, task: str, split: str, num_examples: int = 3,
            feature_lengths: Optional[Dict[str, int]] = None) -> str:
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
  return "\n".join(lines + shown)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Inspect a SeqIO task.")
  parser.add_argument("--task", required=True)
  parser.add_argument("--split", default="validation")
  parser.add_argument("--num_examples", type=int, default=3)
  parser.add_argument("--feature_lengths", default=None,
                      help="e.g. prompt:64,response:64")
  args = parser.parse_args(argv)
  kind = pipeline.task_kind(args.task)
  print(inspect(task=args.task, split=args.split,
                num_examples=args.num_examples,
                feature_lengths=parse_lengths(args.feature_lengths, kind,
                                              args.task)))


if __name__ == "__main__":
  main()
