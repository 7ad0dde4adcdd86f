import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import comms
from comms.api import CommAlgorithm
from tests.comms import harness
from tests.comms import numpy_reference as ref

LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8
SHAPES = {"bias": (3,), "kernel": (5, 7)}  # 38 values: padded on 2, 4 and 8 replicas


@dataclasses.dataclass(frozen=True)
class PlainAdam(CommAlgorithm):
    """The reference: full-precision gradient all-reduce and `optax.adam` itself."""

    def optimizer(self, learning_rate, **unused):
        return optax.adam(learning_rate, b1=B1, b2=B2, eps=EPS)


def replica_mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def run_optimizer(tx, n, gradient_steps, params):
    """Applies tx's update to each step's per-replica gradients inside a shard_map; returns [steps] updates."""
    spec = P("data")

    def init(params):
        return comms.add_replica_dim(tx.init(comms.strip_replica_dim(params)))

    def step(grads, state, params):
        updates, state = tx.update(*map(comms.strip_replica_dim, (grads, state, params)))
        return comms.add_replica_dim(updates), comms.add_replica_dim(state)

    mesh = replica_mesh(n)
    init_fn = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=spec, out_specs=spec))
    step_fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec)))
    state = init_fn(params)
    results = []
    for grads in gradient_steps:
        updates, state = step_fn(grads, state, params)
        results.append(np.concatenate([np.asarray(updates[k]).reshape(n, -1) for k in sorted(updates)], axis=1))
    return results


def random_gradients(n, num_steps, seed):
    rng = np.random.default_rng(seed)
    return [
        {k: rng.normal(size=(n, *shape)).astype(np.float32) for k, shape in SHAPES.items()} for _ in range(num_steps)
    ]


def flat(tree):
    return np.concatenate([np.asarray(tree[k]).reshape(len(tree[k]), -1) for k in sorted(tree)], axis=1)


def numpy_compressed_adam(gradient_steps, warmup_steps, exchange):
    """n-worker simulation: Adam on the mean gradient in warm-up, then local momentum exchanged by `exchange`."""
    f32 = np.float32
    # As optax: 1 - beta is formed in double precision, then rounded to float32.
    b1, b2, one_minus_b1, one_minus_b2 = f32(B1), f32(B2), f32(1 - B1), f32(1 - B2)
    mu = nu = None
    updates = []
    for t, grads in enumerate(gradient_steps):
        g = flat(grads)  # [n, numel]
        if mu is None:
            mu, nu = np.zeros(g.shape[1], f32), np.zeros(g.shape[1], f32)
        if t < warmup_steps:
            mean = ref.sum_in_order(list(g)) / len(g)
            mu = one_minus_b1 * mean + b1 * mu
            nu = one_minus_b2 * mean * mean + b2 * nu
        else:  # entries with no warm-up gradient (zero frozen variance) keep a zero momentum
            mu = np.where(nu > 0, exchange(one_minus_b1 * g + b1 * mu), f32(0))
        count = t + 1
        mu_hat = mu / (1 - b1**count)
        nu_hat = nu / (1 - b2 ** min(count, warmup_steps))  # v and its bias correction freeze together
        updates.append(-f32(LR) * (mu_hat / (np.sqrt(nu_hat) + f32(EPS))))
    return updates


@pytest.mark.parametrize("static_phases", [False, True], ids=["run-time-switch", "static-phase"])
@pytest.mark.parametrize("name", ["onebit_adam", "qadam"])
def test_warmup_longer_than_the_run_equals_optax_adam_bitwise(name, static_phases):
    algorithm = comms.get(name, warmup_steps=100)
    params, losses = harness.train(algorithm, num_replicas=4, num_steps=10, static_phases=static_phases)
    want_params, want_losses = harness.train(PlainAdam(), num_replicas=4, num_steps=10)
    np.testing.assert_array_equal(losses, want_losses)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))


