"""Counters for data problems: skipped rows, empty responses, identical pairs,
prompt mismatches, truncation. Readers and the pipeline add to one process-wide
report per (task, split) so that `perl.data.inspect` and trainers can show it.
"""
from __future__ import annotations

import collections
import threading
from typing import Dict, Mapping

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


def log_scope(scope: str) -> None:
  scope_counts = counts(scope)
  if scope_counts:
    logging.info("data report %s: %s", scope, scope_counts)
