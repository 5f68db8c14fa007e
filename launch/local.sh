#!/usr/bin/env bash
# Runs panda-jax as several JAX processes on this machine: a multi-host run over loopback, on CPU.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [main args...]
#   launch/local.sh 2 4 --config=configs/stage2.py:tiny --workdir=/tmp/s2
#
# Each process runs `python -m MODULE --multihost --coordinator_address=127.0.0.1:PORT
# --num_processes=N --process_id=I [main args...]` with JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS after the caller's
# XLA_FLAGS (the last count wins), CPU collectives through gloo, PORT a free loopback port.
# Output lines are prefixed with "[I] ". The script waits for all; when one fails it stops the
# others (SIGTERM, then SIGKILL after LOCAL_KILL_GRACE seconds, default 10) and exits with the
# failed process's status. A failing process tells the others, which exit with status 3
# (panda_jax.distributed.PEER_FAILED_STATUS): a status 3 waits up to LOCAL_KILL_GRACE seconds
# for the process that failed first, which is the one reported. PYTHON picks the interpreter
# (default: python), LOCAL_MODULE the module every process runs (default: panda_jax.main; also
# panda_jax.eval.videoqa and panda_jax.teacher.extract, which take the same distributed flags).
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; }
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

if [ $# -lt 2 ]; then
  usage
  exit 2
fi
num=$1 per=$2
shift 2
if ! is_count "$num"; then
  echo "local.sh: NUM_PROCESSES='$num' must be a positive integer" >&2
  exit 2
fi
if ! is_count "$per"; then
  echo "local.sh: DEVICES_PER_PROCESS='$per' must be a positive integer" >&2
  exit 2
fi
python=${PYTHON:-python}
grace=${LOCAL_KILL_GRACE:-10}
module=${LOCAL_MODULE:-panda_jax.main}
cd "$(dirname "$0")/.."
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

declare -A rank_of=()
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + grace))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'echo "local.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per" \
    "$python" -m "$module" --multihost --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num" --process_id="$i" "$@" \
    > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
  rank_of[$!]=$i
  echo "local.sh: process $i of $num: pid $!, $per devices, coordinator 127.0.0.1:$port"
done

# Reports the process that failed first and stops the others. PID exited with STATUS; a status
# of 3 (stopped because another process failed) waits for the one that failed, up to the grace.
failed() {
  local pid=$1 status=$2 other st deadline=$((SECONDS + grace))
  while [ "$status" -eq "$peer_failed" ] && [ $SECONDS -lt $deadline ]; do
    for other in "${pids[@]}"; do
      if [ "$other" != "$pid" ] && ! kill -0 "$other" 2>/dev/null; then
        st=0
        wait "$other" || st=$?
        if [ "$st" -ne 0 ] && [ "$st" -ne "$peer_failed" ]; then pid=$other status=$st; fi
      fi
    done
    if [ "$status" -eq "$peer_failed" ]; then sleep 0.2; fi
  done
  echo "local.sh: process ${rank_of[$pid]} (pid $pid) exited with status $status;" \
       "stopping the others" >&2
  stop_all
  exit "$status"
}
peer_failed=3

# Poll instead of `wait -n`: a process that dies before `wait -n` starts (or between two calls) is
# reaped and reported by bash first, and `wait -n` then ignores it ("no such job") and blocks on
# the survivors forever. `wait PID` still returns a reaped process's saved status.
live=("${pids[@]}")
while [ ${#live[@]} -gt 0 ]; do
  next=()
  for pid in "${live[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
      continue
    fi
    status=0
    wait "$pid" || status=$?
    if [ "$status" -ne 0 ]; then
      failed "$pid" "$status"
    fi
  done
  live=("${next[@]+"${next[@]}"}")
  if [ ${#live[@]} -gt 0 ]; then sleep 0.5; fi
done
echo "local.sh: all $num processes finished"
