"""Starts N JAX processes on this host, optionally behind an emulated slow link.

    python -m launch.local_cluster --num-processes 2 [--bandwidth 1gbit] [--latency 5ms] -- <module or script.py> [args]

Every child gets its rank, the process count and the coordinator address in environment variables, which
`metastone_jax.distributed.initialize_from_env()` reads to join `jax.distributed` with CPU collectives over gloo.
With --bandwidth/--latency the children run inside a fresh network namespace whose loopback is shaped: a `tc` tbf
rate limit for the bandwidth, and for the latency an iptables NFQUEUE rule whose packets `launch.packet_delay` holds
back; all traffic stays on 127.0.0.1 inside it. This needs root, iproute2 and, for --latency, iptables
(`apt-get install iproute2 iptables`).
Output lines are prefixed with the child's rank; the launch fails, and stops the others, when any child fails.
Children allocate large buffers on transparent huge pages (see `child_environment`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping

from launch import packet_delay

# The protocol metastone_jax/distributed.py reads (this package imports nothing of metastone_jax).
COORDINATOR_ENV = "METASTONE_COORDINATOR"
NUM_PROCESSES_ENV = "METASTONE_NUM_PROCESSES"
PROCESS_ID_ENV = "METASTONE_PROCESS_ID"

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
# The NFQUEUE number of the delay rule; each shaped launch has a namespace (and so a queue 0) of its own.
_DELAY_QUEUE = 0
# The loopback device sends frames up to 64 KiB; a token bucket must hold at least one.
_LOOPBACK_MTU = 65536


def bandwidth_bits_per_second(rate: str) -> float:
    """'1gbit' -> 1e9; a clear error for anything `tc` would not read as a rate."""
    match = _RATE.match(rate)
    if not match:
        raise ValueError(f"--bandwidth {rate!r} is not a rate like 100mbit, 1gbit or 10gbit")
    return float(match.group(1)) * _RATE_BITS[match.group(2)]


def shaping_commands(bandwidth: str | None, latency: str | None) -> list[list[str]]:
    """The commands that shape `lo`: a tbf rate limit for a bandwidth, an NFQUEUE rule for a latency.

    The rule hands every packet to `launch.packet_delay`, which holds it for the latency (the kernels we run on
    have no netem). Each packet crosses `lo` once, so a latency of d gives a round trip of 2d.
    """
    commands = []
    if latency is not None:
        packet_delay.delay_seconds(latency)
        commands.append(
            [
                "iptables-legacy",
                "-t",
                "mangle",
                "-A",
                "OUTPUT",
                "-o",
                "lo",
                "-j",
                "NFQUEUE",
                "--queue-num",
                str(_DELAY_QUEUE),
            ]
        )
    if bandwidth is not None:
        bytes_per_second = bandwidth_bits_per_second(bandwidth) / 8
        # A burst of ~2 ms of traffic (at least two frames) keeps the rate exact without starving one flow; the
        # queue holds 0.5 s so that TCP sees delay rather than drops.
        burst = max(2 * _LOOPBACK_MTU, int(bytes_per_second * 0.002))
        limit = max(4 * burst, int(bytes_per_second * 0.5))
        commands.append(
            [
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                bandwidth,
                "burst",
                str(burst),
                "limit",
                str(limit),
            ]
        )
    return commands


def _check_rights(need_delay: bool) -> None:
    if os.geteuid() != 0:
        raise SystemExit("--bandwidth/--latency need root: they create a network namespace and shape it.")
    tools = {"ip": "iproute2", "tc": "iproute2", **({"iptables-legacy": "iptables"} if need_delay else {})}
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if missing:
        raise SystemExit(
            f"--bandwidth/--latency need the tools of {' and '.join(missing)}; install them with: "
            f"apt-get install {' '.join(missing)}"
        )


@contextlib.contextmanager
def _packet_delay(enter: list[str], latency: str) -> Iterator[subprocess.Popen]:
    """`launch.packet_delay` running in the namespace, bound to its queue before any traffic; stopped on exit."""
    delayer = subprocess.Popen(
        [*enter, sys.executable, packet_delay.__file__, "--delay", latency, "--queue", str(_DELAY_QUEUE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first_line = delayer.stdout.readline()
        if first_line.strip() != "ready":
            delayer.wait(timeout=10)
            raise SystemExit(f"--latency: the packet delayer did not start: {first_line}{delayer.stdout.read()}")
        yield delayer
    finally:
        if delayer.poll() is None:
            delayer.terminate()
            delayer.wait(timeout=10)


@contextlib.contextmanager
def shaped_namespace(bandwidth: str | None, latency: str | None) -> Iterator[tuple[list[str], list[subprocess.Popen]]]:
    """A network namespace with a shaped loopback, removed on exit.

    Yields the command prefix that enters it and the helper processes the shaping needs (the packet delayer),
    which must outlive the children.
    """
    commands = shaping_commands(bandwidth, latency)
    _check_rights(need_delay=latency is not None)
    name = f"metastone-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        enter = ["ip", "netns", "exec", name]
        subprocess.run([*enter, "ip", "link", "set", "lo", "up"], check=True)
        for command in commands:
            subprocess.run([*enter, *command], check=True)
        if latency is None:
            yield enter, []
        else:
            with _packet_delay(enter, latency) as delayer:
                yield enter, [delayer]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(rank: int, num_processes: int, port: int, base: dict[str, str]) -> dict[str, str]:
    """`base` plus the cluster variables, and glibc's malloc asked to back large blocks with huge pages."""
    return {
        **base,
        COORDINATOR_ENV: f"127.0.0.1:{port}",
        NUM_PROCESSES_ENV: str(num_processes),
        PROCESS_ID_ENV: str(rank),
        "PYTHONUNBUFFERED": "1",
        "GLIBC_TUNABLES": huge_page_tunables(base),
    }


