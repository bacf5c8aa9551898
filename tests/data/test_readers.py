"""Every read error names its file (and line or record), in fail and skip
modes; file-level problems fail before any tf.data graph is built."""
import gzip
import json

import gin
import pytest

from perl.data import pipeline, readers, report
from tasks import hh_rlhf, taskmaster

GOOD_PAIR = {"chosen": "\n\nHuman: a\n\nAssistant: b",
             "rejected": "\n\nHuman: a\n\nAssistant: c"}
GOOD_ROW = {"conversation_id": "dlg-a", "context": '[{"role": "user", "text": "hi"}]',
            "generation": '{"role": "agent", "text": "hello"}', "reward": 1.0}


@pytest.fixture
def skip_mode():
  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", "skip")
  report.reset()
  yield
  gin.clear_config()


def _hh_file(tmp_path, monkeypatch, data: bytes, gz: bool = True):
  folder = tmp_path / "hh-rlhf" / "helpful-base"
  folder.mkdir(parents=True)
  path = folder / "train.jsonl.gz"
  path.write_bytes(gzip.compress(data) if gz else data)
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  return str(path)


def _reward_file(tmp_path, monkeypatch, text: str):
  folder = tmp_path / "taskmaster" / "TM-4-2024" / "reward"
  folder.mkdir(parents=True)
  path = folder / "reward_00.json"
  path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  return str(path)


