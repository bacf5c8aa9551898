"""Device mesh, logical-axis rules and sharding of states and batches.

t5x-style partitioning without t5x. Model code names the axes of its
parameters and activations with *logical* names ('embed', 'mlp', 'batch', ...);
`DEFAULT_LOGICAL_AXIS_RULES` maps them onto the three *mesh* axes
('data', 'fsdp', 'model'). Everything else here turns those names into
`NamedSharding`s for `jax.jit`.

Fallback (as in t5x): a mesh axis (or axis group) whose size does not divide
an array dimension is dropped for that dimension; for an axis group such as
('data', 'fsdp') the longest dividing prefix is kept. Small or odd-sized
tensors (a 1-wide scalar head, 1 kv head on 2 model shards) are thus
replicated instead of crashing.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from flax.core import spmd as core_spmd
from flax.linen import spmd as linen_spmd
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')
# Axes that together split the batch dimension (data parallel + FSDP).
BATCH_MESH_AXES = ('data', 'fsdp')

LogicalRules = Sequence[tuple[str, Any]]

# The one place where logical names meet mesh axes. Order matters: earlier
# rules win, and a mesh axis is used at most once per array (so an activation
# ('batch', 'length', 'embed') gets batch -> (data, fsdp) and embed -> None).
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_MESH_AXES),
    ('length', None),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv_heads', 'model'),
    ('kv', None),
    ('vocab', 'model'),
    ('layers', None),
    ('lora_rank', None),
    # KV cache [layers, batch, length, kv heads, head dim]: batch like the
    # activations, whole KV heads on the model axis.
    ('cache_batch', BATCH_MESH_AXES),
    ('cache_length', None),
    ('cache_heads', 'model'),
    ('cache_kv', None),
    # Activations: sharded like their parameter counterparts except the
    # feature dim, which stays whole on each device.
    ('activation_batch', BATCH_MESH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_mlp', 'model'),
    ('activation_heads', 'model'),
    ('activation_kv', None),
    ('activation_vocab', 'model'),
    # Sequence logits (RL / SFT log-probs): the vocabulary is split over the
    # batch-sharding axes too, and the small hidden chunk is gathered
    # instead, so the output weights (0.5 GiB at a 128k x 2048 bf16 table)
    # are never all-gathered whole onto each device.
    ('logits_batch', 'data'),
    ('logits_vocab', ('fsdp', 'model')),
)


# Mesh
# ------------------------------------------------------------------------------


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
  """Parses 'data=4,model=2' (or a mapping) into {axis: size}."""
  if isinstance(spec, str):
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(','))):
      m = re.fullmatch(r'(\w+)\s*[=:]\s*(-?\d+)', part)
      if not m:
        raise ValueError(
            f'Bad mesh spec {spec!r}: expected entries like "data=4", got'
            f' {part!r}.')
      if m.group(1) in out:
        raise ValueError(f'Bad mesh spec {spec!r}: axis {m.group(1)!r} twice.')
      out[m.group(1)] = int(m.group(2))
  else:
    out = {str(k): int(v) for k, v in spec.items()}
  unknown = sorted(set(out) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f'Bad mesh spec {spec!r}: unknown axis {unknown}; axes are'
        f' {list(MESH_AXES)}.')
  if sum(v == -1 for v in out.values()) > 1:
    raise ValueError(f'Bad mesh spec {spec!r}: at most one axis may be -1.')
  if any(v == 0 or v < -1 for v in out.values()):
    raise ValueError(f'Bad mesh spec {spec!r}: sizes must be >= 1 or -1.')
  return out


def create_mesh(
    spec: str | Mapping[str, int] = 'data=-1',
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """Builds a ('data', 'fsdp', 'model') mesh; absent axes get size 1.

  All three axes always exist so that the rules never name a missing axis.
  `-1` on one axis takes the remaining devices. Axis types are Auto (GSPMD
  propagation, t5x semantics), not Explicit.
  """
  sizes = parse_mesh_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  known = math.prod(v for v in sizes.values() if v != -1)
  for axis, v in sizes.items():
    if v == -1:
      if n % known:
        raise ValueError(
            f'Mesh spec {spec!r} cannot fill axis {axis!r}: {n} devices are'
            f' not divisible by {known}.')
      sizes[axis] = n // known
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  if math.prod(shape) != n:
    raise ValueError(
        f'Mesh spec {spec!r} needs {math.prod(shape)} devices'
        f' ({dict(zip(MESH_AXES, shape))}) but {n} are available; make the'
        ' product match or use -1 for one axis.')
  # jax.make_mesh lays devices out along the physical topology (TPU/GPU).
  return jax.make_mesh(
      shape, MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


# Logical -> mesh
# ------------------------------------------------------------------------------


def _mesh_shape(mesh) -> Mapping[str, int]:
  return dict(mesh.shape)


def _filter_rules(rules: LogicalRules, mesh) -> tuple[tuple[str, Any], ...]:
  """Drops mesh axes that this mesh lacks (a rule for 'fsdp' on a 2-D mesh)."""
  names = set(mesh.axis_names) if mesh is not None else None
  out = []
  for logical, target in rules:
    if names is not None and target is not None:
      group = (target,) if isinstance(target, str) else tuple(target)
      group = tuple(a for a in group if a in names)
      target = None if not group else (group[0] if len(group) == 1 else group)
    out.append((logical, target))
  return tuple(out)


def _fit_to_shape(spec: P, shape: Sequence[int] | None, mesh_shape,
                  units: Sequence[int] | None = None) -> P:
  """Applies the divisibility fallback described in the module docstring.

  `units` (aligned with the trailing dims of `shape`) makes a dim splittable
  only into whole units: a fused [embed, kv_heads * head_dim] kernel has
  unit head_dim on its last dim, so a 'model' axis larger than the KV-head
  count replicates it instead of cutting heads apart.
  """
  if shape is None:
    return spec
  units = tuple(units or ())
  units = (1,) * (len(shape) - len(units)) + units[-len(shape):] if units else (
      (1,) * len(shape))
  dims = []
  for i, axes in enumerate(spec):
    if axes is None or i >= len(shape):
      dims.append(axes)
      continue
    group = (axes,) if isinstance(axes, str) else tuple(axes)
    whole = shape[i] // units[i] if shape[i] % units[i] == 0 else shape[i]
    while group and whole % math.prod(mesh_shape[a] for a in group):
      group = group[:-1]
    dims.append(None if not group else (group[0] if len(group) == 1
                                        else group))
  return P(*dims)


def logical_to_mesh_axes(
    logical_axes: Sequence[str | None] | None,
    rules: LogicalRules | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    shape: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
) -> P:
  """Logical names -> mesh PartitionSpec (with fallback if `shape` given)."""
  if logical_axes is None:
    return P()
  rules = DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules
  if mesh is not None:
    rules = _filter_rules(rules, mesh)
  spec = linen_spmd.logical_to_mesh_axes(tuple(logical_axes), list(rules))
  if mesh is not None:
    spec = _fit_to_shape(spec, shape, _mesh_shape(mesh), units)
  return spec


def logical_to_mesh_sharding(
    pspec_tree: Any,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules | None = None,
) -> Any:
  """Tree of logical PartitionSpecs/tuples -> tree of NamedShardings."""
  return jax.tree.map(
      lambda s: NamedSharding(mesh, logical_to_mesh_axes(
          None if s is None else tuple(s), rules, mesh=mesh)),
      pspec_tree,
      is_leaf=lambda x: x is None or isinstance(x, (P, tuple)))


def _variable_logical_axes(v: nnx.Variable) -> tuple | None:
  names = v.get_metadata().get('out_sharding')
  return tuple(names) if names else None


def state_shardings(
    state: Any,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules | None = None,
) -> Any:
  """NamedSharding for every array in an nnx.State (real or abstract).

  Reads each Variable's `out_sharding` metadata (set by
  `nnx.with_partitioning`); un-annotated arrays are replicated. The result
  has the structure of `state` and can be passed to `jax.jit`'s
  in_shardings / out_shardings or to `jax.device_put`.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      spec = logical_to_mesh_axes(
          _variable_logical_axes(x), rules, mesh=mesh,
          shape=getattr(value, 'shape', None),
          units=x.get_metadata().get('shard_units'))
      return x.replace(NamedSharding(mesh, spec))
    if hasattr(x, 'shape'):
      return NamedSharding(mesh, P())
    return x
  return jax.tree.map(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: Any, mesh: jax.sharding.Mesh,
                rules: LogicalRules | None = None) -> Any:
  """Places an nnx.State (or any tree of annotated Variables) on the mesh."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def create_sharded_model(
    model_fn: Callable[[], Any],
    mesh: jax.sharding.Mesh,
    rules: LogicalRules | None = None,
) -> Any:
  """Builds `model_fn()` directly in its sharded layout (no host copy).

  The model is first traced abstractly to compute shardings, then created
  under `jax.jit(out_shardings=...)`, so a model larger than one device still
  fits. `model_fn` must create its own `nnx.Rngs` (it runs under jit).
  """
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(model_fn)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
      return nnx.split(model_fn())[1]

    with jax.set_mesh(mesh):
      state = init()
  return nnx.merge(graphdef, state)


# Batches
# ------------------------------------------------------------------------------


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim split over data+fsdp, other dims replicated."""
  axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names)
  if ndim == 0:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def data_shard_info(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(index, num_shards) of this process for the input pipeline.

  Like t5x's data layout: processes whose devices hold the same batch rows
  (model-parallel replicas across hosts) read the same shard.
  """
  n_rows = math.prod(mesh.shape[a] for a in BATCH_MESH_AXES
                     if a in mesh.axis_names)
  idx_map = batch_sharding(mesh).devices_indices_map((n_rows,))
  rows_by_process: dict[int, set[int]] = {}
  for device, index in idx_map.items():
    rows_by_process.setdefault(device.process_index, set()).add(
        index[0].start or 0)
  return _shard_info(rows_by_process, jax.process_index())


def _shard_info(rows_by_process: Mapping[int, set[int]],
                process_index: int) -> tuple[int, int]:
  """Processes holding the same batch rows form one input shard."""
  groups = sorted({tuple(sorted(r)) for r in rows_by_process.values()})
  return groups.index(tuple(sorted(rows_by_process[process_index]))), len(
      groups)


def shard_batch(batch: Mapping[str, Any],
                mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays split over data+fsdp.

  Each process passes only its own rows (those of `data_shard_info`); the
  global batch is local_batch * num_shards.
  """
  _, num_shards = data_shard_info(mesh)
  n_rows = math.prod(mesh.shape[a] for a in BATCH_MESH_AXES
                     if a in mesh.axis_names)
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    if local.ndim == 0:
      out[key] = jax.make_array_from_process_local_data(
          batch_sharding(mesh, 0), local, local.shape)
      continue
    global_shape = (local.shape[0] * num_shards,) + local.shape[1:]
    if global_shape[0] % n_rows:
      raise ValueError(
          f'Batch feature {key!r}: global batch size {global_shape[0]} (local'
          f' {local.shape[0]} x {num_shards} shards) is not divisible by the'
          f' {n_rows} data-parallel shards of mesh {dict(mesh.shape)}.')
    out[key] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, local.ndim), local, global_shape)
  return out


