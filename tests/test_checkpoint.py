"""Checkpointer: exact save/restore (typed RNG keys, data state), resharding onto another mesh, keep-last-K,
fall-back past a damaged latest checkpoint, async saves."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metastone_jax.checkpoint import Checkpointer, CheckpointError
from metastone_jax.sharding import MeshConfig, make_mesh


def _state(step: int) -> dict:
    """A train-state-like pytree whose values depend on `step`: params, optimizer counters, comm state, RNG key."""
    return {
        "params": {
            "w": jnp.arange(48, dtype=jnp.float32).reshape(8, 6) + step,
            "b": jnp.full((6,), -step, jnp.bfloat16),
        },
        "opt": (jnp.int32(step), {"mu": jnp.ones((8, 6)) * 0.5 * step}),
        "comm": (),
        "rng": jax.random.key(100 + step),
    }


def _abstract(state, sharding_of=lambda leaf: None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state)


def _host(state) -> dict:
    """Plain NumPy copies taken before saving: the independent reference (keys as their raw uint32 data)."""
    return jax.tree.map(
        lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x), state
    )


def _assert_equal(restored, expected_host):
    assert jax.tree.structure(_host(restored)) == jax.tree.structure(expected_host)
    for got, want in zip(jax.tree.leaves(_host(restored)), jax.tree.leaves(expected_host)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def _replicated_abstract(state):
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    return _abstract(state, lambda x: NamedSharding(mesh, P()))


def test_restore_returns_the_saved_state_typed_rng_key_data_state_and_extra(tmp_path):
    state = _state(3)
    expected = _host(state)
    with Checkpointer(tmp_path, keep=2, every=1) as checkpointer:
        assert checkpointer.maybe_save(3, state, {"next_index": 17}, {"config": "tiny", "tokens": [1, 2]})
        checkpointer.wait()
    with Checkpointer(tmp_path) as reader:
        restored = reader.restore_latest(_replicated_abstract(state))
    assert restored.step == 3
    assert restored.data_state == {"next_index": 17}
    assert restored.extra == {"config": "tiny", "tokens": [1, 2]}
    _assert_equal(restored.state, expected)
    key = restored.state["rng"]
    assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(key)) == str(jax.random.key_impl(state["rng"]))
    # Resume continues exactly: the restored key draws the same numbers as the original.
    np.testing.assert_array_equal(jax.random.uniform(key, (4,)), jax.random.uniform(state["rng"], (4,)))


def test_restore_onto_a_different_mesh_gives_the_same_values_with_the_new_shardings(tmp_path):
    fsdp8 = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    state = {
        "w": jax.device_put(jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4), NamedSharding(fsdp8, P("fsdp"))),
        "keys": jax.device_put(jax.random.split(jax.random.key(5), 8), NamedSharding(fsdp8, P("fsdp"))),
    }
    assert len(state["w"].sharding.device_set) == 8
    expected = _host(state)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.maybe_save(0, state)

    data2_fsdp4 = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    targets = {
        "w": NamedSharding(data2_fsdp4, P("fsdp", "data")),
        "keys": NamedSharding(data2_fsdp4, P("data")),
    }
    abstract = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=targets[name]) for name, x in state.items()}
    with Checkpointer(tmp_path) as reader:
        restored = reader.restore_latest(abstract)
    _assert_equal(restored.state, expected)
    for name, target in targets.items():
        assert restored.state[name].sharding.is_equivalent_to(target, restored.state[name].ndim)

    with Checkpointer(tmp_path) as reader:
        replicated = reader.restore_latest(_replicated_abstract(state))
    _assert_equal(replicated.state, expected)
    assert replicated.state["w"].sharding.is_fully_replicated


def test_keep_last_k_deletes_the_older_checkpoints(tmp_path):
    with Checkpointer(tmp_path, keep=2, every=1) as checkpointer:
        for step in range(5):
            checkpointer.maybe_save(step, _state(step))
        checkpointer.wait()
        assert checkpointer.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["3", "4"]


def test_saves_only_multiples_of_every_plus_forced_steps_once(tmp_path):
    with Checkpointer(tmp_path, keep=10, every=3) as checkpointer:
        saved = [step for step in range(8) if checkpointer.maybe_save(step, _state(step))]
        assert checkpointer.maybe_save(7, _state(7), force=True)
        assert not checkpointer.maybe_save(6, _state(6), force=True)  # already saved by the interval
        checkpointer.wait()
        assert saved == [0, 3, 6]
        assert checkpointer.all_steps() == [0, 3, 6, 7]
    with Checkpointer(tmp_path, every=0) as only_forced:
        assert not only_forced.maybe_save(9, _state(9))
        assert only_forced.maybe_save(9, _state(9), force=True)


def _truncate_array_files(step_dir):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[:5])


def _delete_data_state(step_dir):
    (step_dir / "data" / "metadata").unlink()


def _delete_array_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


# With truncated array files one of orbax's reads fails while others are still in flight on its event loop. Those
# finish after the failed restore has closed the loop, and asyncio reports "Event loop is closed" as unraisable
# (seen once in CI, not reproducible at will). The fallback itself is what this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate_array_files, _delete_data_state, _delete_array_metadata])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_step_with_a_warning(tmp_path, damage):
    with Checkpointer(tmp_path, keep=3) as checkpointer:
        for step in (1, 2):
            checkpointer.maybe_save(step, _state(step), {"next_index": step})
    damage(tmp_path / "2")
    with pytest.warns(UserWarning, match=r"(?s)checkpoint step 2 .* falling back to step 1"):
        with Checkpointer(tmp_path) as reader:
            restored = reader.restore_latest(_replicated_abstract(_state(0)))
    assert restored.step == 1
    assert restored.data_state == {"next_index": 1}
    _assert_equal(restored.state, _host(_state(1)))
    # The damaged step is set aside, so the resumed run's next checkpoint (below the damaged step) is written.
    assert (tmp_path / "2.unreadable").is_dir()
    with Checkpointer(tmp_path, keep=3) as resumed:
        assert resumed.all_steps() == [1]
        assert resumed.maybe_save(2, _state(22))
        resumed.wait()
        assert resumed.all_steps() == [1, 2]


def test_every_checkpoint_damaged_raises_naming_the_directory_and_steps(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        for step in (1, 2):
            checkpointer.maybe_save(step, _state(step))
    for step in (1, 2):
        _delete_array_metadata(tmp_path / str(step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Checkpointer(tmp_path) as reader:
            with pytest.raises(CheckpointError, match=r"(?s)no checkpoint in .* step 2: .* step 1: "):
                reader.restore_latest(_replicated_abstract(_state(0)))


def test_empty_directory_restores_nothing(tmp_path):
    with Checkpointer(tmp_path / "fresh") as reader:
        assert reader.restore_latest(_replicated_abstract(_state(0))) is None


def test_async_save_is_complete_after_wait(tmp_path):
    state = {"big": jnp.arange(1 << 20, dtype=jnp.float32), "rng": jax.random.key(1)}
    expected = _host(state)
    checkpointer = Checkpointer(tmp_path, async_save=True)
    assert checkpointer.maybe_save(4, state, {"next_index": 4})
    checkpointer.wait()
    # A second manager that shares nothing with the first sees the finished checkpoint.
    with Checkpointer(tmp_path) as reader:
        restored = reader.restore_latest(_replicated_abstract(state))
    assert restored.step == 4
    _assert_equal(restored.state, expected)
    checkpointer.close()


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer("/tmp/unused", keep=0)
    with pytest.raises(ValueError, match="every=-1"):
        Checkpointer("/tmp/unused", every=-1)
