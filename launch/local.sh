#!/usr/bin/env bash
# Single-host launch (CPU, one GPU, or one TPU VM host): the same command runs everywhere.
#   launch/local.sh quickstart /tmp/farmer_quickstart [--config.train.steps=500 ...]
# Several GPUs of one node: launch/gpu_single_node.sh; SLURM: launch/slurm_multinode.sbatch; Cloud
# TPU slices: launch/tpu_vm.sh (docs/launch.md). DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
shift 2
cmd=("${PYTHON:-python}" -m farmer_jax train --config="$config" --workdir="$workdir" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '+'
  printf ' %q' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
