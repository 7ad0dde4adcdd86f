import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import comms
from comms.centralized import ErrorFeedback
from tests.comms import harness
from tests.comms import numpy_reference as ref

SHAPES = {"bias": (3,), "kernel": (5, 7)}  # 38 values: padded on 2, 4 and 8 replicas


def make_mesh(shape: dict[str, int]) -> jax.sharding.Mesh:
    size = int(np.prod(list(shape.values())))
    return jax.make_mesh(
        tuple(shape.values()),
        tuple(shape),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
        devices=jax.devices()[:size],
    )


def random_gradients(num_replicas: int, num_steps: int, seed: int = 0) -> list[dict]:
    """Per step, a gradient pytree with a leading replica dimension; replicas and leaves differ in scale."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(num_steps):
        steps.append(
            {
                name: (
                    rng.normal(size=(num_replicas, *shape))
                    * rng.uniform(0.1, 3, size=(num_replicas,) + (1,) * len(shape))
                ).astype(np.float32)
                for name, shape in SHAPES.items()
            }
        )
    return steps


def flatten(tree: dict) -> np.ndarray:
    """[replicas, numel] in the order ravel_pytree uses (sorted keys, row-major)."""
    return np.concatenate([np.asarray(tree[name]).reshape(len(tree[name]), -1) for name in sorted(tree)], axis=1)


def run_reduce(algorithm, mesh, gradient_steps):
    """Runs reduce_gradients on each step's gradients; returns ([steps] flat results [replicas, numel], state)."""
    spec = P(tuple(mesh.axis_names))

    def init(grads):
        return comms.add_replica_dim(algorithm.init(comms.strip_replica_dim(grads)))

    def step(grads, state):
        grads, state = algorithm.reduce_gradients(*map(comms.strip_replica_dim, (grads, state)), jnp.int32(0))
        return comms.add_replica_dim(grads), comms.add_replica_dim(state)

    init_fn = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=spec, out_specs=spec))
    step_fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec)))
    state = init_fn(gradient_steps[0])
    results = []
    for grads in gradient_steps:
        reduced, state = step_fn(grads, state)
        results.append(flatten(reduced))
    return results, state


def assert_close(actual, desired):
    """Equal to float rounding: 1e-6 relative to the vector's magnitude."""
    np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-6 * np.abs(desired).max())


def joined(tensors: dict) -> np.ndarray:
    """{name: [numel]} -> [numel total] in the order ravel_pytree uses."""
    return np.concatenate([tensors[name] for name in sorted(tensors)])


# Not bitwise: the compiler fuses decoding into the sum over replicas and contracts it into FMAs.
@pytest.mark.parametrize("n", [2, 4, 8])
def test_bytegrad_per_tensor_equals_numpy_simulation(n):
    gradient_steps = random_gradients(n, num_steps=2, seed=n)
    results, _ = run_reduce(comms.get("bytegrad"), make_mesh({"data": n}), gradient_steps)
    for grads, result in zip(gradient_steps, results):
        (want,) = ref.per_tensor(grads, ref.bytegrad, n * 8)
        for replica in range(n):
            assert_close(result[replica], joined(want))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_onebit_per_tensor_with_error_feedback_over_steps_equals_numpy_simulation(n):
    gradient_steps = random_gradients(n, num_steps=4, seed=10 + n)
    results, state = run_reduce(comms.get("onebit"), make_mesh({"data": n}), gradient_steps)
    worker, server = ref.onebit_zero_errors(gradient_steps[0], n, n * 8)
    for grads, result in zip(gradient_steps, results):
        want, worker, server = ref.per_tensor(grads, ref.onebit, n * 8, worker, server)
        for replica in range(n):
            assert_close(result[replica], joined(want))
    assert isinstance(state, ErrorFeedback)
    for name in SHAPES:
        assert_close(np.asarray(state.worker[name]), worker[name])
        assert_close(np.asarray(state.server[name]), server[name])


def test_onebit_gives_each_tensor_its_own_scale():
    # Identical replicas and zero errors: both phases keep a tensor's norm, so the result is
    # ||g|| / sqrt(padded numel) * sign(g) per tensor, whatever the other tensors' magnitudes.
    n = 4
    rng = np.random.default_rng(3)
    tensors = {"bias": 1e-4 * rng.normal(size=(3,)), "kernel": 1e3 * rng.normal(size=(5, 7))}
    grads = [{k: np.broadcast_to(v, (n, *v.shape)).astype(np.float32) for k, v in tensors.items()}]
    results, _ = run_reduce(comms.get("onebit"), make_mesh({"data": n}), grads)
    want = {
        name: np.linalg.norm(v) / np.sqrt(ref.pad(v.ravel(), n * 8).size) * np.where(v.ravel() >= 0, 1, -1)
        for name, v in tensors.items()
    }
    for replica in range(n):
        np.testing.assert_allclose(results[0][replica], joined(want), rtol=1e-5)


