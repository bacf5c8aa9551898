"""Readers for upstream JSON files with one policy for malformed rows.

Every error names the file and line (JSON lines) or record index (JSON arrays).
`bad_row_policy()` is gin-configurable: "fail" (default) raises, "skip" drops
the row, counts it in the data report and logs it.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from typing import (Any, Callable, Iterator, Mapping, Optional, Sequence,
                    Tuple, Union)

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


class DataFileError(ValueError):
  """A whole file is unreadable (truncated, an LFS pointer, wrong format).

  Raised whatever `bad_row_policy()` says: skipping would silently read zero
  rows from the file.
  """


ARRAY = "array"
LINES = "lines"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_CHUNK = 1 << 20
# (path, size, mtime) of files that passed `check_file`: checked once a process.
_CHECKED: set = set()


def _read_bytes(path: str) -> bytes:
  """The file's bytes (gunzipped for .gz); a truncated gzip names the file."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataFileError(
        f"{path}: not a complete gzip file ({e}); the download was probably "
        "cut short: fetch the file again.") from None


def _check_lfs(path: str, head: bytes) -> None:
  if head.startswith(_LFS_POINTER):
    raise DataFileError(
        f"{path}: a Git LFS pointer, not the data: run `git lfs pull` in the "
        "clone it came from (or download the file itself).")


def _scan(path: str) -> Tuple[bytes, bytes, bytes]:
  """(first 256 bytes, first and last non-blank bytes) of the file's data.

  Reads to the end: a gzip's truncation, and a JSON array's missing "]",
  only show at the end.
  """
  head, first, last = b"", b"", b""
  try:
    with (gzip.open(path, "rb") if path.endswith(".gz")
          else open(path, "rb")) as f:
      while chunk := f.read(_CHUNK):
        head = head or chunk[:256]
        data = chunk.strip()
        if data:
          first = first or data[:1]
          last = data[-1:]
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataFileError(
        f"{path}: not a complete gzip file ({e}); the download was "
        "probably cut short: fetch the file again.") from None
  return head, first, last


def _truncated_array(path: str, detail: str) -> DataFileError:
  """A JSON array cut short: the records after the cut are unknown, so this
  fails in "skip" mode too rather than count one row for a lost tail."""
  return DataFileError(
      f"{path}: the JSON array is cut short ({detail}); the download was "
      "probably interrupted: fetch the file again.")


def check_file(path: str, expected: Optional[str] = None) -> None:
  """Raises DataFileError unless `path` is complete data in format `expected`
  ("array": one JSON array; "lines": JSON lines; None: either).

  Called before the input graph is built, so a bad file is one clear error
  rather than a failure deep inside tf.data.
  """
  try:
    stat = os.stat(path)
  except OSError as e:
    raise DataFileError(f"{path}: cannot be opened ({e.strerror}).") from None
  key = (path, stat.st_size, stat.st_mtime_ns, expected)
  if key in _CHECKED:
    return
  with open(path, "rb") as f:
    head = f.read(256)
  _check_lfs(path, head)
  if path.endswith(".gz") and head and not head.startswith(b"\x1f\x8b"):
    raise DataFileError(f"{path}: named .gz but is not gzip data.")
  head, first, last = _scan(path)
  if path.endswith(".gz"):
    _check_lfs(path, head)
  if not first:
    what = {ARRAY: "one JSON array", LINES: "JSON lines"}.get(
        expected, "JSON records")
    raise DataFileError(
        f"{path}: is empty; expected {what}. The download was probably cut "
        "short or never finished: fetch the file again (or remove it if it "
        "does not belong to the data set).")
  if expected == ARRAY and first != b"[":
    found = "JSON lines or one object" if first == b"{" else repr(first)
    raise DataFileError(
        f"{path}: expected one JSON array of records but the file starts "
        f"with {found}: is this the right file?")
  if expected == ARRAY and last != b"]":
    raise _truncated_array(path, f"ends with {last!r}, not the closing ']'")
  if expected == LINES and first == b"[":
    raise DataFileError(
        f"{path}: expected JSON lines (one object per line) but the file "
        "holds a JSON array: is this the right file?")
  _CHECKED.add(key)


def check_files_open(paths: Sequence[str], expected: Optional[str] = None
                     ) -> None:
  for path in paths:
    check_file(path, expected)


def read_text_lines(path: str) -> Iterator[str]:
  """Lines of a small text file; non-UTF-8 bytes name the file and line."""
  for line_number, raw in enumerate(_read_bytes(path).splitlines(True), 1):
    try:
      yield raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise MalformedRowError(
          f"{path}:{line_number}: malformed row: not UTF-8 ({e.reason} at "
          f"byte {e.start} of the line)") from None


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


# Required fields: names, or {name: type or tuple of types}.
Fields = Union[Sequence[str], Mapping[str, Any]]
_JSON_TYPES = {str: "a string", int: "an integer", float: "a number",
               list: "a list", dict: "an object", bool: "true/false"}


