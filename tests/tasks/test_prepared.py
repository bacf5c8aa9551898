"""TFDS-prepared sources (`tasks.tfds_builders` + `tasks.prepared`).

The real upstream files (PERL_DATA_DIR) are prepared through manual_dir into
a tmp folder; a prepared task must yield the same rows as the in-memory task
(compared as multisets: TFDS shuffles rows at write time, by design), each
host reads only its own files, and a missing preparation or raw file is one
error that names the fix.
"""
import collections
import os

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from perl.data import pipeline
from tasks import common, prepare, prepared, tfds_builders
from tests.tasks.fixture_data import FIXTURES, REAL_DATA_REASON, real_data

HH = "hh_rlhf_harmless_base_preference"
TM4 = "taskmaster4_pointwise"
TM4_SPLITS = ("train", "validation", "test", "all")


def _rows(task, split, shard_info=None):
  """Text rows of a task's source (before tokenization), as tuples."""
  ds = pipeline.get_task(task).source.get_dataset(
      split=split, shuffle=False, shard_info=shard_info)
  fields = sorted(common.TEXT_FIELDS[pipeline.task_kind(task)])
  out = []
  for row in pipeline.numpy_iterator(ds):
    values = tuple(row[f] for f in fields)
    out.append(values + ((float(row["label"]),) if "label" in row else ()))
  return out


def _assert_resumes_exactly(task, tmp_path):
  """Save a shuffled, sharded, repeating iterator after 5 batches; a fresh
  one restored there yields the next 2 batches the first one yields."""
  def batches():
    return pipeline.CheckpointableBatches(pipeline.get_dataset(
        task=task, split="test", feature_lengths={"prompt": 32, "response": 16},
        batch_size=8, shard_info=(1, 2), seed=3, shuffle=True, num_epochs=None))
  first = batches()
  for _ in range(5):
    next(first)
  first.save(str(tmp_path / "position"))
  expected = [next(first) for _ in range(2)]
  resumed = batches()
  resumed.restore(str(tmp_path / "position"))
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """HH harmless-base test and every TM-4 pointwise split, prepared once."""
  if not os.environ.get("PERL_DATA_DIR"):
    pytest.skip(REAL_DATA_REASON)
  root = str(tmp_path_factory.mktemp("tfds"))
  manual = os.environ["PERL_DATA_DIR"]
  prepare.prepare(task=HH, data_dir=root, manual_dir=manual, splits=["test"])
  prepare.prepare(task=TM4, data_dir=root, manual_dir=manual, num_shards=4)
  return root


@pytest.fixture
def reading(tfds_dir, monkeypatch):
  monkeypatch.setenv("PERL_TFDS_DIR", tfds_dir)
  return tfds_dir


@real_data
def test_prepared_rows_equal_the_in_memory_rows(reading):
  for task in (HH, TM4):  # same tokenization, features and BOS/EOS handling
    ours, theirs = pipeline.get_task(task + "_prepared"), pipeline.get_task(task)
    assert ours.preprocessors == theirs.preprocessors
    assert ours.output_features == theirs.output_features
  hh = _rows(HH + "_prepared", "test")
  assert len(hh) == 2312
  assert collections.Counter(hh) == collections.Counter(_rows(HH, "test"))
  for split in TM4_SPLITS:
    rows = _rows(TM4 + "_prepared", split)
    assert collections.Counter(rows) == collections.Counter(_rows(TM4, split)), split
  # The held-out split logic came along: the README's TM-4 sizes.
  assert {s: len(_rows(TM4 + "_prepared", s)) for s in TM4_SPLITS} == {
      "train": 2740, "validation": 131, "test": 126, "all": 3228}


@real_data
def test_prepare_summary_and_files(reading):
  info = prepare.summary(prepare._builder(HH, reading))
  assert list(info) == ["test"]
  assert info["test"]["rows"] == 2312 and info["test"]["shards"] == 8
  assert info["test"]["format"] == "array_record"
  assert all(os.path.basename(f).startswith("perl_hh_rlhf-test.array_record-")
             for f in info["test"]["files"])


