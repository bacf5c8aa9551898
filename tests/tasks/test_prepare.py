"""`python -m tasks.prepare`: what it prints, and that it never loses a
preparation already written (on the project's BOLT fixture files)."""
import os

import pytest

from tasks import prepare
from tests import files
from tests.tasks.fixture_data import FIXTURES


def test_cli_prints_rows_and_shards_per_split(tmp_path, capsys):
  prepare.main(["--task=bolt_prompts_prepared", f"--data_dir={tmp_path}",
                f"--manual_dir={FIXTURES}", "--num_shards=1"])
  out = capsys.readouterr().out
  folder = tmp_path / "perl_bolt" / "prompts" / "1.0.0"
  for split, rows in (("test", 1), ("train", 2), ("validation", 1)):
    assert (f"{split}: {rows} rows in 1 array_record shards under {folder}"
            in out), out
  assert (folder / "perl_bolt-train.array_record-00000-of-00001").exists()


def test_existing_preparation_is_kept_and_a_failed_overwrite_loses_nothing(
    tmp_path, capsys):
  kwargs = dict(task="bolt_sft", data_dir=str(tmp_path), num_shards=1)
  first = prepare.prepare(manual_dir=FIXTURES, **kwargs)
  written = files.snapshot(tmp_path / "perl_bolt")
  assert len(written) >= 5  # 3 splits' shards, dataset_info, features
  assert prepare.prepare(manual_dir=FIXTURES, **kwargs) == first
  assert "already prepared (pass --overwrite" in capsys.readouterr().out
  empty = tmp_path / "elsewhere"
  (empty / "other").mkdir(parents=True)  # a manual_dir without BOLT's files
  with pytest.raises(FileNotFoundError, match="elsewhere/bolt-sms-chat/perl/train.jsonl.*LDC2018T19"):
    prepare.prepare(manual_dir=str(empty), overwrite=True, **kwargs)
  assert files.snapshot(tmp_path / "perl_bolt") == written
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".prepare-")]


def test_bad_arguments_are_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match="--num_shards=4.*smaller --num_shards"):
    prepare.prepare(task="bolt_sft", data_dir=str(tmp_path),
                    manual_dir=FIXTURES, num_shards=4)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty is not a directory holding"):
    prepare.prepare(task="bolt_sft", data_dir=str(tmp_path),
                    manual_dir=str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="'parquet': choose one of"):
    prepare.prepare(task="bolt_sft", data_dir=str(tmp_path),
                    file_format="parquet")
  with pytest.raises(ValueError, match="no TFDS builder prepares task 'nope'"):
    prepare.prepare(task="nope", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"no split\(s\) \['dev'\]"):
    prepare.prepare(task="bolt_sft", data_dir=str(tmp_path),
                    manual_dir=FIXTURES, splits=["dev"])
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".prepare-")]
