#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh, which runs it on every worker of the slice from the code it
# unpacked there (~/clip_jax/code/VERSION/launch/tpu_worker.sh):
#
#   tpu_worker.sh start RUN PYTHON CONFIG WORKDIR [flags ...]   start the run detached
#   tpu_worker.sh status RUN [WORKDIR]    one line "clip_jax-status: running|exited N|lost|absent",
#                                         and "clip_jax-done" if WORKDIR/done.json is on this disk
#   tpu_worker.sh stop RUN                SIGTERM to the run's process group (it saves and exits)
#
# The run outlives the ssh session (setsid + nohup) and appends its output to
# ~/clip_jax/logs/RUN.log on this worker; ~/clip_jax/state/RUN.pid holds its process (group) id
# and ~/clip_jax/state/RUN.rc its exit status once it has ended. A run already running is left
# alone. The processes join through explicit --coordinator_address/--num_processes/--process_id
# flags read from the TPU VM's metadata server (worker 0's address, the worker count and this
# worker's index), so that no environment detection is needed.
set -euo pipefail

BASE=$HOME/clip_jax
CODE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$CODE/launch/tpu_worker.sh

die() {
  echo "tpu_worker: error: $*" >&2
  exit 2
}
metadata() {
  curl -sSf -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}
running() { # PIDFILE: the run it names is alive (and is ours, not a reused pid)
  local pid
  [[ -f $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q tpu_worker.sh
}

start() {
  [[ $# -ge 4 ]] || die "usage: $0 start RUN PYTHON CONFIG WORKDIR [flags ...]"
  local run=$1 python=$2 config=$3 workdir=$4
  shift 4
  local pidfile=$BASE/state/$run.pid rcfile=$BASE/state/$run.rc log=$BASE/logs/$run.log
  mkdir -p "$BASE/state" "$BASE/logs"
  if running "$pidfile"; then
    echo "tpu_worker: $(hostname): run $run already running (pid $(<"$pidfile")), log $log"
    return 0
  fi
  local endpoints worker hosts
  endpoints=$(metadata worker-network-endpoints) || die "no TPU VM metadata (worker-network-endpoints)"
  worker=$(metadata agent-worker-number) || die "no TPU VM metadata (agent-worker-number)"
  # "name:id:ip,..." (older images) or "host,..." -> worker 0's address, the worker count
  IFS=, read -ra hosts <<<"$endpoints"
  local distributed=()
  if ((${#hosts[@]} > 1)); then
    distributed=(--coordinator_address="${hosts[0]##*:}:8476" --num_processes="${#hosts[@]}"
      --process_id="$worker")
  fi
  rm -f "$rcfile"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) worker $worker of ${#hosts[@]}: code ${CODE##*/} ===" >>"$log"
  cd "$CODE"
  setsid nohup bash "$SELF" _run "$run" "$python" -m clip_jax.main --config="$config" \
    --workdir="$workdir" "${distributed[@]}" "$@" >>"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "tpu_worker: $(hostname): started run $run as worker $worker (pid $!), log $log"
}

# The detached process: the trainer, then its exit status. Its own SIGTERM handler lets the
# trainer (signalled with the whole process group) save and exit before the status is written.
_run() {
  local run=$1 python=$2
  shift 2
  echo $$ >"$BASE/state/$run.pid"
  trap 'echo "tpu_worker: SIGTERM: the run saves and stops"' TERM
  local status=0
  "$python" "$@" || status=$?
  echo "$status" >"$BASE/state/$run.rc.tmp"
  mv "$BASE/state/$run.rc.tmp" "$BASE/state/$run.rc"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) exit status $status ==="
}

status() {
  [[ $# -ge 1 ]] || die "usage: $0 status RUN [WORKDIR]"
  local state=$BASE/state/$1
  if [[ -f $state.rc ]]; then
    echo "clip_jax-status: exited $(<"$state.rc")"
  elif running "$state.pid"; then
    echo "clip_jax-status: running"
  elif [[ -f $state.pid ]]; then
    echo "clip_jax-status: lost" # gone without an exit status: the VM restarted under it
  else
    echo "clip_jax-status: absent"
  fi
  if [[ -n ${2:-} && -f $2/done.json ]]; then echo "clip_jax-done"; fi
}

stop() {
  [[ $# -eq 1 ]] || die "usage: $0 stop RUN"
  local pidfile=$BASE/state/$1.pid
  if running "$pidfile"; then
    kill -TERM -- "-$(<"$pidfile")"
    echo "tpu_worker: $(hostname): sent SIGTERM to run $1"
  fi
}

command=${1:-}
[[ $# -gt 0 ]] && shift
case $command in
  start | status | stop | _run) "$command" "$@" ;;
  *) die "usage: $0 start|status|stop RUN ..." ;;
esac
