"""The gin entry point: --help, the smoke run and its errors."""
import os
import subprocess
import sys

import gin
import pytest
from jax.sharding import PartitionSpec as P

from perl import main as perl_main
from perl.utils import tf_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='')
  return subprocess.run([sys.executable, '-m', 'perl.main', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_help_exits_zero_and_lists_flags():
  proc = _run_main('--help', timeout=60)
  assert proc.returncode == 0, proc.stderr
  for flag in ('--jax_backend', '--gin_file', '--gin_bindings',
               '--gin_search_paths', '--coordinator_address'):
    assert flag in proc.stdout


def test_smoke_run_end_to_end(tmp_path):
  proc = _run_main('--jax_backend=cpu', '--gin.smoke.mesh=data=4,model=2',
                   '--gin.smoke.use_model=False',
                   f'--gin.run.model_dir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'backend=cpu devices=8' in proc.stdout
  assert "smoke ok: output (8, 32) sharded as P('data', 'model')" in (
      proc.stdout)
  config = (tmp_path / 'config.gin').read_text()
  assert "smoke.mesh = 'data=4,model=2'" in config
  assert 'smoke.batch_size = 8' in config  # operative: defaults included


def test_missing_required_macro_is_one_clear_error(tmp_path):
  (tmp_path / 'exp.gin').write_text(
      'import perl.main\n'
      'STEPS = %gin.REQUIRED\n'
      'perl.main.run.fn = @perl.main.smoke\n'
      'smoke.batch_size = %STEPS\n')
  proc = _run_main('--jax_backend=cpu', '--gin_file=exp.gin',
                   f'--gin_search_paths={tmp_path}')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'perl.main: Gin macro STEPS is %gin.REQUIRED but was never set: pass'
      ' --gin.STEPS=<value> or bind it in a gin file.')


@pytest.fixture
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_run_calls_bound_fn_and_writes_config(tmp_path, _clean_gin):
  gin.parse_config(['run.fn = @smoke', 'smoke.use_model = False',
                    "smoke.mesh = 'data=2,fsdp=2,model=2'"])
  out = perl_main.run(model_dir=str(tmp_path))
  assert out['mesh'] == {'data': 2, 'fsdp': 2, 'model': 2}
  assert out['spec'] == P(('data', 'fsdp'), 'model')
  assert 'smoke.seq_len = 16' in (tmp_path / 'config.gin').read_text()


def test_smoke_with_model(_clean_gin):
  out = perl_main.smoke(mesh='data=2,fsdp=2,model=2', use_model=True)
  assert out['output_shape'] == (8, 16, 512)


def test_hide_accelerators_from_tensorflow():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert tf_setup.hide_accelerators_from_tensorflow() is True
  assert tf.config.get_visible_devices('GPU') == []
  assert tf.config.get_visible_devices('TPU') == []
  # TF still sees its CPU, which the input pipeline needs.
  assert tf.config.get_visible_devices('CPU')
