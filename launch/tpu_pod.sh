#!/usr/bin/env bash
# Runs `python -m metastone_jax.train` on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh qwen2_1.5b [key=value ...]
#
# Every worker runs the same command; on TPU `jax.distributed.initialize()` needs no arguments (the workers
# find each other through the TPU metadata), so `--distributed` is all it takes. For several
# slices joined over DCN, create them as one multi-slice queued resource and run this once per slice, or point
# TPU_NAME at each slice in turn; the `data` mesh axis then spans the slices (the slow link the relaxed
# communication algorithms are for). REPO_DIR must hold this repository on every worker (e.g. a git clone).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
PROJECT_FLAG=${PROJECT:+--project=${PROJECT}}
REPO_DIR=${REPO_DIR:-\$HOME/metastone_jax}
PYTHON=${PYTHON:-python3}
# One run directory for every worker, named here once: set RUN_DIR to a path all workers see (an NFS or gcsfuse
# mount) so that checkpoints are whole; worker 0 writes metrics and the evaluation.
RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}

# printf %q quotes every trainer argument so that it reaches the remote shell unchanged.
ARGS=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG} --worker=all \
  --command="cd ${REPO_DIR} && ${PYTHON} -m metastone_jax.train --distributed --run-dir $(printf %q "${RUN_DIR}")${ARGS}"
