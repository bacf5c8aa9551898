"""File-system helpers shared by tests that check nothing was written."""
import hashlib
import os


def snapshot(path):
  """{relative path: sha256} of every file under path ({} if absent)."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out
