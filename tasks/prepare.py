"""Prepare an upstream dataset once into sharded TFDS files.

    python -m tasks.prepare --task=hh_rlhf_harmless_base_preference \\
        [--data_dir=DIR] [--manual_dir=ROOT] [--file_format=array_record] \\
        [--splits=test] [--num_shards=8] [--overwrite]

Runs the task's TFDS builder (`tasks.tfds_builders`) `download_and_prepare`:
from ROOT (laid out like PERL_DATA_DIR) when --manual_dir is given, else
from the public URLs. Writes DIR/<builder>/<config>/<version>/ (DIR defaults
to `tasks.prepared.tfds_dir()`: $PERL_TFDS_DIR, $TFDS_DATA_DIR or
~/tensorflow_datasets) and prints rows and shard files per split. The task
`<task>_prepared` then reads those files. An existing preparation is kept
unless --overwrite; with it the new one is written beside the old and
replaces it only once complete.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence

from perl.data import registry
from tasks import prepared, tfds_builders

FORMATS = ("array_record", "tfrecord")
# Files per split: enough for that many hosts to read disjoint files.
DEFAULT_NUM_SHARDS = 8


def _builder(task: str, data_dir: str, file_format: Optional[str] = None,
             splits: Optional[Sequence[str]] = None):
  registry.import_modules()  # the registrations the builders read
  cls, config = tfds_builders.builder_for(prepared.base_task(task))
  kwargs = {"file_format": file_format} if file_format else {}
  return cls(config=config.name, data_dir=data_dir, splits=splits, **kwargs)


def summary(builder) -> Dict[str, dict]:
  """{split: {rows, shards, files}} of a prepared builder."""
  names = {tfds_builders.tfds_split(s): s for s in ("all",)}
  out = {}
  for tfds_split, info in sorted(builder.info.splits.items()):
    split = names.get(tfds_split, tfds_split)
    files = [os.fspath(i.filename) for i in info.file_instructions]
    out[split] = {"rows": info.num_examples, "shards": len(files),
                  "files": files, "format": builder.info.file_format.value}
  return out


def prepare(*, task: str, data_dir: Optional[str] = None,
            manual_dir: Optional[str] = None,
            file_format: str = "array_record",
            splits: Optional[Sequence[str]] = None,
            num_shards: int = DEFAULT_NUM_SHARDS,
            overwrite: bool = False) -> Dict[str, dict]:
  """Prepares `task`'s dataset; returns `summary` of what is on disk."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if file_format not in FORMATS:
    raise ValueError(f"--file_format={file_format!r}: choose one of {FORMATS}.")
  if manual_dir is not None and not (os.path.isdir(manual_dir)
                                     and os.listdir(manual_dir)):
    # (TFDS would take an empty one for "no manual_dir" and download.)
    raise FileNotFoundError(f"--manual_dir={manual_dir} is not a directory "
                            "holding the raw files (layout as PERL_DATA_DIR).")
  data_dir = os.path.abspath(os.path.expanduser(data_dir or prepared.tfds_dir()))
  existing = _builder(task, data_dir)
  if existing.data_path.exists() and not overwrite:
    print(f"{existing.data_path}: already prepared (pass --overwrite to "
          "prepare it again).")
    return summary(existing)
  os.makedirs(data_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".prepare-", dir=data_dir)
  try:
    builder = _builder(task, staging, file_format, splits)
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, num_shards=num_shards, try_download_gcs=False,
        download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
    try:
      builder.download_and_prepare(
          download_dir=os.path.join(data_dir, "downloads"),
          download_config=config)
    except AssertionError as e:
      if "number_of_shards" not in str(e):
        raise
      raise ValueError(f"{task}: a split has fewer rows than --num_shards="
                       f"{num_shards} ({e}); pass a smaller --num_shards.") from None
    target = existing.data_path
    if target.exists():
      shutil.rmtree(os.fspath(target))
    os.makedirs(os.path.dirname(os.fspath(target)), exist_ok=True)
    os.replace(os.fspath(builder.data_path), os.fspath(target))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  _forget_memoized(data_dir)
  return summary(_builder(task, data_dir))


def _forget_memoized(data_dir: str) -> None:
  """seqio memoizes TFDS builders by (name, dir): drop this dir's, whose
  info predates the files just written (and the open ArrayRecord readers)."""
  import seqio  # pylint: disable=g-import-not-at-top
  prepared.forget_readers()
  memo = seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS  # pylint: disable=protected-access
  for key in [k for k in memo if k[1] == data_dir]:
    del memo[key]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", required=True,
                      help="e.g. hh_rlhf_harmless_base_preference (or its "
                      "_prepared name)")
  parser.add_argument("--data_dir", default=None,
                      help="where to write (default: tasks.prepared.tfds_dir())")
  parser.add_argument("--manual_dir", default=None,
                      help="local copies, laid out like PERL_DATA_DIR")
  parser.add_argument("--file_format", default="array_record", choices=FORMATS)
  parser.add_argument("--splits", default=None,
                      help="comma-separated (default: every split of the task)")
  parser.add_argument("--num_shards", type=int, default=DEFAULT_NUM_SHARDS)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  result = prepare(task=args.task, data_dir=args.data_dir,
                   manual_dir=args.manual_dir, file_format=args.file_format,
                   splits=args.splits.split(",") if args.splits else None,
                   num_shards=args.num_shards, overwrite=args.overwrite)
  for split, info in result.items():
    folder = os.path.dirname(info["files"][0]) if info["files"] else "-"
    print(f"{split}: {info['rows']} rows in {info['shards']} {info['format']} "
          f"shards under {folder}")
  from perl.data import report  # pylint: disable=g-import-not-at-top
  for scope, counts in sorted(report.all_counts().items()):
    print(f"report {scope}: {counts}")


if __name__ == "__main__":
  main()
