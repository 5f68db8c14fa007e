#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (v4/v5e/v5p/v6e pods) and runs panda-jax on every worker.
#
#   launch/tpu_vm.sh [--dry-run] NAME ZONE create TYPE [gcloud flags...]  # queued resource NAME
#   launch/tpu_vm.sh [--dry-run] NAME ZONE setup              # copy + install on all workers
#   launch/tpu_vm.sh [--dry-run] NAME ZONE run MAIN_ARGS...   # start the run on all workers
#   launch/tpu_vm.sh [--dry-run] NAME ZONE status             # each worker: running or exited N
#   launch/tpu_vm.sh [--dry-run] NAME ZONE wait               # until all end; one fails: stop all
#   launch/tpu_vm.sh [--dry-run] NAME ZONE logs [WORKER]      # follow a worker's log (default 0)
#   launch/tpu_vm.sh [--dry-run] NAME ZONE stop               # SIGTERM: checkpoint and exit
#   launch/tpu_vm.sh [--dry-run] NAME ZONE delete             # delete the slice and its request
#
# --dry-run prints every command (gcloud, and the local git archive / rm of setup) instead of
# running it. `create` asks for the slice as a queued resource (granted when capacity frees up;
# pass e.g. --spot or --project=P after TYPE); the runtime image follows TYPE (v4-*,
# v5litepod-*, v5p-*, v6e-*), TPU_RUNTIME overrides it. `setup` copies this checkout's HEAD to
# ~/panda-jax on every worker and installs requirements.txt and requirements-tpu.txt (jax[tpu]
# at our jax version; gcsfs and google-cloud-storage for gs:// paths are in requirements.txt).
# `run` starts `python -m panda_jax.main --multihost MAIN_ARGS` on all workers at once, detached
# from the ssh session (jax.distributed finds its peers from the TPU metadata), each writing
# ~/panda-jax/run.log, its pid to run.pid and, when it ends, its exit status to run.status.
# `stop` sends SIGTERM (training saves a checkpoint and exits; a rerun of `run` resumes).
#
# When one worker fails: `status` shows it as `exited N` (N != 0) with the last 20 lines of its
# run.log (its error). `wait` (run it after `run`; it may be stopped and restarted at any time)
# asks every worker's status every TPU_WAIT_POLL seconds (default 10); when a worker has exited
# non-zero, or has no status and no live process (killed, or its VM restarted), it prints that
# worker's status and log tail, stops the others (SIGTERM, then SIGKILL after TPU_KILL_GRACE
# seconds, default 20: a process blocked in a collective with a dead peer never reaches the
# step boundary where SIGTERM is honoured) and exits with the failed worker's status. When every
# worker has exited 0 it exits 0. Without `wait`, the others stop only when jax.distributed
# notices the lost peer.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; }

dry_run=0
if [ "${1:-}" = --dry-run ]; then
  dry_run=1
  shift
