"""The run config: a ``ml_collections.ConfigDict`` parsed once, at the entry point,
into a typed, validated ``RunConfig``.

  rules.py   the one rule style: per-field rules (a predicate, why, fix) and a section's ``check()``
             for cross-field rules; ``FieldError`` / ``SettingError``, the structured refusals
  schema.py  the sections and their defaults (ModelConfig, DataConfig, TrainConfig, EvalConfig,
             SampleConfig with its SamplerConfig) and the names they choose from
  parse.py   ``parse`` (a whole run config, its mesh and workdir -> RunConfig), ``parse_model``,
             ``resolved_config`` (what a run saves as config.json)
  resume.py  what may change when a run is resumed (``config_changes``)

Nothing here imports jax at import time: the CLI reads these tables before jax starts.
"""
