"""Sample quality: what `farmer_jax fid` computes, and the scoring the training report shares.

One code path for every feature network: samples -> a ``FeatureNet`` (uint8 images -> pool features
(B, F) and class logits (B, L)) -> FID against reference statistics, Inception Score from the
logits, precision/recall (k-NN manifolds, k = 3) against reference features (eval/metrics.py).

Feature networks:

* ``inception``: the standard FID Inception-v3 (pool3, 2048-d; 1008 logits) with weights from a
  local file (eval/inception.py; docs/eval.md says which file). Reference: a ``.npz`` with ``mu`` /
  ``sigma`` (e.g. the ADM reference batch) and/or images (``arr_0``), or a dataset split.
* ``mnist``: the small CNN trained in seconds on the bundled MNIST-5k train split
  (eval/mnist_classifier.py); reference: the 500 MNIST-5k test images. Offline, for the quickstart.

A reference may also be ``split:NAME``: every image of that split of the model's own dataset
(``config.data``), its statistics and features cached next to the result.

``sample_features`` draws samples class-balanced (sample j has label j mod C and key
``fold_in(key(seed), j)``, so any chunking gives the same samples) and, with a dump directory,
stores each batch's features as it goes: an interrupted run continues where it stopped.

Shape letters: B batch, F feature dim, L logits, C classes.
"""

import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from farmer_jax import untrusted
from farmer_jax.artifacts import storage
from farmer_jax.errors import UserError
from farmer_jax.eval import metrics

DUMP_MANIFEST = "manifest.json"


@dataclasses.dataclass
class FeatureNet:
  """``fn(images uint8 (B, H, W, c)) -> {'pool': (B, F), 'logits': (B, L)}`` numpy float32; ``name``
  and ``signature`` (what must match for a feature dump to be reused)."""
  name: str
  fn: object
  signature: dict


@dataclasses.dataclass
class Reference:
  """Reference statistics (float64) and, when available, reference features (for
  precision/recall)."""
  mu: np.ndarray
  sigma: np.ndarray
  features: "np.ndarray | None"
  what: str


def file_signature(path):
  """Name, size and a hash of the first and last MiB of a file (cheap, catches another file)."""
  st = os.stat(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))
    if st.st_size > 1 << 20:
      f.seek(max(st.st_size - (1 << 20), 0))
      h.update(f.read(1 << 20))
  return {"file": os.path.abspath(path), "bytes": int(st.st_size), "sha256_ends": h.hexdigest()}


def inception_net(path):
  """The FID Inception-v3 from a local weights file (eval/inception.py)."""
  from farmer_jax.eval.inception import load_fid_inception
  return FeatureNet("inception", load_fid_inception(path), file_signature(path))


def mnist_net(seed=0, say=None):
  """(FeatureNet of the MNIST CNN, its Classifier): the CNN trained on the bundled train split."""
  from farmer_jax.eval import mnist_classifier as mc
  clf = mc.train_classifier(seed=seed, say=say)
  def fn(images):
    logits, pool = clf._run(images)
    return {"pool": pool, "logits": logits}

  net = FeatureNet("mnist", fn, {"classifier_seed": int(seed), "classifier_steps": int(clf.steps),
                                 "classifier_lr": float(clf.lr),
                                 "test_accuracy": float(clf.test_accuracy)})
  return net, clf


