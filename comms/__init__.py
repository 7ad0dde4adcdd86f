"""Relaxed communication for data-parallel training, written as `jax.shard_map` collectives.

Importable on its own: nothing here imports the model code. `comms.get(name, **options)` builds an algorithm.
"""

from comms.api import (
    ALGORITHMS,
    CommAlgorithm,
    add_replica_dim,
    apply_gradients,
    pmean,
    psum,
    get,
    register,
    replicate,
    strip_replica_dim,
)
import comms.decentralized  # noqa: E402,F401  (registers decentralized, low_precision_decentralized)
import comms.local_sgd  # noqa: E402,F401  (registers local_sgd)
import comms.centralized  # noqa: E402,F401  (registers bytegrad, onebit, hierarchical)
import comms.onebit_adam  # noqa: E402,F401  (registers onebit_adam, qadam)
from comms.wire import wire_bytes  # noqa: E402
