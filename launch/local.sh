#!/usr/bin/env bash
# Single-host launch (CPU, one GPU, or one TPU VM host): the same command runs everywhere.
#   launch/local.sh configs/quickstart.py /tmp/farmer_quickstart [--config.train.steps=500 ...]
# Multi-host TPU pod and SLURM multi-GPU launchers come with the pod-scale training issue (see docs/).
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
shift 2
exec python -m farmer_jax train --config="$config" --workdir="$workdir" "$@"
