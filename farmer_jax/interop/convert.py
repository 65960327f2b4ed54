"""TARFlow checkpoints <-> farmer_jax exports (what ``farmer_jax convert`` does), and TARFlow
weights as the start of a FARMER run's AF.

    farmer_jax convert --from=tarflow --ckpt=afhq_model_8_768_8_8_0.07.pth --out=/tmp/afhq
    farmer_jax sample --model=/tmp/afhq --classes=0,1,2 --num=4 --sampler=af_guidance=2 --out=a.png
    farmer_jax convert --to=tarflow --model=/tmp/afhq --out=back.pth       # (or .npz)

A converted TARFlow is an export of the model ``prior='standard_normal'`` (the AF with an N(0, I)
prior over its latents: TARFlow itself, no AR params) with ``pixels='tarflow'`` (its 2v/255 - 1
pixel mapping) unless ``--pixels`` says otherwise; ``sample`` and ``eval`` use both. Without
``--config`` the architecture is read off the checkpoint (``tarflow.tarflow_hparams``) and the
rest of the run config is ``tarflow_run_config``'s (the data section names no dataset: pass
``--config`` with ``data.name`` to ``eval`` it on a split). With ``--config`` the config's data
and model fields must describe the checkpoint: a mismatch is refused listing the offending keys and
the config fields to set. TARFlow's VP variant's ``var`` buffer (its sampling variance) goes to
``latent_var.npy`` in the export when it is not all ones.

Nothing half-written is ever left: every check (checkpoint readable, config fits, params finite,
target usable) runs before the export is written, and the export is assembled in a temporary
sibling and renamed into place (``export.write_export``); ``--to=tarflow`` writes a temporary file
and renames it.
"""

import dataclasses
import hashlib
import os
import re

import numpy as np

from farmer_jax.artifacts import storage
from farmer_jax.config.parse import parse_model
from farmer_jax.config.schema import DATA_SHAPE_FIELDS, DataConfig, ModelConfig, TrainConfig
from farmer_jax.errors import ConfigError, UserError
from farmer_jax.interop import tarflow

_ARCH_FIELDS = ("image_size", "channels", "num_classes", "patch_size", "flow_width", "flow_heads",
                "flow_blocks", "flow_layers", "mlp_ratio", "flow_class_conditional",
                "flow_final_norm")


class ConvertError(UserError):
  """A conversion that cannot be done; the message names the file or setting and the fix."""


def tarflow_run_config(hp, pixels="tarflow", noise_std=0.05, data_name=""):
  """A whole run config (ConfigDict) for a TARFlow ``Model(**hp)`` in farmer_jax: its AF,
  ``prior='standard_normal'``, the given pixel mapping; training as TARFlow trains (constant
  Gaussian noise ``noise_std``, or uniform dequantization for None, TARFlow's bits/dim runs; label
  drop 0.1 for conditional models, AdamW betas (0.9, 0.95), weight decay 1e-4, lr 1e-4); sampling
  without AR guidance, with TARFlow's self-denoising at ``noise_std``. ``data_name``: the dataset
  ('' names none)."""
  import ml_collections

  from farmer_jax import configlib
  over = tarflow.config_for_tarflow(**hp)
  classes = over.pop("num_classes", 0)
  m = dataclasses.replace(ModelConfig(), **{k: v for k, v in over.items()
                                             if k not in ("image_size", "channels")},
                          prior="standard_normal", pixels=pixels)
  c = ml_collections.ConfigDict()
  c.data = configlib.base_data(name=data_name, image_size=hp["img_size"],
                               channels=hp["in_channels"], num_classes=classes)
  c.model = configlib.base_model(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                                    if f.name not in DATA_SHAPE_FIELDS})
  noise = dict(noise_kind="uniform") if noise_std is None else dict(
      noise_kind="gaussian", noise_max=noise_std, noise_min=noise_std)
  c.train = configlib.base_train(lr=1e-4, min_lr=1e-6, b1=0.9, b2=0.95, weight_decay=1e-4,
                                 label_drop=0.1 if classes else 0.0, **noise)
  c.eval = configlib.base_eval()
  c.sample = configlib.base_sample(per_class=4, guidance="none", cfg=0.0,
                                   denoise_sigma=noise_std or 0.0)
  configlib.base_mesh(c)
  return c


