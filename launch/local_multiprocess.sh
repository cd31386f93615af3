#!/usr/bin/env bash
# Several processes on one machine, joined by jax.distributed on 127.0.0.1: the multi-host code
# path (per-process data, global arrays, preemption sync) without a cluster. On a CPU each process
# gets DEVICES fake devices.
#
#   launch/local_multiprocess.sh 2 configs/tiny.py /tmp/tiny-mp [--config.KEY=VALUE ...]
#
# A process that is lost (killed, out of memory) makes the others stop with exit status 75
# (clip_jax.infra.watchdog.RELAUNCH_STATUS); the launcher then starts them all again, the run
# resuming from its last checkpoint, at most RELAUNCHES times (default 3). Any other failure (a
# user's mistake, 2; a bug, 1; a non-finite loss, 3) ends it with that status. SIGTERM and SIGINT
# are forwarded to every process (they save and exit) and never relaunch.
set -euo pipefail
NUM_PROCESSES=${1:?usage: $0 NUM_PROCESSES CONFIG WORKDIR [flags...]}
CONFIG=${2:?config file}
WORKDIR=${3:?workdir}
shift 3
DEVICES=${DEVICES:-4}
RELAUNCHES=${RELAUNCHES:-3}
RELAUNCH_STATUS=75

pids=()
stopped=0
# Forward SIGTERM to every process, as a scheduler preempting the job would.
trap 'stopped=1; kill -TERM "${pids[@]}" 2>/dev/null' TERM INT

launch=0
while true; do
  port=${PORT:-$((20000 + RANDOM % 20000))}
  pids=()
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
      python -m clip_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
        --coordinator_address="127.0.0.1:${port}" --num_processes="$NUM_PROCESSES" --process_id="$i" \
        "$@" &
    pids+=($!)
  done
  # The status of each process: a trapped signal interrupts `wait`, so wait until it has ended.
  statuses=()
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null || true; done
    s=0
    wait "$pid" || s=$?
    statuses+=("$s")
  done
  # The run's status: a decision (1, 2, 3) over "lost" (75), over a process killed (128+signal).
  status=0 lost=0 decided=0
  for s in "${statuses[@]}"; do
    if ((s == RELAUNCH_STATUS)); then
      lost=1
    elif ((s != 0 && s < 128)); then
      decided=$s
    elif ((s != 0 && status == 0)); then
      status=$s
    fi
  done
  if ((decided != 0)); then
    status=$decided
  elif ((lost)); then
    status=$RELAUNCH_STATUS
  fi
  if ((lost && !decided && !stopped && launch < RELAUNCHES)); then
    launch=$((launch + 1))
    echo "local_multiprocess: a process was lost (statuses ${statuses[*]}); relaunch $launch of $RELAUNCHES: the run resumes from its last checkpoint" >&2
    continue
  fi
  exit "$status"
done
