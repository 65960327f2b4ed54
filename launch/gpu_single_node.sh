#!/usr/bin/env bash
# One node, all its GPUs, ONE process: JAX drives every visible GPU and the mesh spans them
# (default MESH: FSDP over all local GPUs). Several nodes: launch/slurm_multinode.sbatch (one
# process per GPU there).
#   CONFIG=imagenet256:1.1B/16 WORKDIR=/ckpt/farmer launch/gpu_single_node.sh \
#     [--config.x=y ...]
# Install once, from the repository root (one constrained install):
#   pip install -c launch/constraints.txt -e . "jax[cuda12]==0.10.2"
# Re-running the same command resumes from the newest checkpoint in WORKDIR. Optional: MESH, CACHE
# (XLA compilation cache directory), PYTHON. DRY_RUN=1 prints the command instead of running it.
# XLA_FLAGS: unless set (even empty), --xla_gpu_enable_latency_hiding_scheduler=true (overlaps the
# FSDP collectives with compute); NCCL and other GPU settings: docs/launch.md "GPUs".
set -euo pipefail

: "${CONFIG:?set CONFIG, e.g. CONFIG=imagenet256:1.1B/16}"
: "${WORKDIR:?set WORKDIR, the run directory}"
MESH=${MESH:-"(('data', 1), ('fsdp', -1))"}
GPU_XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true   # the same in the SLURM script

# shell_join
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Prints `+ CMD`, then replaces this shell with it (DRY_RUN=1: only prints).
run_cmd() {
  printf '+ %s\n' "$(shell_join "$@")"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    exit 0
  fi
  exec "$@"
}

if [[ -z ${XLA_FLAGS+set} ]]; then export XLA_FLAGS=$GPU_XLA_FLAGS; fi
echo "XLA_FLAGS=$XLA_FLAGS"
args=(--config="$CONFIG" --workdir="$WORKDIR" --config.mesh="$MESH")
if [[ -n ${CACHE:-} ]]; then args+=(--compilation_cache_dir="$CACHE"); fi
run_cmd "${PYTHON:-python}" -m farmer_jax train "${args[@]}" "$@"
