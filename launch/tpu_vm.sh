#!/usr/bin/env bash
# Cloud TPU VM pod slice: create, install on every worker, run the SAME command on every worker, fetch logs, delete.
#
#   PROJECT=my-proj ZONE=us-central2-b TPU=farmer-v4 TYPE=v4-32 VERSION=tpu-ubuntu2204-base \
#   WORKDIR=gs://my-bucket/farmer_1.1b_p16 CONFIG=configs/imagenet256.py:1.1B/16 launch/tpu_vm.sh all
#
# Steps: create | install | run | logs | delete | all. Every worker runs the same `farmer_jax train`
# with --distributed=auto (jax.distributed.initialize() auto-detects the TPU pod); each host reads its own data
# shard, process 0 writes logs/images, all hosts write checkpoints. Re-running `run` after a preemption resumes
# from the newest checkpoint in $WORKDIR. v5e/v5p: set TYPE=v5litepod-16 / v5p-64 and a matching VERSION.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU:?}" "${TYPE:=v4-32}" "${VERSION:=tpu-ubuntu2204-base}"
: "${CONFIG:=configs/imagenet256.py:1.1B/16}" "${WORKDIR:?set WORKDIR (a gs:// path shared by all hosts)}"
REPO=${REPO:-$(git remote get-url origin 2>/dev/null || echo "")}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --project="$PROJECT" --zone="$ZONE" --worker=all --command="$1"; }

create()  { gcloud compute tpus tpu-vm create "$TPU" --project="$PROJECT" --zone="$ZONE" --accelerator-type="$TYPE" \
              --version="$VERSION"; }
install() { ssh_all "set -e; [ -d farmer_jax ] || git clone $REPO farmer_jax; cd farmer_jax && git pull --ff-only;
                     python3 -m venv .venv && . .venv/bin/activate && pip install -U pip &&
                     pip install -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"; }
run()     { ssh_all "cd farmer_jax && . .venv/bin/activate && nohup farmer_jax train --config=$CONFIG \
                     --workdir=$WORKDIR --distributed=auto ${EXTRA_FLAGS:-} > train.log 2>&1 &"; }
logs()    { gcloud compute tpus tpu-vm ssh "$TPU" --project="$PROJECT" --zone="$ZONE" --worker=0 \
              --command="tail -n 50 farmer_jax/train.log"; }
delete()  { gcloud compute tpus tpu-vm delete "$TPU" --project="$PROJECT" --zone="$ZONE" --quiet; }

case "${1:-all}" in
  create|install|run|logs|delete) "$1" ;;
  all) create; install; run; echo "started; follow with: $0 logs; stop with: $0 delete" ;;
  *) echo "usage: $0 create|install|run|logs|delete|all" >&2; exit 2 ;;
esac
