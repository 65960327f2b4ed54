"""`farmer_jax fid`: FID / IS / precision-recall of an exported model's class-balanced samples
against reference statistics (a resumable feature dump)."""

from absl import app, flags

from farmer_jax.commands import common, sampler_flags

PURPOSE = "FID, IS and precision/recall of an exported model's samples"
EXAMPLE = ("farmer_jax fid --model=/tmp/model --ref=ref.npz --inception=pt_inception.pth "
           "--num=50000 [--cfg=2.0] [--out=fid.json]")


def define_flags(fv):
  flags.DEFINE_string("model", None, "An exported model directory (farmer_jax export).",
                      flag_values=fv)
  flags.DEFINE_integer("num", 50000, "Samples in all (class-balanced).", flag_values=fv)
  flags.DEFINE_enum("features", "inception", ["inception", "mnist"],
                    "The feature network: the FID Inception-v3 (--inception weights, --ref "
                    "statistics) or the MNIST digit CNN (offline; reference: the MNIST-5k test "
                    "split).", flag_values=fv)
  flags.DEFINE_string("inception", None, "The FID Inception weights file (pytorch-fid's "
                      "pt_inception-2015-12-05-6726825d.pth, or the same state_dict as .npz).",
                      flag_values=fv)
  flags.DEFINE_string("ref", None, "Reference .npz: mu/sigma (e.g. the ADM reference batch) "
                      "and/or images under 'arr_0'.", flag_values=fv)
  sampler_flags.define(fv)
  flags.DEFINE_integer("seed", 0, "RNG seed (sample j uses fold_in(seed, j)).", flag_values=fv)
  flags.DEFINE_integer("batch", 64, "Sampling batch size.", flag_values=fv)
  flags.DEFINE_string("out", None, "The JSON result (default: next to the model).",
                      flag_values=fv)
  flags.DEFINE_string("dump", None, "The resumable feature dump directory (default: next to "
                      "the JSON result).", flag_values=fv)
  common.define_compilation_cache(fv)
  common.define_output(fv)


def main(f):
  if not f.model:
    raise app.UsageError("--model (an export directory) is required, e.g. farmer_jax fid "
                         "--model=models/m --inception=pt_inception.pth --ref=ref.npz --num=50000")
  over = sampler_flags.checked_overrides(f)
  common.start_jax(f)
  from farmer_jax.eval.fid import fid_command
  fid_command(f.model, f.num, f.features, f.inception, f.ref, over, seed=f.seed, batch=f.batch,
              out=f.out, dump=f.dump, quiet=f.quiet, say=common.say(f))
