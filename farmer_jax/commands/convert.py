"""`farmer_jax convert`: a TARFlow (apple/ml-tarflow) state_dict into an export (--from=tarflow),
or an export's AF into a TARFlow state_dict (--to=tarflow)."""

import os

from absl import app

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag

PURPOSE = "convert a TARFlow checkpoint into an export, or an export's AF into one"
EXAMPLE = ("farmer_jax convert --from=tarflow --ckpt=afhq_model_8_768_8_8_0.07.pth --out=/tmp/afhq "
           "| --to=tarflow --model=/tmp/afhq --out=afhq.pth")

# the flags of one direction, refused with the other
_FROM_ONLY = ("ckpt", "config", "pixels", "noise_std", "channels", "ckpt_key")
_TO_ONLY = ("model",)


FLAGS = (
    Flag("from", None, "The format of --ckpt (a TARFlow model.state_dict() .pth/.npz) to convert "
         "into an export at --out.", choices=("tarflow",)),
    Flag("to", None, "Write the AF of the export --model as a TARFlow state_dict at --out (.pth "
         "or .npz).", choices=("tarflow",)),
    Flag("ckpt", None, "The checkpoint file to convert."),
    Flag("ckpt_key", None, "The entry of a wrapping dict that holds the state_dict (e.g. "
         "'model')."),
    Flag("model", None, "The export to convert (with --to)."),
    Flag("out", None, "The export directory (--from) or the TARFlow file (--to)."),
)
DESCRIBED = (
    Flag("pixels", None, "The pixel mapping the converted model expects: tarflow (2v/255 - 1, "
         "what TARFlow trains on; the default) or farmer ((v + 0.5)/128 - 1; the default for "
         "*_uniform.pth).", choices=("tarflow", "farmer")),
    Flag("noise_std", None, "The Gaussian noise std the TARFlow model was trained with (default: "
         "from its file name, e.g. ..._0.07.pth); its samples are self-denoised with it.", float),
    Flag("channels", None, "The image channels (default: config.data.channels, else 3 if the "
         "checkpoint's token dim fits, else 1).", int),
    Flag("overwrite", False, "Replace an existing --out."),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  common.define_config(fv, "A run config whose data/model fields describe the checkpoint "
                       "(optionally ':arg'; default: read them off it).")
  common.define(fv, DESCRIBED)
  common.define_output(fv)


def main(f):
  src, dst = f["from"].value, f["to"].value
  if bool(src) == bool(dst) or not f.out:
    raise app.UsageError("pass --from=tarflow --ckpt=FILE --out=EXPORT_DIR, or --to=tarflow "
                         "--model=EXPORT_DIR --out=FILE.pth")
  given = [f"--{name}" for name in (_TO_ONLY if src else _FROM_ONLY) if f[name].present]
  if given:
    one = len(given) == 1
    raise app.UsageError(f"{', '.join(given)} {'does' if one else 'do'} not apply to convert "
                         f"{'--from' if src else '--to'}=tarflow; drop {'it' if one else 'them'}")

  if src:
    if not f.ckpt:
      raise app.UsageError("--from=tarflow needs --ckpt (the TARFlow checkpoint file)")
    from_tarflow(f.ckpt, f.out, config=f.config, in_channels=f.channels, pixels=f.pixels,
                 overwrite=f.overwrite, key=f.ckpt_key, noise_std=f.noise_std,
                 say=common.say(f))
  else:
    if not f.model:
      raise app.UsageError("--to=tarflow needs --model (an export directory)")
    to_tarflow(f.model, f.out, overwrite=f.overwrite, say=common.say(f))


def _checked_from_flags(noise_std, in_channels, pixels):
  """Refuses --noise_std, --channels and --pixels values that cannot describe a checkpoint."""
  import math

  from farmer_jax.config.schema import PIXELS
  from farmer_jax.interop.convert import ConvertError
  if noise_std is not None:
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std > 0):
      raise ConvertError(f"--noise_std={noise_std} must be a finite number > 0 (the Gaussian "
                         "noise std the TARFlow model was trained with, e.g. 0.07)")
  if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
    raise ConvertError(f"--channels={in_channels} must be an integer >= 1 (the image channels, "
                       "e.g. 3 for RGB)")
  if pixels not in PIXELS:
    raise ConvertError(f"--pixels={pixels!r} is unknown; use one of {list(PIXELS)}")


def _read(ckpt, key=None):
  """The state_dict in the file --ckpt (under --ckpt_key)."""
  from farmer_jax.interop.convert import ConvertError
  from farmer_jax.interop.torch_checkpoint import CheckpointError, load_state_dict
  if not os.path.isfile(ckpt):
    raise ConvertError(f"--ckpt={ckpt} does not exist or is not a file; pass a TARFlow "
                       "model.state_dict() file (.pth, or .npz of the same names)")
  try:
    return load_state_dict(ckpt, key=key)
  except CheckpointError as e:
    msg = str(e)
    if "pass key=" in msg:
      raise ConvertError(msg.replace("pass key=", "pass --ckpt_key=")) from None
    raise ConvertError(f"{msg}. Fix: pass a TARFlow model.state_dict() file as torch.save writes "
                       f"it (or an np.savez of one)") from None


