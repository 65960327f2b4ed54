"""What a resumed run may change: ``config_changes`` lists the data/model keys that differ between
the saved config.json and the current config, except those that only change where or how fast the
same batches are read, or how the same model executes (``RESUME_NEUTRAL``)."""

import dataclasses

from farmer_jax.config.parse import resolved_config
from farmer_jax.config.schema import DataConfig

# how the same model executes (same params, same function up to float rounding): a resumed run
# may change these
EXECUTION_FIELDS = ("unroll", "flow_attn_chunk", "attention", "remat", "remat_policy",
                    "remat_blocks")
RESUME_NEUTRAL = tuple(f"data.{f.name}" for f in dataclasses.fields(DataConfig)
                       if f.metadata.get("resume_neutral")) + tuple(
                           f"model.{f}" for f in EXECUTION_FIELDS)


def config_changes(saved, current, sections=("data", "model")):
  """['section.key: saved -> current', ...] for the keys of ``sections`` that differ between two run
  configs (both are resolved first, so a default left implicit equals the same value written
  out)."""
  saved, current = resolved_config(saved), resolved_config(current)
  out = []
  for sec in sections:
    a, b = dict(saved.get(sec, {}) or {}), dict(current.get(sec, {}) or {})
    for k in sorted(set(a) | set(b)):
      if f"{sec}.{k}" in RESUME_NEUTRAL:  # where/how fast the same batches are read
        continue
      va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
      if isinstance(va, (list, tuple)) or isinstance(vb, (list, tuple)):
        va, vb = list(va) if isinstance(va, (list, tuple)) else va, list(vb) if isinstance(
            vb, (list, tuple)) else vb
      if va != vb:
        out.append(f"{sec}.{k}: {va!r} -> {vb!r}")
  return out