@real_data
def test_two_hosts_read_disjoint_files_that_cover_the_split(reading, tmp_path,
                                                            monkeypatch):
  task = HH + "_prepared"
  shards = [_rows(task, "test", seqio.ShardInfo(i, 2)) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert collections.Counter(shards[0] + shards[1]) == collections.Counter(
      _rows(task, "test"))
  # File-level: host i reads exactly files i, i + 2, ... of the split.
  from array_record.python import array_record_data_source
  source = pipeline.get_task(task).source
  files = source.list_shards("test")
  features = source._builder("test").info.features
  for index, rows in enumerate(shards):
    own = array_record_data_source.ArrayRecordDataSource(files[index::2])
    direct = [features.deserialize_example_np(own[i]) for i in range(len(own))]
    assert collections.Counter(rows) == collections.Counter(
        (r["chosen"], r["prompt"], r["rejected"]) for r in direct)

  # A restored iterator goes on with exactly the batches the first would
  # have produced next (the loop's resume: tests/trainers/test_input_resume.py).
  _assert_resumes_exactly(task, tmp_path)

  # perl.data.pipeline hands its shard_info to the prepared source.
  seen = []
  original = prepared.PreparedSource.get_dataset

  def spy(self, *args, **kwargs):
    seen.append(kwargs.get("shard_info"))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(prepared.PreparedSource, "get_dataset", spy)
  ds = pipeline.get_dataset(task=task, split="test", batch_size=None,
                            feature_lengths={"prompt": 32, "response": 16},
                            shard_info=(1, 2), shuffle=False)
  assert sum(1 for _ in ds) == len(shards[1])
  assert seen == [seqio.ShardInfo(index=1, num_shards=2)]


@real_data
def test_missing_preparation_is_one_error_naming_the_command(tmp_path,
                                                             monkeypatch):
  monkeypatch.setenv("PERL_TFDS_DIR", str(tmp_path))
  with pytest.raises(prepared.PreparedDataMissingError) as error:
    next(pipeline.get_batches(task=HH + "_prepared", split="test",
                              feature_lengths={"prompt": 32, "response": 16},
                              batch_size=2))
  assert str(error.value).endswith(
      f"Prepare it once: python -m tasks.prepare --task={HH} "
      f"--data_dir={tmp_path}")
  assert "\n" not in str(error.value)


@real_data
def test_unprepared_split_names_the_command(reading):
  from perl.trainers import loop
  with pytest.raises(ValueError) as error:  # as a run meets it at start-up
    loop.check_inputs(task=HH + "_prepared", splits=("train", "test"),
                      feature_lengths={"prompt": 32, "response": 16})
  message = str(error.value)
  assert "split 'train' was not prepared" in message
  assert (f"python -m tasks.prepare --task={HH} --data_dir={reading} "
          "--splits=test,train --overwrite") in message


@real_data
def test_manual_dir_missing_a_file_names_it_and_its_url(tmp_path):
  manual = os.environ["PERL_DATA_DIR"]  # has harmless-base test, not train
  with pytest.raises(tfds_builders.MissingRawFileError) as error:
    prepare.prepare(task=HH, data_dir=str(tmp_path), manual_dir=manual)
  message = str(error.value)
  assert os.path.join(manual, "hh-rlhf/harmless-base/train.jsonl.gz") in message
  assert (f"{tfds_builders.HH_URL}/harmless-base/train.jsonl.gz") in message
  with pytest.raises(tfds_builders.MissingRawFileError,
                     match=r"TM-3-2020/reward/\*\.json.*github.com/google-"
                     r"research-datasets/Taskmaster/tree/master/TM-3-2020"):
    prepare.prepare(task="taskmaster3_pointwise", data_dir=str(tmp_path),
                    manual_dir=manual)
  with pytest.raises(tfds_builders.MissingRawFileError, match="LDC2018T19"):
    prepare.prepare(task="bolt_sft", data_dir=str(tmp_path), manual_dir=manual)
  # Nothing was written for the failed preparations.
  assert sorted(os.listdir(tmp_path)) in ([], ["downloads"])


@real_data
def test_tfrecord_format_reads_the_same_rows_sharded_by_file(tmp_path,
                                                             monkeypatch):
  prepare.prepare(task=HH, data_dir=str(tmp_path), file_format="tfrecord",
                  manual_dir=os.environ["PERL_DATA_DIR"], splits=["test"],
                  num_shards=4)
  monkeypatch.setenv("PERL_TFDS_DIR", str(tmp_path))
  task = HH + "_prepared"
  assert all(".tfrecord-" in f for f in
             pipeline.get_task(task).source.list_shards("test"))
  shards = [_rows(task, "test", seqio.ShardInfo(i, 2)) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert collections.Counter(shards[0] + shards[1]) == collections.Counter(
      _rows(HH, "test"))
  _assert_resumes_exactly(task, tmp_path)  # TFDS's TFRecord reader, too


def test_fixture_datasets_prepare_to_the_same_rows(tmp_path, monkeypatch):
  """TL;DR, SHP and BOLT builders on the project's fixture files."""
  monkeypatch.setenv("PERL_DATA_DIR", FIXTURES)
  monkeypatch.setenv("PERL_TFDS_DIR", str(tmp_path))
  for task, split in (("tldr_preference", "train"), ("tldr_sft", "train"),
                      ("shp_preference", "train"), ("bolt_prompts", "train")):
    prepare.prepare(task=task, manual_dir=FIXTURES, splits=[split],
                    num_shards=1)
    rows = _rows(task + "_prepared", split)
    assert rows and collections.Counter(rows) == collections.Counter(
        _rows(task, split)), task


def test_quality_policy_applies_at_read_time_as_in_memory():
  spaces = [chr(c) for c in range(0x3001) if chr(c).isspace()]
  records = [{"prompt": "p", "chosen": c, "rejected": r} for c, r in [
      ("a", "a"), ("a", "b"), (" ", "b"), ("a", "".join(spaces)),
      ("a", "\u200b"), ("a", " x ")]]
  ds = tf.data.Dataset.from_tensor_slices(
      {k: [r[k] for r in records] for k in records[0]})

  def kept(dataset):
    return [(r["chosen"].decode(), r["rejected"].decode())
            for r in dataset.as_numpy_iterator()]

  for drop_empty in (False, True):
    with gin.unlock_config():
      gin.bind_parameter("tasks.common.QualityPolicy.drop_empty_responses",
                         drop_empty)
    try:
      expected = [(r["chosen"], r["rejected"]) for r in common.checked(
          common.PREFERENCE, records, "t", common.QualityPolicy())]
      assert kept(prepared.quality_filtered(ds, common.PREFERENCE)) == expected
    finally:
      gin.clear_config()
  assert len(expected) == 3  # identical, and two empty after strip(), dropped
  # Every character Python strips is one the filter strips, and only those.
  probe = tf.constant([chr(c) for c in range(1, 0x3001)])
  matched = tf.strings.regex_full_match(probe, prepared._PY_SPACE).numpy()
  assert [chr(c) for c in np.flatnonzero(matched) + 1] == spaces


class _FakeDownloads:
  """A dl_manager that serves URLs from local files (no network here): what
  TFDS hands the builder once it has fetched them."""

  def __init__(self, download_dir, served):
    self.download_dir, self.served, self.asked = download_dir, served, []

  @property
  def manual_dir(self):
    raise AssertionError("Manual directory not enabled.")  # as TFDS's

  def download(self, urls):
    if isinstance(urls, str):
      self.asked.append(urls)
      return self.served[urls]
    return {key: self.download(url) for key, url in urls.items()}


def test_without_manual_dir_the_builder_downloads_the_upstream_urls(
    tmp_path, monkeypatch):
  import json
  monkeypatch.setenv("PERL_DATA_DIR", FIXTURES)
  listing = tmp_path / "listing.json"
  raw = ("https://raw.githubusercontent.com/google-research-datasets/"
         "Taskmaster/master/TM-4-2024/reward/reward_00.json")
  listing.write_text(json.dumps([
      {"name": "reward_00.json", "type": "file", "download_url": raw},
      {"name": "README.md", "type": "file", "download_url": "unused"}]))
  hh_url = f"{tfds_builders.HH_URL}/harmless-base/test.jsonl.gz"
  served = {
      hh_url: os.path.join(FIXTURES, "hh-rlhf/harmless-base/test.jsonl.gz"),
      f"{tfds_builders.TASKMASTER_API}/TM-4-2024/reward": str(listing),
      raw: os.path.join(FIXTURES, "taskmaster/TM-4-2024/reward/reward_00.json")}
  for task, split, builder_cls, expected_urls in (
      (HH, "test", tfds_builders.PerlHhRlhf, [hh_url]),
      (TM4, "train", tfds_builders.PerlTaskmaster,
       [f"{tfds_builders.TASKMASTER_API}/TM-4-2024/reward", raw])):
    fake = _FakeDownloads(str(tmp_path / task), served)
    os.makedirs(fake.download_dir)
    builder = builder_cls(config=tfds_builders.builder_for(task)[1].name,
                          data_dir=str(tmp_path / "tfds"), splits=[split])
    generators = builder._split_generators(fake)
    assert sorted(fake.asked) == sorted(expected_urls)
    rows = [tuple(sorted(example.items())) for _, example in generators[split]]
    # The task's own records from the same files (before the read-time
    # quality checks, which the fixture's identical HH pair would fail).
    fields = {f for r in rows for f, _ in r}
    expected = [tuple(sorted((f, r[f]) for f in fields))
                for r in common.RECORDS[task].records_fn(split)]
    assert rows and collections.Counter(rows) == collections.Counter(expected)


def test_tfds_dir_gin_then_env(monkeypatch, tmp_path):
  monkeypatch.delenv("PERL_TFDS_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  assert prepared.tfds_dir() == str(tmp_path / "tfds")
  monkeypatch.setenv("PERL_TFDS_DIR", str(tmp_path / "perl"))
  assert prepared.tfds_dir() == str(tmp_path / "perl")
  with gin.unlock_config():
    gin.bind_parameter("tasks.prepared.tfds_dir.root", str(tmp_path / "gin"))
  try:
    assert prepared.tfds_dir() == str(tmp_path / "gin")
  finally:
    gin.clear_config()
