"""Multi-process runs on one machine: 2 CPU processes x 2 fake devices.

The processes talk through jax.distributed (the coordination service on a
free localhost port) and XLA's CPU collectives (gloo, JAX's default for
multi-process CPU), exactly as hosts of a TPU pod slice or GPU nodes would.

* A 2-process LoRA reward-model run through `python -m perl.main` computes
  the same per-step losses, bit for bit, as a 1-process run on 4 devices of
  the same global batches.
* When a peer dies, the survivor exits non-zero within seconds (bounded by
  --heartbeat_timeout_seconds), with JAX's error naming the dead task, and
  never hangs in a collective.
* Evaluation over an uneven split (9 held-out rows, shards of 5 and 4) scores
  every row once: the reward model's metrics equal a 1-process run's, the
  policy eval's equal the exact values of its 9 prompts.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, 'tests', 'multihost_driver.py')
HEARTBEAT_S = 5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(num_devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             PYTHONUNBUFFERED='1', **extra)
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
               'JAX_PROCESS_ID', 'JAX_LOCAL_DEVICE_IDS'):
    env.pop(name, None)
  return env


def _rm_args(model_dir, *, steps: int, mesh: str,
             eval_max_batches: int | None = 1) -> list[str]:
  """A tiny LoRA reward-model run on synthetic preference pairs."""
  return [
      '--jax_backend=cpu', '--verbosity=-1',
      '--gin_file=models/tiny.gin', '--gin_file=runs/reward_model.gin',
      f'--gin.MODEL_DIR={model_dir}', f'--gin.TRAIN_STEPS={steps}',
      '--gin.MIXTURE_OR_TASK_NAME=synthetic_preference',
      "--gin.TASK_FEATURE_LENGTHS={'prompt': 48, 'response': 32}",
      '--gin.BATCH_SIZE=8',
      # No warm-up and a large rate: the adapter moves a lot each step, so a
      # wrong gradient reduction across processes would show in the losses.
      '--gin.LEARNING_RATE=0.01',
      '--gin.perl.trainers.core.OptimizerConfig.warmup_steps=0',
      f'--gin.perl.trainers.runner.train.mesh={mesh}',
      f'--gin.perl.trainers.runner.train.eval_max_batches={eval_max_batches}',
      '--gin.perl.trainers.runner.train.export=False',
      '--gin.perl.trainers.runner.train.log_every=1',
  ]


class _Procs:
  """Started processes, each logging to a file; all killed on exit."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self.procs: dict[str, subprocess.Popen] = {}

  def start(self, name, args, env):
    log = open(os.path.join(self.log_dir, f'{name}.log'), 'w')
    self.procs[name] = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT)
    log.close()
    return self.procs[name]

  def log(self, name) -> str:
    with open(os.path.join(self.log_dir, f'{name}.log')) as f:
      return f.read()

  def wait_all(self, timeout):
    deadline = time.monotonic() + timeout
    for name, p in self.procs.items():
      try:
        p.wait(timeout=max(1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        raise AssertionError(f'{name} still running after {timeout}s:\n'
                             + self.log(name)[-3000:]) from None

  def wait_for(self, name, text, timeout):
    deadline = time.monotonic() + timeout
    while text not in self.log(name):
      if self.procs[name].poll() is not None:
        raise AssertionError(f'{name} exited ({self.procs[name].returncode})'
                             f' before printing {text!r}:\n'
                             + self.log(name)[-3000:])
      if time.monotonic() > deadline:
        raise AssertionError(f'{name} did not print {text!r} within'
                             f' {timeout}s:\n' + self.log(name)[-3000:])
      time.sleep(0.2)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for p in self.procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()


def _dist_args(port, index):
  return [f'--coordinator_address=localhost:{port}', '--process_count=2',
          f'--process_index={index}',
          f'--heartbeat_timeout_seconds={HEARTBEAT_S}']


def _train_metrics(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if 'train/loss' in r]


def test_two_processes_train_exactly_like_one(tmp_path):
  """2 processes x 2 devices == 1 process x 4 devices, same global batches.

  Mesh fsdp=2,model=2: the fsdp axis (batch rows and the embed dim of every
  weight) spans the two processes, the model axis stays inside each, so
  parameter all-gathers and gradient reductions cross the process boundary.
  The pipeline shards the source before shuffling, so the single process
  reads both input shards and concatenates them (multihost_driver.py):
  row for row the global batch the two processes assemble.
  """
  steps, mesh = 3, 'fsdp=2,model=2'
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = _free_port()
  with _Procs(str(tmp_path)) as procs:
    # All three at once: the pair spends part of its time waiting on each
    # other, which the reference run fills.
    for i in range(2):
      procs.start(f'proc{i}',
                  ['-m', 'perl.main', *_rm_args(multi, steps=steps, mesh=mesh),
                   *_dist_args(port, i)], _env(2))
    procs.start('single', [DRIVER, *_rm_args(single, steps=steps, mesh=mesh)],
                _env(4, PERL_EMULATE_INPUT_SHARDS='2'))
    procs.wait_all(timeout=240)
    for name, p in procs.procs.items():
      assert p.returncode == 0, f'{name}:\n' + procs.log(name)[-3000:]
  for i in range(2):  # the collectives really crossed processes
    assert '[Gloo] Rank' in procs.log(f'proc{i}'), procs.log(f'proc{i}')[-3000:]
  assert '[Gloo]' not in procs.log('single')
  a, b = _train_metrics(multi), _train_metrics(single)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [1, 2, 3]
  for key in ('train/loss', 'train/grad_norm', 'train/accuracy',
              'train/margin'):
    for ra, rb in zip(a, b):
      assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (
          key, ra['step'], ra[key], rb[key])
  assert len({r['train/loss'] for r in a}) == steps  # batches differ
  # The 2-process run saved its final checkpoint (Orbax, both processes).
  assert os.path.isdir(os.path.join(multi, 'checkpoints', str(steps)))


@pytest.mark.parametrize('victim, after', [
    # A worker dies mid-run (process 0 printed a train step; only process 0
    # prints progress): the coordinator sees its heartbeats stop and aborts
    # after about --heartbeat_timeout_seconds.
    (1, 'step 1/'),
    # The coordinator dies right after start-up: the worker's next call to
    # the coordination service fails and it aborts at once.
    (0, 'trainable'),
])
def test_survivor_of_dead_peer_exits_nonzero_quickly(tmp_path, victim, after):
  """Kills one process with SIGKILL; the other must fail, never hang."""
  port = _free_port()
  survivor = 1 - victim
  with _Procs(str(tmp_path)) as procs:
    for i in range(2):
      procs.start(f'proc{i}', [
          '-m', 'perl.main',
          *_rm_args(str(tmp_path / 'run'), steps=100_000, mesh='data=4'),
          *_dist_args(port, i)], _env(2))
    procs.wait_for('proc0', after, timeout=180)
    killed_at = time.monotonic()
    procs.procs[f'proc{victim}'].send_signal(signal.SIGKILL)
    try:
      rc = procs.procs[f'proc{survivor}'].wait(timeout=HEARTBEAT_S + 55)
    except subprocess.TimeoutExpired:
      raise AssertionError(
          f'proc{survivor} still running 60 s after its peer died:\n'
          + procs.log(f'proc{survivor}')[-3000:]) from None
    elapsed = time.monotonic() - killed_at
  log = procs.log(f'proc{survivor}')
  assert rc != 0, log[-3000:]
  assert elapsed < HEARTBEAT_S + 30, elapsed
  assert 'JAX distributed service detected fatal errors' in log, log[-3000:]
  if victim == 1:
    assert 'stopped sending heartbeats' in log, log[-3000:]
  else:
    assert 'Failed to send RPC to coordination service' in log, log[-3000:]


def _eval_metrics(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if 'eval/num_examples' in r]
  assert len(evals) == 1, rows
  return evals[0]


@pytest.mark.parametrize('devices, mesh', [(1, 'data=2'),
                                           (2, 'fsdp=2,model=2')])
def test_uneven_eval_split_scores_every_row_once(tmp_path, devices, mesh):
  """9 validation pairs, eval batch 8, 2 processes: the shards hold 5 and 4
  pairs, so one process has two eval batches and the other one. The run
  scores all 9 pairs once, with the metrics of a 1-process run on the same
  devices and the same trained adapter (its train input is both shards'),
  where 9 = 8 + 1 padded to 8."""
  extra = ['--gin.tasks.synthetic.SyntheticConfig.num_validation=9']
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = _free_port()
  with _Procs(str(tmp_path)) as procs:
    for i in range(2):
      procs.start(f'proc{i}', [
          '-m', 'perl.main', *_rm_args(multi, steps=1, mesh=mesh,
                                       eval_max_batches=None),
          *extra, *_dist_args(port, i)], _env(devices))
    procs.start('single', [DRIVER, *_rm_args(single, steps=1, mesh=mesh,
                                             eval_max_batches=None), *extra],
                _env(2 * devices, PERL_EMULATE_INPUT_SHARDS='2'))
    procs.wait_all(timeout=420)  # three runs at once on a shared CPU
    for name, p in procs.procs.items():
      assert p.returncode == 0, f'{name}:\n' + procs.log(name)[-3000:]
  a, b = _eval_metrics(multi), _eval_metrics(single)
  assert a['eval/num_examples'] == b['eval/num_examples'] == 9
  assert a['eval/accuracy'] == b['eval/accuracy']
  assert 0 < b['eval/accuracy'] < 1  # a mixed outcome: a lost row would show
  for key in ('eval/loss', 'eval/margin', 'eval/reward_chosen',
              'eval/reward_rejected'):
    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


POLICY_DRIVER = os.path.join(ROOT, 'tests', 'multihost_policy_eval_driver.py')


@pytest.mark.parametrize('devices', [1, 2])
def test_policy_eval_over_uneven_shards_scores_every_prompt_once(
    tmp_path, devices):
  """9 prompts over 2 processes (5 and 4 rows, eval batch 8): the policy eval
  gathers the global rows, drops the padding and gets the exact metrics of
  the 9 prompts (multihost_policy_eval_driver.py defines the fake policy)."""
  out = str(tmp_path / 'metrics.json')
  port = _free_port()
  with _Procs(str(tmp_path)) as procs:
    for i in range(2):
      procs.start(f'proc{i}', [POLICY_DRIVER, out, str(port), '2', str(i)],
                  _env(devices))
    procs.wait_all(timeout=120)
    for name, p in procs.procs.items():
      assert p.returncode == 0, f'{name}:\n' + procs.log(name)[-3000:]
  with open(out) as f:
    result = json.load(f)
  assert (result['process_count'], result['num_shards']) == (2, 2)
  m = result['metrics']
  # Prompt r's byte id is 100 + r; the policy answers it, the SFT policy 101.
  assert m['reward_model_score'] == pytest.approx(104.0)
  assert m['reward_model_score_sft'] == pytest.approx(101.0)
  assert m['win_rate'] == pytest.approx(7.5 / 9)  # r >= 2 win, r == 1 ties
  assert m['kl'] == pytest.approx(1.04)
  assert m['ground_truth_reward'] == pytest.approx(1.0)
  assert m['ground_truth_reward_sft'] == pytest.approx(1 / 9)
  assert (m['eos_rate'], m['response_length']) == (0.0, 1.0)
