"""PowerSGD against a NumPy simulation of n workers, and its algebraic properties."""

import jax
import numpy as np
import optax
import pytest

import comms
from comms.powersgd import matrix_view
from tests.comms import harness
from tests.comms import numpy_reference as ref

F32 = np.float32
LEARNING_RATE = 0.1
SHAPES = {"bias": (7,), "cube": (4, 5, 6), "kernel": (16, 12), "tiny": (3, 2)}
# The matrices PowerSGD sees, worked out by hand: the closest-to-square split of each shape. "tiny" and "bias"
# go uncompressed at ranks 1 and 2: (3 + 2) * r * 2 >= 6, and a vector is no matrix.
MATRICES = {"cube": (20, 6), "kernel": (16, 12)}


def simulate_powersgd(start, grads, initial_q, rank, start_step):
    """n workers under SGD with PowerSGD (Vogels et al. 2019, Algorithm 1 with error feedback and warm start, as
    torch's DDP hook): per matrix M_r = g_r + e_r, Q = GS(Q), P = GS(sum_r M_r Q), Q = mean_r M_r^T P,
    update with P Q^T, e_r = M_r - P Q^T. Full-precision mean for the first `start_step` steps and for the others.
    `start` {name: [n, ...]}, `grads` {name: [steps, n, ...]}; returns {name: [steps, n, ...]}."""
    n = len(start["bias"])
    x = {k: v.copy() for k, v in start.items()}
    error = {k: np.zeros((n, *MATRICES[k]), F32) for k in MATRICES}
    q = {k: np.asarray(v) for k, v in initial_q.items()}
    history = {k: [] for k in start}
    for t in range(len(grads["bias"])):
        for k in start:
            g = grads[k][t]
            if t < start_step or k not in MATRICES:
                update = ref.sum_in_order(list(g)) / F32(n)
            else:
                m = [g[r].reshape(MATRICES[k]) + error[k][r] for r in range(n)]
                q_k = ref.gram_schmidt(q[k])
                p = ref.gram_schmidt(ref.sum_in_order([m_r @ q_k for m_r in m]))
                q[k] = ref.sum_in_order([m_r.T @ p for m_r in m]) / F32(n)
                approximation = p @ q[k].T
                error[k] = np.stack([m_r - approximation for m_r in m])
                update = approximation.reshape(g.shape[1:])
            x[k] = x[k] - F32(LEARNING_RATE) * update
            history[k].append(x[k].copy())
    return {k: np.stack(v) for k, v in history.items()}


def random_problem(n, num_steps, seed):
    rng = np.random.default_rng(seed)
    start = {k: np.broadcast_to(rng.normal(size=s), (n, *s)).astype(F32).copy() for k, s in SHAPES.items()}
    # Replicas' gradients differ in scale, as in test_centralized.py, so that their sum is not dominated by one.
    grads = {
        k: (rng.normal(size=(num_steps, n, *s)) * rng.uniform(0.1, 3, size=(1, n) + (1,) * len(s))).astype(F32)
        for k, s in SHAPES.items()
    }
    return start, grads


def initial_q(algorithm, start):
    """The random Q the algorithm starts from, per compressed leaf (its draw is its own, like initial parameters)."""
    q = algorithm.init(jax.tree.map(lambda x: x[0], start)).q
    return dict(zip([k for k in sorted(SHAPES) if k in MATRICES], q))


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_powersgd_equals_numpy_simulation_of_n_workers(n, rank):
    start, grads = random_problem(n, num_steps=6, seed=10 * n + rank)
    algorithm = comms.get("powersgd", rank=rank, start_step=2)
    got = harness.replay(algorithm, optax.sgd(LEARNING_RATE), start, grads)
    want = simulate_powersgd(start, grads, initial_q(algorithm, start), rank, start_step=2)
    for k in SHAPES:
        # Not bitwise: the all-reduce and the matrix products sum in orders of their own.
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6 * np.abs(want[k]).max(), err_msg=k)


