#!/usr/bin/env bash
# Runs panda-jax on every worker of a Cloud TPU VM slice (v4/v5e/v5p pods).
#
#   launch/tpu_vm.sh NAME ZONE setup                          # clone/copy + install on all workers
#   launch/tpu_vm.sh NAME ZONE run --config=configs/demo.py [--config.x=y ...] [--workdir=gs://...]
#
# `setup` copies this checkout to ~/panda-jax on every worker and installs requirements.txt
# plus JAX's TPU wheel and the Cloud Storage clients a gs:// workdir needs without TensorFlow
# (gcsfs: etils.epath, so Orbax and tfds; google-cloud-storage: tensorboardX's event files).
# `run` starts `python -m panda_jax.main --multihost ARGS` on all workers at once (every host
# must run the same program; jax.distributed finds its peers from the TPU metadata). Output of
# worker 0 is shown; the others log to ~/panda-jax/worker.log.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,11p' "$0"
  exit 2
fi
name=$1 zone=$2 action=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case "$action" in
  setup)
    tarball=$(mktemp --suffix=.tar.gz)
    git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$name":panda-jax.tar.gz --zone "$zone" --worker=all
    rm -f "$tarball"
    jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.txt")
    ssh_all "set -e; rm -rf ~/panda-jax && mkdir -p ~/panda-jax && tar -xzf ~/panda-jax.tar.gz -C ~/panda-jax && cd ~/panda-jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt && pip install -q 'jax[tpu]==${jax_version}' gcsfs google-cloud-storage"
    ;;
  run)
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/panda-jax && . .venv/bin/activate && if [ \"\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)\" = 0 ]; then python -m panda_jax.main --multihost $args; else python -m panda_jax.main --multihost $args > worker.log 2>&1; fi"
    ;;
  *)
    echo "unknown action '$action'; expected setup or run" >&2
    exit 2
    ;;
esac
