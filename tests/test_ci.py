"""CI runs the README's two set-up commands as written and fails where they fail; the system set-up never fails.

.ci/run runs here in a copy of .ci/ beside a README of the test's choosing, where `python3 -m venv` makes a venv of
stand-ins that only log how they were called: a run takes seconds instead of a real install.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests import machine

REPO = Path(__file__).parents[1]
README = (REPO / "README.md").read_text()

# `python3 -m venv DIR` makes DIR/bin/{pip,python,ruff}, each logging its name and arguments; anything else is Python.
FAKE_PYTHON3 = f"""#!/bin/sh
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  for tool in pip python ruff; do
    printf '#!/bin/sh\\necho "%s $*" >> "$CALLS"\\n' "$tool" > "$3/bin/$tool"
    chmod +x "$3/bin/$tool"
  done
  exit 0
fi
exec {sys.executable} "$@"
"""


def readme_command(name: str) -> str:
    printed = subprocess.run(
        [sys.executable, REPO / ".ci" / "readme_commands.py", name], capture_output=True, text=True, check=True
    )
    return printed.stdout.rstrip("\n")


MAIN, TESTS = readme_command("main"), readme_command("tests")


def readme_with(*commands: str) -> str:
    """A README whose top has a bash block for each command, and a section after it with one more bash block."""
    blocks = [f"```bash\n# step {i}\n{command}\n```\n" for i, command in enumerate(commands)]
    return "# project\n\n" + "\n".join(blocks) + "\n## More\n\n```bash\nexit 1\n```\n"


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def run_ci(tmp_path: Path, readme: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """bash .ci/run in a tree of .ci/, `readme` and a logging scripts/setup_system.sh; returns it and the calls."""
    tree, bin_dir, calls = tmp_path / "tree", tmp_path / "bin", tmp_path / "calls"
    shutil.copytree(REPO / ".ci", tree / ".ci")
    shutil.copy(REPO / "pyproject.toml", tree / "pyproject.toml")
    (tree / "README.md").write_text(readme)
    (tree / "scripts").mkdir()
    write_executable(tree / "scripts" / "setup_system.sh", '#!/bin/sh\necho setup_system >> "$CALLS"\n')
    bin_dir.mkdir()
    write_executable(bin_dir / "python3", FAKE_PYTHON3)
    calls.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    ran = subprocess.run(["bash", ".ci/run"], cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    return ran, calls.read_text().splitlines()


def test_the_commands_are_the_readme_s_first_two_bash_blocks():
    blocks = README.split("```bash\n")
    assert f"\n{MAIN}\n```" in blocks[1] and f"\n{TESTS}\n```" in blocks[2]
    assert MAIN.startswith("python3 -m venv .venv && ") and MAIN.endswith(" -m metastone_jax.train")
    assert TESTS.startswith("scripts/setup_system.sh && ") and TESTS.endswith(" -m pytest -q")


RUFF = re.search(r"ruff==[0-9.]+", (REPO / "pyproject.toml").read_text()).group()
# What .ci/run runs after the main job: ruff at the test extra's version, libtpu (the tpu extra) for the TPU compile
# tests, then the README's test command.
AFTER_MAIN = [
    f"pip install -q {RUFF}",
    "ruff format --check .",
    "ruff check .",
    "pip install -q -e .[tpu]",
    "setup_system",
    "pip install -q -e .[test]",
    "python -m pytest -q",
]


def test_ci_runs_the_readme_s_main_job_shortened_then_ruff_then_its_tests(tmp_path):
    ran, calls = run_ci(tmp_path, README)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    main, *rest = calls[1:]
    assert calls[0] == "pip install -e ."
    assert main.startswith("python -m metastone_jax.train sft.steps=") and main.endswith(" eval.modes=[low]")
    assert rest == AFTER_MAIN
    assert f"+ {TESTS}\n" in ran.stdout


@pytest.mark.parametrize(
    "commands, message",
    [
        ((MAIN,), "expected two fenced bash blocks before the first '## ' heading"),
        ((), "expected two fenced bash blocks before the first '## ' heading"),
        ((MAIN, TESTS, "echo a third"), "expected two fenced bash blocks before the first '## ' heading"),
        ((MAIN, "# a comment and no command"), "found 2 (1 with a command)"),
        ((MAIN + " --run-dir out", TESTS), "the first bash block must end with `-m metastone_jax.train`"),
    ],
)
def test_ci_refuses_a_readme_without_its_two_commands_before_running_anything(tmp_path, commands, message):
    ran, calls = run_ci(tmp_path, readme_with(*commands))
    assert ran.returncode != 0 and "tree/README.md: " in ran.stderr and message in ran.stderr
    assert calls == []


@pytest.mark.parametrize(
    "main, tests, calls_made",
    [
        (MAIN.replace("-m venv", "-m no_such_venv"), TESTS, 0),
        (MAIN, TESTS.replace("-m venv", "-m no_such_venv"), 2 + AFTER_MAIN.index("setup_system") + 1),
        (MAIN, TESTS.replace("pytest -q", "pytest -q && false"), 2 + len(AFTER_MAIN)),
    ],
)
def test_ci_fails_where_a_readme_command_fails_and_runs_nothing_after_it(tmp_path, main, tests, calls_made):
    ran, calls = run_ci(tmp_path, readme_with(main, tests))
    assert ran.returncode != 0
    assert len(calls) == calls_made
    assert calls[2:] == AFTER_MAIN[: max(calls_made - 2, 0)]


def test_without_the_slow_link_tools_their_tests_skip_naming_the_tools_and_the_install(tmp_path):
    hidden = ("ip", "tc", "iptables-legacy")
    folders = os.environ["PATH"].split(os.pathsep)
    path = os.pathsep.join(f for f in folders if not any(os.path.exists(os.path.join(f, tool)) for tool in hidden))
    report = tmp_path / "report.xml"
    command = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "needs", f"--junitxml={report}"]
    ran = subprocess.run(
        [sys.executable, *command, "tests/launch/test_local_cluster.py"],
        cwd=REPO,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    skipped = {case.get("name"): case.find("skipped") for case in ElementTree.parse(report).getroot().iter("testcase")}
    assert "test_two_processes_behind_a_shaped_loopback_match_one_process" in skipped
    assert "test_latency_delays_every_packet_so_a_round_trip_takes_twice_the_latency" in skipped
    for name, skip in skipped.items():
        assert skip is not None, f"{name} ran without ip, tc and iptables-legacy"
        reason = skip.get("message")
        assert "ip (iproute2), tc (iproute2), iptables-legacy (iptables), not on PATH" in reason, reason
        assert "scripts/setup_system.sh as root, or apt-get install iproute2 iptables" in reason, reason


@pytest.fixture
def kernel(monkeypatch):
    """A root machine with every tool, whose commands answer from `answers` (command start -> exit code, stderr)."""
    answers, calls = {}, []

    def run(*command):
        calls.append(command)
        code, stderr = next((a for start, a in answers.items() if command[: len(start)] == start), (0, ""))
        return subprocess.CompletedProcess(command, code, "", stderr)

    monkeypatch.setattr(machine, "_run", run)
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    machine._kernel_lacks.cache_clear()
    yield answers, calls
    machine._kernel_lacks.cache_clear()  # the real machine's answers, for the tests that follow


def test_a_kernel_that_refuses_the_nfqueue_rule_is_named_and_the_probe_namespace_removed(kernel):
    answers, calls = kernel
    answers["ip", "netns", "exec"] = (1, "iptables-legacy: No chain/target/match by that name.")
    reason = machine.lacks("tc", "nfqueue")
    assert reason.startswith("needs the kernel's NFQUEUE target") and "No chain/target/match" in reason, reason
    assert "modprobe xt_NFQUEUE" in reason
    (_, _, _, name), rule, removed = calls[-3:]  # after the namespace probe: add, delete
    assert rule[:4] == ("ip", "netns", "exec", name) and "NFQUEUE" in rule
    assert removed == ("ip", "netns", "delete", name)


def test_a_machine_without_namespaces_or_root_is_named(kernel, monkeypatch):
    answers, _ = kernel
    answers["ip", "netns", "add"] = (1, "mount --make-shared /run/netns failed: Operation not permitted")
    assert machine.lacks("nfqueue") == (
        "needs network namespaces, but `ip netns add` failed: "
        "mount --make-shared /run/netns failed: Operation not permitted"
    )
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert machine.lacks("netns").startswith("needs root")
    assert machine.lacks("tc") is None
    with pytest.raises(ValueError, match="unknown machine needs \\['iptables'\\]; the valid ones are ip, tc"):
        machine.lacks("iptables")


def run_setup(tmp_path: Path, uid: int, tools: tuple[str, ...] = (), apt_get: str | None = None):
    """scripts/setup_system.sh with stand-ins for `id`, the given tools and `apt-get`, and the utilities it uses."""
    stand_ins, utilities = Path(tempfile.mkdtemp(dir=tmp_path)), tmp_path / "utilities"
    utilities.mkdir(exist_ok=True)
    for name in ("mktemp", "tail", "rm"):
        if not (utilities / name).exists():
            (utilities / name).symlink_to(shutil.which(name))
    bodies = {"id": f"echo {uid}", **dict.fromkeys(tools, "true"), **({"apt-get": apt_get} if apt_get else {})}
    for name, body in bodies.items():
        write_executable(stand_ins / name, f"#!/bin/sh\n{body}\n")
    env = {"PATH": f"{stand_ins}:{utilities}", "CALLS": str(tmp_path / "apt-calls")}
    return subprocess.run(["/bin/bash", REPO / "scripts" / "setup_system.sh"], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    "uid, tools, why", [(1000, (), "not root"), (0, (), "no apt-get"), (1000, ("ip", "tc"), "not root")]
)
def test_setup_without_root_or_apt_says_why_and_succeeds(tmp_path, uid, tools, why):
    ran = run_setup(tmp_path, uid, tools)
    missing = "iptables" if tools else "iproute2 iptables"
    assert ran.returncode == 0 and ran.stderr == ""
    assert ran.stdout == (
        f"setup_system: {missing} not installed: {why}; "
        f"the slow-link tests will skip (install later with: apt-get install {missing})\n"
    )


def test_setup_installs_what_is_missing_then_nothing_once_all_is_there(tmp_path):
    apt_get = 'echo "$*" >> "$CALLS"'
    ran = run_setup(tmp_path, 0, ("ip", "tc"), apt_get)
    assert ran.returncode == 0 and ran.stdout == "setup_system: apt-get install iptables\n"
    assert (tmp_path / "apt-calls").read_text().splitlines() == ["update -qq", "install -y -qq iptables"]
    ran = run_setup(tmp_path, 0, ("ip", "tc", "iptables-legacy"), apt_get)
    assert ran.returncode == 0 and ran.stdout == ""
    assert len((tmp_path / "apt-calls").read_text().splitlines()) == 2


def test_setup_whose_apt_get_fails_shows_why_and_succeeds(tmp_path):
    ran = run_setup(tmp_path, 0, (), 'echo "E: Unable to locate package iptables"; exit 100')
    assert ran.returncode == 0
    assert "E: Unable to locate package iptables\nsetup_system: apt-get failed; the slow-link tests" in ran.stdout
