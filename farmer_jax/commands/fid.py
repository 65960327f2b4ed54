"""`farmer_jax fid`: FID / IS / precision-recall of an exported model's class-balanced samples
against reference statistics (a resumable feature dump)."""

import os
import time

from absl import app

from farmer_jax.commands import common, sampler_flags
from farmer_jax.commands.common import Flag
from farmer_jax.errors import UserError

PURPOSE = "FID, IS and precision/recall of an exported model's samples"
EXAMPLE = ("farmer_jax fid --model=/tmp/model --ref=ref.npz --inception=pt_inception.pth "
           "--num=50000 [--cfg=2.0] [--out=fid.json]")

FLAGS = (
    Flag("model", None, "An exported model directory (farmer_jax export)."),
    Flag("num", 50000, "Samples in all (class-balanced)."),
    Flag("features", "inception",
         "The feature network: the FID Inception-v3 (--inception weights, --ref statistics) or "
         "the MNIST digit CNN (offline; reference: the MNIST-5k test split).",
         choices=("inception", "mnist")),
    Flag("inception", None, "The FID Inception weights file (pytorch-fid's "
         "pt_inception-2015-12-05-6726825d.pth, or the same state_dict as .npz)."),
    Flag("ref", None, "Reference .npz: mu/sigma (e.g. the ADM reference batch) and/or images "
         "under 'arr_0'."),
)
OUTPUT = (
    Flag("seed", 0, "RNG seed (sample j uses fold_in(seed, j))."),
    Flag("batch", None, sampler_flags.BATCH_HELP, int),
    Flag("out", None, "The JSON result (default: next to the model)."),
    Flag("dump", None, "The resumable feature dump directory (default: next to the JSON "
         "result)."),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  sampler_flags.define(fv)
  common.define(fv, OUTPUT)
  common.define_launch(fv)
  common.define_output(fv)


def _checked_reference(f):
  """(--ref, or the default split:test of --features=mnist; the split it names or None), after
  refusing flags that cannot work, before the model is loaded."""
  if f.num < 2:
    raise UserError(f"--num={f.num} must be >= 2 (a covariance needs two samples; the paper's "
                    "protocol uses 50000)")
  if f.batch is not None and f.batch < 1:
    raise UserError(f"--batch={f.batch} must be >= 1")
  if f.features == "inception":
    if not f.inception:
      raise UserError("--inception is required with --features=inception: the FID Inception "
                      "weights file (see docs/eval.md; nothing is downloaded)")
    if not f.ref:
      raise UserError("--ref is required with --features=inception: a reference .npz (mu and "
                      "sigma, and/or images under 'arr_0'), e.g. the ADM reference batch, or "
                      "split:NAME for a split of the model's own dataset")
  from farmer_jax.eval.fid import SPLIT_PREFIX
  ref = f.ref or SPLIT_PREFIX + "test"
  ref_split = ref[len(SPLIT_PREFIX):] if ref.startswith(SPLIT_PREFIX) else None
  for path, flag in ((f.inception, "--inception"), (None if ref_split else ref, "--ref")):
    if path and not os.path.isfile(path):
      raise UserError(f"{flag}={path} does not exist (nothing is downloaded; see docs/eval.md)")
  return ref, ref_split


def main(f):
  if not f.model:
    raise app.UsageError("--model (an export directory) is required, e.g. farmer_jax fid "
                         "--model=models/m --inception=pt_inception.pth --ref=ref.npz --num=50000")
  over = sampler_flags.checked_overrides(f)
  common.start_jax(f)
  t0 = time.time()
  say = common.say(f)
  ref, ref_split = _checked_reference(f)

  from farmer_jax.config.schema import DataConfig
  from farmer_jax.eval import fid
  from farmer_jax.artifacts.export import load_model
  from farmer_jax.sampling.generate import export_sampler, on_mesh
  mcfg, params, config, meta = load_model(f.model)
  if f.features == "mnist" and (mcfg.image_size, mcfg.channels) != (32, 1):
    raise UserError(f"--features=mnist scores 32x32x1 digits; this model makes "
                    f"{mcfg.image_size}x{mcfg.image_size}x{mcfg.channels} images. Fix: use "
                    "--features=inception")
  drawn = export_sampler(f.model, mcfg, config, meta, over)
  data = DataConfig.from_section(config.data)
  if ref_split is not None:
    fid.check_split(data, ref_split)
  out = f.out or fid.default_out(
      f.model, fid.settings_tag(f.features, f.num, drawn.sampler, drawn.settings, f.seed))
  common.check_json_out(out)
  from farmer_jax.artifacts import storage
  for path, flag in ((out, "--out"), (f.dump, "--dump")):
    if path and storage.is_url(path):
      raise UserError(f"{flag}={path}: fid writes its result and resumable feature dump on this "
                      "host's disk, not in a bucket. Fix: a local path (copy the result to the "
                      "bucket afterwards, e.g. `gcloud storage cp`)")
  dump = f.dump or fid.default_dump(out)

  import jax
  lead = jax.process_index() == 0
  net, clf = fid.feature_net(f.features, f.inception, say=say if not f.quiet and lead else None)
  reference = None   # process 0 scores; the others draw their share of the samples
  if lead and ref_split is None:
    reference = fid.reference_from_file(net, ref)
  elif lead:
    reference = fid.reference_from_split(net, data, ref_split,
                                         fid.split_cache(out, net, data, ref_split), say=say,
                                         progress=not f.quiet)
  placed = on_mesh(config, mcfg, params, drawn.student, f.batch, say if lead else lambda _: None)
  with placed.context():
    feats = fid.sample_features(
        mcfg, placed.params, drawn.sampler, f.num, net, seed=f.seed, batch=placed.batch,
        dump=dump, signature=fid.dump_signature(f.model, meta, drawn.settings, f.seed, f.num, net),
        progress=not f.quiet, say=say, student_params=placed.student,
        latent_var=drawn.latent_var, batch_sharding=placed.batch_sharding,
        gather_weights=True)
  if not lead:
    return
  result = fid.fid_result(f.model, net, reference, f.num, f.seed, drawn.sampler, drawn.settings,
                          feats, dump, t0)
  if f.features == "mnist" and mcfg.num_classes == 10:   # labels are digits only then
    result.update(fid.class_consistency(clf, feats))
  fid.write_result(out, result)
  say(fid.format_scores(result))
  say(f"-> {out}")