# Activations
# ------------------------------------------------------------------------------


def with_sharding_constraint(x: jax.Array,
                             logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation by logical names; no-op without mesh or rules.

  Model code calls this unconditionally, e.g.
  `x = with_sharding_constraint(x, ('batch', 'length', 'embed'))`; it only
  acts inside a `Partitioner` context (or `jax.set_mesh` +
  `nnx.logical_axis_rules`).
  """
  rules = core_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  spec = logical_to_mesh_axes(logical_axes, rules, mesh=mesh, shape=x.shape)
  if mesh.are_all_axes_explicit:
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


# Partitioner
# ------------------------------------------------------------------------------


class Partitioner:
  """Mesh + logical rules, and the jit / sharding helpers that use them.

  As a context manager it activates the mesh (`jax.set_mesh`) and the rules
  (`nnx.logical_axis_rules`), and turns off flax's eager variable sharding so
  that all placement goes through `state_shardings` (whose fallback handles
  non-divisible dims that eager sharding would crash on).
  """

  def __init__(self, mesh: jax.sharding.Mesh | str | Mapping[str, int] = (
      'data=-1'), rules: LogicalRules | None = None):
    self.mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else create_mesh(
        mesh)
    self.rules = tuple(DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules)
    self._stack: list[contextlib.ExitStack] = []

  def __repr__(self):
    return f'Partitioner(mesh={dict(self.mesh.shape)})'

  @contextlib.contextmanager
  def activate(self):
    with contextlib.ExitStack() as stack:
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nnx.logical_axis_rules(self.rules))
      stack.enter_context(nnx.use_eager_sharding(False))
      yield self

  def __enter__(self):
    stack = contextlib.ExitStack()
    stack.enter_context(self.activate())
    self._stack.append(stack)
    return self

  def __exit__(self, *exc):
    return self._stack.pop().__exit__(*exc)

  # Sharding helpers bound to this mesh and rules.
  def state_shardings(self, state):
    return state_shardings(state, self.mesh, self.rules)

  def shard_state(self, state):
    return shard_state(state, self.mesh, self.rules)

  def create_sharded_model(self, model_fn):
    return create_sharded_model(model_fn, self.mesh, self.rules)

  def batch_sharding(self, ndim: int = 1):
    return batch_sharding(self.mesh, ndim)

  def shard_batch(self, batch):
    return shard_batch(batch, self.mesh)

  def data_shard_info(self):
    return data_shard_info(self.mesh)

  def logical_sharding(self, logical_axes, shape=None) -> NamedSharding:
    return NamedSharding(self.mesh, logical_to_mesh_axes(
        logical_axes, self.rules, mesh=self.mesh, shape=shape))

  def jit(self, fn: Callable, *, in_shardings=None, out_shardings=None,
          donate_argnums=(), static_argnums=None, static_argnames=None):
    """`jax.jit` whose traces and calls run inside this partitioner's context.

    Shardings are trees of NamedSharding (e.g. from `state_shardings`) or
    None for "let XLA decide". Returns a callable with `.lower` and
    `.jitted` (the raw jax.jit object, e.g. for `_cache_size()`).
    """
    kwargs = dict(donate_argnums=donate_argnums,
                  static_argnums=static_argnums,
                  static_argnames=static_argnames)
    if in_shardings is not None:
      kwargs['in_shardings'] = in_shardings
    if out_shardings is not None:
      kwargs['out_shardings'] = out_shardings
    jitted = jax.jit(fn, **kwargs)

    @functools.wraps(fn)
    def call(*args, **kw):
      with self.activate():
        return jitted(*args, **kw)

    def lower(*args, **kw):
      with self.activate():
        return jitted.lower(*args, **kw)

    call.lower = lower
    call.jitted = jitted
    return call


def log_state_shardings(state, mesh, rules=None) -> None:
  """Logs each parameter's shape and mesh spec (like t5x's param table)."""
  shardings = state_shardings(state, mesh, rules)
  for path, s in jax.tree_util.tree_leaves_with_path(shardings):
    logging.info('%s: %s', jax.tree_util.keystr(path), s.spec)