def test_powersgd_compresses_what_it_should():
    start, _ = random_problem(2, 1, 0)
    q = initial_q(comms.get("powersgd", rank=2), start)
    assert {k: v.shape for k, v in q.items()} == {"cube": (6, 2), "kernel": (12, 2)}


def test_powersgd_at_full_rank_is_the_exact_mean():
    # With rank = min(rows, cols), P spans the column space of sum_r M_r, so P P^T projects the mean exactly and
    # every error is the replica's deviation from the mean, which averages to zero at the next step.
    start, grads = random_problem(4, num_steps=4, seed=7)
    algorithm = comms.get("powersgd", rank=12, min_compression_rate=0.01)
    got = harness.replay(algorithm, optax.sgd(LEARNING_RATE), start, grads)
    for k in SHAPES:
        want = start[k][0] - F32(LEARNING_RATE) * np.cumsum(grads[k].mean(axis=1), axis=0)
        np.testing.assert_allclose(got[k], np.broadcast_to(want[:, None], got[k].shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,view",
    [((7,), None), ((16, 12), (16, 12)), ((4, 5, 6), (20, 6)), ((128, 4, 32), (128, 128)), ((4, 128, 384), (512, 384))],
)
def test_matrix_view_is_the_closest_to_square_split(shape, view):
    assert matrix_view(shape) == view


def test_powersgd_replicas_stay_bit_identical_and_compiled_phases_equal_the_run_time_switch():
    algorithm = comms.get("powersgd", rank=2, start_step=3)
    per_phase, losses = harness.train(algorithm, num_replicas=4, num_steps=10, static_phases=True)
    switched, _ = harness.train(algorithm, num_replicas=4, num_steps=10, static_phases=False)
    for a, b in zip(jax.tree.leaves(per_phase), jax.tree.leaves(switched)):
        a, b = np.asarray(a), np.asarray(b)
        for replica in range(1, 4):
            np.testing.assert_array_equal(a[replica], a[0])
            np.testing.assert_array_equal(b[replica], b[0])
        # To float rounding only: inside the switch's branch XLA fuses the matrix products differently.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert losses[-1].mean() < losses[0].mean()


def test_powersgd_keeps_zero_gradients_finite():
    # An all-zero gradient gives P = 0; Gram-Schmidt must leave its zero column zero rather than divide by 0.
    start = comms.replicate(harness.init_mlp(jax.random.key(0)), 2)
    params, _ = harness.train(comms.get("powersgd"), num_replicas=2, num_steps=3, zero_gradients=True)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"rank": 0}, "rank must be an integer >= 1, got 0"),
        ({"start_step": -1}, "start_step must be an integer >= 0, got -1"),
        ({"min_compression_rate": 0}, "min_compression_rate must be > 0"),
    ],
)
def test_powersgd_refuses_bad_options_with_a_sentence(options, message):
    with pytest.raises(ValueError, match=message):
        comms.get("powersgd", **options)


def test_powersgd_after_zero_gradients_continues_as_if_they_had_not_been():
    # Zero gradients leave zero errors and (with the previous Q kept) the warm start as it was, so the later steps
    # equal a run that starts with them.
    start, grads = random_problem(2, num_steps=3, seed=8)
    zeros = {k: np.zeros_like(g[:2]) for k, g in grads.items()}  # two steps of zero gradients
    algorithm = comms.get("powersgd", rank=2)
    after_zeros = harness.replay(
        algorithm,
        optax.sgd(LEARNING_RATE),
        start,
        {k: np.concatenate([zeros[k], g]) for k, g in grads.items()},
    )
    direct = harness.replay(algorithm, optax.sgd(LEARNING_RATE), start, grads)
    for k in SHAPES:
        np.testing.assert_allclose(after_zeros[k][2:], direct[k], rtol=1e-6, atol=1e-6)