def training_noise(ckpt):
  """TARFlow's checkpoint name ``{dataset}_model_{p}_{C}_{blocks}_{layers}_{noise}.pth`` ->
  ('gaussian', sigma) | ('uniform', None) | (None, None) when the name does not say."""
  m = re.search(r"_(\d+\.\d+|uniform)\.(pth|pt|npz)$", os.path.basename(ckpt))
  if not m:
    return None, None
  return ("uniform", None) if m.group(1) == "uniform" else ("gaussian", float(m.group(1)))


def _arch_mismatch(config, mcfg_ckpt):
  """['data.image_size=32 (the checkpoint: 64)', ...] where a user config disagrees with the
  checkpoint's architecture."""
  mine = parse_model(config)
  out = []
  for f in _ARCH_FIELDS:
    want = getattr(mcfg_ckpt, f)
    if f == "num_classes" and not mcfg_ckpt.flow_class_conditional:
      continue
    if getattr(mine, f) != want:
      sec = "data" if f in ("image_size", "channels", "num_classes") else "model"
      out.append(f"{sec}.{f}={getattr(mine, f)!r} (set --config.{sec}.{f}={want!r})")
  return out


def checkpoint_hparams(sd, in_channels=None):
  """TARFlow's ``Model`` hyperparameters of the state_dict ``sd`` with ``in_channels`` image
  channels (None: 3 if the token dim fits, else 1; TARFlow stores only c*p^2). ValueError if it
  is not a TARFlow state_dict (the first reason)."""
  err = None
  for c in ((in_channels,) if in_channels is not None else (3, 1)):
    try:
      return tarflow.tarflow_hparams(sd, c)
    except ValueError as e:
      err = err or e
  raise err


def converted_config(hp, pixels, kind, sigma, noise_std=None, config=None, ckpt="",
                     say=print):
  """The run config of the converted checkpoint ``ckpt`` (TARFlow ``Model(**hp)``), checked as
  `sample` / `eval` / `train` will read it. ``kind, sigma``: its training noise
  (``training_noise``; ``noise_std`` if given, None when unknown). ``config``: the user's run config
  describing it (its prior, pixels and sampler are fitted to a TARFlow, said), else
  ``tarflow_run_config``'s. ConvertError names what to fix."""
  from farmer_jax.config.parse import section
  from farmer_jax.config.schema import SamplerConfig
  # the training noise: the name's (or --noise_std); unknown: TARFlow's default 0.05 for training
  # here, and no denoising of samples
  base = tarflow_run_config(hp, pixels, noise_std={"gaussian": sigma, "uniform": None}.get(
      kind, 0.05))
  if kind is None:
    base.sample.denoise_sigma = 0.0
  if config is None:
    config = base
  else:
    config = _fitted(config, base, hp, pixels, kind, sigma, noise_std, ckpt, say)
  try:    # the whole final config, as `sample` / `eval` / `train` will read it, before any write
    DataConfig.from_section(section(config, "data"))
    TrainConfig.from_section(section(config, "train"))
    SamplerConfig.from_config(config.sample).check_model(parse_model(config))
  except (ValueError, ConfigError) as e:
    raise ConvertError(f"--config: {e}") from None
  return config


def _fitted(config, base, hp, pixels, kind, sigma, noise_std, ckpt, say):
  """The user's run ``config`` made a TARFlow's (``converted_config``): refused when its
  architecture is not the checkpoint's (``base``: the run config read off it)."""
  from farmer_jax.config.parse import resolved_config
  from farmer_jax.config.schema import SamplerConfig
  config = resolved_config(config)
  if config.model.get("prior") != "standard_normal" or config.model.get("pixels") != pixels:
    say(f"convert: model.prior='standard_normal' (TARFlow's N(0, I)), model.pixels={pixels!r}")
  config.model.prior = "standard_normal"
  config.model.pixels = pixels
  ckpt_mcfg = parse_model(base)
  try:
    bad = _arch_mismatch(config, ckpt_mcfg)
  except ConfigError as e:
    raise ConvertError(f"--config: {e}") from None
  hp_text = ", ".join(f"{k}={v}" for k, v in hp.items())
  if bad:
    raise ConvertError(f"--config does not describe --ckpt={ckpt} (TARFlow Model({hp_text})): "
                       + "; ".join(bad))
  try:
    SamplerConfig.from_config(config.sample).check_model(parse_model(config))
  except (ValueError, ConfigError) as e:
    if config.sample.get("guidance", "none") == "none":
      raise ConvertError(f"--config: {e}") from None    # not the AR guidance: the user's to fix
    say(f"convert: config.sample.guidance=none, cfg=0 (a standard-normal prior has no GMMs to "
        f"guide: {e})")
    config.sample.update(guidance="none", cfg=0.0)
  # --noise_std wins over the config; else the file name's sigma fills an unset denoise_sigma
  if kind == "gaussian" and (noise_std is not None or not config.sample.get("denoise_sigma")):
    say(f"convert: config.sample.denoise_sigma={sigma} (TARFlow's self-denoising at its "
        "training noise)")
    config.sample.denoise_sigma = sigma
  return config


