"""TFDS builders that prepare the upstream datasets once into sharded files.

One builder per upstream dataset, one config per SeqIO task that reads it:
  perl_hh_rlhf/<subset>_<kind>   e.g. perl_hh_rlhf/harmless_base_preference
  perl_taskmaster/<task>         e.g. perl_taskmaster/taskmaster4_pointwise
  perl_tldr/<kind>, perl_shp/<kind>, perl_bolt/<kind>

The examples are the task's own records (`tasks.common.RECORDS[task]`: the
same readers, split logic, duplicate removal and read errors naming file and
line as the in-memory task), written as plain text features (the kind's
`TEXT_FIELDS`, plus `label` for pointwise): tokenization stays in the SeqIO
task, so one preparation serves every tokenizer. The quality checks
(identical pairs, empty responses) stay at read time, under gin's
`QualityPolicy`. TFDS shuffles the rows at write time (by a hash of the row
index), so every shard is a sample of the whole split, which is what a host
reading its own shards needs.

Where the raw files come from, per `_split_generators`:
  - `manual_dir` (a folder laid out like PERL_DATA_DIR: hh-rlhf/, taskmaster/,
    summarize-from-feedback/, SHP/, bolt-sms-chat/): a missing file is one
    error naming the file and the URL to get it. BOLT (licensed) reads only
    from there.
  - otherwise `dl_manager.download` of the public URLs below (Taskmaster's
    file lists come from the GitHub contents API), placed under the download
    folder in the same layout, and read by the same readers.
"""
from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from perl.data import paths
from tasks import bolt, common, hh_rlhf, shp, taskmaster, tldr

VERSION = tfds.core.Version("1.0.0")
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
TASKMASTER_API = ("https://api.github.com/repos/google-research-datasets/"
                  "Taskmaster/contents")
TASKMASTER_WEB = "https://github.com/google-research-datasets/Taskmaster/tree/master"
TLDR_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
# The TL;DR comparison batches (batch21 was never published) and the CNN/DM
# batch the upstream folder also holds.
TLDR_BATCHES = tuple(f"batch{i}" for i in range(3, 21)) + ("batch22",
                                                          "batch0_cnndm")
SHP_URL = "https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main"
SHP_DOMAINS = (
    "askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary",
    "askdocs", "askengineers", "askhistorians", "askhr", "askphilosophy",
    "askphysics", "askscience", "asksciencefiction", "asksocialscience",
    "askvet", "changemyview", "explainlikeimfive", "legaladvice")


# TFDS reserves "all" (every split): Taskmaster's "all" (every row as
# published) is written as this split.
_TFDS_SPLITS = {"all": "as_published"}


def tfds_split(split: str) -> str:
  """The TFDS split name that holds a task's `split`."""
  return _TFDS_SPLITS.get(split, split)


@dataclasses.dataclass(frozen=True)
class Needed:
  """Raw files one split reads, relative to the data root (a glob)."""
  # e.g. "hh-rlhf/harmless-base/test.jsonl.gz" or "taskmaster/TM-4-2024/reward/*.json".
  pattern: str
  # {relative path: URL} to download (empty: see `listing` / manual only).
  urls: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # A GitHub contents-API URL listing the files of the pattern's folder.
  listing: Optional[str] = None
  # Where a person gets the files (named in the missing-file error).
  origin: str = ""


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
  # The SeqIO task whose records this config holds.
  task: str = ""


class MissingRawFileError(paths.MissingDataError):
  """A raw file `download_and_prepare` needs is not in the manual_dir."""


def _features(kind: str) -> tfds.features.FeaturesDict:
  features = {name: tfds.features.Text() for name in common.TEXT_FIELDS[kind]}
  if kind == common.POINTWISE:
    features["label"] = tfds.features.Scalar(dtype=np.float32)
  return tfds.features.FeaturesDict(features)


