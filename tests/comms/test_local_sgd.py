"""Local SGD (periodic model averaging) against a NumPy simulation of n workers."""

import numpy as np
import optax
import pytest

import comms
from tests.comms import harness

F32 = np.float32
LEARNING_RATE = 0.05
PERIOD = 3


def simulate_local_sgd(start, grads, period):
    """Each worker takes plain SGD steps on its own gradient; all average after steps period-1, 2*period-1, ..."""
    x, history = start.copy(), []
    for t, g in enumerate(grads):
        x = x + F32(-LEARNING_RATE) * g
        if (t + 1) % period == 0:
            x = np.broadcast_to(x.mean(axis=0, dtype=F32), x.shape)
        history.append(x)
    return np.stack(history)


def run(num_replicas, num_steps, seed=0):
    rng = np.random.default_rng(seed)
    start = {"w": rng.normal(size=(num_replicas, 4, 3)).astype(F32)}
    grads = {"w": rng.normal(size=(num_steps, num_replicas, 4, 3)).astype(F32)}
    got = harness.replay(comms.get("local_sgd", period=PERIOD), optax.sgd(LEARNING_RATE), start, grads)["w"]
    return got, simulate_local_sgd(start["w"], grads["w"], PERIOD)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_local_sgd_equals_numpy_simulation_of_n_workers(n):
    got, want = run(n, num_steps=3 * PERIOD + 1, seed=n)
    # Not bitwise: XLA fuses x - lr * g into one FMA, and the all-reduce sums in an order of its own.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_local_sgd_replicas_are_identical_exactly_after_each_averaging_and_apart_between(n):
    got, _ = run(n, num_steps=2 * PERIOD)
    for t, params in enumerate(got):
        identical = all(np.array_equal(params[0], params[r]) for r in range(1, n))
        assert identical == ((t + 1) % PERIOD == 0), f"step {t}"


def test_local_sgd_refuses_a_period_below_one():
    with pytest.raises(ValueError, match="period must be a positive integer.*got 0"):
        comms.get("local_sgd", period=0)


def test_local_sgd_training_loss_is_within_five_percent_of_full_precision():
    # 256 examples per replica: shards alike enough that the averaging delay, not data skew, is what is compared.
    def final_loss(algorithm):
        _, losses = harness.train(algorithm, num_replicas=4, num_steps=60, per_replica=256)
        return losses[-1].mean()

    reference = final_loss(comms.get("pmean"))
    assert abs(final_loss(comms.get("local_sgd", period=4)) - reference) <= 0.05 * reference