def _lines(*records) -> bytes:
  return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_truncated_gzip_names_the_file(tmp_path, monkeypatch, mode):
  path = _hh_file(tmp_path, monkeypatch, b"")
  whole = gzip.compress(_lines(*[GOOD_PAIR] * 200))
  with open(path, "wb") as f:
    f.write(whole[: len(whole) // 2])
  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", mode)
  try:
    with pytest.raises(readers.DataFileError,
                       match=f"{path}: not a complete gzip file"):
      list(hh_rlhf.pairs("helpful-base", "train"))
  finally:
    gin.clear_config()


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_git_lfs_pointer_says_git_lfs_pull(tmp_path, monkeypatch, mode):
  pointer = (b"version https://git-lfs.github.com/spec/v1\n"
             b"oid sha256:4d7a2146\nsize 13421772\n")
  path = _hh_file(tmp_path, monkeypatch, pointer, gz=False)
  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", mode)
  try:
    with pytest.raises(readers.DataFileError) as error:
      list(hh_rlhf.pairs("helpful-base", "train"))
  finally:
    gin.clear_config()
  assert str(error.value).startswith(f"{path}: a Git LFS pointer")
  assert "`git lfs pull`" in str(error.value)


def test_non_utf8_line_names_file_and_line(tmp_path, monkeypatch):
  data = _lines(GOOD_PAIR) + b'{"chosen": "caf\xe9", "rejected": "x"}\n'
  path = _hh_file(tmp_path, monkeypatch, data)
  with pytest.raises(readers.MalformedRowError, match=f"{path}:2: .*not UTF-8"):
    list(hh_rlhf.pairs("helpful-base", "train"))


def test_non_utf8_line_is_skipped_and_counted(tmp_path, monkeypatch, skip_mode):
  data = _lines(GOOD_PAIR) + b'{"chosen": "caf\xe9", "rejected": "x"}\n'
  _hh_file(tmp_path, monkeypatch, data)
  assert len(list(hh_rlhf.pairs("helpful-base", "train"))) == 1
  assert report.counts("hh_rlhf/helpful-base/train") == {
      "skipped_malformed_rows": 1}


@pytest.mark.parametrize("bad, problem", [
    (dict(GOOD_PAIR, rejected=None), r"\['rejected'\] are null"),
    (dict(GOOD_PAIR, chosen=3), "field 'chosen' should be a string, got int"),
])
def test_null_or_mistyped_field_names_file_and_line(tmp_path, monkeypatch, bad,
                                                    problem):
  path = _hh_file(tmp_path, monkeypatch, _lines(GOOD_PAIR, bad))
  with pytest.raises(readers.MalformedRowError, match=f"{path}:2: .*{problem}"):
    list(hh_rlhf.pairs("helpful-base", "train"))


def test_null_reward_field_in_an_array_is_skipped(tmp_path, monkeypatch,
                                                  skip_mode):
  rows = [GOOD_ROW, dict(GOOD_ROW, conversation_id="dlg-b", reward=None),
          dict(GOOD_ROW, conversation_id="dlg-c", reward="1.0")]
  _reward_file(tmp_path, monkeypatch, json.dumps(rows, indent=4))
  assert len(list(taskmaster.reward_examples("taskmaster4", "all"))) == 1
  assert report.counts("taskmaster4/reward/all") == {"skipped_malformed_rows": 2}


def _array_with_bad_record() -> str:
  good = json.dumps([GOOD_ROW, dict(GOOD_ROW, conversation_id="dlg-c")],
                    indent=4)
  bad = json.dumps(dict(GOOD_ROW, conversation_id="dlg-b"), indent=4)
  bad = bad.replace('"reward": 1.0', '"reward": 1.0,,')  # a syntax error
  bad = "\n".join("    " + line for line in bad.splitlines())
  first, second = good.split("\n    },\n")
  return first + "\n    },\n" + bad + ",\n" + second


def test_array_with_one_bad_record_skips_the_record(tmp_path, monkeypatch,
                                                    skip_mode):
  _reward_file(tmp_path, monkeypatch, _array_with_bad_record())
  examples = list(taskmaster.reward_examples("taskmaster4", "all"))
  assert len(examples) == 2  # records 0 and 2 survive
  assert report.counts("taskmaster4/reward/all") == {"skipped_malformed_rows": 1}


def test_array_with_one_bad_record_fails_naming_the_record(tmp_path,
                                                           monkeypatch):
  path = _reward_file(tmp_path, monkeypatch, _array_with_bad_record())
  with pytest.raises(readers.MalformedRowError,
                     match=rf"{path} record 1 \(line 8\): malformed row: "
                           "invalid JSON"):
    list(taskmaster.reward_examples("taskmaster4", "all"))


def test_non_utf8_bytes_in_an_array_skip_one_record(tmp_path, monkeypatch,
                                                    skip_mode):
  text = json.dumps([GOOD_ROW, dict(GOOD_ROW, conversation_id="dlg-b",
                                    generation="CAFE")], indent=4)
  text = text.replace("CAFE", "caf\udce9")  # a lone 0xe9 byte on disk
  _reward_file(tmp_path, monkeypatch, text)
  assert len(list(taskmaster.reward_examples("taskmaster4", "all"))) == 1
  assert report.counts("taskmaster4/reward/all") == {"skipped_malformed_rows": 1}


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_json_lines_where_an_array_is_expected(tmp_path, monkeypatch, mode):
  text = "".join(json.dumps(r) + "\n" for r in [GOOD_ROW, GOOD_ROW])
  path = _reward_file(tmp_path, monkeypatch, text)
  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", mode)
  try:
    with pytest.raises(readers.DataFileError,
                       match=f"{path}: expected one JSON array of records but "
                             "the file starts with JSON lines"):
      list(taskmaster.reward_examples("taskmaster4", "all"))
  finally:
    gin.clear_config()


def test_bad_file_fails_before_the_graph_with_one_line(tmp_path, monkeypatch):
  # The task's preflight opens every file when the dataset is built, so the
  # error is the reader's own, not a tf.data error with a traceback inside.
  path = _reward_file(tmp_path, monkeypatch, json.dumps(GOOD_ROW) + "\n")
  with pytest.raises(readers.DataFileError) as error:
    pipeline.get_dataset(task="taskmaster4_pointwise", split="all",
                         feature_lengths={"prompt": 32, "response": 32})
  assert "\n" not in str(error.value) and str(error.value).startswith(path)


def test_bad_row_inside_the_graph_reraises_the_original_error(tmp_path,
                                                              monkeypatch):
  rows = [GOOD_ROW, dict(GOOD_ROW, conversation_id="dlg-b", context="[oops")]
  path = _reward_file(tmp_path, monkeypatch, json.dumps(rows, indent=4))
  with pytest.raises(readers.MalformedRowError) as error:
    list(pipeline.get_batches(task="taskmaster4_pointwise", split="all",
                              feature_lengths={"prompt": 32, "response": 32},
                              batch_size=2))
  message = str(error.value)
  assert message.startswith(f"{path} record 1 (line 8): malformed row:")
  assert "Traceback" not in message and "\n" not in message


@pytest.mark.parametrize("mode", ["fail", "skip"])
@pytest.mark.parametrize("data, gz", [(b"", False), (b"", True),
                                      (b"\n  \n", True)])
def test_empty_json_lines_file_is_an_error(tmp_path, monkeypatch, mode, data,
                                           gz):
  path = _hh_file(tmp_path, monkeypatch, data, gz=gz)
  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", mode)
  try:
    with pytest.raises(readers.DataFileError) as error:
      list(hh_rlhf.pairs("helpful-base", "train"))
  finally:
    gin.clear_config()
  assert str(error.value).startswith(f"{path}: is empty; expected JSON lines")
  assert "fetch the file again" in str(error.value)


@pytest.mark.parametrize("read, expected", [
    (readers.read_json_lines, "JSON lines"),
    (readers.read_json_records, "JSON records")])
def test_zero_byte_jsonl_file_is_an_error(tmp_path, skip_mode, read, expected):
  path = tmp_path / "rows.jsonl"
  path.write_bytes(b"")
  with pytest.raises(readers.DataFileError,
                     match=f"^{path}: is empty; expected {expected}"):
    list(read(str(path), scope="x"))


def _cut(text: str, marker: str) -> str:
  """`text` cut just before the last occurrence of `marker`."""
  return text[:text.rindex(marker)]


@pytest.mark.parametrize("mode", ["fail", "skip"])
@pytest.mark.parametrize("cut", [
    '"reward"',  # inside the last record
    "\n]",  # after the last record, before the closing bracket
])
def test_truncated_array_fails_in_either_mode(tmp_path, monkeypatch, mode,
                                              cut):
  rows = [dict(GOOD_ROW, conversation_id=f"dlg-{i}") for i in range(5)]
  path = _reward_file(tmp_path, monkeypatch,
                      _cut(json.dumps(rows, indent=4), cut))
  with gin.unlock_config():
    gin.bind_parameter("perl.data.readers.bad_row_policy.policy", mode)
  try:
    with pytest.raises(readers.DataFileError) as error:
      list(taskmaster.reward_examples("taskmaster4", "all"))
  finally:
    gin.clear_config()
  assert str(error.value).startswith(f"{path}: the JSON array is cut short")
  assert "fetch the file again" in str(error.value)
  assert report.counts("taskmaster4/reward/all") == {}


def test_array_cut_after_a_nested_bracket_is_truncated(tmp_path, skip_mode):
  # Ends in "]" (of a nested list), so only parsing finds the cut.
  text = json.dumps([{"a": 1}, {"b": [1, 2]}], indent=4)
  path = tmp_path / "rows.json"
  path.write_text(text[:text.rindex("]", 0, len(text) - 1) + 1])
  with pytest.raises(readers.DataFileError,
                     match=r"cut short \(.*record 1 \(line 5\) is incomplete"):
    list(readers.read_json_array(str(path), scope="x"))
  assert report.counts("x") == {}
