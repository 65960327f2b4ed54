"""`farmer_jax convert`: a TARFlow (apple/ml-tarflow) state_dict into an export (--from=tarflow),
or an export's AF into a TARFlow state_dict (--to=tarflow)."""

from absl import app, flags

from farmer_jax.commands import common

PURPOSE = "convert a TARFlow checkpoint into an export, or an export's AF into one"
EXAMPLE = ("farmer_jax convert --from=tarflow --ckpt=afhq_model_8_768_8_8_0.07.pth --out=/tmp/afhq "
           "| --to=tarflow --model=/tmp/afhq --out=afhq.pth")

# the flags of one direction, refused with the other
_FROM_ONLY = ("ckpt", "config", "pixels", "noise_std", "channels", "ckpt_key")
_TO_ONLY = ("model",)


def define_flags(fv):
  flags.DEFINE_enum("from", None, ["tarflow"], "The format of --ckpt (a TARFlow "
                    "model.state_dict() .pth/.npz) to convert into an export at --out.",
                    flag_values=fv)
  flags.DEFINE_enum("to", None, ["tarflow"], "Write the AF of the export --model as a TARFlow "
                    "state_dict at --out (.pth or .npz).", flag_values=fv)
  flags.DEFINE_string("ckpt", None, "The checkpoint file to convert.", flag_values=fv)
  flags.DEFINE_string("ckpt_key", None, "The entry of a wrapping dict that holds the state_dict "
                      "(e.g. 'model').", flag_values=fv)
  flags.DEFINE_string("model", None, "The export to convert (with --to).", flag_values=fv)
  flags.DEFINE_string("out", None, "The export directory (--from) or the TARFlow file (--to).",
                      flag_values=fv)
  common.define_config(fv, "A run config whose data/model fields describe the checkpoint "
                       "(optionally ':arg'; default: read them off it).")
  flags.DEFINE_enum("pixels", None, ["tarflow", "farmer"], "The pixel mapping the converted "
                    "model expects: tarflow (2v/255 - 1, what TARFlow trains on; the default) or "
                    "farmer ((v + 0.5)/128 - 1; the default for *_uniform.pth).", flag_values=fv)
  flags.DEFINE_float("noise_std", None, "The Gaussian noise std the TARFlow model was trained "
                     "with (default: from its file name, e.g. ..._0.07.pth); its samples are "
                     "self-denoised with it.", flag_values=fv)
  flags.DEFINE_integer("channels", None, "The image channels (default: config.data.channels, "
                       "else 3 if the checkpoint's token dim fits, else 1).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=fv)
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

  from farmer_jax.interop import convert
  if src:
    if not f.ckpt:
      raise app.UsageError("--from=tarflow needs --ckpt (the TARFlow checkpoint file)")
    convert.from_tarflow(f.ckpt, f.out, config=f.config, in_channels=f.channels,
                         pixels=f.pixels, overwrite=f.overwrite, key=f.ckpt_key,
                         noise_std=f.noise_std, say=common.say(f))
  else:
    if not f.model:
      raise app.UsageError("--to=tarflow needs --model (an export directory)")
    convert.to_tarflow(f.model, f.out, overwrite=f.overwrite, say=common.say(f))