def _type_name(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  return " or ".join(_JSON_TYPES.get(t, t.__name__) for t in types)


def require_fields(record: Any, fields: Fields) -> Optional[str]:
  """The problem with `record` as text, or None when every field is present,
  not null and (when `fields` maps names to types) of its type."""
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  missing = [f for f in fields if f not in record]
  if missing:
    return f"missing field(s) {missing}"
  nulls = [f for f in fields if record[f] is None]
  if nulls:
    return f"field(s) {nulls} are null"
  if isinstance(fields, Mapping):
    for name, types in fields.items():
      value = record[name]
      wrong = not isinstance(value, types) or (
          isinstance(value, bool) and bool not in (
              types if isinstance(types, tuple) else (types,)))
      if wrong:
        return (f"field {name!r} should be {_type_name(types)}, got "
                f"{type(value).__name__} {str(value)[:40]!r}")
  return None


def read_json_lines(
    path: str, *, required: Fields = (), scope: str
) -> Iterator[Tuple[str, dict]]:
  """Yields (where, record) for each non-blank line of a JSON-lines file."""
  check_file(path, LINES)
  for line_number, raw in enumerate(_read_bytes(path).splitlines(), start=1):
    if not raw.strip():
      continue
    where = f"{path}:{line_number}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      handle_bad_row(where, f"not UTF-8 ({e.reason} at byte {e.start})",
                     scope=scope)
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      handle_bad_row(where, f"invalid JSON ({e.msg} at column {e.colno})",
                     scope=scope)
      continue
    problem = require_fields(record, required)
    if problem:
      handle_bad_row(where, problem, scope=scope)
      continue
    yield where, record


_SURROGATE = re.compile("[\udc80-\udcff]")
_WHITESPACE = re.compile(r"\s*")


def _next_record(text: str, pos: int, indent: str) -> Optional[int]:
  """Where the record after a malformed one starts: the next "," then a "{"
  at the first record's indentation (upstream files are pretty-printed)."""
  pattern = r",\s*\n" + re.escape(indent) + r"\{" if indent else r",\s*\{"
  match = re.compile(pattern).search(text, pos)
  return match.end() - 1 if match else None


def read_json_array(
    path: str, *, required: Fields = (), scope: str
) -> Iterator[Tuple[str, dict]]:
  """Yields (where, record) for each element of a file holding a JSON array.

  Records are parsed one at a time, so a malformed record (invalid JSON,
  non-UTF-8 bytes, a missing, null or mistyped field) is one bad row named
  "{path} record {i} (line {n})": skipping it keeps the rest of the file.
  A file cut short (the text ends inside a record or before the closing "]")
  is a DataFileError in either mode: what followed the cut is unknown.
  """
  check_file(path, ARRAY)
  text = _read_bytes(path).decode("utf-8", errors="surrogateescape")
  decoder = json.JSONDecoder()
  pos = _WHITESPACE.match(text, 0).end()
  if text[pos:pos + 1] != "[":
    raise DataFileError(f"{path}: expected one JSON array of records.")
  pos = _WHITESPACE.match(text, pos + 1).end()
  indent = text[text.rfind("\n", 0, pos) + 1:pos]
  indent = indent if not indent.strip() else ""
  index = 0
  end_of_data = len(text.rstrip())
  while pos < len(text) and text[pos] != "]":
    line = text.count("\n", 0, pos) + 1
    where = f"{path} record {index} (line {line})"
    index += 1
    try:
      record, end = decoder.raw_decode(text, pos)
      after = _WHITESPACE.match(text, end).end()
      if text[after:after + 1] not in (",", "]"):
        raise json.JSONDecodeError("expected ',' or ']' after a record",
                                   text, after)
    except json.JSONDecodeError as e:
      if e.pos >= end_of_data:  # the text stops inside this record
        raise _truncated_array(path, f"{where} is incomplete") from None
      handle_bad_row(where, f"invalid JSON ({e.msg}, line {e.lineno} column "
                     f"{e.colno})", scope=scope)
      resume = _next_record(text, max(e.pos, pos), indent)
      if resume is None:
        return
      pos = resume
      continue
    bad_bytes = _SURROGATE.search(text, pos, end)
    pos = after + 1 if text[after] == "," else after
    pos = _WHITESPACE.match(text, pos).end()
    if bad_bytes:
      handle_bad_row(where, "not UTF-8 (byte 0x"
                     f"{ord(bad_bytes.group()) - 0xdc00:02x})", scope=scope)
      continue
    problem = require_fields(record, required)
    if problem:
      handle_bad_row(where, problem, scope=scope)
      continue
    yield where, record
  if pos >= len(text):
    raise _truncated_array(path, f"no closing ']' after {index} records")


def read_json_records(
    path: str, *, required: Fields = (), scope: str
) -> Iterator[Tuple[str, dict]]:
  """JSON array or JSON lines, decided by the first non-blank character."""
  check_file(path)
  first = _read_bytes(path).lstrip()[:1]
  reader = read_json_array if first == b"[" else read_json_lines
  yield from reader(path, required=required, scope=scope)


def parse_or_bad_row(
    where: str, parse: Callable[[], Any], *, scope: str
) -> Optional[Any]:
  """Runs `parse()`; on a data error applies the bad-row policy, returns None."""
  try:
    return parse()
  except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
    if isinstance(e, MalformedRowError):
      raise
    handle_bad_row(where, f"{type(e).__name__}: {e}", scope=scope)
    return None
