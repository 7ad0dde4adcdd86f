"""DiLoCo and PowerSGD in the trainer, through its command line: SFT then RL with fsdp inside each replica, on 2
processes through the launcher, and a kill -9 mid-round followed by a resume that reproduces every metric.

Marked slow: every run compiles an inner and a sync step (DiLoCo) or a full and a compressed one (PowerSGD) per
phase, several minutes per test on a 2-core machine.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import PRESET
from tests.test_train import TINY as TRAIN_TINY

REPO = Path(__file__).parents[2]
TINY = [PRESET, *TRAIN_TINY, "eval.questions=0"]  # the trainer tests' tiny run, without its evaluation
DILOCO = ["comm.algorithm=diloco", "comm.options={inner_steps: 2, compression: int4}"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "metastone_jax.train", *TINY, *overrides, "--run-dir", str(run_dir)]


def environment(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def assert_trained(run_dir: Path, sft_steps: int, rl_steps: int) -> None:
    got = metrics(run_dir)
    assert [m["phase"] for m in got] == ["sft"] * sft_steps + ["rl"] * rl_steps
    assert all(np.isfinite(m["loss"]) for m in got)
    sft = [m["loss"] for m in got if m["phase"] == "sft"]
    assert np.mean(sft[-2:]) < np.mean(sft[:2]) - 0.3


def test_more_fragments_than_layers_stop_the_run_with_a_sentence_before_compiling(tmp_path, capsys):
    from metastone_jax.train import main

    options = "comm.options={inner_steps: 4, fragments: 4}"
    assert main([*TINY, "mesh.data=2", "comm.algorithm=diloco", options, "--run-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "fragments=4 is more than the 2 rows of the leading axis of parameter" in error
    assert "use fragments <= 2" in error


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "overrides",
    [DILOCO, ["comm.algorithm=powersgd", "comm.options={rank: 2, start_step: 2}"]],
    ids=["diloco", "powersgd"],
)
def test_sft_and_rl_run_through_the_command_line_with_fsdp_inside_each_replica(tmp_path, overrides):
    # 6 SFT and 4 RL updates: both phases run inner steps and syncs (DiLoCo, H = 2) or compressed steps (PowerSGD).
    command = train_command(tmp_path, "sft.steps=6", "rl.steps=4", "mesh.data=2", "mesh.fsdp=2", *overrides)
    done = subprocess.run(command, env=environment(4), cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_trained(tmp_path, 6, 4)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_diloco_trains_on_two_processes_through_the_launcher(tmp_path):
    # 2 processes x 2 devices: one replica per process, fsdp over its two devices.
    command = [
        sys.executable,
        "-m",
        "launch.local_cluster",
        "--num-processes",
        "2",
        "--",
        *train_command(tmp_path, "sft.steps=6", "rl.steps=2", "mesh.data=2", "mesh.fsdp=2", *DILOCO)[2:],
    ]
    done = subprocess.run(command, env=environment(2), cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_trained(tmp_path, 6, 2)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_diloco_killed_mid_round_resumes_with_the_same_metrics(tmp_path):
    # H = 4 in 2 fragments, a sync every 2 steps. The kill comes after the checkpoint of step 4, i.e. RL update 1,
    # which synced fragment 1 (its momentum and int4 error rows are no longer zero) while fragment 0 is 2 steps
    # into its round; the resumed run must sync fragment 0 at RL update 3 and fragment 1 at RL update 5 as the
    # uninterrupted one does.
    options = "comm.options={inner_steps: 4, compression: int4, fragments: 2}"
    args = ["sft.steps=2", "rl.steps=6", "checkpoint.every=4", "mesh.data=2", "comm.algorithm=diloco", options]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def launch(run_dir):
        return subprocess.Popen(
            train_command(run_dir, *args),
            env=environment(2),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    first, victim = launch(straight), launch(killed)
    deadline = time.time() + 2400
    while not (killed / "checkpoints" / "4").exists():
        assert victim.poll() is None, victim.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert first.wait(timeout=2400) == 0, first.stdout.read().decode()[-3000:]
    resumed = launch(killed)
    output = resumed.communicate(timeout=2400)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from the checkpoint of step 4" in output
    drop = ("step_s", "tokens_per_s")
    expected = [{k: v for k, v in m.items() if k not in drop} for m in metrics(straight)]
    got = [{k: v for k, v in m.items() if k not in drop} for m in metrics(killed)]
    assert [m["step"] for m in got] == list(range(1, 9))
    assert got == expected
