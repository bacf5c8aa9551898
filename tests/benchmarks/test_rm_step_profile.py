"""benchmarks/rm_step_profile.py's accounting: dot FLOPs per XLA op, wall unions."""
import jax
import jax.numpy as jnp


def test_dot_flops_counts_each_compiled_dot_op(profile):
  # Two dots of different sizes, one batched: FLOPs = 2 x result x contracted.
  def f(x, w, a, b):
    return jax.nn.silu(x @ w).sum() + jnp.einsum("bij,bjk->bik", a, b).sum()
  args = (jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((3, 8, 5)), jnp.ones((3, 5, 7)))
  ops = profile._dot_flops(jax.jit(f).lower(*args).compile().as_text())  # pylint: disable=protected-access
  top = sorted(set(ops.values()))
  assert top == [2.0 * 3 * 8 * 7 * 5, 2.0 * 64 * 16 * 32]


def test_union_counts_overlapping_ops_once(profile):
  events = [dict(ts=0, dur=10), dict(ts=5, dur=10), dict(ts=30, dur=5), dict(ts=31, dur=1)]
  assert profile._union_us(events) == 20  # pylint: disable=protected-access


def test_dots_alone_and_beside_another_op(profile):
  flops = {"big": 2e9}
  ops = [dict(name="big", ts=0, dur=100), dict(name="small", ts=200, dur=20),
         dict(name="big", ts=150, dur=100)]
  solo, shared = profile._dot_rates_by_overlap(ops, flops)  # pylint: disable=protected-access
  assert solo == [1, 0.1, 2e9] and shared == [1, 0.1, 2e9]
