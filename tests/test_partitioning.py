"""Mesh, rules and sharding on 8 fake CPU devices (see conftest.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P

from perl import partitioning as pt


def _w(names):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class MLP(nnx.Module):
  """Toy 2-layer MLP with logical names on params and activations."""

  def __init__(self, rngs, d=16, h=32):
    self.l1 = nnx.Linear(d, h, kernel_init=_w(('embed', 'mlp')),
                         bias_init=nnx.with_partitioning(
                             nnx.initializers.normal(0.1), ('mlp',)),
                         rngs=rngs)
    self.l2 = nnx.Linear(h, d, kernel_init=_w(('mlp', 'embed')), rngs=rngs)
    # 3x5 divides neither fsdp=2 nor model=2: must fall back to replication.
    self.odd = nnx.Param(jnp.ones((3, 5)), out_sharding=('embed', 'mlp'))

  def __call__(self, x):
    h = jax.nn.gelu(self.l1(x))
    h = pt.with_sharding_constraint(h, ('batch', 'mlp'))
    y = self.l2(h) + self.odd[0, 0]
    return pt.with_sharding_constraint(y, ('batch', 'embed'))


def _make_mlp():
  with nnx.use_eager_sharding(False):
    return MLP(nnx.Rngs(0))


def test_create_mesh_from_spec():
  mesh = pt.create_mesh('data=4,model=2')
  assert mesh.axis_names == ('data', 'fsdp', 'model')
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'model': 2}
  mesh = pt.create_mesh('data=2,fsdp=2,model=2')
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'model': 2}
  mesh = pt.create_mesh({'data': -1, 'model': 4})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 1, 'model': 4}
  assert pt.create_mesh('fsdp=-1').shape['fsdp'] == 8
  mesh = pt.create_mesh('data=2', devices=jax.devices()[:2])
  assert mesh.devices.size == 2


@pytest.mark.parametrize('spec, match', [
    ('data=4,model=4', r"'data=4,model=4' needs 16 devices .* but 8"),
    ('data=3,model=-1', r'8 devices are not divisible by 3'),
    ('batch=8', r"unknown axis \['batch'\]"),
    ('data=-1,model=-1', r'at most one axis'),
    ('data4', r'expected entries like'),
])
def test_create_mesh_errors_name_the_spec(spec, match):
  with pytest.raises(ValueError, match=match):
    pt.create_mesh(spec)


def test_rules_mapping():
  rules = pt.DEFAULT_LOGICAL_AXIS_RULES
  assert pt.logical_to_mesh_axes(('embed', 'mlp'), rules) == P('fsdp', 'model')
  assert pt.logical_to_mesh_axes(('layers', 'embed', 'heads', 'kv'), rules) == (
      P(None, 'fsdp', 'model', None))
  assert pt.logical_to_mesh_axes(('vocab', 'embed'), rules) == P('model', 'fsdp')
  assert pt.logical_to_mesh_axes(('embed', 'lora_rank'), rules) == P('fsdp', None)
  # A mesh axis is used once per array: batch takes fsdp, so embed gets none.
  assert pt.logical_to_mesh_axes(('batch', 'length', 'embed'), rules) == (
      P(('data', 'fsdp'), None, None))
  # Divisibility fallback: keep the longest dividing prefix of a group.
  mesh = pt.create_mesh('data=2,fsdp=2,model=2')
  assert pt.logical_to_mesh_axes(
      ('batch', 'mlp'), rules, mesh=mesh, shape=(6, 3)) == P('data', None)
  assert pt.logical_to_mesh_axes(
      ('batch', 'mlp'), rules, mesh=mesh, shape=(8, 4)) == P(
          ('data', 'fsdp'), 'model')
  shardings = pt.logical_to_mesh_sharding(
      {'a': P('embed', 'mlp'), 'b': None}, mesh)
  assert shardings['a'].spec == P('fsdp', 'model')
  assert shardings['b'].spec == P()


def test_state_gets_sharded():
  mesh = pt.create_mesh('data=2,fsdp=2,model=2')
  _, state = nnx.split(_make_mlp())
  sharded = pt.shard_state(state, mesh)
  assert sharded['l1']['kernel'][...].sharding.spec == P('fsdp', 'model')
  assert sharded['l1']['bias'][...].sharding.spec == P('model')
  assert sharded['l2']['kernel'][...].sharding.spec == P('model', 'fsdp')
  assert sharded['l2']['bias'][...].sharding.spec == P()
  assert sharded['odd'][...].sharding.spec == P(None, None)
  # Really split: each device holds a 16/2 x 32/2 block of l1's kernel.
  kernel = sharded['l1']['kernel'][...]
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 16)}
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(state['l1']['kernel'][...]))
  # Abstract states give the same shardings without allocating.
  abstract = nnx.split(nnx.eval_shape(_make_mlp))[1]
  abs_sh = pt.state_shardings(abstract, mesh)
  assert abs_sh['l1']['kernel'].get_value().spec == P('fsdp', 'model')


def test_create_sharded_model_matches_host_init():
  partitioner = pt.Partitioner('data=2,fsdp=2,model=2')
  model = partitioner.create_sharded_model(_make_mlp)
  assert model.l1.kernel[...].sharding.spec == P('fsdp', 'model')
  np.testing.assert_allclose(np.asarray(model.l1.kernel[...]),
                             np.asarray(_make_mlp().l1.kernel[...]))


def _loss(graphdef, state, x):
  y = nnx.merge(graphdef, state)(x)
  return jnp.mean(jnp.square(y - 1.0))


def test_sharded_forward_backward_matches_single_device():
  graphdef, state = nnx.split(_make_mlp())
  x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(_loss, argnums=1),
                                static_argnums=0)(graphdef, state, x)

  partitioner = pt.Partitioner('data=2,fsdp=2,model=2')
  shardings = partitioner.state_shardings(state)
  step = partitioner.jit(
      lambda s, b: jax.value_and_grad(_loss, argnums=1)(graphdef, s, b['x']),
      in_shardings=(shardings, {'x': partitioner.batch_sharding(2)}),
      out_shardings=(None, shardings))
  loss, grads = step(partitioner.shard_state(state),
                     partitioner.shard_batch({'x': x}))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5,
                               atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert grads['l1']['kernel'][...].sharding.spec == P('fsdp', 'model')
  # The activation constraints are in the jitted graph, with the mesh axes
  # the rules give: h ('batch', 'mlp') and y ('batch', 'embed').
  hlo = step.lower(partitioner.shard_state(state),
                   partitioner.shard_batch({'x': x})).as_text()
  assert _constraints(hlo) >= {
      ('[{"data", "fsdp"}, {"model"}]', 'tensor<8x32xf32>'),
      ('[{"data", "fsdp"}, {}]', 'tensor<8x16xf32>')}, _constraints(hlo)


def _constraints(stablehlo_text):
  """{(mesh axes per dim, tensor type)} of the sdy.sharding_constraint ops."""
  return set(re.findall(
      r'sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : (tensor<[^>]*>)',
      stablehlo_text))


def test_sharding_constraints_vanish_without_with_sharding_constraint(
    monkeypatch):
  """The check above sees the constraints, not shardings of the arguments."""
  graphdef, state = nnx.split(_make_mlp())
  partitioner = pt.Partitioner('data=2,fsdp=2,model=2')
  shardings = partitioner.state_shardings(state)
  x = {'x': np.zeros((8, 16), np.float32)}

  def lowered():
    step = partitioner.jit(
        lambda s, b: _loss(graphdef, s, b['x']),
        in_shardings=(shardings, {'x': partitioner.batch_sharding(2)}))
    return step.lower(partitioner.shard_state(state),
                      partitioner.shard_batch(x)).as_text()

  assert _constraints(lowered())
  monkeypatch.setattr(pt, 'with_sharding_constraint', lambda x, axes: x)
  assert not _constraints(lowered())


def test_with_sharding_constraint_noop_outside_context():
  x = jnp.ones((8, 4))
  assert pt.with_sharding_constraint(x, ('batch', 'embed')) is x
  # Rules alone (no mesh) are still a no-op.
  with nnx.logical_axis_rules(pt.DEFAULT_LOGICAL_AXIS_RULES):
    assert pt.with_sharding_constraint(x, ('batch', 'embed')) is x


def test_with_sharding_constraint_inside_partitioner():
  partitioner = pt.Partitioner('data=4,model=2')
  f = partitioner.jit(
      lambda x: pt.with_sharding_constraint(x * 2, ('batch', 'mlp')))
  y = f(jnp.ones((8, 6)))
  assert y.sharding.spec == P('data', 'model')
  np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 6)))


def test_shard_batch_global_shape_and_sharding():
  mesh = pt.create_mesh('data=4,model=2')
  batch = {'tokens': np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
           'weight': np.float32(2.0)}
  out = pt.shard_batch(batch, mesh)
  assert out['tokens'].shape == (8, 5)
  assert out['tokens'].sharding.spec == P(('data', 'fsdp'), None)
  # Each data shard holds 2 rows, replicated across the model axis.
  assert {s.data.shape for s in out['tokens'].addressable_shards} == {(2, 5)}
  np.testing.assert_array_equal(np.asarray(out['tokens']), batch['tokens'])
  assert out['weight'].shape == () and float(out['weight']) == 2.0
  assert pt.data_shard_info(mesh) == (0, 1)
  with pytest.raises(ValueError, match=r"'tokens'.*not divisible by the 4"):
    pt.shard_batch({'tokens': np.zeros((6, 5))}, mesh)


def test_donation_deletes_input():
  partitioner = pt.Partitioner('data=8')
  sharding = partitioner.batch_sharding(2)
  x = jax.device_put(jnp.ones((8, 4)), sharding)
  f = partitioner.jit(lambda a: a + 1, in_shardings=(sharding,),
                      out_shardings=sharding, donate_argnums=(0,))
  y = f(x)
  assert x.is_deleted()
  assert not y.is_deleted()
  np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))


def test_partitioner_context_activates_mesh_and_rules():
  partitioner = pt.Partitioner('data=2,model=4')
  with partitioner:
    assert dict(jax.sharding.get_abstract_mesh().shape) == {
        'data': 2, 'fsdp': 1, 'model': 4}
    assert tuple(core_spmd.get_logical_axis_rules()) == (
        pt.DEFAULT_LOGICAL_AXIS_RULES)
  assert jax.sharding.get_abstract_mesh().empty
  assert not core_spmd.get_logical_axis_rules()


def test_data_shard_info_groups_processes_by_batch_rows():
  # 4 hosts, model parallelism across host pairs: 0/1 and 2/3 share rows.
  rows = {0: {0, 1}, 1: {0, 1}, 2: {2, 3}, 3: {2, 3}}
  assert [pt._shard_info(rows, p) for p in range(4)] == [
      (0, 2), (0, 2), (1, 2), (1, 2)]
  # Pure data parallelism: every host its own shard.
  rows = {0: {0}, 1: {1}, 2: {2}}
  assert [pt._shard_info(rows, p) for p in range(3)] == [(0, 3), (1, 3), (2, 3)]


def test_partitioner_jit_compiles_once_per_shape():
  partitioner = pt.Partitioner('data=8')
  traces = []

  def f(x):
    traces.append(x.shape)
    return pt.with_sharding_constraint(x * 2, ('batch', 'embed'))

  step = partitioner.jit(f, in_shardings=(partitioner.batch_sharding(2),))
  for _ in range(3):
    step(partitioner.shard_batch({'x': np.ones((8, 4), np.float32)})['x'])
  assert traces == [(8, 4)]
  step(partitioner.shard_batch({'x': np.ones((16, 4), np.float32)})['x'])
  assert traces == [(8, 4), (16, 4)]
  assert step.jitted._cache_size() == 2
