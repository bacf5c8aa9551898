"""Gin flag rewriting and the clear errors of perl.gin_utils."""
import gin
import pytest

from perl import gin_utils


@gin.configurable(module='test_gin_utils')
def toy_train(*, steps=1, learning_rate=0.1, model_dir=None):
  return steps, learning_rate, model_dir


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_rewrite_gin_args():
  argv = ['prog', '--gin.TRAIN_STEPS=100', '--gin_file=a.gin',
          '--gin.train.learning_rate=1e-4', '--gin.MODEL_DIR=/tmp/run',
          "--gin.NAME='quoted'", '--gin.FN=@train', '--gin.EXPR=a=b',
          '--gin.L=[1, 2]', '--jax_backend=cpu']
  assert gin_utils.rewrite_gin_args(argv) == [
      'prog', '--gin_bindings=TRAIN_STEPS = 100', '--gin_file=a.gin',
      '--gin_bindings=train.learning_rate = 1e-4',
      # Bare strings get quoted so paths need no shell gymnastics.
      "--gin_bindings=MODEL_DIR = '/tmp/run'",
      "--gin_bindings=NAME = 'quoted'", '--gin_bindings=FN = @train',
      "--gin_bindings=EXPR = 'a=b'", '--gin_bindings=L = [1, 2]',
      '--jax_backend=cpu']


def test_rewrite_gin_args_without_value_errors():
  with pytest.raises(gin_utils.GinConfigError, match=r"--gin\.TRAIN_STEPS"):
    gin_utils.rewrite_gin_args(['prog', '--gin.TRAIN_STEPS'])


def test_files_search_paths_and_bindings(tmp_path):
  (tmp_path / 'base.gin').write_text(
      'TRAIN_STEPS = %gin.REQUIRED\n'
      'test_gin_utils.toy_train.steps = %TRAIN_STEPS\n'
      'toy_train.learning_rate = 0.5\n')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'run.gin').write_text(
      "include 'base.gin'\ntoy_train.model_dir = '/nowhere'\n")
  gin_utils.parse_gin_flags(
      [str(tmp_path)], ['sub/run.gin'],
      ['TRAIN_STEPS = 7', "toy_train.model_dir = '/tmp/x'"])
  assert toy_train() == (7, 0.5, '/tmp/x')


def test_missing_required_macro_names_it(tmp_path):
  (tmp_path / 'base.gin').write_text(
      'TRAIN_STEPS = %gin.REQUIRED\ntoy_train.steps = %TRAIN_STEPS\n')
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin_flags([str(tmp_path)], ['base.gin'], [])
  assert str(e.value) == (
      'Gin macro TRAIN_STEPS is %gin.REQUIRED but was never set: pass'
      ' --gin.TRAIN_STEPS=<value> or bind it in a gin file.')


def test_required_parameter_names_it():
  with pytest.raises(gin_utils.GinConfigError,
                     match=r'toy_train\.steps is %gin\.REQUIRED.*--gin\.'):
    gin_utils.parse_gin_flags([], [], ['toy_train.steps = %gin.REQUIRED'])


def test_undefined_macro_names_it():
  with pytest.raises(gin_utils.GinConfigError,
                     match=r'macro %STEPZ is used but never defined'):
    gin_utils.parse_gin_flags([], [], ['toy_train.steps = %STEPZ'])


def test_misspelt_parameter_names_it_and_suggests():
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin_flags([], [], ['toy_train.learning_rat = 0.1'])
  assert "toy_train.learning_rat" in str(e.value)
  assert "Did you mean 'learning_rate'?" in str(e.value)


def test_misspelt_configurable_names_it():
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"unknown configurable 'trian'"):
    gin_utils.parse_gin_flags([], [], ['trian.steps = 3'])


def test_missing_gin_file_names_it(tmp_path):
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"Gin file 'nope\.gin' not found.*search_paths"):
    gin_utils.parse_gin_flags([str(tmp_path)], ['nope.gin'], [])


def test_write_operative_config(tmp_path):
  gin_utils.parse_gin_flags([], [], ['toy_train.steps = 3'])
  toy_train()
  path = gin_utils.write_operative_config(str(tmp_path / 'model'))
  text = open(path).read()
  assert path == str(tmp_path / 'model' / 'config.gin')
  assert 'toy_train.steps = 3' in text
  assert 'toy_train.learning_rate = 0.1' in text  # defaults are recorded too


def test_include_beside_a_plain_directory_of_that_name(tmp_path, monkeypatch):
  # `python -m perl.demo` writes ./runs/demo and has cwd on sys.path; gin then
  # took ./runs for the package of `include 'runs/...'` and crashed.
  (tmp_path / 'configs' / 'runs').mkdir(parents=True)
  (tmp_path / 'configs' / 'runs' / 'base.gin').write_text(
      'test_gin_utils.toy_train.steps = 3\n')
  (tmp_path / 'configs' / 'exp.gin').write_text("include 'runs/base.gin'\n")
  (tmp_path / 'runs' / 'demo').mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  gin_utils.parse_gin_flags([str(tmp_path / 'configs')], ['exp.gin'], [])
  assert gin.query_parameter('test_gin_utils.toy_train.steps') == 3


def test_misspelt_macro_fails_naming_the_close_match():
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin_flags(
        [], [], ['TRAIN_STEPS = 300', 'toy_train.steps = %TRAIN_STEPS',
                 'TRAIN_STEP = 5'])
  assert str(e.value) == (
      'Gin macro TRAIN_STEP is set (--gin.TRAIN_STEP=...) but no binding uses'
      ' %TRAIN_STEP: misspelt? Did you mean TRAIN_STEPS?')


def test_macro_used_only_through_another_macro_is_accepted():
  gin_utils.parse_gin_flags(
      [], [], ['LR = 0.5', 'RATES = [%LR, {"x": %LR}]',
               'toy_train.learning_rate = %RATES'])
  assert toy_train()[1] == [0.5, {'x': 0.5}]


def test_experiment_misspelt_macro_names_train_steps():
  import os  # pylint: disable=g-import-not-at-top
  configs = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'configs')
  with pytest.raises(gin_utils.GinConfigError,
                     match=r'macro TRAIN_STEP .*Did you mean TRAIN_STEPS'):
    gin_utils.parse_gin_flags(
        [configs], ['experiments/synthetic_sft.gin'],
        ["MODEL_DIR = '/tmp/x'", 'TRAIN_STEP = 5'])
