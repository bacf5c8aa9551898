"""Model architecture: transformer, LoRA adapters, heads."""

from flax import nnx

# Parameters carry logical axis names that only perl/partitioning.py can map to
# a mesh; creating them must not try to shard eagerly (the partitioner creates
# sharded models by jitting the constructor with out_shardings instead).
nnx.use_eager_sharding(False)