def huge_page_tunables(env: Mapping[str, str]) -> str:
    """`env`'s GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added (a `hugetlb` tunable already there is left alone).

    XLA:CPU allocates every output buffer afresh, and each execution's temporaries as one block; glibc maps blocks
    this large anew each time, so with 4 KiB pages every first touch of a large buffer faults (huge pages fault 512x
    less often; BENCHMARKS.md has the measurements). The variable is read when a process starts.
    """
    return glibc_tunables(env, "glibc.malloc.hugetlb=1")


def glibc_tunables(env: Mapping[str, str], added: str) -> str:
    """`env`'s GLIBC_TUNABLES plus each `name=value` of the colon-separated `added` whose name it does not set."""
    tunables = env.get("GLIBC_TUNABLES", "")
    present = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    new = [item for item in added.split(":") if item.split("=", 1)[0] not in present]
    return ":".join(filter(None, [tunables, *new]))


def child_command(program: list[str]) -> list[str]:
    """`script.py args` runs the script, anything else runs as `python -m module args`."""
    if program[0].endswith(".py"):
        return [sys.executable, *program]
    return [sys.executable, "-m", *program]


def _relay(rank: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"[{rank}] {line}")
            sys.stdout.flush()


def run_children(
    program: list[str], num_processes: int, prefix: list[str], port: int, helpers: list[subprocess.Popen] = ()
) -> int:
    """Runs the children, relays their output, returns 0 or the first failing child's exit code.

    A helper the children's traffic depends on (the packet delayer) that exits stops the launch too.
    """
    children, relays, lock = [], [], threading.Lock()
    try:
        for rank in range(num_processes):
            child = subprocess.Popen(
                [*prefix, *child_command(program)],
                env=child_environment(rank, num_processes, port, dict(os.environ)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            children.append(child)
            relays.append(threading.Thread(target=_relay, args=(rank, child.stdout, lock), daemon=True))
            relays[-1].start()
        return _wait_for_all(children, helpers)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for relay in relays:
            relay.join(timeout=5)


def _wait_for_all(children: list[subprocess.Popen], helpers: list[subprocess.Popen] = ()) -> int:
    """Waits until every child exits; the first failure stops the rest (they would wait for it forever)."""
    running = list(range(len(children)))
    while running:
        for helper in helpers:
            if helper.poll() is not None:
                print(
                    f"local_cluster: {' '.join(helper.args[-5:])} exited with code {helper.returncode}: "
                    f"{helper.stdout.read().strip()}; stopping the processes",
                    file=sys.stderr,
                )
                return 1
        for rank in list(running):
            try:
                code = children[rank].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            running.remove(rank)
            if code != 0:
                print(
                    f"local_cluster: process {rank} failed with exit code {code}; stopping the others", file=sys.stderr
                )
                return code
    return 0


def _raise_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.local_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, required=True, help="how many JAX processes to start")
    parser.add_argument("--bandwidth", help="emulated link rate, e.g. 1gbit or 100mbit (needs root)")
    parser.add_argument("--latency", help="emulated one-way delay per packet, e.g. 5ms (needs root and iptables)")
    parser.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- then a module or script.py and its arguments")
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("give the program to run after --, e.g. -- metastone_jax.train or -- script.py")
    if args.num_processes < 1:
        parser.error(f"--num-processes must be at least 1, got {args.num_processes}")
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the children stop and the namespace goes away.
    signal.signal(signal.SIGTERM, _raise_on_signal)
    port = args.port or free_port()
    if args.bandwidth is None and args.latency is None:
        return run_children(program, args.num_processes, [], port)
    try:
        shaping_commands(args.bandwidth, args.latency)
    except ValueError as error:
        parser.error(str(error))
    with shaped_namespace(args.bandwidth, args.latency) as (prefix, helpers):
        return run_children(program, args.num_processes, prefix, port, helpers)


if __name__ == "__main__":
    sys.exit(main())
