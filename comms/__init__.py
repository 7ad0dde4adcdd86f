"""Relaxed communication for data-parallel training, written as `jax.shard_map` collectives.

Importable on its own: nothing here imports the model code. `comms.get(name, **options)` builds an algorithm.
Importing the package registers every algorithm (each module registers its own with `comms.api.register`).
"""

from comms import centralized, decentralized, diloco, local_sgd, onebit_adam, powersgd
from comms.api import (
    ALGORITHMS,
    CommAlgorithm,
    add_replica_dim,
    apply_gradients,
    get,
    pmean,
    psum,
    register,
    replicate,
    strip_replica_dim,
)
from comms.wire import wire_bytes, wire_bytes_by_axes

__all__ = [
    "ALGORITHMS",
    "CommAlgorithm",
    "add_replica_dim",
    "apply_gradients",
    "centralized",
    "decentralized",
    "diloco",
    "get",
    "local_sgd",
    "onebit_adam",
    "pmean",
    "powersgd",
    "psum",
    "register",
    "replicate",
    "strip_replica_dim",
    "wire_bytes",
    "wire_bytes_by_axes",
]
