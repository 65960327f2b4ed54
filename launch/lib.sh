#!/usr/bin/env bash
# Helpers sourced by the launchers that run from the repository (tpu_vm.sh, gpu_single_node.sh).
# slurm_multinode.sbatch keeps its own copy: SLURM runs a spooled copy of the batch script, which
# cannot source files relative to itself.

# Words joined into one line that bash reads back as the same words.
shell_join() {
  local out="" w q
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      q=$w
    elif [[ $w != *[\"\$\`\\!]* ]]; then
      q="\"$w\""
    else
      q="'${w//\'/\'\\\'\'}'"
    fi
    out+="${out:+ }$q"
  done
  printf '%s' "$out"
}