def from_tarflow(ckpt, out, config=None, in_channels=None, pixels=None, overwrite=False,
                 key=None, noise_std=None, say=print):
  """`convert --from=tarflow`: the TARFlow state_dict file ``ckpt`` as an export at ``out``;
  returns its metadata. ``config``: a run config whose data/model fields describe the checkpoint
  (None: read them off it); ``in_channels``: the image channels (default: config.data.channels,
  else 3 if the token dim fits, else 1). ``key``: the entry of a wrapping dict holding the
  state_dict. ``pixels``: the pixel mapping (default: 'farmer' for TARFlow's uniform-noise
  bits/dim checkpoints ``*_uniform.pth``, whose inputs are (v + u)/128 - 1, else 'tarflow').
  ``noise_std``: the Gaussian noise it was trained with (default: read off TARFlow's file name,
  ``..._0.07.pth``), the self-denoising sigma of its samples."""
  from farmer_jax.interop import convert
  from farmer_jax.artifacts import export
  kind, sigma = convert.training_noise(ckpt)
  if pixels is None:    # from the file name: uniform-noise bits/dim checkpoints use (v + u)/128 - 1
    pixels = "farmer" if kind == "uniform" else "tarflow"
  _checked_from_flags(noise_std, in_channels, pixels)
  if noise_std is not None:
    kind, sigma = "gaussian", float(noise_std)
  out = export.check_export_target(ckpt if os.path.exists(ckpt) else None, out, overwrite)
  sd = _read(ckpt, key)
  if in_channels is None and config is not None:
    in_channels = config.data.get("channels")
    if not isinstance(in_channels, int) or in_channels < 1:
      raise convert.ConvertError(f"--config: data.channels={in_channels!r} must be an integer >= "
                                 "1 (set --config.data.channels=3 for RGB)")
  try:
    hp = convert.checkpoint_hparams(sd, in_channels)
  except ValueError as e:
    raise convert.ConvertError(f"--ckpt={ckpt}: {e} (image channels: pass --channels, or a "
                               "--config with data.channels)") from None
  if in_channels is None and hp["in_channels"] == 1:
    say("convert: token dim fits 1 image channel, not 3 (pass --channels to choose)")
  config = convert.converted_config(hp, pixels, kind, sigma, noise_std, config, ckpt, say)
  _, flow, var = convert.converted_params(sd, config, ckpt)
  meta = convert.export_meta(ckpt, hp, var)
  export.write_export(out, {"flow": flow}, config, meta, overwrite, ckpt, latent_var=var)
  denoise = config.sample.get("denoise_sigma", 0.0)
  say(f"converted TARFlow Model({', '.join(f'{k}={v}' for k, v in hp.items())}) -> {out} "
      f"(prior standard_normal, pixels {pixels}, sample.denoise_sigma {denoise}"
      + (", VP latent variance kept" if var is not None else "") + ")")
  if not kind and noise_std is None:
    say("note: the training noise is not in the file name (TARFlow's ..._0.07.pth): pass "
        "--noise_std to denoise samples as TARFlow does (sample --sampler=denoise_sigma=S)")
  if not config.data.name:
    say("note: the export names no dataset (config.data.name is empty); to `farmer_jax eval` "
        "it, convert with --config=FILE --config.data.name=tfds:NAME")
  return meta


def to_tarflow(model_dir, out, overwrite=False, say=print):
  """`convert --to=tarflow`: the AF of the export ``model_dir`` as a TARFlow
  ``Model.state_dict()`` at ``out`` (.pth / .pt, torch.load-able, or .npz). A FARMER export's AR
  prior is dropped (said). Returns the TARFlow hparams."""
  from farmer_jax.interop import convert
  from farmer_jax.artifacts import export
  if not out.lower().endswith((".pth", ".pt", ".npz")):
    raise convert.ConvertError(f"--out={out}: write a .pth / .pt (PyTorch) or .npz file")
  if os.path.isdir(out):
    raise convert.ConvertError(f"--out={out} is a directory; name the file to write, e.g. "
                               f"--out={os.path.join(out, 'model.pth')}")
  if os.path.lexists(out) and not overwrite:
    raise convert.ConvertError(f"--out={out} exists; pass --overwrite to replace the file, or "
                               "choose another --out")
  inside = os.path.abspath(model_dir)
  if os.path.commonpath([inside, os.path.abspath(out)]) == inside:
    raise convert.ConvertError(f"--out={out} is inside the export --model={model_dir}; write the "
                               "TARFlow file elsewhere (the export's folder holds only what "
                               "`export` wrote)")
  mcfg, params, _, meta = export.load_model(model_dir)
  sd, hp = convert.tarflow_state_dict(model_dir, mcfg, params, meta)
  if mcfg.prior != "standard_normal":
    say(f"note: {model_dir} is a FARMER model; only its AF is written (TARFlow has no AR prior)")
  if mcfg.pixels != "tarflow":
    say(f"note: this model expects pixels={mcfg.pixels!r}; TARFlow's code maps 2v/255 - 1")
  convert.save_state_dict(out, sd)
  say(f"wrote TARFlow Model({', '.join(f'{k}={v}' for k, v in hp.items())}) state_dict -> {out}")
  return hp
