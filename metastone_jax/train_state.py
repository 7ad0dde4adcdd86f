"""The train state: parameters, optimizer and communication state with a leading replica dimension, their
shardings, and the optimizer that updates them.

Every TrainState leaf except `step` carries a leading replica dimension sharded over `data`; the rest of each
leaf's dimensions follow its parameter's logical axes. The optimizer is two optimizers side by side: the policy's
for every parameter outside params[HEAD] and the SPRM head's own AdamW for params[HEAD] (docs/algorithms.md), each
with its own global-norm clipping, as the released code clips and steps the actor and the score module separately.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import comms
from metastone_jax.models.reflective import HEAD, ReflectiveModel, abstract_params, init_params, param_shardings
from metastone_jax.sharding import DATA_AXIS, LOGICAL_RULES, fit_spec

PyTree = Any


class TrainState(NamedTuple):
    step: jax.Array  # [] int32, 0-based count of steps taken, replicated
    params: PyTree  # [replicas, ...] per leaf
    opt_state: PyTree  # [replicas, ...] per leaf
    comm_state: PyTree  # [replicas, ...] per leaf


def param_labels(params: PyTree) -> PyTree:
    """`"head"` for every leaf under params[HEAD], `"policy"` for the rest (the labels of `make_optimizer`)."""
    return {
        name: jax.tree.map(lambda _, label=("head" if name == HEAD else "policy"): label, sub)
        for name, sub in params.items()
    }


def make_optimizer(
    algorithm: comms.CommAlgorithm,
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    head_learning_rate: optax.ScalarOrSchedule = 1e-5,
    head_weight_decay: float = 0.01,
    head_clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """The policy's `algorithm.optimizer(...)` and the head's AdamW (betas 0.9/0.999), each after its own clipping.

    The head's AdamW also comes from `algorithm.optimizer`: under algorithms that communicate inside the optimizer
    (1-bit Adam, QAdam) the head's gradients are otherwise never averaged and its replicas would drift apart.
    """

    def clipped(optimizer, max_norm):
        return optimizer if max_norm is None else optax.chain(optax.clip_by_global_norm(max_norm), optimizer)

    policy = algorithm.optimizer(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    head = algorithm.optimizer(head_learning_rate, b1=0.9, b2=0.999, eps=eps, weight_decay=head_weight_decay)
    return optax.multi_transform(
        {"policy": clipped(policy, clip_norm), "head": clipped(head, head_clip_norm)}, param_labels
    )


def state_specs() -> TrainState:
    return TrainState(step=P(), params=P(DATA_AXIS), opt_state=P(DATA_AXIS), comm_state=P(DATA_AXIS))


def init_fn(algorithm, tx, mesh, step: int = 0):
    """shard_map'd: params without the replica dimension -> the TrainState at `step`."""

    def init(params):
        return TrainState(
            step=jnp.full([], step, jnp.int32),
            params=comms.add_replica_dim(params),
            opt_state=comms.add_replica_dim(tx.init(params)),
            comm_state=comms.add_replica_dim(algorithm.init(params)),
        )

    # algorithm.init may read the replica count, so it runs inside the shard_map.
    return jax.shard_map(init, mesh=mesh, in_specs=P(), out_specs=state_specs(), axis_names={DATA_AXIS})


@functools.cache
def train_state_shardings(
    module: ReflectiveModel, algorithm: comms.CommAlgorithm, tx: optax.GradientTransformation, mesh
) -> TrainState:
    """NamedShardings of every TrainState leaf: the replica dimension over `data`, the rest by logical axes.

    The state is traced from the parameters with their logical-axis boxes (`nn.with_logical_partitioning`) still
    on, so a leaf the optimizer or the algorithm builds from a parameter (Adam's moments, a neighbour's copy) keeps
    that parameter's axis names and is sharded like it; any other leaf (counts, flat error buffers) is replicated
    inside its replica group. Computed once per (module, algorithm, optimizer, mesh).
    """
    abstract_state = jax.eval_shape(init_fn(algorithm, tx, mesh), abstract_params(module))

    def leaf_sharding(leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, P(DATA_AXIS))
        if not hasattr(leaf.value, "shape"):  # a masked-out entry of the other optimizer (optax.MaskedNode)
            return leaf.value
        if len(leaf.names) != leaf.value.ndim - 1:  # built from a parameter but reshaped (a flat buffer)
            return NamedSharding(mesh, P(DATA_AXIS))
        spec = nn.logical_to_mesh_axes(leaf.names, LOGICAL_RULES)
        return NamedSharding(mesh, fit_spec(P(DATA_AXIS, *spec), leaf.value.shape, mesh))

    per_replica = jax.tree.map(
        leaf_sharding, abstract_state._replace(step=None), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    return per_replica._replace(step=NamedSharding(mesh, P()))


@functools.cache
def abstract_train_state(
    module: ReflectiveModel, algorithm: comms.CommAlgorithm, tx: optax.GradientTransformation, mesh
) -> TrainState:
    """The TrainState's shapes, dtypes and shardings (`jax.ShapeDtypeStruct` leaves), without building it."""
    shapes = jax.eval_shape(init_fn(algorithm, tx, mesh), nn.unbox(abstract_params(module)))
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        train_state_shardings(module, algorithm, tx, mesh),
    )


def init_train_state(
    module: ReflectiveModel,
    algorithm: comms.CommAlgorithm,
    tx: optax.GradientTransformation,
    mesh,
    key_or_params: jax.Array | PyTree,
    step: int = 0,
) -> TrainState:
    """The state at global `step` (0 for a new run), every replica at the same parameters (a typed PRNG key
    initialises them at random) with a fresh optimizer and algorithm state."""
    if isinstance(key_or_params, jax.Array) and jax.dtypes.issubdtype(key_or_params.dtype, jax.dtypes.prng_key):
        params = init_params(module, key_or_params, mesh)
    else:
        params = jax.device_put(key_or_params, param_shardings(module, mesh))
    shardings = train_state_shardings(module, algorithm, tx, mesh)
    return jax.jit(init_fn(algorithm, tx, mesh, step), out_shardings=shardings)(params)
