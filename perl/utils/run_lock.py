"""One writer per MODEL_DIR: an exclusive lock file naming its holder.

    with run_lock.hold(model_dir):
      ...  # train, save, log

MODEL_DIR/.lock holds {"pid", "host", "started"} of the run that owns the
directory; it is created with O_EXCL, so of two runs started together exactly
one gets it. A lock whose holder ran on this host and is no longer alive is
stale (a kill -9, a crash) and is taken over with a warning. Only process 0
of a multi-host run takes the lock (the others write nothing of their own).
The same process may take it again (a trainer inside perl.main.run). A
MODEL_DIR that the lock itself created and nothing else was written to is
removed again on release, so a run that fails its checks leaves no skeleton.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Iterator

from absl import logging

from perl.run_dir import RunDir


class ModelDirLockedError(RuntimeError):
  """Another live run holds MODEL_DIR."""


_held: dict[str, int] = {}  # lock path -> reentrancy depth in this process


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def check_free(model_dir: str) -> None:
  """Raises ModelDirLockedError if a live run holds MODEL_DIR (writes
  nothing; for failing fast before a run's slow start-up)."""
  path = RunDir(os.path.abspath(model_dir)).lock
  if path in _held or not os.path.exists(path):
    return
  holder = _read(path)
  pid, host = holder.get("pid"), holder.get("host")
  if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
    return  # stale: acquire() takes it over
  raise _locked(os.path.abspath(model_dir), path, holder)


def _locked(model_dir: str, path: str, holder: dict) -> ModelDirLockedError:
  return ModelDirLockedError(
      f"MODEL_DIR {model_dir} is in use by pid {holder.get('pid')} on host"
      f" {holder.get('host')} (since {holder.get('started', '?')}): wait for"
      " that run to end, stop it, or use another MODEL_DIR. If it is dead,"
      f" delete {path}.")


def acquire(model_dir: str) -> bool:
  """Takes MODEL_DIR's lock; True if it created MODEL_DIR to do so."""
  model_dir = os.path.abspath(model_dir)
  path = RunDir(model_dir).lock
  if path in _held:
    _held[path] += 1
    return False
  created = not os.path.isdir(model_dir)
  os.makedirs(model_dir, exist_ok=True)
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read(path)
      pid, host = holder.get("pid"), holder.get("host")
      if host == me["host"] and isinstance(pid, int) and not _alive(pid):
        logging.warning("Removing the stale lock %s of dead process %s.",
                        path, pid)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      raise _locked(model_dir, path, holder) from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    _held[path] = 1
    return created
  raise ModelDirLockedError(f"Could not take the lock {path}; retry.")


def release(model_dir: str, *, created: bool = False) -> None:
  model_dir = os.path.abspath(model_dir)
  path = RunDir(model_dir).lock
  depth = _held.get(path, 0)
  if depth > 1:
    _held[path] = depth - 1
    return
  _held.pop(path, None)
  if depth and _read(path).get("pid") == os.getpid():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  if created:
    with contextlib.suppress(OSError):
      os.rmdir(model_dir)  # only if still empty


@contextlib.contextmanager
def hold(model_dir: str, *, enabled: bool = True) -> Iterator[None]:
  """Holds MODEL_DIR's lock for the block (no-op when not enabled)."""
  if not enabled or "://" in model_dir:  # remote dirs: no atomic create
    yield
    return
  created = acquire(model_dir)
  try:
    yield
  finally:
    release(model_dir, created=created)
