"""Counters for data problems: skipped rows, empty responses, identical pairs,
conflicting labels, prompt mismatches, truncation. Readers and the pipeline add to one process-wide
report per (task, split) so that `perl.data.inspect` and trainers can show it.
"""
from __future__ import annotations

import collections
import threading
from typing import Dict, Iterable, Iterator, Mapping

from absl import logging

_LOCK = threading.Lock()
_COUNTS: Dict[str, collections.Counter] = collections.defaultdict(
    collections.Counter
)


def count(scope: str, issue: str, n: int = 1) -> None:
  """Adds `n` to the counter `issue` of `scope` (e.g. "hh_rlhf_harmless/test")."""
  with _LOCK:
    _COUNTS[scope][issue] += n


def counts(scope: str) -> Mapping[str, int]:
  with _LOCK:
    return dict(_COUNTS.get(scope, {}))


def all_counts() -> Mapping[str, Mapping[str, int]]:
  with _LOCK:
    return {k: dict(v) for k, v in _COUNTS.items() if v}


def reset() -> None:
  with _LOCK:
    _COUNTS.clear()


def counting_label_conflicts(scope: str, examples: Iterable[dict]
                             ) -> Iterator[dict]:
  """Yields pointwise `examples` unchanged; once they are all read, counts as
  "conflicting_labels" the (prompt, response) pairs seen with more than one
  label (noise a reward model cannot fit)."""
  labels: Dict[tuple, set] = collections.defaultdict(set)
  for example in examples:
    labels[(example["prompt"], example["response"])].add(example["label"])
    yield example
  conflicts = sum(len(seen) > 1 for seen in labels.values())
  if conflicts:
    count(scope, "conflicting_labels", conflicts)


def log_scope(scope: str) -> None:
  scope_counts = counts(scope)
  if scope_counts:
    logging.info("data report %s: %s", scope, scope_counts)
