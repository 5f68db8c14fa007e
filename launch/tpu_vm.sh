#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (v4/v5e/v5p/v6e pods) and runs panda-jax on every worker.
#
#   launch/tpu_vm.sh [--dry-run] NAME ZONE create TYPE [gcloud flags...]  # queued resource NAME
#   launch/tpu_vm.sh [--dry-run] NAME ZONE setup              # copy + install on all workers
#   launch/tpu_vm.sh [--dry-run] NAME ZONE run MAIN_ARGS...   # start the run on all workers
#   launch/tpu_vm.sh [--dry-run] NAME ZONE logs [WORKER]      # follow a worker's log (default 0)
#   launch/tpu_vm.sh [--dry-run] NAME ZONE stop               # SIGTERM: checkpoint and exit
#   launch/tpu_vm.sh [--dry-run] NAME ZONE delete             # delete the slice and its request
#
# --dry-run prints every command (gcloud, and the local git archive / rm of setup) instead of
# running it. `create` asks for the slice as a queued resource (granted when capacity frees up;
# pass e.g. --spot or --project=P after TYPE); the runtime image follows TYPE (v4-*,
# v5litepod-*, v5p-*, v6e-*), TPU_RUNTIME overrides it. `setup` copies this checkout's HEAD to
# ~/panda-jax on every worker and installs requirements.txt plus JAX's TPU wheel at our jax
# version and the Cloud Storage clients a gs:// workdir needs without TensorFlow (gcsfs:
# etils.epath, so Orbax and tfds; google-cloud-storage: tensorboardX's event files). `run`
# starts `python -m panda_jax.main --multihost MAIN_ARGS` on all workers at once, detached
# from the ssh session (jax.distributed finds its peers from the TPU metadata), each writing
# ~/panda-jax/run.log. `stop` sends SIGTERM (training saves a checkpoint and exits; a rerun of
# `run` resumes).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; }

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
    jax_version=$(sed -n 's/^jax==//p' requirements.txt)
    do_cmd git archive --format=tar.gz -o "$tarball" HEAD
    do_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote.tar.gz" --zone="$zone" \
      --worker=all
    do_cmd rm -f "$tarball"
    ssh_workers all "set -e; rm -rf ~/$remote && mkdir -p ~/$remote && tar -xzf ~/$remote.tar.gz -C ~/$remote && cd ~/$remote && python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt && pip install -q \"jax[tpu]==$jax_version\" gcsfs google-cloud-storage"
    ;;
  run)
    if [ $# -eq 0 ]; then
      echo "tpu_vm.sh: run needs panda_jax.main arguments, e.g. --config=configs/stage1.py" \
           "--workdir=gs://BUCKET/s1" >&2
      exit 2
    fi
    args=$(show "$@")
    ssh_workers all "set -e; cd ~/$remote; if [ -f run.pid ] && kill -0 \$(cat run.pid) 2>/dev/null; then echo \"a run is already going (run.pid); stop it first\" >&2; exit 1; fi; . .venv/bin/activate; setsid nohup python -m panda_jax.main --multihost $args > run.log 2>&1 < /dev/null & echo \$! > run.pid"
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
    echo "tpu_vm.sh: unknown action '$action'; expected create, setup, run, logs, stop or delete" >&2
    exit 2
    ;;
esac
