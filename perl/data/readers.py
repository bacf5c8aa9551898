"""Readers for upstream JSON files with one policy for malformed rows.

Every error names the file and line (JSON lines) or record index (JSON arrays).
`bad_row_policy()` is gin-configurable: "fail" (default) raises, "skip" drops
the row, counts it in the data report and logs it.
"""
from __future__ import annotations

import gzip
import json
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import gin
from absl import logging

from perl.data import report

FAIL = "fail"
SKIP = "skip"


class MalformedRowError(ValueError):
  """A row could not be parsed or lacks a required field."""


@gin.configurable(module="perl.data.readers")
def bad_row_policy(policy: str = FAIL) -> str:
  """What to do with a malformed row: "fail" or "skip" (counted and logged)."""
  if policy not in (FAIL, SKIP):
    raise ValueError(f"bad_row_policy must be 'fail' or 'skip', got {policy!r}")
  return policy


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, "r", encoding="utf-8")


def handle_bad_row(where: str, problem: str, *, scope: str) -> None:
  """Raises or counts a malformed row according to `bad_row_policy()`."""
  message = f"{where}: malformed row: {problem}"
  if bad_row_policy() == FAIL:
    raise MalformedRowError(
        message + " (bind perl.data.readers.bad_row_policy.policy='skip' to "
        "skip such rows)"
    )
  report.count(scope, "skipped_malformed_rows")
  logging.warning("skipping %s", message)


def require_fields(record: Any, fields: Sequence[str]) -> Optional[str]:
  """The problem with `record` as text, or None when all fields are present."""
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  missing = [f for f in fields if f not in record]
  if missing:
    return f"missing field(s) {missing}"
  return None


def read_json_lines(
    path: str, *, required: Sequence[str] = (), scope: str
) -> Iterator[Tuple[str, dict]]:
  """Yields (where, record) for each non-blank line of a JSON-lines file."""
  with _open_text(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        handle_bad_row(where, f"invalid JSON ({e.msg})", scope=scope)
        continue
      problem = require_fields(record, required)
      if problem:
        handle_bad_row(where, problem, scope=scope)
        continue
      yield where, record


def read_json_array(
    path: str, *, required: Sequence[str] = (), scope: str
) -> Iterator[Tuple[str, dict]]:
  """Yields (where, record) for each element of a file holding a JSON array.

  A file that is not valid JSON is one malformed "row" (the whole file): the
  error names the file and the line where parsing failed.
  """
  with _open_text(path) as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      handle_bad_row(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})",
                     scope=scope)
      return
  if not isinstance(records, list):
    handle_bad_row(path, "expected a JSON array of records", scope=scope)
    return
  for index, record in enumerate(records):
    where = f"{path} record {index}"
    problem = require_fields(record, required)
    if problem:
      handle_bad_row(where, problem, scope=scope)
      continue
    yield where, record


def read_json_records(
    path: str, *, required: Sequence[str] = (), scope: str
) -> Iterator[Tuple[str, dict]]:
  """JSON array or JSON lines, decided by the first non-blank character."""
  with _open_text(path) as f:
    first = ""
    while not first:
      chunk = f.read(64)
      if not chunk:
        return
      first = chunk.lstrip()[:1]
  reader = read_json_array if first == "[" else read_json_lines
  yield from reader(path, required=required, scope=scope)


def parse_or_bad_row(
    where: str, parse: Callable[[], Any], *, scope: str
) -> Optional[Any]:
  """Runs `parse()`; on a data error applies the bad-row policy, returns None."""
  try:
    return parse()
  except (KeyError, TypeError, ValueError, IndexError) as e:
    if isinstance(e, MalformedRowError):
      raise
    handle_bad_row(where, f"{type(e).__name__}: {e}", scope=scope)
    return None
