"""The one interface every relaxed-communication algorithm implements.

A train step runs as a `jax.shard_map` that is manual over the replica axis (default `data`) and leaves
`fsdp`/`tensor` to the compiler. Inside it every replica sees its own gradients, parameters and algorithm
state *without* the replica dimension, and calls, in order:

    params, state = algorithm.mix_parameters(params, state, step)         # before the optimizer (gossip)
    grads, state = algorithm.reduce_gradients(grads, state, step)        # before the optimizer
    updates, opt_state = tx.update(grads, opt_state, params)              # tx = algorithm.optimizer(...)
    params = optax.apply_updates(params, updates)
    params, state = algorithm.sync_parameters(params, state, step)        # after the optimizer

An algorithm whose optimizer switches code paths over time (1-bit Adam's warm-up, then compressed momenta)
names them with `phase(update)`. A caller that knows how many updates its optimizer has taken compiles one step
per phase and passes it on (`apply_gradients(..., phase=...)`): the step then holds only that path. Without it
the switch is a `lax.cond` on the optimizer's count, whose outputs XLA cannot write in place: for 1-bit Adam
extra temporaries of a few times the parameters' bytes, filled and copied out every step (BENCHMARKS.md).

Outside the shard_map every per-replica leaf (parameters, optimizer state, algorithm state) carries a
leading replica dimension sharded over the replica axis, so that algorithms that let replicas differ
(decentralized, local SGD, error-feedback buffers) and those that keep them bit-identical share one layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

PyTree = Any

ALGORITHMS: dict[str, type[CommAlgorithm]] = {}


def _axes_and_replicas(axis_names: str | tuple[str, ...]) -> tuple[tuple[str, ...], int]:
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    return names, math.prod(jax.lax.axis_size(name) for name in names)


def psum(tree: PyTree, axis_names: str | tuple[str, ...]) -> PyTree:
    """`jax.lax.psum` inside a shard_map, written so that it also compiles over axes that hold one replica.

    Inside a shard_map manual over a one-device axis while other mesh axes stay automatic (`mesh.data=1
    mesh.fsdp=8`), XLA rejects an all-reduce of any non-scalar ("Cross-partition allreduce must be in (partial)
    manual partitioning mode"). A sum over one replica is its value; a tiled all-gather over that axis
    returns it unchanged, and with `to="invarying"` it is typed as the same on every replica, as a psum's result.
    """
    names, replicas = _axes_and_replicas(axis_names)
    if replicas > 1:
        return jax.lax.psum(tree, names)
    return jax.tree.map(
        lambda x: (
            jax.lax.psum(x, names) if jnp.ndim(x) == 0 else jax.lax.all_gather(x, names, tiled=True, to="invarying")
        ),
        tree,
    )


def pmean(tree: PyTree, axis_names: str | tuple[str, ...]) -> PyTree:
    """`jax.lax.pmean` that also compiles over one-replica axes (see `psum`)."""
    names, replicas = _axes_and_replicas(axis_names)
    return jax.lax.pmean(tree, names) if replicas > 1 else psum(tree, names)


def register(name: str) -> Callable[[type[CommAlgorithm]], type[CommAlgorithm]]:
    """Class decorator: makes an algorithm available as `comms.get(name, ...)`."""

    def decorate(cls):
        if name in ALGORITHMS:
            raise ValueError(f"communication algorithm {name!r} is registered twice")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


@dataclasses.dataclass(frozen=True)
class CommAlgorithm:
    """Base class: full-precision gradient all-reduce, the baseline every other algorithm is measured against.

    Subclasses override what they change. All hooks run inside the shard_map, on one replica's values.
    """

    name: ClassVar[str] = "base"
    # True where replicas must stay bit-identical (the parameters after a step are a function of the average).
    centralized: ClassVar[bool] = True

    axis_name: str = "data"

    def init(self, params: PyTree) -> PyTree:
        """Per-replica algorithm state for one replica's `params` (error buffers, neighbour copies, ...)."""
        return ()

    def reduce_gradients(self, grads: PyTree, state: PyTree, step: jax.Array) -> tuple[PyTree, PyTree]:
        """What the replicas exchange before the optimizer; `step` is the 0-based global step."""
        return jax.tree.map(lambda g: pmean(g, self.axis_name), grads), state

    def mix_parameters(self, params: PyTree, state: PyTree, step: jax.Array) -> tuple[PyTree, PyTree]:
        """What the replicas exchange of the parameters the gradients were computed at, before the optimizer."""
        return params, state

    def sync_parameters(self, params: PyTree, state: PyTree, step: jax.Array) -> tuple[PyTree, PyTree]:
        """What the replicas exchange after the optimizer has updated their parameters."""
        return params, state

    def phase(self, update: int) -> Hashable:
        """The optimizer's code path at its update number `update` (0-based); None where it has only one."""
        return None

    def optimizer(
        self,
        learning_rate: optax.ScalarOrSchedule,
        *,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> optax.GradientTransformation:
        """The optimizer this algorithm runs with: AdamW, unless the algorithm fuses communication into it."""
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def get(name: str, **options: Any) -> CommAlgorithm:
    """The algorithm registered as `name`, built with `options`; a clear error names the valid choices."""
    import comms  # noqa: F401  (importing the package registers every algorithm)

    if name not in ALGORITHMS:
        raise ValueError(f"unknown communication algorithm {name!r}; choose one of: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"communication algorithm {name!r} has no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(fields))}"
        )
    return cls(**options)


def replicate(tree: PyTree, num_replicas: int) -> PyTree:
    """Adds the leading replica dimension: every replica starts from the same values."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_replicas, *jnp.shape(x))), tree)


def strip_replica_dim(tree: PyTree) -> PyTree:
    """Inside the shard_map a replica's block has a leading dimension of 1; the hooks work without it."""
    return jax.tree.map(lambda x: x[0], tree)


def add_replica_dim(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x[None], tree)


register("pmean")(CommAlgorithm)


def apply_gradients(
    algorithm: CommAlgorithm,
    tx: optax.GradientTransformation,
    grads: PyTree,
    params: PyTree,
    opt_state: PyTree,
    comm_state: PyTree,
    step: jax.Array,
    phase: Hashable = None,
) -> tuple[PyTree, PyTree, PyTree]:
    """One replica's update inside the shard_map: mix parameters, exchange gradients, optimize, synchronize.

    `phase`: `algorithm.phase(update)` for this update, known when the step is compiled; None decides at run time.
    """
    params, comm_state = algorithm.mix_parameters(params, comm_state, step)
    grads, comm_state = algorithm.reduce_gradients(grads, comm_state, step)
    if phase is None:
        updates, opt_state = tx.update(grads, opt_state, params)
    else:
        updates, opt_state = optax.with_extra_args_support(tx).update(grads, opt_state, params, phase=phase)
    params = optax.apply_updates(params, updates)
    params, comm_state = algorithm.sync_parameters(params, comm_state, step)
    return params, opt_state, comm_state
