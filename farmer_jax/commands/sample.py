"""`farmer_jax sample`: class-conditional (or unconditional) samples of an exported model, written
as a PNG grid and/or an .npz. Everything that does not need the model is checked before it is
loaded."""

from absl import app

from farmer_jax.commands import common, sampler_flags
from farmer_jax.commands.common import Flag
from farmer_jax.config.rules import SettingError
from farmer_jax.errors import UserError

PURPOSE = "draw samples from an exported model into a PNG grid and/or an .npz"
EXAMPLE = ("farmer_jax sample --model=/tmp/model --classes=0,1,2 --num=8 --cfg=2.0 --seed=0 "
           "--out=grid.png [--npz=s.npz]")
_STUDENT_FIX = (". Fix: export with `farmer_jax export --workdir=RUN --student=DISTILL_RUN`, or "
                "use --inverse=exact|jacobi")


WHAT = (
    Flag("model", None, "An exported model directory (farmer_jax export)."),
    Flag("classes", "all", "Comma-separated class ids, 'null' for unconditional, or 'all'."),
    Flag("num", 8, "Samples per class."),
)
OUTPUT = (
    Flag("seed", 0, "RNG seed (sample j uses fold_in(seed, j))."),
    Flag("batch", None, sampler_flags.BATCH_HELP, int),
    Flag("out", None, "Output PNG grid (*.png)."),
    Flag("npz", None, "Also write the uint8 images (as 'arr_0', what the ADM evaluator reads) and "
         "their labels to this .npz."),
)


def define_flags(fv):
  common.define(fv, WHAT)
  sampler_flags.define(fv)
  common.define(fv, OUTPUT)
  common.define_launch(fv)
  common.define_output(fv)


def main(f):
  if not f.model or not (f.out or f.npz):
    raise app.UsageError(
        "--model (an export directory) and --out (PNG) or --npz are required")
  if f.num < 1:
    raise UserError(f"--num={f.num} must be >= 1 (samples per class)")
  if f.batch is not None and f.batch < 1:
    raise UserError(f"--batch={f.batch} must be >= 1")
  from farmer_jax.sampling.generate import check_output_path
  for path, flag in ((f.out, "--out"), (f.npz, "--npz")):
    if path:
      check_output_path(path, flag)
  over = sampler_flags.checked_overrides(f)
  common.start_jax(f)
  say = common.say(f)

  import jax
  from farmer_jax.artifacts.export import load_model
  from farmer_jax.sampling.generate import (
      check_output_size, describe_stats, draw_samples, export_sampler, on_mesh, parse_classes,
      write_outputs)
  mcfg, params, config, meta = load_model(f.model)
  classes = parse_classes(f.classes, mcfg.num_classes)
  check_output_size(mcfg, classes, f.num, bool(f.out))
  try:
    drawn = export_sampler(f.model, mcfg, config, meta, over, student_fix=_STUDENT_FIX)
  except SettingError as e:   # a sampler setting the model refuses
    raise sampler_flags.sampler_error(e) from e
  sampler = drawn.sampler
  lead = jax.process_index() == 0
  placed = on_mesh(config, mcfg, params, drawn.student, f.batch, say if lead else lambda _: None)
  images, labels, stats = draw_samples(mcfg, placed, drawn, classes, f.num, f.seed,
                                       progress=not f.quiet)
  if not lead:   # every process holds the samples; process 0 writes them
    return
  write_outputs(images, labels, f.out, f.npz, stats)

  line = describe_stats(stats, sampler)
  if line:
    print(line)
  af = f", AF guidance {sampler.af_guidance}" if sampler.af_guidance else ""
  print(f"{images.shape[0] * images.shape[1]} samples ({sampler.guidance}, w={sampler.cfg.w}{af}) "
        f"-> {', '.join(p for p in (f.out, f.npz) if p)}")
