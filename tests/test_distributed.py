"""Joining a multi-process run: the launcher's environment protocol and JAX's own cluster detection."""

import jax

from launch import local_cluster
from metastone_jax import distributed


def test_the_launcher_sets_the_variables_the_library_reads():
    env = local_cluster.child_environment(1, 2, 1234, {})
    assert env[distributed.PROCESS_ID_ENV] == "1" and env[distributed.NUM_PROCESSES_ENV] == "2"
    assert env[distributed.COORDINATOR_ENV] == "127.0.0.1:1234"


def test_outside_a_launch_only_auto_detect_joins_through_jax_distributed(monkeypatch):
    joined = []
    monkeypatch.delenv(distributed.COORDINATOR_ENV, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda: joined.append(True))
    assert distributed.initialize_from_env() == (0, 1) and not joined
    assert distributed.initialize_from_env(auto_detect=True) == (jax.process_index(), jax.process_count())
    assert joined == [True]
