"""benchmarks/tpu_aot.py's rendering of RESULTS.md (pure Python, no libtpu)."""
import pytest


def _row(step, peak, size="1b", chip="v5e"):
  return dict(chip=chip, size=size, step=step, topology="v5e:2x2", chips=4, compile_s=1.0,
              date="2026-12-01", commit="abc1234", config="c", peak_gib=peak,
              temp_gib=peak / 2, args_gib=0.5, flops=1e12, bytes=1e9, hbm_bytes=1e9)


def _target_line(text, needle):
  lines = [l for l in text.splitlines() if l.startswith("| v5e:2x2 |") and needle in l]
  assert len(lines) == 1, lines
  return lines[0]


def test_micro_batched_reward_model_rows_are_one_per_chip(tpu_aot):
  import argparse
  args = argparse.Namespace(chips="v5e,v5p", sizes="1b,7b", only="rm-", rm_batch_size=16)
  steps = {"/".join(k) for k in tpu_aot.row_keys(args)}
  # 16 pairs = 32 sequences: 4 chips -> 8 micro-batches, 16 chips -> 2.
  assert {"v5e/1b/rm-lora-accum8", "v5e/1b/rm-full-accum8", "v5e/7b/rm-lora-accum2",
          "v5p/7b/rm-full-accum4"} <= steps
  assert not any("accum1" in s for s in steps)


def test_reward_model_target_takes_each_sides_leanest_micro_batching(tpu_aot):
  rows = {f"v5e/1b/{r['step']}": r for r in (
      _row("rm-lora", 2.58), _row("rm-full", 4.0),
      _row("rm-lora-accum8", 0.8), _row("rm-full-accum8", 5.0))}
  text = tpu_aot.render(rows)
  plain = _target_line(text, "peak rm-lora / rm-full")
  assert "| 0.645 | no |" in plain
  # LoRA is leaner micro-batched, full fine-tuning without: 0.8 / 4.0.
  best = _target_line(text, "min(rm-lora, rm-lora-accum8)")
  assert "0.200 (rm-lora-accum8 / rm-full) | yes |" in best


def test_a_program_that_does_not_fit_is_a_row_and_fails_its_target(tpu_aot):
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error.\n"
             "Ran out of memory in memory space hbm. Used 16.79G of 15.75G hbm.")
  row = tpu_aot.does_not_fit_row(("v5e", "1b", "decode-b256"), message)
  assert row["error"] == "Ran out of memory in memory space hbm. Used 16.79G of 15.75G hbm."
  text = tpu_aot.render({"v5e/1b/decode-b256": row})
  assert "| decode-b256 | does not fit: Ran out of memory" in text
  assert "decode b=256: HBM bytes/step <= 1.2 x (weights + KV cache read once) " \
         "| does not fit the slice | no |" in text
  assert "v5e/1b/decode-b256" not in text.split("Not measured yet")[-1]


def test_a_failed_render_keeps_the_old_results(tpu_aot, tmp_path, monkeypatch):
  md, js = tmp_path / "RESULTS.md", tmp_path / "tpu_aot.json"
  md.write_text("# old results\n")
  js.write_text("{}")
  monkeypatch.setattr(tpu_aot, "RESULTS_MD", str(md))
  monkeypatch.setattr(tpu_aot, "RESULTS_JSON", str(js))

  def broken(rows):
    raise RuntimeError("render failed")
  monkeypatch.setattr(tpu_aot, "render", broken)
  with pytest.raises(RuntimeError, match="render failed"):
    tpu_aot.main(["--render"])
  assert md.read_text() == "# old results\n"



def test_a_run_keeps_the_rows_a_concurrent_run_wrote(tpu_aot, tmp_path, monkeypatch):
  import json
  js, md = tmp_path / "tpu_aot.json", tmp_path / "RESULTS.md"
  monkeypatch.setattr(tpu_aot, "RESULTS_JSON", str(js))
  monkeypatch.setattr(tpu_aot, "RESULTS_MD", str(md))
  # main() sets these for libtpu; monkeypatch puts the old values back.
  monkeypatch.setenv("PERL_SPLASH_INTERPRET", "1")
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  js.write_text(json.dumps({"v5e/1b/rm-lora": _row("rm-lora", 3.0)}))

  def measure(key, args):
    # Meanwhile another run re-measures rm-lora and saves it.
    js.write_text(json.dumps({**json.loads(js.read_text()),
                              "v5e/1b/rm-lora": _row("rm-lora", 2.5)}))
    return _row(key[2], 4.0)
  monkeypatch.setattr(tpu_aot, "measure", measure)
  tpu_aot.main(["--chips=v5e", "--sizes=1b", "--only=rm-full"])
  on_disk = json.loads(js.read_text())
  assert on_disk["v5e/1b/rm-lora"]["peak_gib"] == 2.5
  assert on_disk["v5e/1b/rm-full"]["peak_gib"] == 4.0
  assert "| rm-full |" in md.read_text()


def test_a_memory_only_rl_row_names_its_program_and_why_no_flops(tpu_aot):
  row = dict(_row("rl-lora-hydra", 1.9), flops=None, bytes=None, program="update",
             cost="not compiled (--memory_only)", attention="splash")
  line = next(l for l in tpu_aot.render({"v5e/1b/rl-lora-hydra": row}).splitlines()
              if "| rl-lora-hydra |" in l)
  assert "attention splash; peak in update | 1.90 | 0.95 | " in line
  assert "n/a: not compiled (--memory_only) | n/a | 1.00 | n/a |" in line
