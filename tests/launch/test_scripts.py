"""The TPU pod and SLURM scripts, run against stand-ins for `gcloud` and `srun` that print what they were given."""

import os
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[2]


def run_with_stand_in(script: str, tool: str, tmp_path: Path, *args: str, **env: str) -> str:
    (tmp_path / tool).write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (tmp_path / tool).chmod(0o755)
    result = subprocess.run(
        ["bash", str(REPO / "launch" / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", **env},
    )
    return result.stdout


def test_tpu_pod_runs_the_trainer_on_every_worker_with_one_run_directory(tmp_path):
    printed = run_with_stand_in(
        "tpu_pod.sh",
        "gcloud",
        tmp_path,
        "qwen2_1.5b",
        "task.files=[a b.jsonl]",
        TPU_NAME="pod",
        ZONE="zone-a",
        RUN_DIR="/shared/run 1",
    )
    lines = printed.splitlines()
    assert lines[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in lines
    remote = shlex.split(lines[-1].removeprefix("--command="))
    assert remote[remote.index("-m") :] == [
        "-m",
        "metastone_jax.train",
        "--distributed",
        "--run-dir",
        "/shared/run 1",
        "qwen2_1.5b",
        "task.files=[a b.jsonl]",
    ]


def test_slurm_tasks_share_the_job_s_run_directory(tmp_path):
    printed = run_with_stand_in("gpu_slurm.sh", "srun", tmp_path, "qwen2_7b", "rl.steps=5", SLURM_JOB_ID="42")
    args = printed.splitlines()
    assert args[args.index("-m") :] == [
        "-m",
        "metastone_jax.train",
        "--distributed",
        "--run-dir",
        "runs/slurm-42",
        "qwen2_7b",
        "rl.steps=5",
    ]
