"""Where the upstream data lives, resolved lazily at read time.

`data_dir()` is gin-configurable (`perl.data.paths.data_dir.root = "..."`) and
defaults to the `PERL_DATA_DIR` environment variable. Nothing here runs at
import time, so registering tasks never touches the file system.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import threading
from typing import Iterator, Optional, Sequence

import gin

DATA_DIR_ENV = "PERL_DATA_DIR"


class MissingDataError(FileNotFoundError):
  """An expected upstream file is absent; the message says where to get it."""


@dataclasses.dataclass(frozen=True)
class DataSourceInfo:
  # Human-readable dataset name, e.g. "Anthropic HH".
  name: str
  # Folder under data_dir() that mirrors the upstream layout, e.g. "hh-rlhf".
  folder: str
  # Where the files come from: a URL or an LDC catalog id.
  origin: str


# Roots set by `using_data_dir` in this thread (a TFDS builder reading its
# manual_dir or its downloads through the tasks' own readers); they win over
# gin and the env.
_OVERRIDE = threading.local()


@contextlib.contextmanager
def using_data_dir(root: str) -> Iterator[str]:
  """Within the block (and this thread), `data_dir()` is `root`."""
  stack = _OVERRIDE.__dict__.setdefault("roots", [])
  stack.append(os.path.abspath(os.path.expanduser(root)))
  try:
    yield stack[-1]
  finally:
    stack.pop()


@gin.configurable(module="perl.data.paths")
def data_dir(root: Optional[str] = None) -> str:
  """The root folder holding one sub-folder per upstream dataset."""
  roots = getattr(_OVERRIDE, "roots", None)
  if roots:
    return roots[-1]
  root = root or os.environ.get(DATA_DIR_ENV)
  if not root:
    raise MissingDataError(
        f"No data directory: set the {DATA_DIR_ENV} environment variable or "
        "bind `perl.data.paths.data_dir.root` in gin (e.g. "
        f"{DATA_DIR_ENV}=../shared/data)."
    )
  return os.path.abspath(os.path.expanduser(root))


def _missing(expected: str, source: DataSourceInfo) -> MissingDataError:
  return MissingDataError(
      f"{source.name}: expected {expected} but it does not exist. Get the "
      f"upstream files from {source.origin} and place them under "
      f"{os.path.join(data_dir(), source.folder)} (layout as published)."
  )


def dataset_file(source: DataSourceInfo, relative: str) -> str:
  """Absolute path of one upstream file; one clear error when it is absent."""
  path = os.path.join(data_dir(), source.folder, relative)
  if not os.path.exists(path):
    raise _missing(path, source)
  return path


def dataset_files(source: DataSourceInfo, pattern: str) -> Sequence[str]:
  """Sorted files matching a glob under the dataset folder; error if none."""
  full_pattern = os.path.join(data_dir(), source.folder, pattern)
  files = sorted(glob.glob(full_pattern))
  if not files:
    raise _missing(full_pattern, source)
  return files