def _numpy_hierarchical(vectors, slow, fast, compress_over_slow):
    """[slow*fast, P] (device (s, k) at row s*fast+k) -> the vector each device holds, and per-part outputs."""
    group_means = vectors.reshape(slow, fast, -1)
    group_means = ref.sum_in_order([group_means[:, k] for k in range(fast)]) / fast  # [slow, P]
    parts = group_means.reshape(slow, fast, -1)  # fast replica k serves part k
    return np.concatenate([compress_over_slow(k, parts[:, k]) for k in range(fast)])


@pytest.mark.parametrize("slow,fast", [(2, 2), (4, 2), (2, 4)])
def test_hierarchical_bytegrad_equals_numpy_simulation(slow, fast):
    gradient_steps = random_gradients(slow * fast, num_steps=1, seed=slow + 7 * fast)
    algorithm = comms.get("hierarchical", compression="bytegrad")
    results, _ = run_reduce(algorithm, make_mesh({"data": slow, "fast": fast}), gradient_steps)

    def hierarchical(vectors):
        return _numpy_hierarchical(vectors, slow, fast, lambda k, part: ref.bytegrad(part))

    (want,) = ref.per_tensor(gradient_steps[0], hierarchical, slow * fast * 8)
    for device in range(slow * fast):
        assert_close(results[0][device], joined(want))


