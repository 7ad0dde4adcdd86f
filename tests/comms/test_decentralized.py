"""Decentralized SGD and its low-precision ring variant against NumPy simulations of n workers."""

import jax
import numpy as np
import optax
import pytest

import comms
from comms.decentralized import shift_one_peer
from tests.comms import harness
from tests.comms.numpy_reference import minmax_roundtrip

F32 = np.float32
LEARNING_RATE = 0.05
SHAPES = {"matrix": (5, 3), "vector": (7,)}


def random_problem(num_replicas, num_steps, seed=0):
    """Replicas that start apart, and per-step per-replica gradients.

    Returns {leaf: [replicas, ...]} and {leaf: [steps, replicas, ...]}.
    """
    rng = np.random.default_rng(seed)
    start = {k: rng.normal(size=(num_replicas, *s)).astype(F32) for k, s in SHAPES.items()}
    grads = {k: rng.normal(size=(num_steps, num_replicas, *s)).astype(F32) for k, s in SHAPES.items()}
    return start, grads


def expected_shift_one_peer(rank, step, n):
    # BAGUA's rule, written out: the first half walks over the second half, the second half walks back.
    if rank < n // 2:
        return (step + rank) % ((n + 1) // 2) + n // 2
    return (rank - n // 2 - step) % (n // 2)


def numpy_mix(x, mode, step):
    """mix(x) over the leading worker axis of x [n, ...]."""
    n = len(x)
    if mode == "all":
        return np.broadcast_to(x.mean(axis=0, dtype=F32), x.shape)
    if mode == "ring":
        left, right = np.roll(x, 1, axis=0), np.roll(x, -1, axis=0)
        neighbour = F32(1) / F32(3)  # the self weight takes the remainder, so the weights sum to exactly 1
        return x * (F32(1) - F32(2) * neighbour) + left * neighbour + right * neighbour
    peers = [expected_shift_one_peer(rank, step, n) for rank in range(n)]
    return (x + x[peers]) / F32(2)


def simulate_decentralized(mode, start, grads):
    """x_{t+1} = mix(x_t) - lr * g_t with plain SGD; returns the history [steps, n, ...] per leaf."""
    history = {}
    for key, x in start.items():
        steps = []
        for t, g in enumerate(grads[key]):
            x = numpy_mix(x, mode, t) + F32(-LEARNING_RATE) * g
            steps.append(x)
        history[key] = np.stack(steps)
    return history


def simulate_low_precision(start, grads):
    """BAGUA's ring low-precision decentralized SGD: peers' copies l, r, own copy w, MinMaxUInt8 of each tensor."""
    history = {}
    for key, x in start.items():
        n = len(x)
        own, left, right = x.copy(), x.copy(), x.copy()
        steps = []
        for g in grads[key]:
            x_half = x + F32(-LEARNING_RATE) * g
            z = x_half + left * F32(1 / 3) + right * F32(1 / 3) + own * F32(-5 / 3)
            decoded = np.stack([minmax_roundtrip(z[i].reshape(-1)).reshape(z[i].shape) for i in range(n)])
            left = left + np.roll(decoded, 1, axis=0)  # what the left neighbour sent
            right = right + np.roll(decoded, -1, axis=0)
            x = decoded + own
            own = x
            steps.append(x)
        history[key] = np.stack(steps)
    return history


@pytest.mark.parametrize("n", [2, 4, 8])
def test_shift_one_peer_follows_bagua_rule_and_is_a_perfect_matching_across_halves(n):
    for step in range(2 * n):
        peers = [shift_one_peer(rank, step, n) for rank in range(n)]
        assert peers == [expected_shift_one_peer(rank, step, n) for rank in range(n)]
        assert all(peers[peers[rank]] == rank and peers[rank] != rank for rank in range(n))
        assert all((rank < n // 2) != (peers[rank] < n // 2) for rank in range(n))


def test_shift_one_pairs_for_four_workers_match_the_written_out_table():
    table = {0: [2, 3, 0, 1], 1: [3, 2, 1, 0], 2: [2, 3, 0, 1]}
    for step, peers in table.items():
        assert [shift_one_peer(rank, step, 4) for rank in range(4)] == peers


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("mode", ["ring", "shift_one", "all"])
def test_decentralized_equals_numpy_simulation_of_n_workers(mode, n):
    start, grads = random_problem(n, num_steps=2 * n + 1, seed=n)
    got = harness.replay(comms.get("decentralized", peer_mode=mode), optax.sgd(LEARNING_RATE), start, grads)
    want = simulate_decentralized(mode, start, grads)
    for key in SHAPES:
        if mode == "shift_one":  # (x + peer) / 2 rounds once, whatever the compiler fuses
            np.testing.assert_array_equal(got[key], want[key])
        else:  # the all-reduce sums in an order of its own; XLA fuses x * (1/3) - lr * g into one FMA
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_low_precision_decentralized_equals_numpy_simulation_of_n_workers(n):
    start, grads = random_problem(1, num_steps=6, seed=n)
    start = {k: np.repeat(v, n, axis=0) for k, v in start.items()}  # BAGUA starts every replica alike
    grads = {k: np.random.default_rng(n).normal(size=(6, n, *s)).astype(F32) for k, s in SHAPES.items()}
    got = harness.replay(comms.get("low_precision_decentralized"), optax.sgd(LEARNING_RATE), start, grads)
    want = simulate_low_precision(start, grads)
    for key in SHAPES:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("mode", ["ring", "shift_one", "all"])
def test_decentralized_mixing_preserves_the_replica_average(mode, n):
    start, grads = random_problem(n, num_steps=n)
    zero = {k: np.zeros_like(g) for k, g in grads.items()}
    got = harness.replay(comms.get("decentralized", peer_mode=mode), optax.sgd(LEARNING_RATE), start, zero)
    for key in SHAPES:
        average = start[key].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(
            got[key].mean(axis=1), np.broadcast_to(average, got[key].mean(axis=1).shape), atol=1e-6
        )


@pytest.mark.parametrize("mode", ["ring", "shift_one", "all"])
def test_decentralized_reaches_consensus_on_the_initial_average_when_gradients_are_zero(mode):
    n = 8
    start = jax.tree.map(
        lambda x: x + np.arange(n, dtype=F32).reshape(-1, *[1] * (x.ndim - 1)),
        comms.replicate(harness.init_mlp(jax.random.key(0)), n),
    )
    params, _ = harness.train(
        comms.get("decentralized", peer_mode=mode), n, num_steps=80, zero_gradients=True, initial_params=start
    )
    for before, after in zip(jax.tree.leaves(start), jax.tree.leaves(params)):
        average = np.asarray(before).mean(axis=0)
        np.testing.assert_allclose(np.asarray(after), np.broadcast_to(average, after.shape), atol=1e-5)


def test_decentralized_refuses_unknown_peer_mode_and_odd_shift_one():
    with pytest.raises(ValueError, match="peer_mode 'star'.*all, shift_one, ring"):
        comms.get("decentralized", peer_mode="star")
    start, grads = random_problem(3, num_steps=1)
    with pytest.raises(ValueError, match="even number of replicas, got 3"):
        harness.replay(comms.get("decentralized", peer_mode="shift_one"), optax.sgd(LEARNING_RATE), start, grads)


@pytest.mark.parametrize(
    "name, options",
    [
        ("decentralized", {"peer_mode": "all"}),
        ("decentralized", {"peer_mode": "ring"}),
        ("decentralized", {"peer_mode": "shift_one"}),
        ("low_precision_decentralized", {}),
    ],
)
def test_training_loss_is_within_five_percent_of_full_precision(name, options):
    # 256 examples per replica: shards alike enough that gossip, not data skew, is what is compared.
    def final_loss(algorithm):
        _, losses = harness.train(algorithm, num_replicas=4, num_steps=60, per_replica=256)
        return losses[-1].mean()

    reference = final_loss(comms.get("pmean"))
    assert abs(final_loss(comms.get(name, **options)) - reference) <= 0.05 * reference
