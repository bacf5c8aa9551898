"""Multi-host initialisation: env parsing and the single-process no-op."""
import jax
import pytest

from perl import distributed


def test_single_process_is_noop():
  cfg = distributed.initialize()
  assert cfg.mode == 'single'
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1
  # Explicitly one process, even with a coordinator: still nothing to start.
  cfg = distributed.initialize(coordinator_address='localhost:1234',
                               num_processes=1, process_id=0)
  assert cfg.mode == 'single'
  assert not jax.distributed.is_initialized()


def test_env_parsing():
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:8476', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '2', 'JAX_LOCAL_DEVICE_IDS': '0,1'}
  cfg = distributed.resolve_config(environ=env)
  assert cfg == distributed.DistributedConfig(
      'explicit', '10.0.0.1:8476', 4, 2, (0, 1), None)
  # Arguments (flags) win over the environment.
  cfg = distributed.resolve_config(process_id=3, environ=env)
  assert cfg.process_id == 3 and cfg.num_processes == 4


@pytest.mark.parametrize('env, cluster', [
    ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1,host-2,host-3',
      'CLOUD_TPU_TASK_ID': '1'}, 'tpu_pod'),
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'h:8080', 'MEGASCALE_NUM_SLICES': '2'},
     'tpu_multislice'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}, 'slurm'),
])
def test_cluster_autodetect(env, cluster):
  cfg = distributed.resolve_config(environ=env)
  assert cfg.mode == 'auto' and cfg.cluster == cluster


@pytest.mark.parametrize('env, tpu_chips, mode', [
    ({}, 4, 'auto'),  # a Cloud TPU VM: jax reads the workers from metadata
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, 8, 'auto'),
    ({'TPU_SKIP_MDS_QUERY': '1'}, 4, 'single'),  # metadata disabled
    ({}, 0, 'single'),
])
def test_cloud_tpu_vm_is_detected_from_its_chips(env, tpu_chips, mode):
  cfg = distributed.resolve_config(environ=env, tpu_chips=tpu_chips)
  assert cfg.mode == mode
  assert cfg.cluster == ('tpu_vm' if mode == 'auto' else None)


@pytest.mark.parametrize('env', [
    {},
    {'TPU_WORKER_HOSTNAMES': 'localhost'},  # single-host TPU VM
    {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'},
    {'MEGASCALE_NUM_SLICES': '1'},
])
def test_single_host_environments(env):
  assert distributed.resolve_config(environ=env).mode == 'single'


@pytest.mark.parametrize('kwargs, env, match', [
    (dict(coordinator_address='h:1'), {}, r"Coordinator 'h:1'.*set both"),
    (dict(num_processes=4, process_id=0), {}, r'without a coordinator'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), {},
     r'outside \[0, 2\)'),
    ({}, {'JAX_NUM_PROCESSES': 'four'}, r"JAX_NUM_PROCESSES='four'"),
])
def test_bad_config_errors(kwargs, env, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve_config(environ=env, **kwargs)
