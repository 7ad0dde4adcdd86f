"""Joining a multi-process run: the environment a launcher sets, or JAX's own cluster detection.

`launch.local_cluster` (several processes on one host, over gloo) gives every child its rank, the process count
and the coordinator address in the METASTONE_* variables below; on TPU pods and SLURM clusters
`jax.distributed.initialize()` finds the cluster by itself (the entry points' --distributed).
"""

from __future__ import annotations

import os

import jax

# The launcher's side of this protocol is launch/local_cluster.py (which imports nothing of this package).
COORDINATOR_ENV = "METASTONE_COORDINATOR"
NUM_PROCESSES_ENV = "METASTONE_NUM_PROCESSES"
PROCESS_ID_ENV = "METASTONE_PROCESS_ID"


def initialize_from_env(auto_detect: bool = False) -> tuple[int, int]:
    """Joins the cluster described by the launcher's environment variables; returns (process_id, num_processes).

    Outside a launch (no variables) it returns (0, 1), or with `auto_detect` joins through
    `jax.distributed.initialize()`, which finds TPU pod and SLURM clusters by itself.
    """
    if COORDINATOR_ENV not in os.environ:
        if not auto_detect:
            return 0, 1
        jax.distributed.initialize()
        return jax.process_index(), jax.process_count()
    process_id, num_processes = int(os.environ[PROCESS_ID_ENV]), int(os.environ[NUM_PROCESSES_ENV])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ[COORDINATOR_ENV], num_processes=num_processes, process_id=process_id
    )
    return process_id, num_processes
