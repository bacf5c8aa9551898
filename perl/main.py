r"""perl's gin entry point (t5x style).

  python -m perl.main --gin_file=experiments/synthetic_sft.gin --gin.TRAIN_STEPS=100 \
      --gin.MODEL_DIR=/tmp/run --gin_search_paths=configs --jax_backend=cpu

Gin files bind `run.fn` to the function to run (e.g. `run.fn =
@perl.trainers.runner.train`, the stage runner); with no gin file, a built-in
smoke run checks the devices, the mesh and one sharded forward pass.
`--gin.NAME=VALUE` is shorthand for `--gin_bindings='NAME = VALUE'`; bare
strings (paths) need no quotes. Multi-host: --coordinator_address/--process_count/--process_index (or
JAX_COORDINATOR_ADDRESS/...); TPU pods and SLURM are detected automatically.

Known user errors (a bad flag or gin binding, missing data, an unknown task,
a checkpoint that does not fit, a locked MODEL_DIR, a run gone non-finite)
print one line `perl.main: ...` and exit 1. Logs are quiet by default
(warnings and up); --verbosity=0 brings back absl/Orbax INFO and gin's
search-path messages, --verbosity=1 also the traceback of a user error.
"""
import sys

if __name__ == '__main__':
  # `python -m perl.main` runs this file as __main__. Re-import it as
  # perl.main so that its flags and gin configurables are registered once,
  # under the name gin files use (perl.main.run); app.run exits.
  from perl import main as _main  # pylint: disable=import-self
  _main.console_entry()

import logging as logging_std  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position
from collections.abc import Callable, Sequence
from typing import Any

import gin  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging

from perl import gin_utils

FLAGS = flags.FLAGS

_GIN_FILE = flags.DEFINE_multi_string(
    'gin_file', None, 'Gin config file(s), relative to the working directory '
    'or to a --gin_search_paths entry. Repeatable; later files override.')
_GIN_BINDINGS = flags.DEFINE_multi_string(
    'gin_bindings', [], "Individual gin bindings, e.g. 'TRAIN_STEPS = 10'. "
    'Usually written --gin.TRAIN_STEPS=10.')
_GIN_SEARCH_PATHS = flags.DEFINE_list(
    'gin_search_paths', ['configs'],
    'Comma-separated directories searched for gin files and their includes.')
_JAX_BACKEND = flags.DEFINE_enum(
    'jax_backend', None, ['cpu', 'gpu', 'cuda', 'rocm', 'tpu'],
    'JAX platform to use (sets jax_platforms before any backend starts). '
    'Default: JAX picks the best available.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 for multi-process '
    'runs (default: $JAX_COORDINATOR_ADDRESS, or auto on TPU pods/SLURM).')
_PROCESS_COUNT = flags.DEFINE_integer(
    'process_count', None, 'Number of processes (default: $JAX_NUM_PROCESSES).')
_PROCESS_INDEX = flags.DEFINE_integer(
    'process_index', None, 'Index of this process (default: $JAX_PROCESS_ID).')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', None,
    'Fail within this many seconds when a peer process dies (JAX default '
    '100).')

_RUN_FN_SELECTORS = ('run.fn', 'main.run.fn', 'perl.main.run.fn')


@gin.configurable(module='perl.main')
def run(fn: Callable[[], Any] = gin.REQUIRED, *,
        model_dir: str | None = None) -> Any:
  """Calls the gin-bound `fn` (a trainer, evaluator, ... or `smoke`).

  With model_dir, this process holds MODEL_DIR's lock while fn runs (a
  second run on it fails at once, naming the holder), and MODEL_DIR/config.gin
  gets the operative config (what was actually used, defaults included) when
  fn returns. Trainers write the parsed config earlier, once they have
  validated their inputs and restored their state (loop.fit).
  """
  if not model_dir:
    return fn()
  import jax  # pylint: disable=g-import-not-at-top
  from perl.utils import run_lock  # pylint: disable=g-import-not-at-top
  with run_lock.hold(model_dir, enabled=jax.process_index() == 0):
    result = fn()
    if not (isinstance(result, dict) and result.get('preempted')):
      _write_config_on_process_0(model_dir, None)
  return result