def converted_params(sd, config, ckpt=""):
  """(ModelConfig, the AF params, the VP latent variance or None) of the TARFlow state_dict
  ``sd`` under the run ``config``; ConvertError for weights that cannot be used."""
  from farmer_jax.artifacts.export import _non_finite_report
  try:
    mcfg = parse_model(config)
    flow = tarflow.tarflow_to_params(sd, mcfg)
  except (ValueError, ConfigError) as e:
    raise ConvertError(f"--ckpt={ckpt}: {e}") from None
  report = _non_finite_report(flow)
  if report:
    raise ConvertError(f"--ckpt={ckpt} holds non-finite weights ({report}); nothing was written")
  var = tarflow.tarflow_var(sd, mcfg) if "var" in sd else None
  if var is not None and (not np.all(np.isfinite(var)) or np.any(var < 0)):
    raise ConvertError(f"--ckpt={ckpt}: its 'var' buffer has non-finite or negative values")
  if var is not None and np.all(var == 1):
    var = None
  return mcfg, flow, var


def export_meta(ckpt, hp, latent_var):
  """The export metadata of a converted TARFlow checkpoint file ``ckpt``."""
  from farmer_jax.artifacts import export
  return {
      "kind": export.EXPORT_KIND,
      "format_version": export.FORMAT_VERSION,
      "source_checkpoint": os.path.abspath(ckpt),
      "source_format": "tarflow",
      "source_sha256": _sha256(ckpt),
      "tarflow": {"nvp": bool(hp["nvp"]), "hparams": hp},
      "step": None,
      "params": "raw",
      "dtype": "float32",
      "latent_var": latent_var is not None,
  }


def tarflow_state_dict(model_dir, mcfg, params, meta):
  """(TARFlow ``Model.state_dict()`` of the AF of the export at ``model_dir``, its ``Model``
  hyperparameters); ConvertError for an AF TARFlow cannot hold."""
  from farmer_jax.artifacts import export
  try:
    tarflow._check_config(mcfg)
  except ValueError as e:
    raise ConvertError(f"--model={model_dir}: {e}; TARFlow's block has no such option, so this "
                       "AF cannot be written as a TARFlow checkpoint") from None
  nvp = bool((meta.get("tarflow") or {}).get("nvp", True))
  var = export.load_latent_var(model_dir, mcfg, meta)
  try:
    sd = tarflow.params_to_tarflow(params["flow"], mcfg, nvp=nvp, var=var)
  except ValueError as e:
    raise ConvertError(f"--model={model_dir}: {e}") from None
  hp = dict(in_channels=mcfg.channels, img_size=mcfg.image_size, patch_size=mcfg.patch_size,
            channels=mcfg.flow_width, num_blocks=mcfg.flow_blocks,
            layers_per_block=mcfg.flow_layers,
            num_classes=mcfg.num_classes if mcfg.flow_class_conditional else 0, nvp=nvp)
  return sd, hp


def save_state_dict(out, sd):
  """Writes a state_dict to ``out``: .npz, else a torch.load-able .pth (written without torch)."""
  from farmer_jax.interop.torch_checkpoint import save_state_dict as save_pth
  if out.lower().endswith(".npz"):
    _save_npz(out, sd)
  else:
    save_pth(out, sd)


def _save_npz(out, sd):
  with storage.atomic_file(out) as f:   # a file object: np.savez adds no suffix
    np.savez(f, **sd)


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()
