"""Projections with named LoRA adapters over one frozen kernel.

Each adapter is Flax's own `nnx.LoRA` (its parameters are `nnx.LoRAParam`, so
`nnx.LoRAParam` selects the trainable set). `nnx.LoRA` falls short in two
places, handled here: it has no alpha/rank scaling and no input dropout, and
one `nnx.LoRALinear` carries a single adapter, while Hydra-RLHF needs several
named adapters (policy, value, reward) over the same base kernel. So a
`LoRADense` holds the base kernel once plus an `nnx.Dict` of adapters, and the
caller names the adapter per call; `adapter=None` runs the bare base.

The update (alpha/r)·x·A·B runs through `lora_delta`, a custom VJP: autodiff
transposes each projection's [tokens, out] cotangent to form dB, where the
hand-written backward contracts the saved [tokens, r] activations instead
(at benchmarks/rm_step_profile.py's peer shape, autodiff's form costs 16 such
transposes, 142 ms of a 2.3 s CPU reward-model step).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from perl.models.config import LoRAConfig

Axes = tuple[str | None, str | None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """scale · (x @ a) @ b, x [..., in], a [in, r], b [r, out], one dtype."""
  return _lora_delta_forward(x, a, b, scale)[0]


def _lora_delta_forward(x, a, b, scale):
  h = (x @ a) * jnp.asarray(scale, x.dtype)  # [..., r]: what dB needs
  return h @ b, (x, a, b, h)


def _lora_delta_backward(scale, residuals, g):
  x, a, b, h = residuals
  lead = "".join(chr(ord("a") + i) for i in range(x.ndim - 1))
  gb = (g @ b.T) * jnp.asarray(scale, g.dtype)   # [..., r]
  db = jnp.einsum(f"{lead}r,{lead}o->ro", h, g)
  da = jnp.einsum(f"{lead}i,{lead}r->ir", x, gb)
  return gb @ a.T, da, db


lora_delta.defvjp(_lora_delta_forward, _lora_delta_backward)


class LoRADense(nnx.Module):
  """y = x W (+ b) [+ (alpha/r) · dropout(x) A B for the named adapter]."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      name: str,
      axes: Axes,
      adapters: Mapping[str, LoRAConfig],
      use_bias: bool = False,
      head_dim: int | None = None,
      param_dtype: Any = jnp.float32,
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.name = name
    self.dtype = dtype
    # A fused heads dim ("heads"/"kv_heads" x head_dim) shards in whole heads
    # only (perl/partitioning.py's `shard_units`).
    units = {}
    if head_dim:
      head_axis = 1 if axes[1] in ("heads", "kv_heads") else 0
      units = {"shard_units": (head_dim, 1) if head_axis == 0 else (1, head_dim)}
    out_units = {"shard_units": (1, head_dim)} if units and head_axis == 1 else {}
    kernel_init = nnx.with_partitioning(
        nnx.initializers.lecun_normal(), axes, **units
    )
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    )
    self.bias = (
        nnx.Param(
            nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],),
                                  **({"shard_units": (head_dim,)} if out_units else {}))(
                rngs.params(), (out_features,), param_dtype
            )
        )
        if use_bias
        else None
    )
    lora = {}
    hyper = []
    for adapter_name, cfg in adapters.items():
      if name not in cfg.targets:
        continue
      # Adapters train in float32 whatever the base dtype: they are small and
      # bf16 updates of a zero-initialised B lose most of their bits.
      lora[adapter_name] = nnx.LoRA(
          in_features,
          cfg.rank,
          out_features,
          dtype=dtype,
          param_dtype=jnp.float32,
          a_metadata={"out_sharding": (axes[0], "lora_rank"),
                      **({"shard_units": (head_dim, 1)} if units and not out_units else {})},
          b_metadata={"out_sharding": ("lora_rank", axes[1]), **out_units},
          rngs=rngs,
      )
      hyper.append((adapter_name, cfg.scale, cfg.dropout))
    self.lora = nnx.Dict(lora)
    # (name, scale, dropout) triples; a tuple so the graph stays hashable.
    self.hyper = tuple(hyper)

  def has_adapter(self, adapter: str | None) -> bool:
    return adapter is not None and adapter in self.lora

  def __call__(
      self,
      x: jax.Array,
      *,
      adapter: str | None = None,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if not self.has_adapter(adapter):
      return y
    scale, rate = next((s, r) for n, s, r in self.hyper if n == adapter)
    if rate > 0.0 and dropout_rng is not None:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, x.shape)
      x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    lora = self.lora[adapter]
    x, a, b = lora.promote_dtype((x, lora.lora_a[...], lora.lora_b[...]),
                                 dtype=lora.dtype)
    return y + lora_delta(x, a, b, float(scale))

  def merged_kernel(self, adapter: str) -> jax.Array:
    """W + (alpha/r)·A·B in the kernel's dtype (leading 'layers' axis kept)."""
    scale = next(s for n, s, _ in self.hyper if n == adapter)
    a = self.lora[adapter].lora_a[...]
    b = self.lora[adapter].lora_b[...]
    delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
    kernel = self.kernel[...]
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def lora_dense_layers(model: nnx.Module):
  """All LoRADense submodules of `model`."""
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRADense)]


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
  names = set()
  for layer in lora_dense_layers(model):
    names.update(layer.lora.keys())
  return tuple(sorted(names))


def merge_adapter(model: nnx.Module, adapter: str) -> nnx.Module:
  """A copy of `model` whose base kernels include `adapter` (others untouched).

  Running the copy with `adapter=None` equals running `model` with the adapter;
  use it for export or for sampling without the low-rank matmuls.
  """
  if adapter not in adapter_names(model):
    raise ValueError(
        f"No adapter named {adapter!r}; the model has {adapter_names(model)}."
    )
  merged = nnx.clone(model)
  for layer in lora_dense_layers(merged):
    if layer.has_adapter(adapter):
      layer.kernel[...] = layer.merged_kernel(adapter)
  return merged


def adapter_filter(adapter: str | None = None) -> nnx.filterlib.Filter:
  """Selects the LoRA parameters of one adapter (all adapters when None)."""
  if adapter is None:
    return nnx.LoRAParam
  return nnx.All(nnx.LoRAParam, nnx.PathContains(adapter))


def count_params(state: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state))


def trainable_summary(model: nnx.Module, trainable: nnx.filterlib.Filter) -> str:
  """'trainable 12,288 of 1,234,567 parameters (0.995%)'."""
  _, trainable_state, rest = nnx.split(model, trainable, ...)
  n_train = count_params(trainable_state)
  n_total = n_train + count_params(rest)
  return (
      f"trainable {n_train:,} of {n_total:,} parameters "
      f"({100.0 * n_train / max(n_total, 1):.3f}%)"
  )
