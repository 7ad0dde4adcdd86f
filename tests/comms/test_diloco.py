"""DiLoCo and Streaming DiLoCo against a NumPy simulation of n workers, their schedule, and their training loss."""

import functools

import jax
import numpy as np
import optax
import pytest

import comms
from tests.comms import harness
from tests.comms import numpy_reference as ref

F32 = np.float32
INNER_LEARNING_RATE = 0.05
SHAPES = {"bias": (3,), "kernel": (6, 5)}
BLOCK = 8  # small blocks, so that a fragment of a leaf spans several


def simulate_diloco(start, grads, *, inner_steps, fragments, learning_rate, momentum, compression, warmup=0):
    """n workers; the first `warmup` updates are synchronous SGD on the mean gradient (the anchor follows), then
    each takes SGD steps on its own gradients; after the updates t with (t - warmup + 1) mod (H/F) == 0, fragment
    f = ((t - warmup + 1) mod H) / (H/F), i.e. rows f, f+F, ... of every leaf, gets the outer Nesterov step:

        Δ_r = anchor − x_r (+ error_r, compressed block-wise; error_r = what the blocks did not carry)
        m = μ m + mean_r Δ_r;   anchor −= lr (mean_r Δ_r + μ m);   x_r = anchor

    `start` {name: [n, ...]}, `grads` {name: [steps, n, ...]}; returns {name: [steps, n, ...]} after every step.
    """
    x = {k: v.copy() for k, v in start.items()}
    anchor = {k: v.copy() for k, v in start.items()}
    outer = {k: np.zeros_like(v) for k, v in start.items()}
    error = {k: np.zeros_like(v) for k, v in start.items()}
    n, stride = len(next(iter(start.values()))), inner_steps // fragments
    history = {k: [] for k in start}
    for t in range(len(next(iter(grads.values())))):
        if t < warmup:
            for k in x:
                mean_gradient = ref.sum_in_order(list(grads[k][t])) / F32(n)
                x[k] = x[k] + F32(-INNER_LEARNING_RATE) * mean_gradient[None]
                anchor[k] = x[k].copy()
                history[k].append(x[k].copy())
            continue
        for k in x:
            x[k] = x[k] + F32(-INNER_LEARNING_RATE) * grads[k][t]
        taken = t - warmup + 1
        if taken % stride == 0:
            rows = (slice(None), slice(taken % inner_steps // stride, None, fragments))
            for k in x:
                delta = anchor[k][rows] - x[k][rows]  # [n, fragment rows, ...]
                if compression == "none":
                    sent = delta
                else:
                    compensated = delta + error[k][rows]
                    sent = np.stack([ref.block_roundtrip(c, compression, BLOCK) for c in compensated])
                    error[k][rows] = compensated - sent
                mean = ref.sum_in_order(list(sent)) / F32(n)
                outer[k][rows] = F32(momentum) * outer[k][rows] + mean
                anchor[k][rows] = anchor[k][rows] - F32(learning_rate) * (mean + F32(momentum) * outer[k][rows])
                x[k][rows] = anchor[k][rows]
        for k in x:
            history[k].append(x[k].copy())
    return {k: np.stack(v) for k, v in history.items()}


def random_problem(n, num_steps, seed):
    rng = np.random.default_rng(seed)
    start = {k: np.broadcast_to(rng.normal(size=s), (n, *s)).astype(F32).copy() for k, s in SHAPES.items()}
    grads = {k: rng.normal(size=(num_steps, n, *s)).astype(F32) for k, s in SHAPES.items()}
    return start, grads


def run(n, num_steps, seed=0, **options):
    start, grads = random_problem(n, num_steps, seed)
    algorithm = comms.get("diloco", block_size=BLOCK, **options)
    got = harness.replay(algorithm, optax.sgd(INNER_LEARNING_RATE), start, grads)
    want = simulate_diloco(
        start,
        grads,
        inner_steps=algorithm.inner_steps,
        fragments=algorithm.fragments,
        learning_rate=algorithm.outer_learning_rate,
        momentum=algorithm.outer_momentum,
        compression=algorithm.compression,
        warmup=algorithm.warmup_steps,
    )
    return got, want


def assert_close(got, want):
    """Equal to float rounding (1e-6 relative to the values' magnitude): XLA contracts x - lr * g and the decoding
    inside the sum over replicas into FMAs, and its all-reduce sums in an order of its own."""
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6 * np.abs(want[k]).max(), err_msg=k)


@pytest.mark.parametrize("compression", ["none", "int8", "int4", "onebit"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_diloco_rounds_equal_numpy_simulation_of_n_workers(n, compression):
    # 3 rounds of 2 fragments: each fragment synced 3 times, with its momentum and error feedback carried over.
    got, want = run(n, num_steps=12, seed=n, inner_steps=4, fragments=2, compression=compression)
    assert_close(got, want)


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_diloco_with_one_fragment_and_default_outer_optimizer_equals_numpy_simulation(compression):
    got, want = run(4, num_steps=9, seed=1, inner_steps=3, compression=compression)
    assert_close(got, want)


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_diloco_after_a_synchronous_warmup_equals_numpy_simulation(compression):
    # 5 warm-up updates of data-parallel SGD, then 3 rounds of H = 4 in 2 fragments, starting from the warmed-up model.
    got, want = run(4, num_steps=17, seed=7, inner_steps=4, fragments=2, compression=compression, warmup_steps=5)
    assert_close(got, want)
    assert [comms.get("diloco", inner_steps=4, fragments=2, warmup_steps=5).phase(u) for u in range(9)] == [
        *["warmup"] * 5,
        *["inner", "sync1", "inner", "sync0"],
    ]


def test_streaming_fragments_sync_on_their_schedule_and_only_their_rows():
    # H = 8, F = 4: fragment f (rows f, f+4 of the kernel's 6) after the updates u with (u + 1) mod 8 == 2f.
    want_phases = ["inner", "sync1", "inner", "sync2", "inner", "sync3", "inner", "sync0"] * 2
    algorithm = comms.get("diloco", inner_steps=8, fragments=4)
    assert [algorithm.phase(u) for u in range(16)] == want_phases
    start, grads = random_problem(4, num_steps=16, seed=3)
    kernels = harness.replay(algorithm, optax.sgd(INNER_LEARNING_RATE), start, grads)["kernel"]  # [steps, 4, 6, 5]
    for u, phase in enumerate(want_phases):
        synced = set() if phase == "inner" else set(range(int(phase[4:]), 6, 4))
        same = {
            row for row in range(6) if all(np.array_equal(kernels[u, 0, row], kernels[u, r, row]) for r in (1, 2, 3))
        }
        assert same == synced, f"update {u}"


def test_diloco_with_one_inner_step_outer_lr_1_no_momentum_equals_synchronous_data_parallel_sgd():
    # Averaging the parameters after one SGD step each is one SGD step on the averaged gradient (not so for Adam,
    # whose per-replica state would differ from the state of the averaged gradients).
    start, grads = random_problem(4, num_steps=6, seed=5)
    algorithm = comms.get("diloco", inner_steps=1, outer_learning_rate=1.0, outer_momentum=0.0)
    got = harness.replay(algorithm, optax.sgd(INNER_LEARNING_RATE), start, grads)
    for k in SHAPES:
        x, want = start[k][0], []
        for g in grads[k]:
            x = x - F32(INNER_LEARNING_RATE) * g.mean(axis=0)
            want.append(np.broadcast_to(x, g.shape))
        np.testing.assert_allclose(got[k], np.stack(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_diloco_replicas_are_identical_exactly_after_each_sync_and_apart_between(compression):
    start, grads = random_problem(4, num_steps=9, seed=6)
    algorithm = comms.get("diloco", inner_steps=3, compression=compression)
    kernels = harness.replay(algorithm, optax.sgd(INNER_LEARNING_RATE), start, grads)["kernel"]
    for u, replicas in enumerate(kernels):
        identical = all(np.array_equal(replicas[0], replicas[r]) for r in range(1, 4))
        assert identical == ((u + 1) % 3 == 0), f"update {u}"


def test_diloco_steps_compiled_per_phase_equal_the_run_time_switch_bitwise():
    algorithm = comms.get("diloco", inner_steps=4, fragments=2, compression="int4")
    per_phase, _ = harness.train(algorithm, num_replicas=2, num_steps=10, static_phases=True)
    switched, _ = harness.train(algorithm, num_replicas=2, num_steps=10, static_phases=False)
    for a, b in zip(jax.tree.leaves(per_phase), jax.tree.leaves(switched)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_diloco_warmup_compiled_per_phase_equals_the_run_time_switch():
    # Equal to rounding, not bitwise: the warm-up's all-reduce inside a lax.cond is fused differently from the one
    # of a step compiled for the warm-up alone (one ulp in the averaged gradients).
    algorithm = comms.get("diloco", inner_steps=4, fragments=2, compression="int4", warmup_steps=3)
    per_phase, _ = harness.train(algorithm, num_replicas=2, num_steps=10, static_phases=True)
    switched, _ = harness.train(algorithm, num_replicas=2, num_steps=10, static_phases=False)
    for a, b in zip(jax.tree.leaves(per_phase), jax.tree.leaves(switched)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"inner_steps": 0}, "inner_steps must be an integer >= 1, got 0"),
        ({"inner_steps": 8, "fragments": 3}, "fragments must be a positive integer that divides inner_steps=8"),
        ({"compression": "int2"}, "unknown compression 'int2'; choose one of: none, int8, int4, onebit"),
        ({"outer_momentum": 1.0}, r"outer_momentum must be in \[0, 1\)"),
        ({"outer_learning_rate": 0}, "outer_learning_rate must be > 0"),
        ({"block_size": 12}, "block_size must be a positive multiple of 8"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
    ],
)
def test_diloco_refuses_bad_options_with_a_sentence(options, message):
    with pytest.raises(ValueError, match=message):
        comms.get("diloco", **options)


def test_diloco_refuses_more_fragments_than_layers_at_init():
    params = {"layers": {"kernel": np.zeros((2, 4, 4), F32)}, "embedding": np.zeros((16, 4), F32)}
    with pytest.raises(ValueError, match=r"fragments=4 is more than the 2 rows .* \['layers'\]\['kernel'\]"):
        comms.get("diloco", inner_steps=8, fragments=4).init(params)
    comms.get("diloco", inner_steps=8, fragments=2).init(params)


# The convergence setting of test_centralized.py: 4 x 2048 examples with label noise 0.3 (a floor near 0.09 that
# cannot be memorized away), Adam at lr 1e-2 for 1000 steps. DiLoCo's loss is that of its anchor after the last
# sync (1000 is a multiple of H), on all examples; pmean's that of its parameters.
CONVERGENCE = dict(num_replicas=4, num_steps=1000, learning_rate=1e-2, per_replica=2048, noise=0.3)


@functools.cache
def final_loss(name, options=()):
    params, _ = harness.train(comms.get(name, **dict(options)), static_phases=True, **CONVERGENCE)
    x, y = harness.regression_data(4, per_replica=2048, noise=0.3)
    replica0 = jax.tree.map(lambda p: p[0], params)
    return float(harness.mlp_loss(replica0, x.reshape(-1, x.shape[-1]), y.reshape(-1, 1)))


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_diloco_with_8_inner_steps_trains_within_5_percent_of_pmean(compression):
    loss = final_loss("diloco", (("inner_steps", 8), ("compression", compression)))
    assert loss <= 1.05 * final_loss("pmean")
