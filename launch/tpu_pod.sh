#!/usr/bin/env bash
# Run on every host of a Cloud TPU pod slice (jax.distributed.initialize() detects the pod):
#
#   launch/tpu_pod.sh my-tpu us-central2-b configs/b16.py gs://bucket/runs/b16 [--config.KEY=VALUE]
#
# The repository must be at the same path (~/clip_jax) on every host; gs:// workdirs hold the
# checkpoints and metrics. Rerunning the same command resumes from the latest checkpoint.
set -euo pipefail
TPU_NAME=${1:?TPU name}
ZONE=${2:?zone}
CONFIG=${3:?config file}
WORKDIR=${4:?workdir}
shift 4
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/clip_jax && pip install -q -e . 'jax[tpu]' &&
  python -m clip_jax.main --config=$CONFIG --workdir=$WORKDIR $EXTRA"
