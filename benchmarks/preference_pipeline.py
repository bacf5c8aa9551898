"""Throughput of the preference input pipeline (examples/s), on the host CPU.

    python benchmarks/preference_pipeline.py [--batch_size=64] [--epochs=1]

Measures tasks -> tokenize -> PreferenceFeatureConverter -> numpy batches for
the synthetic preference task (20k train examples, generated in Python) and,
when PERL_DATA_DIR is set, Anthropic HH harmless-base test (2,312 pairs).
The first batch (graph building, file opening) is timed separately.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perl.data import pipeline  # noqa: E402


def measure(task: str, split: str, feature_lengths, batch_size: int):
  start = time.perf_counter()
  batches = pipeline.get_batches(task=task, split=split,
                                 feature_lengths=feature_lengths,
                                 batch_size=batch_size, shuffle=False,
                                 drop_remainder=False)
  first = next(batches)
  first_s = time.perf_counter() - start
  examples = len(first["chosen_tokens"])
  steady_start = time.perf_counter()
  steady = 0
  for batch in batches:
    steady += len(batch["chosen_tokens"])
  steady_s = time.perf_counter() - steady_start
  return examples + steady, first_s, steady / max(steady_s, 1e-9)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args()
  runs = [("synthetic_preference", "train", {"prompt": 48, "response": 32})]
  if os.environ.get("PERL_DATA_DIR"):
    runs.append(("hh_rlhf_harmless_base_preference", "test",
                 {"prompt": 512, "response": 256}))
  else:
    print("PERL_DATA_DIR unset: skipping Anthropic HH")
  print(f"{'task':40s} {'split':8s} {'lengths':28s} {'examples':>9s} "
        f"{'first batch s':>13s} {'examples/s':>11s}")
  for task, split, lengths in runs:
    n, first_s, rate = measure(task, split, lengths, args.batch_size)
    lengths_text = ",".join(f"{k}:{v}" for k, v in lengths.items())
    print(f"{task:40s} {split:8s} {lengths_text:28s} {n:9d} {first_s:13.2f} "
          f"{rate:11.0f}")


if __name__ == "__main__":
  main()