def net_features(net, images, batch=250):
  """Features of uint8 images (n, H, W, c) in batches -> {'pool', 'logits'}."""
  out = {}
  for i in range(0, len(images), batch):
    for k, v in net.fn(images[i:i + batch]).items():
      out.setdefault(k, []).append(np.asarray(v, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


def reference_from_images(net, images, what):
  feats = net_features(net, images)["pool"]
  mu, sigma = metrics.feature_statistics(feats)
  return Reference(mu, sigma, feats, what)


def reference_from_file(net, path):
  """A reference ``.npz``: its mu/sigma if present (features of its images too when it has images,
  for precision/recall), else statistics of its images' features."""
  ref = metrics.reference_statistics(path, load_images=True)
  feats = None
  if ref.features is not None:
    feats = np.asarray(ref.features, np.float32)
  elif ref.images is not None:
    feats = net_features(net, np.asarray(ref.images))["pool"]
  if ref.mu is not None:
    mu, sigma = np.asarray(ref.mu, np.float64), np.asarray(ref.sigma, np.float64)
  else:
    mu, sigma = metrics.feature_statistics(feats)
  return Reference(mu, sigma, feats, os.path.abspath(path))


SPLIT_PREFIX = "split:"


def check_split(data, split):
  """Refuses (UserError) a ``--ref=split:NAME`` the model's dataset (``data``, its DataConfig)
  does not have."""
  from farmer_jax.data import sources
  sources.require_dataset(data, f"--ref={SPLIT_PREFIX}{split}: the model")
  sources.require_split(data, split, f"--ref={SPLIT_PREFIX}{split}",
                        "use one of them, or a reference .npz")


def reference_from_split(net, data, split, cache=None, say=print, progress=True):
  """Reference statistics and features of every image of a split of the model's dataset
  (``data``, its DataConfig), cached as a statistics ``.npz`` at ``cache`` (reused when
  present)."""
  from farmer_jax.data import pipeline
  what = f"{data.name} split {split!r}"
  if cache and os.path.exists(cache):
    ref = metrics.reference_statistics(cache)
    say(f"reference: {what} statistics from {cache}")
    return Reference(ref.mu, ref.sigma, ref.features, what)
  check_split(data, split)
  batches, steps, n = pipeline.eval_batches(data, split, 250)
  feats = []
  bar = tqdm(total=n, desc=f"reference {net.name} features", disable=not progress,
             dynamic_ncols=True)
  for b in batches:
    m = np.asarray(b["mask"], bool)
    feats.append(net_features(net, np.asarray(b["image"])[m])["pool"])
    bar.update(int(m.sum()))
  bar.close()
  feats = np.concatenate(feats)
  mu, sigma = metrics.feature_statistics(feats)
  if cache:
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    metrics.save_statistics(cache, mu, sigma, feats)
  return Reference(mu, sigma, feats, what)


def score(pool, logits, ref: Reference, k=3):
  """FID (vs ``ref``), Inception Score (of ``logits``) and precision/recall (vs ``ref.features``,
  when the reference has features) of generated features."""
  mu, sigma = metrics.feature_statistics(pool)
  if mu.shape != ref.mu.shape:
    raise UserError(f"the reference statistics are {ref.mu.shape[0]}-d but the feature network "
                    f"gives {mu.shape[0]}-d features; use a reference made with the same network")
  out = {"fid": float(metrics.frechet_distance(mu, sigma, ref.mu, ref.sigma)),
         "count": int(len(pool))}
  is_mean, is_std = metrics.inception_score(logits, splits=min(10, len(logits)))
  out.update(inception_score=float(is_mean), inception_score_std=float(is_std))
  if ref.features is not None:
    p, r = metrics.precision_recall(ref.features, pool, k=k)
    out.update(precision=float(p), recall=float(r))
  return out


def balanced_labels(num, num_classes):
  """Sample j's label: j mod C (the null class for an unconditional model)."""
  if num_classes == 0:
    return np.zeros((num,), np.int32)
  return (np.arange(num) % num_classes).astype(np.int32)


def _dump_chunks(dump):
  """{start: path} of the complete chunk files of a dump directory."""
  out = {}
  for name in storage.listdir(dump):
    if name.startswith("chunk_") and name.endswith(".npz"):
      out[int(name[len("chunk_"):-len(".npz")])] = os.path.join(dump, name)
  return out


def _open_dump(dump, signature, say):
  """Creates the dump directory with its manifest, or checks an existing one's manifest; returns
  {start: (pool, logits)} of the chunks already there."""
  manifest = os.path.join(dump, DUMP_MANIFEST)
  if os.path.exists(manifest):
    with open(manifest) as f:
      saved = json.load(f)
    if saved != signature:
      diff = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
      raise UserError(f"the feature dump {dump} was made with other settings ({', '.join(diff)} "
                      "differ); nothing was changed. Fix: pass another --dump directory, or "
                      "delete this one to start over")
    chunks = {}
    for start, path in _dump_chunks(dump).items():
      with untrusted.Npz(path) as z:
        chunks[start] = (z["pool"], z["logits"])
    if chunks:
      say(f"resuming from {dump}: {sum(len(v[0]) for v in chunks.values())} samples' features "
          "already there")
    return chunks
  if os.path.isdir(dump) and _dump_chunks(dump):
    raise UserError(f"{dump} holds feature chunks but no {DUMP_MANIFEST}, so nothing says which "
                    "settings made them; nothing was changed. Fix: pass another --dump directory, "
                    "or delete this one to start over")
  os.makedirs(dump, exist_ok=True)
  with storage.atomic_file(manifest, "w") as f:
    json.dump(signature, f, indent=2)
  return {}


def sample_features(mcfg, params, sampler, num, net, seed=0, batch=64, dump=None,
                    signature=None, progress=True, say=print, student_params=None,
                    latent_var=None, batch_sharding=None, gather_weights=False):
  """Draws ``num`` class-balanced samples (``balanced_labels``) in batches of ``batch`` and returns
  their features {'pool': (num, F), 'logits': (num, L), 'labels': (num,)} on process 0 (None on
  the others).

  ``batch_sharding`` (a mesh's batch sharding, see ``make_sample_fn`` with ``gather_weights``;
  ``batch`` then a multiple of its data-parallel slots and of the processes): each process draws
  its share of every batch and computes its share's features on its own devices; the features,
  not the images, are gathered.

  With ``dump`` (a local directory of process 0) every batch's features are written there as it
  is done (``chunk_<start>.npz``, atomically) under a manifest holding ``signature``; a later call
  with the same signature continues from the chunks present (any --batch, any device or process
  count: sample j is the same in any chunking), another signature is refused."""
  from farmer_jax.sampling.generate import draw_batch, make_sample_fn
  lead = jax.process_index() == 0
  labels = balanced_labels(num, mcfg.num_classes)
  if mcfg.num_classes == 0:
    labels[:] = mcfg.null_class
  done = _open_dump(dump, signature or {}, say) if dump and lead else {}
  covered = np.zeros((num,), bool)
  for start, (pool, _) in done.items():
    covered[start:start + len(pool)] = True
  if jax.process_count() > 1:   # every process draws the batches process 0's dump lacks
    from jax.experimental import multihost_utils
    covered = np.array(multihost_utils.broadcast_one_to_all(covered))
  fn = make_sample_fn(mcfg, sampler, latent_var, batch_sharding, gather_weights)
  pad_to = batch if num > batch or batch_sharding is not None else None
  bar = tqdm(total=num, initial=int(covered.sum()), desc=f"sample + {net.name} features",
             disable=not (progress and lead), dynamic_ncols=True)
  try:
    start = 0
    while start < num:
      if covered[start]:
        start += 1
        continue
      end = start
      while end < num and end - start < batch and not covered[end]:
        end += 1
      drawn = draw_batch(fn, params, labels[start:end], start, seed, pad_to=pad_to,
                         student_params=student_params, total=num)
      f = net.fn(drawn.images)
      f = drawn.gathered({"pool": np.asarray(f["pool"], np.float32),
                          "logits": np.asarray(f["logits"], np.float32)})
      if lead:
        done[start] = (f["pool"], f["logits"])
        if dump:
          path = os.path.join(dump, f"chunk_{start:09d}.npz")
          with storage.atomic_file(path) as fh:
            np.savez(fh, pool=f["pool"], logits=f["logits"])
      covered[start:end] = True
      bar.update(end - start)
      start = end
  finally:
    bar.close()
  if not lead:
    return None
  order = sorted(done)
  out = {"pool": np.concatenate([done[s][0] for s in order]),
         "logits": np.concatenate([done[s][1] for s in order]), "labels": labels}
  if len(out["pool"]) != num:
    raise UserError(f"the feature dump {dump} holds {len(out['pool'])} samples' features for "
                    f"--num={num} (overlapping or extra chunks); nothing was changed. Fix: pass "
                    "another --dump directory, or delete this one to start over")
  return out


def feature_net(features, inception=None, say=None):
  """(FeatureNet, the MNIST Classifier or None) of ``features``: 'inception' (weights from the
  file ``inception``) or 'mnist' (``say``: the classifier's training lines, or None)."""
  if features == "inception":
    return inception_net(inception), None
  return mnist_net(say=say)


def settings_tag(features, num, sampler, settings, seed):
  """The name of a result for these settings (``settings``: the config.sample keys used, of which
  ``sampler`` is the SamplerConfig)."""
  settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
  return f"{features}_n{num}_cfg{sampler.cfg.w:g}_seed{seed}_{settings_hash}"


def default_out(model_dir, tag):
  """Where a result goes by default: next to the model."""
  return os.path.join(model_dir, "eval", f"fid_{tag}.json")


def default_dump(out):
  """The feature dump directory of the result ``out`` (a .json path)."""
  return out[:-len(".json")] + ".features"


def dump_signature(model_dir, meta, settings, seed, num, net):
  """What a feature dump's samples depend on (``sample_features`` refuses a dump made with
  another)."""
  return {"model": os.path.abspath(model_dir), "export": meta, "sampler": settings,
          "seed": int(seed), "num": int(num), "features": net.name, "net": net.signature}


def split_cache(out, net, data, split):
  """Where the statistics of ``split`` of ``data`` go: next to the result ``out``, keyed by the
  feature network, the data and the split."""
  ident = {"net": net.signature, "split": split, "data": dataclasses.asdict(data)}
  key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(os.path.dirname(os.path.abspath(out)), f"ref_{split}_{net.name}_{key}.npz")


def fid_result(model_dir, net, reference, num, seed, sampler, settings, feats, dump, t0):
  """The result JSON: the scores of the sample features ``feats`` against ``reference`` and what
  made them (``t0``: when the command started)."""
  return {"model": os.path.abspath(model_dir), "features": net.name, "reference": reference.what,
          "num": num, "seed": seed, "guidance": sampler.guidance, "cfg": sampler.cfg.w,
          "sampler": settings, **score(feats["pool"], feats["logits"], reference),
          "net": net.signature, "dump": os.path.abspath(dump), "seconds": time.time() - t0}


def write_result(out, result):
  """Writes ``result`` as JSON at ``out`` (its folder is created)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  storage.write_text(out, json.dumps(result, indent=2))


def class_consistency(clf, feats):
  """Fraction of samples of class y that the MNIST classifier calls y (overall and per class),
  from the classifier logits in ``feats``."""
  pred = np.argmax(feats["logits"], axis=-1)
  labels = feats["labels"]
  per = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
  return {"class_consistency": float(np.mean(pred == labels)), "class_consistency_per_class": per}


def format_scores(r):
  parts = [f"FID {r['fid']:.2f}", f"IS {r['inception_score']:.2f}"]
  if "precision" in r:
    parts += [f"precision {r['precision']:.3f}", f"recall {r['recall']:.3f}"]
  if "class_consistency" in r:
    parts.append(f"class consistency {r['class_consistency']:.3f}")
  return (f"{r['features']} features, {r['num']} samples ({r['guidance']}, cfg {r['cfg']:g}) vs "
          f"{r['reference']}: " + ", ".join(parts))
