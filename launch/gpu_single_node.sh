#!/usr/bin/env bash
# One node, N GPUs, ONE process (JAX drives all local GPUs): the mesh in the config spans every visible device.
#   CONFIG=configs/imagenet256.py:1.1B/16 WORKDIR=/ckpt/farmer launch/gpu_single_node.sh [--config.x=y ...]
# Install once: pip install -e . 'jax[cuda12]'
set -euo pipefail
: "${CONFIG:?}" "${WORKDIR:?}"
exec python -m farmer_jax train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.mesh="(('data', 1), ('fsdp', -1))" "$@"