def _manual_dir(dl_manager) -> Optional[str]:
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError:  # not given, absent or empty: download instead
    return None


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the records of `builder_config.task`, split by split."""

  VERSION = VERSION
  RELEASE_NOTES = {"1.0.0": "The records of the perl SeqIO task, as text."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass --manual_dir=ROOT where ROOT is laid out like PERL_DATA_DIR (see "
      "the README's Data section), e.g. ROOT/hh-rlhf/harmless-base/test.jsonl.gz.")
  # Dataset name and homepage, for the info.
  SOURCE: paths.DataSourceInfo

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this through `importlib_resources`, which it does not
    # install; the module file is all it needs (for a checksums.tsv beside it).
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, splits: Optional[Sequence[str]] = None, **kwargs):
    # The splits to write (default: all the task's); reading ignores it.
    self._wanted_splits = tuple(splits) if splits else None
    super().__init__(**kwargs)

  @property
  def task(self) -> str:
    return self.builder_config.task

  @property
  def records(self) -> common.TaskRecords:
    if self.task not in common.RECORDS:
      import tasks  # noqa: F401  pylint: disable=g-import-not-at-top
    return common.RECORDS[self.task]

  def _info(self) -> tfds.core.DatasetInfo:
    kind = _kind_of(self.task)
    return self.dataset_info_from_configs(
        description=(f"The records of the perl task {self.task!r} "
                     f"({self.SOURCE.name}), as plain text."),
        features=_features(kind),
        homepage=re.search(r"https?://[^\s,)]+", self.SOURCE.origin).group(),
    )

  def splits_to_write(self) -> Tuple[str, ...]:
    splits = self.records.splits
    wanted = self._wanted_splits or splits
    unknown = [s for s in wanted if s not in splits]
    if unknown:
      raise ValueError(f"{self.task} has no split(s) {unknown}; its splits are "
                       f"{list(splits)}.")
    return tuple(wanted)

  def needed(self, split: str) -> List[Needed]:  # per dataset
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    splits = self.splits_to_write()
    manual = _manual_dir(dl_manager)
    if manual is not None:
      root = manual
      for split in splits:
        self._check_manual(root, split)
    else:
      root = self._download(dl_manager, splits)
    return {tfds_split(split): self._generate_examples(root=root, split=split)
            for split in splits}

  def _check_manual(self, root: str, split: str) -> None:
    for need in self.needed(split):
      if not glob.glob(os.path.join(root, need.pattern)):
        urls = sorted(need.urls.values())
        where = ", ".join(urls[:3]) + (", ..." if len(urls) > 3 else "")
        downloadable = bool(urls or need.listing)
        raise MissingRawFileError(
            f"{self.name}/{self.builder_config.name}: the manual_dir has no "
            f"{os.path.join(root, need.pattern)} (split {split!r}). Get it "
            f"from {where or need.origin} and put it there"
            + (", or leave out --manual_dir to download it." if downloadable
               else "."))

  def _download(self, dl_manager, splits: Sequence[str]) -> str:
    urls: Dict[str, str] = {}
    for split in splits:
      for need in self.needed(split):
        found = dict(need.urls)
        if need.listing:
          found.update(_listed(dl_manager, need))
        if not found:
          raise MissingRawFileError(
              f"{self.name}/{self.builder_config.name}: {need.pattern} cannot "
              f"be downloaded ({need.origin}); pass --manual_dir=ROOT with the "
              f"file at ROOT/{need.pattern}.")
        urls.update(found)
    downloaded = dl_manager.download(urls)
    root = os.path.join(os.fspath(dl_manager.download_dir), "perl_layout")
    for relative, local in downloaded.items():
      link = os.path.join(root, relative)
      os.makedirs(os.path.dirname(link), exist_ok=True)
      if os.path.lexists(link):
        os.remove(link)
      os.symlink(os.fspath(local), link)
    return root

  def _generate_examples(self, *, root: str, split: str):
    fields = tuple(_features(_kind_of(self.task)).keys())
    records, index = None, 0
    while True:
      # The readers see `root` only while they run, never across a yield
      # (a generator TFDS stops early must not leave it set).
      with paths.using_data_dir(root):
        if records is None:
          if self.records.preflight is not None:
            self.records.preflight(split)
          records = iter(self.records.records_fn(split))
        record = next(records, None)
      if record is None:
        return
      yield index, {f: record[f] for f in fields}
      index += 1


def _kind_of(task: str) -> str:
  return next(k for k in common.KINDS if task.endswith("_" + k))


def _listed(dl_manager, need: Needed) -> Dict[str, str]:
  """{relative path: download URL} of a GitHub folder listing."""
  with open(dl_manager.download(need.listing), encoding="utf-8") as f:
    entries = json.load(f)
  folder = os.path.dirname(need.pattern)
  suffix = os.path.splitext(need.pattern)[1]
  return {os.path.join(folder, e["name"]): e["download_url"] for e in entries
          if e.get("type") == "file" and e["name"].endswith(suffix)}


def _configs(tasks: Sequence[str], prefix: str = "") -> List[TaskConfig]:
  return [TaskConfig(name=t[len(prefix):], task=t,
                     description=f"Records of the perl task {t}.")
          for t in tasks]


class PerlHhRlhf(_TaskBuilder):
  """Anthropic HH pairs, one config per perl task (subset x kind)."""
  SOURCE = hh_rlhf.SOURCE
  BUILDER_CONFIGS = _configs(
      [hh_rlhf.task_name(s, k) for s in hh_rlhf.SUBSETS
       for k in (common.PREFERENCE, common.SFT, common.PROMPTS)], "hh_rlhf_")

  def needed(self, split):
    subset = next(s for s in hh_rlhf.SUBSETS
                  if self.task.startswith(hh_rlhf.task_name(s, "")))
    relative = f"{hh_rlhf.SOURCE.folder}/{subset}/{split}.jsonl.gz"
    return [Needed(relative, {relative: f"{HH_URL}/{subset}/{split}.jsonl.gz"})]


class PerlTaskmaster(_TaskBuilder):
  """Taskmaster TM-4 / TM-3 dialogs (sft) and reward sets (pointwise, prompts)."""
  SOURCE = taskmaster.SOURCE
  BUILDER_CONFIGS = _configs(
      [f"{v}_{k}" for v in taskmaster.VERSIONS
       for k in (common.SFT, common.POINTWISE, common.PROMPTS)])

  def needed(self, split):
    version, kind = self.task.rsplit("_", 1)
    release = taskmaster.VERSIONS[version]
    subdir = "data" if kind == common.SFT else "reward"
    folder = f"{taskmaster.SOURCE.folder}/{release}"
    needs = [Needed(f"{folder}/{subdir}/*.json",
                    listing=f"{TASKMASTER_API}/{release}/{subdir}",
                    origin=f"{TASKMASTER_WEB}/{release}/{subdir}")]
    if version == "taskmaster3" and kind == common.SFT and split != "all":
      # TM-3's official dialog splits (used when present, so downloaded too).
      needs += [Needed(f"{folder}/splits/{part}/*.tsv",
                       listing=f"{TASKMASTER_API}/{release}/splits/{part}",
                       origin=f"{TASKMASTER_WEB}/{release}/splits/{part}")
                for part in ("train", "dev", "test")]
    return needs


class PerlTldr(_TaskBuilder):
  """Reddit TL;DR: filtered posts (sft, prompts) and comparisons (preference)."""
  SOURCE = tldr.SOURCE
  BUILDER_CONFIGS = _configs(["tldr_sft", "tldr_prompts", "tldr_preference"],
                             "tldr_")

  def needed(self, split):
    folder = tldr.SOURCE.folder
    if self.task == "tldr_preference":
      urls = {f"{folder}/comparisons/{b}.json":
              f"{TLDR_URL}/dataset/comparisons/{b}.json" for b in TLDR_BATCHES}
      return [Needed(f"{folder}/comparisons/batch*.json", urls)]
    name = tldr.FILTERED_FILES[split]
    relative = f"{folder}/tldr_3_filtered/{name}.jsonl"
    return [Needed(relative, {
        relative: f"{TLDR_URL}/datasets/tldr_3_filtered/{name}.jsonl"})]


class PerlShp(_TaskBuilder):
  """Stanford Human Preferences, every domain."""
  SOURCE = shp.SOURCE
  BUILDER_CONFIGS = _configs(["shp_preference", "shp_sft", "shp_prompts"],
                             "shp_")

  def needed(self, split):
    folder = shp.SOURCE.folder
    return [Needed(f"{folder}/*/{split}.json",
                   {f"{folder}/{d}/{split}.json": f"{SHP_URL}/{d}/{split}.json"
                    for d in SHP_DOMAINS})]


class PerlBolt(_TaskBuilder):
  """BOLT SMS/Chat, from a local LDC copy converted by tasks.bolt_convert."""
  SOURCE = bolt.SOURCE
  BUILDER_CONFIGS = _configs(["bolt_prompts", "bolt_sft"], "bolt_")

  def needed(self, split):
    return [Needed(f"{bolt.SOURCE.folder}/perl/{split}.jsonl",
                   origin=bolt.SOURCE.origin)]


BUILDERS = (PerlHhRlhf, PerlTaskmaster, PerlTldr, PerlShp, PerlBolt)


def builder_for(task: str) -> Tuple[type, TaskConfig]:
  """The builder class and config that prepare `task`."""
  for cls in BUILDERS:
    for config in cls.BUILDER_CONFIGS:
      if config.task == task:
        return cls, config
  known = sorted(c.task for cls in BUILDERS for c in cls.BUILDER_CONFIGS)
  raise ValueError(f"no TFDS builder prepares task {task!r}; these do: {known}")