fi
if [ $# -lt 3 ]; then
  usage
  exit 2
fi
name=$1 zone=$2 action=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
remote=panda-jax

# Prints a command as a shell would read it back: words quoted only where needed.
show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}
do_cmd() {
  if [ "$dry_run" = 1 ]; then show "$@"; else "$@"; fi
}
ssh_workers() {  # ssh_workers WORKER COMMAND
  do_cmd gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$1" --command "$2"
}
# One line per worker, "panda-jax HOST: running | exited N | not running", and after a non-zero
# exit the last 20 lines of its log, each as "panda-jax HOST log: LINE". A worker seen neither
# running nor exited is asked again a second later (its run may be starting or just ending).
status_cmd='w="panda-jax $(hostname)"; cd ~/'"$remote"' 2>/dev/null || { echo "$w: not running"; exit 0; }; for t in 1 2; do if [ -f run.pid ] && kill -0 $(cat run.pid) 2>/dev/null; then echo "$w: running"; exit 0; fi; if [ -f run.status ]; then s=$(cat run.status); echo "$w: exited $s"; if [ "$s" != 0 ]; then tail -n 20 run.log | sed "s|^|$w log: |"; fi; exit 0; fi; sleep 1; done; echo "$w: not running"'
# Stops this worker's run: SIGTERM, then SIGKILL after GRACE seconds.
halt_cmd() {
  echo 'p=$(cat ~/'"$remote"'/run.pid 2>/dev/null) || exit 0; kill -TERM $p 2>/dev/null || exit 0; for i in $(seq '"$1"'); do sleep 1; kill -0 $p 2>/dev/null || exit 0; done; echo "panda-jax $(hostname): SIGKILL after '"$1"' s"; kill -KILL $p 2>/dev/null || true'
}
# `wait`: polls every worker's status until all have exited 0 (exit 0) or one has failed (stops
# the others, exits with its status).
supervise() {
  local poll=${TPU_WAIT_POLL:-10} grace=${TPU_KILL_GRACE:-20} out lines failed codes bad last=
  if [ "$dry_run" = 1 ]; then
    ssh_workers all "$status_cmd"
    ssh_workers all "$(halt_cmd "$grace")"
    return
  fi
  while true; do
    if ! out=$(ssh_workers all "$status_cmd"); then
      echo "tpu_vm.sh wait: could not ask every worker (gcloud failed); asking again in $poll s" >&2
      sleep "$poll"
      continue
    fi
    lines=$(grep -oE 'panda-jax [^ :]+: (running|not running|exited .*)$' <<< "$out" || true)
    failed=$(grep -E ': (not running|exited (.*[^0].*|))$' <<< "$lines" || true)
    if [ -n "$failed" ]; then
      echo "$out"
      echo "tpu_vm.sh wait: failed: ${failed//$'\n'/; }; stopping every worker (SIGTERM, SIGKILL" \
           "after $grace s)" >&2
      ssh_workers all "$(halt_cmd "$grace")" || true
      # The status of the worker that failed first: 3 is panda_jax's "stopped because another
      # process failed" (distributed.PEER_FAILED_STATUS), so any other status wins.
      codes=$(grep -oE 'exited -?[0-9]+$' <<< "$failed" | grep -oE '[0-9]+$' || true)
      bad=$( (grep -vx 3 <<< "$codes" || true; echo "$codes") | grep -m 1 . || true)
      [ -n "$bad" ] && [ "$bad" -ge 1 ] && [ "$bad" -le 255 ] || bad=1
      exit "$bad"
    fi
    if [ -n "$lines" ] && ! grep -qv ': exited 0$' <<< "$lines"; then
      echo "$lines"
      echo "tpu_vm.sh wait: every worker exited 0"
      return
    fi
    local summary
    summary="$(grep -c ': running$' <<< "$lines" || true) running, $(grep -c ': exited 0$' \
      <<< "$lines" || true) done"
    if [ "$summary" != "$last" ]; then
      echo "tpu_vm.sh wait: $(date +%H:%M:%S) $summary"
      last=$summary
    fi
    sleep "$poll"
  done
}
no_more_args() {
  if [ $# -gt 0 ]; then
    echo "tpu_vm.sh: $action takes no arguments, got: $*" >&2
    exit 2
  fi
}

case "$action" in
  create)
    if [ $# -lt 1 ]; then
      echo "tpu_vm.sh: create needs the accelerator type, e.g. v5litepod-64 or v4-32" >&2
      exit 2
    fi
    type=$1
    shift
    case "$type" in
      v4-*) runtime=tpu-ubuntu2204-base ;;
      v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      *)
        echo "tpu_vm.sh: accelerator type '$type' not known; expected v4-N, v5litepod-N," \
             "v5p-N or v6e-N (or set TPU_RUNTIME)" >&2
        [ -n "${TPU_RUNTIME:-}" ] || exit 2
        ;;
    esac
    runtime=${TPU_RUNTIME:-$runtime}
    do_cmd gcloud compute tpus queued-resources create "$name" --node-id="$name" \
      --zone="$zone" --accelerator-type="$type" --runtime-version="$runtime" "$@"
    ;;
  setup)
    no_more_args "$@"
    tarball=${TMPDIR:-/tmp}/panda-jax-$name.tar.gz
    do_cmd git archive --format=tar.gz -o "$tarball" HEAD
    do_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote.tar.gz" --zone="$zone" \
      --worker=all
    do_cmd rm -f "$tarball"
    ssh_workers all "set -e; rm -rf ~/$remote && mkdir -p ~/$remote && tar -xzf ~/$remote.tar.gz -C ~/$remote && cd ~/$remote && python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt -r requirements-tpu.txt"
    ;;
  run)
    if [ $# -eq 0 ]; then
      echo "tpu_vm.sh: run needs panda_jax.main arguments, e.g. --config=configs/stage1.py" \
           "--workdir=gs://BUCKET/s1" >&2
      exit 2
    fi
    # The arguments go inside a double-quoted `bash -c` string: quoted for the shell that runs
    # it, then \ " $ ` escaped for the double quotes.
    args=$(show "$@")
    args=${args//\\/\\\\}
    args=${args//\"/\\\"}
    args=${args//\$/\\\$}
    args=${args//\`/\\\`}
    ssh_workers all "set -e; cd ~/$remote; if [ -f run.pid ] && kill -0 \$(cat run.pid) 2>/dev/null; then echo \"a run is already going (run.pid); stop it first\" >&2; exit 1; fi; rm -f run.pid run.status run.status.tmp; . .venv/bin/activate; setsid nohup bash -c \"python -m panda_jax.main --multihost $args & echo \\\$! > run.pid; wait \\\$!; echo \\\$? > run.status.tmp; mv run.status.tmp run.status\" > run.log 2>&1 < /dev/null &"
    ;;
  status)
    no_more_args "$@"
    ssh_workers all "$status_cmd"
    ;;
  wait)
    no_more_args "$@"
    supervise
    ;;
  logs)
    worker=${1:-0}
    if ! [[ $worker =~ ^[0-9]+$ ]]; then
      echo "tpu_vm.sh: logs takes a worker number, got '$worker'" >&2
      exit 2
    fi
    ssh_workers "$worker" "tail -n 200 -F ~/$remote/run.log"
    ;;
  stop)
    no_more_args "$@"
    ssh_workers all "if [ -f ~/$remote/run.pid ]; then kill -TERM \$(cat ~/$remote/run.pid) 2>/dev/null || true; fi"
    ;;
  delete)
    no_more_args "$@"
    do_cmd gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    ;;
  *)
    echo "tpu_vm.sh: unknown action '$action'; expected create, setup, run, status, wait, logs," \
         "stop or delete" >&2
    exit 2
    ;;
esac
