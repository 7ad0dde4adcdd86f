"""The local cluster launcher: 2 processes over gloo give the numbers of one process with 2 devices.

Run as a module (`python -m tests.launch.test_local_cluster OUT.npz`) this file is also the child program.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from launch import local_cluster, packet_delay

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALGORITHMS = [
    ("pmean", {}),
    ("decentralized", {"peer_mode": "shift_one"}),
    ("low_precision_decentralized", {}),
    ("local_sgd", {"period": 2}),
]
NUM_STEPS = 4
# --bandwidth/--latency: a namespace shaped by tc, and an NFQUEUE rule whose packets launch.packet_delay holds back.
NEEDS_SLOW_LINK = pytest.mark.needs("root", "ip", "tc", "iptables-legacy", "netns", "nfqueue")


def train_all(fetch):
    """{algorithm: losses [steps, 2]} and final parameters, from harness training on 2 replicas."""
    import jax

    import comms
    from tests.comms import harness

    results = {}
    for name, options in ALGORITHMS:
        params, losses = harness.train(comms.get(name, **options), num_replicas=2, num_steps=NUM_STEPS)
        results[f"{name}/losses"] = losses
        for i, leaf in enumerate(jax.tree.leaves(params)):
            results[f"{name}/param{i}"] = fetch(leaf)
    return results


def launch(*options, timeout=300):
    """Runs this file as the child program under the launcher, with one CPU device per process."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "launch.local_cluster", *options]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_as_in_process(output_file, launched):
    from tests.comms import harness

    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "[0] " in launched.stdout and "[1] " in launched.stdout
    expected = train_all(harness.fetch)
    got = np.load(output_file)
    assert sorted(got.files) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_two_processes_over_gloo_match_one_process_with_two_devices(tmp_path):
    output_file = tmp_path / "results.npz"
    launched = launch("--num-processes", "2", "--", "tests.launch.test_local_cluster", str(output_file))
    assert_same_as_in_process(output_file, launched)


@NEEDS_SLOW_LINK
def test_two_processes_behind_a_shaped_loopback_match_one_process(tmp_path):
    output_file = tmp_path / "results.npz"
    launched = launch(
        "--num-processes",
        "2",
        "--bandwidth",
        "100mbit",
        "--latency",
        "1ms",
        "--",
        "tests.launch.test_local_cluster",
        str(output_file),
    )
    assert_same_as_in_process(output_file, launched)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "metastone-" not in namespaces, "the launcher left its network namespace behind"


def test_a_failing_child_fails_the_launch_and_stops_the_others(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            if os.environ["{local_cluster.PROCESS_ID_ENV}"] == "1":
                print("giving up")
                sys.exit(3)
            time.sleep(120)
            """
        )
    )
    launched = launch("--num-processes", "2", "--", str(script), timeout=60)
    assert launched.returncode == 3
    assert "[1] giving up" in launched.stdout
    assert "process 1 failed with exit code 3" in launched.stderr


def test_shaping_uses_tbf_for_bandwidth_and_a_netfilter_queue_for_latency():
    (tbf,) = local_cluster.shaping_commands("1gbit", None)
    assert tbf[:7] == ["tc", "qdisc", "add", "dev", "lo", "root", "tbf"] and tbf[7:9] == ["rate", "1gbit"]
    rule, tbf = local_cluster.shaping_commands("10gbit", "5ms")
    assert rule[0] == "iptables-legacy" and rule[-4:-2] == ["-j", "NFQUEUE"] and tbf[7:9] == ["rate", "10gbit"]
    assert local_cluster.shaping_commands(None, "5ms") == [rule]
    assert local_cluster.bandwidth_bits_per_second("2.5gbit") == 2.5e9


@pytest.mark.parametrize("delay, seconds", [("500us", 5e-4), ("5ms", 5e-3), ("1.5ms", 1.5e-3), ("0.1s", 0.1)])
def test_delays_are_read_in_their_units(delay, seconds):
    assert packet_delay.delay_seconds(delay) == pytest.approx(seconds)


PING_PONG = """
import os, socket, sys, time
port, rounds = int(sys.argv[1]), 8
if os.environ["{rank}"] == "0":
    server = socket.create_server(("127.0.0.1", port))
    peer, _ = server.accept()
    for _ in range(rounds):
        peer.sendall(peer.recv(1))
else:
    for _ in range(100):
        try:
            peer = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    round_trips = []
    for _ in range(rounds):
        start = time.perf_counter()
        peer.sendall(b"x")
        peer.recv(1)
        round_trips.append(time.perf_counter() - start)
    print(f"round trip {{min(round_trips) * 1e3:.3f}} ms")
"""


@NEEDS_SLOW_LINK
def test_latency_delays_every_packet_so_a_round_trip_takes_twice_the_latency(tmp_path):
    script = tmp_path / "ping_pong.py"
    script.write_text(PING_PONG.format(rank=local_cluster.PROCESS_ID_ENV))
    launched = launch("--num-processes", "2", "--latency", "25ms", "--", str(script), "5555", timeout=60)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    (milliseconds,) = re.findall(r"\[1\] round trip ([\d.]+) ms", launched.stdout)
    # A lower bound only: the delay is a floor that no load can shorten, while the time above it is the machine's.
    assert float(milliseconds) >= 50.0
    assert "metastone-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.parametrize(
    "bandwidth, latency, message",
    [("fast", None, "not a rate"), ("1gbit", "5 ms", "not a delay"), (None, "ms", "not a delay")],
)
def test_bad_link_settings_are_refused_with_their_value(bandwidth, latency, message):
    with pytest.raises(ValueError, match=message):
        local_cluster.shaping_commands(bandwidth, latency)


def test_shaping_without_root_is_refused_with_a_clear_sentence(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit, match="need root"):
        local_cluster._check_rights(need_delay=False)


def test_latency_without_iptables_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "iptables-legacy" else f"/usr/sbin/{tool}")
    with pytest.raises(SystemExit, match="apt-get install iptables"):
        local_cluster._check_rights(need_delay=True)
    local_cluster._check_rights(need_delay=False)


if __name__ == "__main__":
    from metastone_jax.distributed import initialize_from_env

    process_id, _ = initialize_from_env()
    from tests.comms import harness

    results = train_all(harness.fetch)
    if process_id == 0:
        np.savez(sys.argv[1], **results)


def test_children_get_the_cluster_variables_and_huge_pages_without_losing_other_tunables():
    env = local_cluster.child_environment(1, 2, 1234, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env["HOME"] == "/h" and env[local_cluster.PROCESS_ID_ENV] == "1"
    assert env[local_cluster.NUM_PROCESSES_ENV] == "2" and env[local_cluster.COORDINATOR_ENV] == "127.0.0.1:1234"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert local_cluster.child_environment(0, 1, 1, {})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert local_cluster.child_environment(0, 1, 1, chosen)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    merged = local_cluster.glibc_tunables(chosen, "glibc.malloc.mmap_max=0:glibc.malloc.hugetlb=1")
    assert merged == "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=0"
    assert local_cluster.glibc_tunables({"GLIBC_TUNABLES": merged}, "glibc.malloc.mmap_max=0") == merged
