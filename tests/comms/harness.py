"""A small model trained data-parallel under any communication algorithm, for the comms tests.

Each replica gets its own slice of a fixed regression data set; parameters, optimizer state and algorithm
state carry the leading replica dimension, sharded over the `data` axis, exactly as the train step does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

import comms


def fetch(x: jax.Array) -> np.ndarray:
    """Host copy of a global array, also under `launch.local_cluster` where other processes hold parts of it."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def replica_mesh(num_replicas: int, axis_name: str = "data") -> jax.sharding.Mesh:
    return jax.make_mesh(
        (num_replicas,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:num_replicas]
    )


def init_mlp(key: jax.Array, sizes=(12, 32, 1)) -> dict:
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
            "bias": jnp.zeros((fan_out,)),
        }
    return params


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    layers = sorted(params)
    for name in layers[:-1]:
        h = jnp.tanh(h @ params[name]["kernel"] + params[name]["bias"])
    out = h @ params[layers[-1]]["kernel"] + params[layers[-1]]["bias"]
    return jnp.mean((out - y) ** 2)


def regression_data(num_replicas: int, per_replica: int = 16, dim: int = 12, seed: int = 0, noise: float = 0.0):
    """[replicas, batch, dim] inputs and [replicas, batch, 1] targets of a fixed smooth function.

    `noise` adds Gaussian label noise of that standard deviation, so that with enough examples the loss has a
    floor (about noise^2) that no algorithm can memorize its way below.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_replicas, per_replica, dim)).astype(np.float32)
    w = rng.normal(size=(dim, 1)).astype(np.float32)
    y = np.sin(x @ w) + 0.1 * x[..., :1] + noise * rng.normal(size=(num_replicas, per_replica, 1))
    return jnp.asarray(x), jnp.asarray(y.astype(np.float32))


def train(
    algorithm: comms.CommAlgorithm,
    num_replicas: int,
    num_steps: int,
    learning_rate: float = 1e-2,
    seed: int = 0,
    zero_gradients: bool = False,
    initial_params=None,
    mesh: jax.sharding.Mesh | None = None,
    per_replica: int = 16,
    noise: float = 0.0,
    static_phases: bool = False,
    tx: optax.GradientTransformation | None = None,
):
    """Trains the MLP; returns (params with the replica dimension, [steps, replicas] local losses).

    `static_phases`: compile one step per `algorithm.phase(i)` and pass the phase (else: chosen at run time).
    `tx` replaces the algorithm's own optimizer, `algorithm.optimizer(learning_rate)`.

    `initial_params` (with the replica dimension) lets replicas start apart, e.g. to test consensus.
    `per_replica` examples per replica: more makes the replicas' data sets alike (closer to IID shards).
    `noise`: label noise as in `regression_data`.
    `mesh` (default: `num_replicas` devices on the algorithm's axis) may have several axes, e.g. ("data", "fast")
    for hierarchical algorithms; the shard_map is then manual over all of them, one replica per device.
    """
    if mesh is None:
        mesh = replica_mesh(num_replicas, algorithm.axis_name)
    if mesh.size != num_replicas:
        raise ValueError(f"mesh has {mesh.size} devices but num_replicas is {num_replicas}")
    tx = algorithm.optimizer(learning_rate) if tx is None else tx
    x, y = regression_data(num_replicas, per_replica=per_replica, seed=seed, noise=noise)
    if initial_params is None:
        initial_params = comms.replicate(init_mlp(jax.random.key(seed)), num_replicas)
    spec = P(tuple(mesh.axis_names))

    def init_states(params):
        local = comms.strip_replica_dim(params)
        return comms.add_replica_dim(tx.init(local)), comms.add_replica_dim(algorithm.init(local))

    def step_fn(params, opt_state, comm_state, x, y, step, phase):
        params, opt_state, comm_state = map(comms.strip_replica_dim, (params, opt_state, comm_state))
        loss, grads = jax.value_and_grad(mlp_loss)(params, x[0], y[0])
        if zero_gradients:
            grads = jax.tree.map(jnp.zeros_like, grads)
        params, opt_state, comm_state = comms.apply_gradients(
            algorithm, tx, grads, params, opt_state, comm_state, step, phase
        )
        return (*map(comms.add_replica_dim, (params, opt_state, comm_state)), loss[None])

    init_fn = jax.jit(jax.shard_map(init_states, mesh=mesh, in_specs=spec, out_specs=spec))

    @functools.cache
    def step_for(phase):
        sharded = functools.partial(step_fn, phase=phase)
        return jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(spec, spec, spec, spec, spec, P()), out_specs=spec))

    params = jax.device_put(initial_params, jax.NamedSharding(mesh, spec))
    opt_state, comm_state = init_fn(params)
    losses = []
    for i in range(num_steps):
        step = step_for(algorithm.phase(i) if static_phases else None)
        params, opt_state, comm_state, loss = step(params, opt_state, comm_state, x, y, jnp.int32(i))
        losses.append(fetch(loss))
    return params, np.stack(losses)


def replay(algorithm: comms.CommAlgorithm, tx: optax.GradientTransformation, initial_params, gradients):
    """Applies given gradients ([steps, replicas, ...] leaves) under `algorithm`; returns the parameters after
    every step ([steps, replicas, ...]). Lets a test feed the same gradients to a NumPy simulation."""
    num_replicas = jax.tree.leaves(initial_params)[0].shape[0]
    mesh = replica_mesh(num_replicas, algorithm.axis_name)
    spec, history_spec = P(algorithm.axis_name), P(None, algorithm.axis_name)

    def init_states(params):
        local = comms.strip_replica_dim(params)
        return comms.add_replica_dim(tx.init(local)), comms.add_replica_dim(algorithm.init(local))

    def run(params, opt_state, comm_state, gradients):
        carry = tuple(map(comms.strip_replica_dim, (params, opt_state, comm_state)))
        gradients = jax.tree.map(lambda g: g[:, 0], gradients)

        def one_step(carry, inputs):
            grads, step = inputs
            carry = comms.apply_gradients(algorithm, tx, grads, *carry, step)
            return carry, carry[0]

        num_steps = jax.tree.leaves(gradients)[0].shape[0]
        _, history = jax.lax.scan(one_step, carry, (gradients, jnp.arange(num_steps, dtype=jnp.int32)))
        return jax.tree.map(lambda h: h[:, None], history)

    # The states enter the step as per-replica inputs, as in a train step (the init is a program of its own).
    init_fn = jax.jit(jax.shard_map(init_states, mesh=mesh, in_specs=spec, out_specs=spec))
    run = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, history_spec), out_specs=history_spec))
    return jax.tree.map(np.asarray, run(initial_params, *init_fn(initial_params), gradients))
