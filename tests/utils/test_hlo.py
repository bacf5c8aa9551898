"""perl.utils.hlo.hbm_bytes: HBM traffic by memory space, windows and trip counts."""

import jax
import jax.numpy as jnp
import pytest

from perl.utils import hlo

# A TPU-style program (the shapes and layouts XLA:TPU prints): a 2048x2048
# bf16 weight (8 MiB) prefetched into VMEM (S(1)) in four async slices, a
# fusion reading one row of a table through a dynamic-slice, an in-place
# cache update, and a 3-trip while loop whose body reads a VMEM operand and
# writes 4 KiB to HBM.
TPU_HLO = """\
HloModule m

%gather_row (p0: bf16[1024,2048], p1: s32[]) -> bf16[1,2048] {
  %p0 = bf16[1024,2048]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s32[]{:T(128)} parameter(1)
  %c = s32[]{:T(128)} constant(0)
  ROOT %ds = bf16[1,2048]{1,0:T(2,128)(2,1)} dynamic-slice(%p0, %p1, %c), dynamic_slice_sizes={1,2048}
}

%update (q0: bf16[4,1024,64], q1: bf16[4,1,64], q2: s32[]) -> bf16[4,1024,64] {
  %q0 = bf16[4,1024,64]{2,1,0:T(8,128)(2,1)} parameter(0)
  %q1 = bf16[4,1,64]{2,1,0:T(2,128)(2,1)} parameter(1)
  %q2 = s32[]{:T(128)} parameter(2)
  %z = s32[]{:T(128)} constant(0)
  ROOT %dus = bf16[4,1024,64]{2,1,0:T(8,128)(2,1)} dynamic-update-slice(%q0, %q1, %z, %q2, %z)
}

%body (b0: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %b0 = (s32[]{:T(128)}, f32[1024]{0:T(1024)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%b0), index=0
  %v = f32[1024]{0:T(1024)} get-tuple-element(%b0), index=1
  %vm = f32[1024]{0:T(1024)S(1)} copy(%v)
  %out = f32[1024]{0:T(1024)} negate(%vm)
  ROOT %t = (s32[]{:T(128)}, f32[1024]{0:T(1024)}) tuple(%i, %out)
}

%cond (c0: (s32[], f32[1024])) -> pred[] {
  %c0 = (s32[]{:T(128)}, f32[1024]{0:T(1024)}) parameter(0)
  ROOT %lt = pred[]{:T(512)} constant(true)
}

ENTRY %main (w: bf16[2048,2048], table: bf16[1024,2048], row: s32[], cache: bf16[4,1024,64], kv: bf16[4,1,64], x: f32[1024]) -> bf16[1,2048] {
  %w = bf16[2048,2048]{1,0:T(8,128)(2,1)} parameter(0)
  %table = bf16[1024,2048]{1,0:T(8,128)(2,1)} parameter(1)
  %row = s32[]{:T(128)} parameter(2)
  %cache = bf16[4,1024,64]{2,1,0:T(8,128)(2,1)} parameter(3)
  %kv = bf16[4,1,64]{2,1,0:T(2,128)(2,1)} parameter(4)
  %x = f32[1024]{0:T(1024)} parameter(5)
  %ss0 = ((bf16[2048,2048]{1,0:T(8,128)(2,1)}), bf16[512,2048]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:512], [0:2048]}
  %ss1 = ((bf16[2048,2048]{1,0:T(8,128)(2,1)}), bf16[512,2048]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[512:1024], [0:2048]}
  %ss2 = ((bf16[2048,2048]{1,0:T(8,128)(2,1)}), bf16[512,2048]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[1024:1536], [0:2048]}
  %ss3 = ((bf16[2048,2048]{1,0:T(8,128)(2,1)}), bf16[512,2048]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[1536:2048], [0:2048]}
  %sd0 = bf16[512,2048]{1,0:T(8,128)(2,1)S(1)} slice-done(%ss0)
  %sd1 = bf16[512,2048]{1,0:T(8,128)(2,1)S(1)} slice-done(%ss1)
  %sd2 = bf16[512,2048]{1,0:T(8,128)(2,1)S(1)} slice-done(%ss2)
  %sd3 = bf16[512,2048]{1,0:T(8,128)(2,1)S(1)} slice-done(%ss3)
  %g = bf16[1,2048]{1,0:T(2,128)(2,1)S(1)} fusion(%table, %row), kind=kLoop, calls=%gather_row
  %new_cache = bf16[4,1024,64]{2,1,0:T(8,128)(2,1)} fusion(%cache, %kv, %row), kind=kLoop, calls=%update
  %zero = s32[]{:T(128)} constant(0)
  %init = (s32[]{:T(128)}, f32[1024]{0:T(1024)}) tuple(%zero, %x)
  %loop = (s32[]{:T(128)}, f32[1024]{0:T(1024)}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = bf16[1,2048]{1,0:T(2,128)(2,1)} copy(%g)
}
"""


def test_hbm_bytes_counts_hbm_once_per_window_and_per_trip():
  weight = 2048 * 2048 * 2        # read once over its four VMEM slices
  row = 2048 * 2 + 4              # one table row (and its index), into VMEM
  update = 2 * (4 * 1 * 64 * 2) + 4  # kv read, written in place (not the cache)
  loop = 3 * (1024 * 4 + 1024 * 4)  # per trip: read v (HBM), write out (HBM)
  result = 2048 * 2               # the ROOT copy writes HBM (its operand is VMEM)
  assert hlo.hbm_bytes(TPU_HLO) == weight + row + update + loop + result
  by_op = {i.name: n for i, n in hlo.hbm_traffic(TPU_HLO)}
  assert by_op["ss0"] == 512 * 2048 * 2 and "sd0" not in by_op
  assert by_op["new_cache"] == update


def test_hbm_bytes_rejects_a_loop_without_a_trip_count():
  text = TPU_HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
  with pytest.raises(ValueError, match="known trip count"):
    hlo.hbm_bytes(text)


def test_hbm_bytes_of_a_compiled_scan_is_linear_in_layers_and_reads_one_layer_each():
  """On a real (XLA:CPU, all-HBM) program: a layer loop reads one layer's weight
  per trip, not the stacked weights (what counting whole operands would give)."""
  d, rows = 256, 64

  def traffic(layers):
    def f(x, w):
      return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]
    text = jax.jit(f).lower(jnp.ones((rows, d)), jnp.ones((layers, d, d))).compile().as_text()
    return hlo.hbm_bytes(text)

  t3, t6, t12 = traffic(3), traffic(6), traffic(12)
  per_layer = (t12 - t6) / 6
  assert t12 - t6 == 2 * (t6 - t3)
  layer_weight, activations = d * d * 4, rows * d * 4
  # One window read of the layer's weight (plus the dot reading it) and a few
  # activation passes; the whole stack would be 12x the weight per trip.
  assert 2 * layer_weight <= per_layer <= 3 * layer_weight + 8 * activations
