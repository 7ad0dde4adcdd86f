#!/usr/bin/env bash
# SLURM batch script: one JAX process per GPU across the allocated nodes, running metastone_jax.train.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh config=configs/qwen2_7b.yaml [key=value ...]
#
# srun starts one task per GPU; inside each, `jax.distributed.initialize()` without arguments detects the
# SLURM cluster (coordinator = first node, process id = SLURM_PROCID, count = SLURM_NTASKS) and binds the
# task to its GPU (SLURM_LOCALID). The nodes' interconnect is the `data` axis the comms algorithms relax.
#SBATCH --job-name=metastone
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=metastone-%j.out
set -euo pipefail

PYTHON=${PYTHON:-python3}
cd "${SLURM_SUBMIT_DIR:-.}"
# One run directory for all tasks (on the shared submit directory): checkpoints are written by all of them,
# metrics and the evaluation by the first.
RUN_DIR=${RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}

# Every task sees all GPUs of its node; jax picks the one at index SLURM_LOCALID (restricting
# CUDA_VISIBLE_DEVICES per task, e.g. with --gpus-per-task, would make that index wrong).
srun --kill-on-bad-exit=1 "${PYTHON}" -m metastone_jax.train --distributed --run-dir "${RUN_DIR}" "$@"