def _write_config_on_process_0(model_dir: str, text: str | None) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    path = gin_utils.write_operative_config(model_dir, text=text)
    logging.info('Wrote gin config to %s', path)


def write_operative_config(model_dir: str) -> str:
  """Writes the operative gin config to MODEL_DIR/config.gin."""
  return gin_utils.write_operative_config(model_dir)


@gin.configurable(module='perl.main')
def smoke(*, mesh: str = 'data=-1', use_model: bool = True,
          batch_size: int = 8, seq_len: int = 16) -> dict[str, Any]:
  """Checks devices, mesh and one sharded forward pass; returns a summary."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from perl import partitioning  # pylint: disable=g-import-not-at-top

  partitioner = partitioning.Partitioner(mesh)
  logging.info('Devices: %s; mesh %s', jax.devices(),
               dict(partitioner.mesh.shape))
  print(f'backend={jax.default_backend()} devices={jax.device_count()} '
        f'processes={jax.process_count()} mesh={dict(partitioner.mesh.shape)}')
  index, num_shards = partitioner.data_shard_info()
  local_batch = batch_size // num_shards
  rng = np.random.default_rng(index)

  if use_model:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from perl.models import config as model_config  # pylint: disable=g-import-not-at-top
    from perl.models import transformer  # pylint: disable=g-import-not-at-top
    cfg = model_config.tiny()
    model = partitioner.create_sharded_model(
        lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = rng.integers(0, cfg.vocab_size, (local_batch, seq_len),
                          dtype=np.int32)

    def forward(state, batch):
      logits, _ = nnx.merge(graphdef, state)(batch['tokens'])
      return logits

    out_shape = (batch_size, seq_len, cfg.vocab_size)
  else:
    tokens = rng.normal(size=(local_batch, 64)).astype(np.float32)
    state = {'w': jnp.ones((64, 32), jnp.float32) / 64}
    state = jax.device_put(state, {'w': partitioner.logical_sharding(
        ('embed', 'mlp'), shape=(64, 32))})

    def forward(state, batch):
      y = batch['tokens'] @ state['w']
      return partitioning.with_sharding_constraint(y, ('batch', 'mlp'))

    out_shape = (batch_size, 32)

  batch = partitioner.shard_batch({'tokens': tokens})
  step = partitioner.jit(forward, in_shardings=(
      partitioner.state_shardings(state) if use_model else None,
      {'tokens': partitioner.batch_sharding(2)}))
  out = step(state, batch)
  if out.shape != out_shape or not bool(jnp.all(jnp.isfinite(out))):
    raise RuntimeError(f'Smoke forward pass gave shape {out.shape} (expected'
                       f' {out_shape}) or non-finite values.')
  print(f'smoke ok: output {out.shape} sharded as {out.sharding.spec}')
  return {'output_shape': tuple(out.shape), 'spec': out.sharding.spec,
          'mesh': dict(partitioner.mesh.shape)}


def _user_errors() -> tuple[type[BaseException], ...]:
  """Errors that mean bad input, not a bug: reported in one line."""
  from perl import checkpoints  # pylint: disable=g-import-not-at-top
  from perl.utils import run_lock  # pylint: disable=g-import-not-at-top
  return (gin_utils.GinConfigError, checkpoints.CheckpointMismatchError,
          checkpoints.NonFiniteError, checkpoints.CorruptCheckpointError,
          run_lock.ModelDirLockedError, FileNotFoundError, ValueError)


def _one_line(e: BaseException) -> str:
  lines = [l for l in str(e).strip().splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _check_model_dir_free(bindings: Sequence[str]) -> None:
  """A MODEL_DIR given on the command line that a live run holds fails now,
  in a second, not after the imports and the gin parse."""
  import ast  # pylint: disable=g-import-not-at-top
  from perl.utils import run_lock  # pylint: disable=g-import-not-at-top
  for binding in bindings:
    name, _, value = binding.partition('=')
    if name.strip() not in ('MODEL_DIR', 'run.model_dir',
                            'perl.main.run.model_dir'):
      continue
    try:
      model_dir = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      continue
    if isinstance(model_dir, str) and '://' not in model_dir:
      try:
        run_lock.check_free(model_dir)
      except run_lock.ModelDirLockedError as e:
        sys.exit(f'perl.main: {e}')


def _import_tensorflow_quietly() -> None:
  """Imports TF with stderr closed: its C++ start-up lines (oneDNN, no CUDA
  drivers) come before absl's log set-up and ignore TF_CPP_MIN_LOG_LEVEL."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('tensorflow') is None:
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel  # noqa: F401
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _has_run_fn_binding(bindings: Sequence[str]) -> bool:
  return any(b.split('=', 1)[0].strip() in _RUN_FN_SELECTORS
             for b in bindings)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_model_dir_free(_GIN_BINDINGS.value)
  if FLAGS.verbosity < 0:
    _import_tensorflow_quietly()
  from perl.utils import tf_setup  # pylint: disable=g-import-not-at-top
  # Before TF or JAX touch a device: TF must not grab accelerator memory, and
  # jax_platforms only takes effect before the first backend use.
  tf_setup.hide_accelerators_from_tensorflow()
  import jax  # pylint: disable=g-import-not-at-top
  if _JAX_BACKEND.value:
    jax.config.update('jax_platforms', _JAX_BACKEND.value)
  from perl import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(
      coordinator_address=_COORDINATOR_ADDRESS.value,
      num_processes=_PROCESS_COUNT.value, process_id=_PROCESS_INDEX.value,
      heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)

  bindings = list(_GIN_BINDINGS.value)
  if not _GIN_FILE.value and not _has_run_fn_binding(bindings):
    bindings.insert(0, 'perl.main.run.fn = @perl.main.smoke')
  search_paths = list(_GIN_SEARCH_PATHS.value)
  # Configs shipped with the repo are found from any working directory.
  repo_configs = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'configs')
  if os.path.isdir(repo_configs) and repo_configs not in search_paths:
    search_paths.append(repo_configs)
  try:
    gin_utils.parse_gin_flags(search_paths, _GIN_FILE.value or [], bindings)
    run()  # pylint: disable=no-value-for-parameter
  except _user_errors() as e:
    if FLAGS.verbosity >= 1:
      raise
    sys.exit(f'perl.main: {_one_line(e)}')


