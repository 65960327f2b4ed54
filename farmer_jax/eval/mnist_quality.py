"""The quickstart's offline sample-quality numbers (``config.eval.mnist_quality``): MNIST-FID and
class consistency of samples at cfg 0 and at the run's own guidance, scored by the small CNN of
eval/mnist_classifier.py through the same code path as `farmer_jax fid --features=mnist`
(eval/fid.py)."""

from typing import NamedTuple

from farmer_jax import sharding
from farmer_jax.eval import fid


def settings(sampler):
  """[(name, SamplerConfig)]: plain ancestral sampling (cfg 0, every temperature and the redundant
  variance scale at 1, the exact inverse) and, if the run's config.sample guides, its own
  settings."""
  from farmer_jax.config.schema import ResamplingCFG, SamplerConfig
  plain = SamplerConfig(guidance="none", cfg=ResamplingCFG())
  out = [("cfg0", plain)]
  if sampler.guidance != "none" and sampler.cfg.w > 0:
    out.append((f"{sampler.guidance}_cfg{sampler.cfg.w:g}", sampler))
  return out


# samples drawn per call (a run rounds it up to its mesh's data-parallel slots)
QUALITY_BATCH = 500


class Judge(NamedTuple):
  """What scores MNIST samples: the digit CNN as a feature net, its classifier, and the reference
  (the MNIST-5k test split's features)."""
  net: object
  clf: object
  ref: object


def make_judge(say=None):
  """The ``Judge``: trains the digit CNN (seconds) and computes the test split's features."""
  net, clf = fid.mnist_net(seed=0, say=say)
  from farmer_jax.data.mnist import load_mnist5k
  images, _ = load_mnist5k("test")
  return Judge(net, clf, fid.reference_from_images(net, images, "mnist5k test (500 images)"))


def score_model(mcfg, params, sampler, per_class, seed=0, say=None, progress=False,
                batch_sharding=None, batch=QUALITY_BATCH, named=None, judge=None):
  """{'classifier_test_accuracy', 'samples_per_class', '<setting>': {'mnist_fid',
  'class_consistency', 'class_consistency_per_class', 'inception_score' (of the classifier's
  logits), 'precision', 'recall'}} for each of ``settings(sampler)`` (or of ``named``, [(name,
  SamplerConfig)]), on process 0 (None on the others). ``batch_sharding``, ``batch``: see
  ``fid.sample_features``; ``judge``: a ``make_judge()`` to reuse."""
  j = judge or make_judge(say)
  out = {"classifier_test_accuracy": float(j.clf.test_accuracy), "samples_per_class": per_class}
  for name, s in named or settings(sampler):
    feats = fid.sample_features(mcfg, params, s, per_class * mcfg.num_classes, j.net, seed=seed,
                                batch=batch, progress=progress, say=say or (lambda _: None),
                                batch_sharding=batch_sharding)
    if feats is None:
      return None
    r = fid.score(feats["pool"], feats["logits"], j.ref)
    r["mnist_fid"] = r.pop("fid")
    r.update(fid.class_consistency(j.clf, feats))
    out[name] = r
  return out


def score_run(tr, e, say=print):
  """``score_model`` on a finished Trainer's eval params with its config.sample sampler, on its
  mesh (each process draws its share of every batch); None on processes other than 0."""
  s = tr.run.sample
  batch = sharding.padded_batch_size(QUALITY_BATCH, tr.mesh, tr.run.sharding_rules)
  with tr.mesh_context():
    out = score_model(tr.mcfg, tr.eval_params(), s.sampler, e.quality_per_class, seed=s.seed,
                      say=say, progress=tr.bars, batch_sharding=tr.batch_sh, batch=batch)
  return out


def format_quality(q):
  parts = []
  for name, r in q.items():
    if isinstance(r, dict):
      parts.append(f"{name}: MNIST-FID {r['mnist_fid']:.2f}, class consistency "
                   f"{r['class_consistency']:.3f}")
  return (f"sample quality ({q['samples_per_class']} per class; digit classifier test accuracy "
          f"{q['classifier_test_accuracy']:.3f}): " + "; ".join(parts))
