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


def test_leakage_counts_exact_and_prefix_overlap():
  train_prompts = ["a: hi\nb:", "a: hi\nb: yo\na: tea?\nb:", "c: x\nb:"]
  train_pairs = [("c: x\nb:", " y")]
  held_prompts = ["a: hi\nb:", "a: hi\nb: yo\na:", "c: x\nb: y\na: z\nb:",
                  "d: new\nb:"]
  held_pairs = [("c: x\nb:", " y"), ("a: hi\nb:", " yo"), ("d: new\nb:", " q")]
  counts = inspect.leakage(train_prompts, train_pairs, held_prompts, held_pairs)
  assert counts == {
      "eval_prompts": 4, "prompt_in_train": 1,
      "prompt_prefix_of_train_prompt": 2,  # "a: hi\nb:" and "a: hi\nb: yo\na:"
      # "c: x\nb:" and "a: hi\nb:" start longer held-out prompts.
      "train_prompt_prefix_of_prompt": 2,
      "eval_pairs": 3, "pair_in_train": 1,
      "pair_prefix_of_train_prompt": 1,  # "a: hi\nb: yo" continues in train
      # Held-out turns: "a: hi", "b: yo", "a: tea?"... less the cue "b:":
      # {a: hi, c: x, b: y, a: z, d: new, b: q, b: yo}; train has 4 of them.
      "eval_turns": 7, "turn_in_train": 4}


def test_turn_overlap_sees_through_a_shared_opening():
  greeting = "agent: Welcome, what can I get you?\n"
  train = [greeting + "user: one latte\nagent:",
           greeting + "user: a tea\nagent: sure\nuser: thanks\nagent:"]
  held = [greeting + "user: two mochas\nagent:",
          greeting + "user: a tea\nagent:"]
  counts = inspect.leakage(train, [], held, [(held[0], " right away")])
  # Every held-out prompt starts with a train prompt's greeting line, but
  # of 4 distinct held-out turns only the greeting and "user: a tea" recur.
  assert counts["eval_turns"] == 4 and counts["turn_in_train"] == 2
  assert inspect.dialog_turns(held[:1], []) == {
      "agent: Welcome, what can I get you?", "user: two mochas"}


def test_inspect_reports_zero_synthetic_leakage(monkeypatch, capsys):
  from tasks import synthetic

  small = synthetic.SyntheticConfig(num_train=2000, num_validation=300,
                                    num_test=300)
  monkeypatch.setattr(synthetic, "SyntheticConfig", lambda: small)
  inspect.main(["--task=synthetic_preference", "--num_examples=0"])
  out = capsys.readouterr().out
  leak_lines = [line for line in out.splitlines() if line.startswith("leakage")]
  turn_lines = [line for line in out.splitlines()
                if line.startswith("turn overlap")]
  assert [line.split(":")[0] for line in turn_lines] == [
      "turn overlap validation in train", "turn overlap test in train",
      "turn overlap test in validation"]
  assert [line.split(":")[0] for line in leak_lines] == [
      "leakage validation in train", "leakage test in train",
      "leakage test in validation"]
  for line in leak_lines:
    counts = eval(line.split(": ", 1)[1])  # a printed dict of ints
    assert counts["eval_prompts"] > 100 and counts["eval_pairs"] > 300
    rows = {k: v for k, v in counts.items()
            if not k.startswith("eval_") and "turn" not in k}
    assert rows == {
        "prompt_in_train": 0, "prompt_prefix_of_train_prompt": 0,
        "train_prompt_prefix_of_prompt": 0, "pair_in_train": 0,
        "pair_prefix_of_train_prompt": 0}, line
    # Held-out prompts are new orders, but replies ("confirm: 1 latte")
    # recur across splits: turns overlap where prompts do not.
    assert 0 < counts["turn_in_train"] < counts["eval_turns"], line
  for leak, turns in zip(leak_lines, turn_lines):
    counts = eval(leak.split(": ", 1)[1])
    held, _, train = leak.split(":")[0].split()[1:]
    share = counts["turn_in_train"] / counts["eval_turns"]
    assert turns == (
        f"turn overlap {held} in {train}: {counts['turn_in_train']} of "
        f"{counts['eval_turns']} distinct {held} turns ({share:.1%}) are also "
        f"turns in {train}")


def test_using_data_dir_wins_inside_the_block_and_thread_only(monkeypatch,
                                                              tmp_path):
  import threading
  monkeypatch.setenv("PERL_DATA_DIR", str(tmp_path / "env"))
  seen = []
  with paths.using_data_dir(str(tmp_path / "manual")):
    assert paths.data_dir() == str(tmp_path / "manual")
    other = threading.Thread(target=lambda: seen.append(paths.data_dir()))
    other.start()
    other.join()
  assert seen == [str(tmp_path / "env")]
  assert paths.data_dir() == str(tmp_path / "env")