_HELP_ARGS = ('-h', '--help', '--helpshort', '-?')


def _flags_parser(argv: Sequence[str]) -> list[str]:
  try:
    argv = gin_utils.rewrite_gin_args(argv)
  except gin_utils.GinConfigError as e:
    sys.exit(f'perl.main: {e}')
  return app.parse_flags_with_usage(argv)


class _QuietGinSearch(logging_std.Filter):
  """Drops gin's `Path not found: <file>` errors: it logs one for every
  search path it tries before the one that holds the file."""

  def filter(self, record):
    return not str(record.msg).startswith('Path not found')


def _quiet_by_default(argv: list[str]) -> None:
  """Warnings and up unless --verbosity/-v is given (argv edited in place)."""
  if any(a.startswith(('--verbosity', '-v=', '--v=')) or a == '-v'
         for a in argv[1:]):
    return
  argv.insert(1, '--verbosity=-1')  # absl WARNING: no Orbax/absl INFO
  # TensorFlow/XLA C++ start-up chatter (oneDNN, "no CUDA drivers").
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  quiet_gin_search()


def quiet_gin_search() -> None:
  """Installs the `Path not found` filter once (perl.main, perl.demo)."""
  root = logging_std.getLogger()
  if not any(isinstance(f, _QuietGinSearch) for f in root.filters):
    root.addFilter(_QuietGinSearch())


def console_entry(argv: Sequence[str] | None = None) -> None:
  """Runs main under absl; `--help` prints perl.main's flags and exits 0."""
  argv = list(sys.argv if argv is None else argv)
  _quiet_by_default(argv)
  if any(a in _HELP_ARGS for a in argv[1:]):
    # absl's own --help exits 1; asking for help is not an error.
    print(__doc__)
    print(FLAGS.module_help(__name__))
    print('\nTry --helpfull for all flags.')
    sys.exit(0)
  app.run(main, argv=argv, flags_parser=_flags_parser)
