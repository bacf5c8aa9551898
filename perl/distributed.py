"""Multi-host start-up: `jax.distributed.initialize` from flags or env.

Resolution order: explicit arguments, then `JAX_COORDINATOR_ADDRESS` /
`JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` / `JAX_LOCAL_DEVICE_IDS`, then cluster
auto-detection (TPU pod slices, multi-slice Megascale, SLURM), where JAX finds
everything itself. A single process does nothing. Must run before any JAX
backend use.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence

from absl import logging

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'JAX_LOCAL_DEVICE_IDS'


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """What `initialize` will do. mode: 'single', 'explicit' or 'auto'."""
  mode: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  cluster: str | None = None  # for 'auto': which cluster was detected


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  raw = environ.get(name)
  if raw in (None, ''):
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f'{name}={raw!r} is not an integer.') from None


def tpu_chips_on_host() -> int:
  """TPU chips on this host's PCI bus (0 off Cloud TPU VMs); starts no backend."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # pylint: disable=broad-except
    return 0  # JAX moved the helper: fall back to the environment checks only.


def detect_cluster(environ: Mapping[str, str] | None = None,
                   tpu_chips: int | None = None) -> str | None:
  """Names a multi-process cluster that JAX can auto-configure, else None.

  tpu_chips: TPU chips on this host (default: read from the PCI bus). A Cloud
  TPU VM is 'tpu_vm' even when TPU_WORKER_HOSTNAMES is unset, as it usually
  is: jax.distributed then reads the slice's workers from the GCE metadata
  server (one host: one process, which is harmless).
  """
  env = os.environ if environ is None else environ
  if env.get('MEGASCALE_COORDINATOR_ADDRESS') or _int_env(
      env, 'MEGASCALE_NUM_SLICES') not in (None, 1):
    return 'tpu_multislice'
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1:
    return 'tpu_pod'
  if (_int_env(env, 'SLURM_NTASKS') or 1) > 1 and env.get('SLURM_JOB_ID'):
    return 'slurm'
  if len(hosts) <= 1 and env.get('TPU_SKIP_MDS_QUERY') is None and (
      tpu_chips if tpu_chips is not None else tpu_chips_on_host()) > 0:
    return 'tpu_vm'
  return None


def resolve_config(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
    tpu_chips: int | None = None,
) -> DistributedConfig:
  """Merges arguments with the environment; raises on inconsistent input."""
  env = os.environ if environ is None else environ
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int_env(env, ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_env(env, ENV_PROCESS_ID)
  if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
    local_device_ids = [int(i) for i in env[ENV_LOCAL_DEVICE_IDS].split(',')]
  ids = None if local_device_ids is None else tuple(local_device_ids)

  if num_processes == 1:
    return DistributedConfig('single', num_processes=1, process_id=0)
  if coordinator_address:
    cluster = detect_cluster(env, tpu_chips)
    if cluster is None and (num_processes is None or process_id is None):
      raise ValueError(
          f'Coordinator {coordinator_address!r} given but num_processes='
          f'{num_processes} process_id={process_id}: set both (flags'
          f' --process_count/--process_index or {ENV_NUM_PROCESSES}/'
          f'{ENV_PROCESS_ID}).')
    if num_processes is not None and process_id is not None and not (
        0 <= process_id < num_processes):
      raise ValueError(
          f'process_id={process_id} is outside [0, {num_processes}).')
    return DistributedConfig('explicit', coordinator_address, num_processes,
                             process_id, ids, cluster)
  if num_processes is not None or process_id is not None:
    raise ValueError(
        f'num_processes={num_processes} process_id={process_id} given without'
        f' a coordinator address (--coordinator_address or {ENV_COORDINATOR}).')
  cluster = detect_cluster(env, tpu_chips)
  if cluster is not None:
    return DistributedConfig('auto', local_device_ids=ids, cluster=cluster)
  return DistributedConfig('single', num_processes=1, process_id=0)


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    heartbeat_timeout_seconds: int | None = None,
    initialization_timeout: int | None = None,
) -> DistributedConfig:
  """Starts jax.distributed when there is more than one process.

  heartbeat_timeout_seconds bounds how long survivors wait on a dead peer
  before failing (JAX's default is 100 s). Returns the resolved config.
  """
  import jax  # pylint: disable=g-import-not-at-top

  cfg = resolve_config(coordinator_address=coordinator_address,
                       num_processes=num_processes, process_id=process_id,
                       local_device_ids=local_device_ids)
  if cfg.mode == 'single':
    logging.info('Single process: jax.distributed not initialised.')
    return cfg
  if jax.distributed.is_initialized():
    logging.info('jax.distributed already initialised.')
    return cfg
  kwargs = {}
  if cfg.mode == 'explicit':
    kwargs.update(coordinator_address=cfg.coordinator_address,
                  num_processes=cfg.num_processes, process_id=cfg.process_id)
  if cfg.local_device_ids is not None:
    kwargs['local_device_ids'] = list(cfg.local_device_ids)
  supported = inspect.signature(jax.distributed.initialize).parameters
  for name, value in (('heartbeat_timeout_seconds', heartbeat_timeout_seconds),
                      ('initialization_timeout', initialization_timeout)):
    if value is not None:
      if name not in supported:
        raise ValueError(f'This JAX version does not support {name}.')
      kwargs[name] = value
  logging.info('jax.distributed.initialize(%s) [%s%s]', kwargs, cfg.mode,
               f', {cfg.cluster}' if cfg.cluster else '')
  jax.distributed.initialize(**{k: v for k, v in kwargs.items()
                                if v is not None})
  logging.info('Process %d of %d; %d local / %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return cfg
