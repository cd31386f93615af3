#!/usr/bin/env bash
# clip_jax on a Cloud TPU VM slice, from your machine (gcloud logged in, a git checkout):
#
#   launch/tpu_pod.sh [--zone=us-central2-b] [--accelerator-type=v4-32] [--spot] [--queued] \
#     TPU_NAME CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# Creates or reuses the slice TPU_NAME, copies the code (HEAD plus uncommitted changes to tracked
# files) to every worker and installs it once per code version, starts the run on all workers
# detached (each worker logs to ~/clip_jax/logs/RUN.log, RUN being WORKDIR's last part), watches
# it and relaunches it after a preemption until WORKDIR/done.json exists. WORKDIR is gs://... (or
# a path every worker mounts). Rerunning the same command reattaches to a running run or resumes
# it from its latest checkpoint. `--dry-run` prints every command, runs none; `--help` lists the
# options (project, runtime version, Spot/preemptible, queued resources, polling, ...).
set -euo pipefail
command -v python3 >/dev/null || { echo "tpu_pod.sh: error: python3 is needed" >&2; exit 2; }
exec python3 "$(dirname "${BASH_SOURCE[0]}")/tpu_pod.py" "$@"
