"""Data directory resolution (gin / env, lazily) and the inspect CLI."""
import gin
import pytest

from perl.data import inspect, paths


def test_data_dir_env_gin_and_clear_error(monkeypatch, tmp_path):
  monkeypatch.delenv("PERL_DATA_DIR", raising=False)
  with pytest.raises(paths.MissingDataError, match="PERL_DATA_DIR"):
    paths.data_dir()
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  assert paths.data_dir() == str(tmp_path)
  with gin.unlock_config():
    gin.bind_parameter("perl.data.paths.data_dir.root", "/elsewhere")
  try:
    assert paths.data_dir() == "/elsewhere"
  finally:
    gin.clear_config()


def test_missing_file_error_names_path_and_origin(monkeypatch, tmp_path):
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path))
  source = paths.DataSourceInfo(name="X", folder="x", origin="LDC2018T19")
  with pytest.raises(paths.MissingDataError) as error:
    paths.dataset_file(source, "a/b.jsonl")
  assert str(tmp_path / "x" / "a" / "b.jsonl") in str(error.value)
  assert "LDC2018T19" in str(error.value)


def test_inspect_prints_counts_and_decoded_examples(monkeypatch, capsys):
  from tasks import synthetic

  small = synthetic.SyntheticConfig(num_train=10, num_validation=6)
  monkeypatch.setattr(synthetic, "SyntheticConfig", lambda: small)
  inspect.main(["--task=synthetic_pointwise", "--split=validation",
                "--num_examples=2"])
  out = capsys.readouterr().out
  assert "converted examples: 6" in out
  assert "report synthetic_pointwise/validation: {'examples': 6}" in out
  first = next(synthetic.generate("pointwise", "validation", small))
  assert f"prompt: {first['prompt']!r}" in out
  assert f"response: {first['response']!r}" in out
  assert "label: 1.0" in out and "--- example 2" not in out
