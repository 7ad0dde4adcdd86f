"""Relaxed communication for data-parallel training, written as `jax.shard_map` collectives.

Importable on its own: nothing here imports the model code. `comms.get(name, **options)` builds an algorithm.
"""

from comms.api import (
    ALGORITHMS,
    CommAlgorithm,
    add_replica_dim,
    apply_gradients,
    get,
    register,
    replicate,
    strip_replica_dim,
)
