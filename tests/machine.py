"""What a test needs from the machine besides Python packages, and why a machine lacks it.

A test names its needs with `@pytest.mark.needs("root", "tc", ...)`, each one of NEEDS; tests/conftest.py skips it
where this machine lacks one, with a reason that names what is missing and how to get it. `scripts/setup_system.sh`,
the first step of the README's test command, installs the tools where it can (as root, with apt).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from launch import local_cluster

# Each tool and the Debian package that has it.
TOOLS = {"ip": "iproute2", "tc": "iproute2", "iptables-legacy": "iptables"}
# Probing the kernel runs the tools as root, so a kernel need brings those needs with it.
IMPLIED = {"netns": ("root", "ip"), "nfqueue": ("root", "ip", "netns", "iptables-legacy")}
NEEDS = (*TOOLS, "root", *IMPLIED)


def lacks(*needs: str) -> str | None:
    """Why this machine cannot run a test that needs `needs`, or None when it can."""
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"unknown machine needs {unknown}; the valid ones are {', '.join(NEEDS)}")
    wanted = set(needs).union(*(IMPLIED.get(need, ()) for need in needs))
    missing = [tool for tool in TOOLS if tool in wanted and shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({TOOLS[tool] for tool in missing}))
        named = ", ".join(f"{tool} ({TOOLS[tool]})" for tool in missing)
        return f"needs {named}, not on PATH: run scripts/setup_system.sh as root, or apt-get install {packages}"
    if "root" in wanted and os.geteuid() != 0:
        return "needs root to create and shape a network namespace: run the tests as root"
    for feature in IMPLIED:
        if feature in wanted and (reason := _kernel_lacks(feature)):
            return reason
    return None


@functools.cache
def _kernel_lacks(feature: str) -> str | None:
    """Tries `feature` in a scratch network namespace: the namespace itself, or the launcher's NFQUEUE rule in it."""
    # Not named metastone-*: the launch tests check that no such namespace is left behind.
    name = f"pytest-probe-{os.getpid()}"
    added = _run("ip", "netns", "add", name)
    if added.returncode != 0:
        return f"needs network namespaces, but `ip netns add` failed: {added.stderr.strip()}"
    try:
        if feature == "nfqueue":
            (rule,) = local_cluster.shaping_commands(None, "1ms")
            refused = _run("ip", "netns", "exec", name, *rule)
            if refused.returncode != 0:
                return (
                    f"needs the kernel's NFQUEUE target, but iptables-legacy refused the rule: "
                    f"{refused.stderr.strip()}; load it with modprobe xt_NFQUEUE"
                )
            if not _queue_available():
                return "needs the kernel's netfilter queue: load it with modprobe nfnetlink_queue"
        return None
    finally:
        _run("ip", "netns", "delete", name)


def _queue_available() -> bool:
    """nfnetlink_queue is loaded, or loads (as it would when the packet delayer binds its queue)."""
    if os.path.exists("/proc/net/netfilter/nfnetlink_queue"):
        return True
    return shutil.which("modprobe") is not None and _run("modprobe", "nfnetlink_queue").returncode == 0


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)
