#!/usr/bin/env bash
# Several processes on one machine, joined by jax.distributed on 127.0.0.1: the multi-host code
# path (per-process data, global arrays, preemption sync) without a cluster. On a CPU each process
# gets DEVICES fake devices.
#
#   launch/local_multiprocess.sh 2 configs/tiny.py /tmp/tiny-mp [--config.KEY=VALUE ...]
set -euo pipefail
NUM_PROCESSES=${1:?usage: $0 NUM_PROCESSES CONFIG WORKDIR [flags...]}
CONFIG=${2:?config file}
WORKDIR=${3:?workdir}
shift 3
DEVICES=${DEVICES:-4}
PORT=${PORT:-$((20000 + RANDOM % 20000))}

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    python -m clip_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="127.0.0.1:${PORT}" --num_processes="$NUM_PROCESSES" --process_id="$i" \
      "$@" &
  pids+=($!)
done
# Forward SIGTERM to every process, as a scheduler preempting the job would.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