def test_warmup_with_weight_decay_equals_optax_adamw_to_float_rounding():
    # Both replicas see the same gradient, so optax.adamw on it is the reference without any averaging.
    n, wd = 2, 0.1
    gradient_steps = [{k: np.repeat(v, n, axis=0) for k, v in g.items()} for g in random_gradients(1, 4, seed=5)]
    params = {k: np.full((n, *shape), 0.5, np.float32) for k, shape in SHAPES.items()}
    tx = comms.get("onebit_adam", warmup_steps=100).optimizer(LR, b1=B1, b2=B2, eps=EPS, weight_decay=wd)
    results = run_optimizer(tx, n, gradient_steps, params)
    wants = run_optimizer(optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=wd), n, gradient_steps, params)
    for result, want in zip(results, wants):
        np.testing.assert_allclose(result, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def by_tensor(local):
    """[n, numel] in ravel_pytree order -> {name: [n, size]}."""
    sizes = [int(np.prod(SHAPES[name])) for name in sorted(SHAPES)]
    return dict(zip(sorted(SHAPES), np.split(local, np.cumsum(sizes)[:-1], axis=1)))


def joined(tensors):
    return np.concatenate([tensors[name] for name in sorted(tensors)])


def _numpy_qadam_exchange(n):
    return lambda local: joined(ref.per_tensor(by_tensor(local), ref.bytegrad, n * 8)[0])


def _numpy_onebit_exchange(n):
    numel = sum(int(np.prod(s)) for s in SHAPES.values())
    errors = list(ref.onebit_zero_errors(by_tensor(np.zeros((n, numel), np.float32)), n, n * 8))

    def exchange(local):
        out, errors[0], errors[1] = ref.per_tensor(by_tensor(local), ref.onebit, n * 8, *errors)
        return joined(out)

    return exchange


EXCHANGES = {"onebit_adam": _numpy_onebit_exchange, "qadam": _numpy_qadam_exchange}


@pytest.mark.parametrize("name", ["onebit_adam", "qadam"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_compressed_phase_per_tensor_over_steps_equals_numpy_simulation(name, n):
    warmup, steps = 2, 6
    gradient_steps = random_gradients(n, steps, seed=n)
    for grads in gradient_steps[:warmup]:  # an entry that gets its first gradient only after the freeze
        grads["kernel"][:, 1, 2] = 0.0
    params = {k: np.zeros((n, *shape), np.float32) for k, shape in SHAPES.items()}
    tx = comms.get(name, warmup_steps=warmup).optimizer(LR, b1=B1, b2=B2, eps=EPS)
    results = run_optimizer(tx, n, gradient_steps, params)
    wants = numpy_compressed_adam(gradient_steps, warmup, EXCHANGES[name](n))
    frozen_zero = int(np.prod(SHAPES["bias"])) + 1 * SHAPES["kernel"][1] + 2  # kernel[1, 2] in the flat order
    for result, want in zip(results, wants):
        assert np.all(result[:, frozen_zero] == 0) and np.abs(result).max() < 10 * LR
        for replica in range(n):
            np.testing.assert_allclose(result[replica], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("name", ["onebit_adam", "qadam"])
@pytest.mark.parametrize("n", [2, 4])
def test_steps_compiled_per_phase_equal_the_run_time_switch_bitwise(name, n):
    algorithm = comms.get(name, warmup_steps=3)
    assert [algorithm.phase(i) for i in range(5)] == ["warmup"] * 3 + ["compressed"] * 2
    params, losses = harness.train(algorithm, num_replicas=n, num_steps=7, static_phases=True)
    want_params, want_losses = harness.train(algorithm, num_replicas=n, num_steps=7)
    np.testing.assert_array_equal(losses, want_losses)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))


def test_compressed_phase_step_needs_no_temporaries_for_the_moments():
    # Under the run-time switch the cond's outputs (both moments, the error buffers) are buffers of their own;
    # the step compiled for the compressed phase updates the state in place. Compiled only, never run.
    n, width = 2, 512
    algorithm = comms.get("onebit_adam", warmup_steps=1)
    tx = algorithm.optimizer(LR)
    params = {"a": np.zeros((n, width, width), np.float32), "b": np.zeros((n, width, width), np.float32)}
    moment_bytes = 2 * 4 * 2 * width * width  # mu and nu of one replica

    def temp_bytes(phase):
        def step(params, opt_state, comm_state):
            local = map(comms.strip_replica_dim, (params, opt_state, comm_state))
            grads = jax.tree.map(jnp.sin, comms.strip_replica_dim(params))
            return tuple(map(comms.add_replica_dim, comms.apply_gradients(algorithm, tx, grads, *local, 0, phase)))

        spec = P("data")
        mesh = replica_mesh(n)
        init = jax.shard_map(
            lambda p: tuple(comms.add_replica_dim(f(comms.strip_replica_dim(p))) for f in (tx.init, algorithm.init)),
            mesh=mesh, in_specs=spec, out_specs=spec,
        )  # fmt: skip
        states = jax.eval_shape(init, params)
        compiled = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=spec, out_specs=spec), donate_argnums=(0, 1, 2))
        return compiled.lower(params, *states).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(None) - temp_bytes("compressed") >= moment_bytes


def test_unknown_phase_is_rejected():
    adam = comms.get("onebit_adam").scale_by_compressed_adam(B1, B2, EPS)
    grads = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="unknown phase 'frozen'; its phases are 'warmup' and 'compressed'"):
        adam.update(grads, None, phase="frozen")


def test_warmup_steps_below_one_is_rejected():
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        comms.get("qadam", warmup_steps=0)


# Same setting as the centralized convergence test: data that cannot be memorized, a learning rate with which
# full-precision Adam settles onto the noise floor within the run, and 15% of the run as warm-up (1-bit Adam's
# paper uses 15-25%); "within 5%" means a final loss at most 1.05x pmean's.
CONVERGENCE = dict(num_replicas=4, num_steps=1000, learning_rate=1e-2, per_replica=2048, noise=0.3)


def final_loss(algorithm) -> float:
    return float(harness.train(algorithm, **CONVERGENCE)[1][-5:].mean())


def test_onebit_adam_and_qadam_final_loss_within_5_percent_of_pmean():
    # One test, so that the full-precision run is trained once.
    full_precision = final_loss(comms.get("pmean"))
    for name in ["onebit_adam", "qadam"]:
        assert final_loss(comms.get(name, warmup_steps=150)) <= 1.05 * full_precision, name