@pytest.mark.parametrize("slow,fast", [(2, 2), (4, 2)])
def test_hierarchical_onebit_over_steps_equals_numpy_simulation(slow, fast):
    gradient_steps = random_gradients(slow * fast, num_steps=3, seed=3 * slow + fast)
    mesh = make_mesh({"data": slow, "fast": fast})
    results, state = run_reduce(comms.get("hierarchical", compression="onebit"), mesh, gradient_steps)
    # Per tensor and fast part k: the errors of each slow replica in the 1-bit compression of that part.
    parts = {
        name: ref.pad(np.zeros(int(np.prod(shape)), np.float32), slow * fast * 8).size // fast
        for name, shape in SHAPES.items()
    }
    worker = {name: np.zeros((fast, slow, part), np.float32) for name, part in parts.items()}
    server = {name: np.zeros((fast, slow, part // slow), np.float32) for name, part in parts.items()}

    def hierarchical(vectors, worker, server):
        worker, server = worker.copy(), server.copy()

        def onebit_part(k, part_vectors):
            out, worker[k], server[k] = ref.onebit(part_vectors, worker[k], server[k])
            return out

        return _numpy_hierarchical(vectors, slow, fast, onebit_part), worker, server

    for grads, result in zip(gradient_steps, results):
        want, worker, server = ref.per_tensor(grads, hierarchical, slow * fast * 8, worker, server)
        for device in range(slow * fast):
            assert_close(result[device], joined(want))
    # Device (s, k) holds the errors of slow replica s in the compression of part k.
    for name, part in parts.items():
        assert_close(np.asarray(state.worker[name]), worker[name].transpose(1, 0, 2).reshape(slow * fast, part))
        assert_close(np.asarray(state.server[name]), server[name].transpose(1, 0, 2).reshape(slow * fast, part // slow))


def test_hierarchical_rejects_unknown_compression():
    with pytest.raises(ValueError, match="compression 'twobit'.*onebit, bytegrad"):
        comms.get("hierarchical", compression="twobit")


CENTRALIZED = [
    ("bytegrad", {}, {"data": 4}),
    ("onebit", {}, {"data": 4}),
    ("hierarchical", {"compression": "onebit"}, {"data": 2, "fast": 2}),
    ("hierarchical", {"compression": "bytegrad"}, {"data": 2, "fast": 2}),
]


@pytest.mark.parametrize("name,options,mesh_shape", CENTRALIZED)
def test_replicas_stay_bit_identical_over_10_steps(name, options, mesh_shape):
    mesh = make_mesh(mesh_shape)
    params, losses = harness.train(comms.get(name, **options), num_replicas=mesh.size, num_steps=10, mesh=mesh)
    for leaf in jax.tree.leaves(params):
        leaf = np.asarray(leaf)
        for replica in range(1, mesh.size):
            np.testing.assert_array_equal(leaf[replica], leaf[0])
    assert losses[-1].mean() < losses[0].mean()


# Convergence: enough examples (4 x 2048) and label noise (0.3) that no run can memorize its data, so that every
# algorithm that converges ends near the same floor (~0.3^2); a learning rate and a number of steps with which
# full-precision Adam settles onto it. "Within 5%" means the final loss is at most 1.05x pmean's.
CONVERGENCE = dict(num_steps=1000, learning_rate=1e-2, per_replica=2048, noise=0.3)


@functools.cache
def final_loss(name: str, options: tuple = (), mesh_shape: tuple = (("data", 4),)) -> float:
    mesh = make_mesh(dict(mesh_shape))
    _, losses = harness.train(comms.get(name, **dict(options)), num_replicas=mesh.size, mesh=mesh, **CONVERGENCE)
    return float(losses[-5:].mean())


ONEBIT_GRADIENTS_UNDER_ADAM = pytest.mark.xfail(
    strict=True,
    reason="1-bit gradients fed to Adam end ~2x pmean's loss at every learning rate (0.196-0.218 vs 0.088-0.091 "
    "for lr 3e-3..3e-2), per tensor or not, with a cosine schedule or not. Every coordinate of a chunk arrives as "
    "+-scale, so Adam's second moment becomes the chunk's mean square and its per-coordinate step size is lost; "
    "error feedback only corrects what is linear in the gradient (1-bit Adam paper, section 3). A contractive L1 "
    "scale does not help either (measured). 1-bit gradients are for SGD (test below); for Adam, DeepSpeed "
    "compresses the momentum with a frozen second moment instead (onebit_adam, which passes)",
)


@pytest.mark.parametrize(
    "name,options,mesh_shape",
    [
        ("bytegrad", (), (("data", 4),)),
        ("hierarchical", (("compression", "bytegrad"),), (("data", 2), ("fast", 2))),
        pytest.param("onebit", (), (("data", 4),), marks=[ONEBIT_GRADIENTS_UNDER_ADAM, pytest.mark.slow]),
        pytest.param(
            "hierarchical",
            (("compression", "onebit"),),
            (("data", 2), ("fast", 2)),
            marks=[ONEBIT_GRADIENTS_UNDER_ADAM, pytest.mark.slow],
        ),
    ],
)
def test_final_loss_within_5_percent_of_pmean(name, options, mesh_shape):
    assert final_loss(name, options, mesh_shape) <= 1.05 * final_loss("pmean")


# 1-bit gradients under the optimizer error feedback is proven for: SGD (Stich et al. 2018, Karimireddy et al.
# 2019). The updates applied so far sum to the true gradients minus the current, bounded errors, which carries over
# to any optimizer linear in its gradients and not to Adam (above). Plain SGD with a cosine decay does not reach
# Adam's floor on this ill-conditioned problem in 2000 steps, so each run is compared with pmean under the same
# recipe, both at their best learning rate on one grid: the top of pmean's stable range (it diverges at 0.7; on the
# measured grid 0.2-0.5 its best is 0.4). With momentum 0.9, 1-bit gradients keep up only at small learning rates
# (3000 steps, lr 0.02: 0.163 vs 0.155; lr 0.07: 0.29 vs 0.12, measured): error feedback delays part of every
# gradient, and heavy momentum amplifies the delay.
SGD_CONVERGENCE = dict(num_steps=2000, per_replica=2048, noise=0.3)
SGD_LEARNING_RATES = (0.3, 0.4, 0.5)


@functools.cache
def best_final_loss_under_sgd(name: str, options: tuple = (), mesh_shape: tuple = (("data", 4),)) -> float:
    mesh = make_mesh(dict(mesh_shape))
    losses = []
    for learning_rate in SGD_LEARNING_RATES:
        tx = optax.sgd(optax.cosine_decay_schedule(learning_rate, SGD_CONVERGENCE["num_steps"]))
        algorithm = comms.get(name, **dict(options))
        _, run = harness.train(algorithm, num_replicas=mesh.size, mesh=mesh, tx=tx, **SGD_CONVERGENCE)
        losses.append(run[-5:].mean())
    return float(np.nanmin(losses))


@pytest.mark.parametrize(
    "name,options,mesh_shape",
    [
        ("onebit", (), (("data", 4),)),
        pytest.param("hierarchical", (("compression", "onebit"),), (("data", 2), ("fast", 2)), marks=pytest.mark.slow),
    ],
)
def test_onebit_gradients_under_sgd_final_loss_within_5_percent_of_pmean(name, options, mesh_shape):
    assert best_final_loss_under_sgd(name, options, mesh_shape) <= 1.05 * best_final_loss_under_sgd("pmean")
