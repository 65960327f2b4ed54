"""The input pipeline (grain): one code path for the bundled quickstart data and a TPU pod.

Training. The split is a random-access source (data/sources.py). Its records form one infinite
stream, reshuffled every epoch (``shuffle(seed).repeat()``; epoch e uses seed + e), optionally
flipped (seeded by the record's position in the stream). Global batch k is the records
[k B, (k + 1) B) of that stream, in order; process p of P reads only its contiguous block
[k B + p b, k B + (p + 1) b) of it (b = B / P), so the global array assembled from the P blocks
is the same, element for element, for any process count, and no process reads another's
records. Images stay uint8 until the jitted step (``conventions.dequantize`` maps them to the
model range; 4x less host->device traffic).

Reading (``LocalBatches``). A process's records are read and preprocessed one by one, by
``data.read_threads`` threads with ``data.prefetch`` batches' worth of records in flight, then
stacked into batches in stream order: the records of one batch are decoded in parallel, and a
bucket's read latency overlaps across records. With ``data.worker_count`` worker processes, each
worker reads whole batches (worker w of W: the process's batches w, w + W, ...) the same way, and
grain interleaves them back in order, so the worker count changes nothing but speed.

Resume. The iterator's grain state goes into every checkpoint (``TrainInput.checkpoint``, saved
per process through ``grain.checkpoint.CheckpointSave``) and is restored on resume, so a resumed
run reads exactly the batches an uninterrupted one would. If the number of processes or of
workers changed since the save, the saved per-process states do not apply; the iterator then
starts at global batch ``step`` (one batch per train step), which, the stream being a pure
function of the position, is again exactly the global batch the uninterrupted run would read.
See docs/data.md.

Evaluation (``eval_batches``) visits every example of a split exactly once: the split is padded to
a multiple of the global batch with copies of record 0 whose ``mask`` is False, and every process
runs the same number of batches, whatever the split size and process count.

Shape letters: b = B / P per-process batch, H W c image.
"""

import dataclasses
import json
import math

import grain
import numpy as np

from farmer_jax.data import preprocess, sources
from farmer_jax.errors import ConfigError


class Preprocess(grain.transforms.Map):
  """A source record -> {'image': uint8 (S, S, c), 'label': int32}: center crop (data.resize =
  'center_crop') or a shape check, and the label checked against data.num_classes (0 =
  unconditional: every label is the null class, 0)."""

  def __init__(self, data):
    self.name, self.size, self.channels = data.name, data.image_size, data.channels
    self.num_classes, self.resize = data.num_classes, data.resize

  def map(self, record):
    image = np.asarray(record["image"])
    if image.ndim == 2:
      image = image[..., None]
    if self.resize == "center_crop" and image.shape[:2] != (self.size, self.size):
      image = preprocess.center_crop_array(image, self.size)
    if image.shape != (self.size, self.size, self.channels) or image.dtype != np.uint8:
      raise ConfigError(
          f"an image of {self.name} has shape {image.shape} ({image.dtype}), config.data wants "
          f"({self.size}, {self.size}, {self.channels}) uint8. Fix: set --config.data.image_size /"
          " channels to the dataset's, or --config.data.resize=center_crop")
    label = int(record["label"])
    if self.num_classes == 0:
      label = 0
    elif not 0 <= label < self.num_classes:
      raise ConfigError(
          f"a label of {self.name} is {label}, outside [0, {self.num_classes}) with "
          f"config.data.num_classes={self.num_classes}. Fix: set --config.data.num_classes to "
          "the dataset's class count; out-of-range labels are never mapped to the null class")
    return {"image": image, "label": np.int32(label)}


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (data.random_flip), drawn from the record's rng."""

  def random_map(self, record, rng):
    if rng.random() < 0.5:
      record = dict(record, image=record["image"][:, ::-1])
    return record


def _local_batch(global_batch, process_count):
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by the process count "
                     f"{process_count}; use a multiple of {process_count}")
  return global_batch // process_count


def train_stream(data, source, seed):
  """grain.MapDataset of the training records (infinite): shuffled per epoch, preprocessed,
  flipped (module doc)."""
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None).map(Preprocess(data))
  if data.random_flip:
    ds = ds.random_map(RandomFlip(), seed=seed)
  return ds


class _Blocks(grain.MapDataset):
  """The records of one process's batches first, first + stride, ... of a stream, in order:
  record i is record j = i % b of batch k = first + stride * (i // b), i.e. stream record
  k B + p b + j."""

  def __init__(self, stream, b, global_batch, p, first, stride):
    super().__init__(stream)
    self._b, self._global, self._p, self._first, self._stride = b, global_batch, p, first, stride
    self._batches = len(range(first, len(stream) // global_batch, stride))

  def __len__(self):
    return self._batches * self._b

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, j = divmod(index, self._b)
    return self._parent[(self._first + self._stride * k) * self._global + self._p * self._b + j]

  def __str__(self):
    return f"_Blocks(b={self._b}, B={self._global}, p={self._p}, batches {self._first}::" \
           f"{self._stride})"


class _BatchPosition(grain.DatasetIterator):
  """Batches of b records, with the iterator state counted in batches: {'next_index': batches
  read} (the record reader's state counts records)."""

  def __init__(self, batches, b):
    super().__init__(batches)
    self._b = b

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return {"next_index": self._parent.get_state()["next_index"] // self._b}

  def set_state(self, state):
    self._parent.set_state({"next_index": int(state["next_index"]) * self._b})


class LocalBatches(grain.IterDataset):
  """grain.IterDataset of process p's batches of a record stream (module doc): batch k holds the
  stream records [k B + p b, k B + (p + 1) b), for k = first, first + stride, ... up to the end of
  the stream. The records are read one by one by ``read_threads`` threads, ``prefetch`` batches
  of records ahead, and stacked in order. ``mp_prefetch``'s worker split lands here
  (``set_slice``) and picks whole batches, so batches never mix records of two workers."""

  def __init__(self, stream, global_batch, process_index=0, process_count=1, read_threads=1,
               prefetch=2, first=0, stride=1):
    super().__init__(stream)
    self._b = _local_batch(global_batch, process_count)
    self._global, self._p, self._first, self._stride = global_batch, process_index, first, stride
    self._read = grain.ReadOptions(num_threads=read_threads,
                                   prefetch_buffer_size=prefetch * self._b)

  def set_slice(self, sl, sequential_slice=False):
    """Keeps batches sl.start, sl.start + sl.step, ... of these (a worker's share; grain calls
    this in each worker process)."""
    if sequential_slice or sl.stop is not None:
      raise ValueError(f"LocalBatches takes strided worker slices, not {sl} "
                       f"(sequential={sequential_slice})")
    self._first += (sl.start or 0) * self._stride
    self._stride *= sl.step or 1

  def __iter__(self):
    records = _Blocks(self._parent, self._b, self._global, self._p, self._first, self._stride)
    batches = records.to_iter_dataset(self._read).batch(self._b, drop_remainder=True)
    return _BatchPosition(iter(batches), self._b)

  def __str__(self):
    return f"LocalBatches(b={self._b}, batches {self._first}::{self._stride}, {self._read})"


def _iter_dataset(batches, data, put=None):
  """LocalBatches -> the IterDataset training reads: in ``data.worker_count`` worker processes
  (each with ``data.prefetch`` batches buffered) if any; ``put`` (e.g. local batch -> global
  device array) runs in a background thread two batches ahead."""
  it = batches
  if data.worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count,
                                                     per_worker_buffer_size=data.prefetch))
  if put is not None:
    it = grain.experimental.ThreadPrefetchIterDataset(it.map(put), prefetch_buffer_size=2)
  return it


class _FrozenState:
  """A snapshot of an iterator's state for grain's checkpoint handler (an async checkpoint must
  not see the live iterator move on)."""

  def __init__(self, state):
    self._text = json.dumps(state, indent=2)

  def get_state(self):
    return self._text.encode()


class _StateHolder:
  """Receives a saved iterator state from grain's checkpoint handler (``set_state``)."""
  state = None

  def set_state(self, state):
    self.state = json.loads(state.decode() if isinstance(state, bytes) else state)

  def start_prefetch(self):
    pass


@dataclasses.dataclass
class TrainInput:
  """The training input of one process (see module doc): ``next(inp)`` -> the local batch
  {'image': uint8 (b, S, S, c), 'label': int32 (b,)}; ``start``, ``checkpoint`` for resume."""
  data: object                 # DataConfig
  global_batch: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  put: object = None           # local batch -> what the train step takes (e.g. a global array)

  def __post_init__(self):
    self.source = sources.open_split(self.data, self.data.train_split)
    self.num_examples = len(self.source)
    if self.num_examples < self.global_batch:
      raise ConfigError(
          f"config.train.batch_size={self.global_batch} exceeds the {self.num_examples} examples "
          f"of {self.data.name} split {self.data.train_split!r}. Fix: lower train.batch_size")
    self.stream = train_stream(self.data, self.source, self.seed)
    self.origin, self._it = 0, None

  @property
  def layout(self):
    """What a saved per-process iterator state depends on."""
    return {"process_count": self.process_count, "worker_count": self.data.worker_count,
            "global_batch": self.global_batch, "seed": self.seed,
            "num_examples": self.num_examples, "random_flip": bool(self.data.random_flip)}

  def start(self, step=0, saved=None):
    """Positions the iterator at global batch ``step``: from ``saved`` (meta, grain state) as
    written by ``checkpoint`` when it applies, else directly. Returns a line saying which."""
    self.close()
    meta, state = saved if saved is not None else (None, None)
    how = f"input: starting at global batch {step}"
    # without workers the state is {'next_index': batches read since origin}: it must match step
    consistent = (not isinstance(state, dict) or "next_index" not in state or
                  int(meta.get("origin", 0)) + int(state["next_index"]) == step)
    if meta is not None and state is not None and meta.get("layout") == self.layout:
      if consistent:
        self.origin = int(meta["origin"])
        self._it = iter(self._iter_dataset())
        self._it.set_state(state)
        return f"input: restored the iterator state saved at step {step}"
    if meta is not None:
      saved_layout = meta.get("layout") or {}
      changed = {k: f"{saved_layout.get(k)} -> {v}" for k, v in self.layout.items()
                 if saved_layout.get(k) != v}
      same = "the global batches are the same as in an uninterrupted run"
      if not saved_layout:
        why = f"the checkpoint holds no input state (an older release); {same}"
      elif not set(changed) <= {"process_count", "worker_count"}:
        why = (f"the input itself changed: {changed}; batches from here on follow the new "
               "setting")
      elif changed:
        why = f"the saved states are per process/worker and the layout changed: {changed}; {same}"
      elif state is None:
        why = f"no saved state for this process; {same}"
      else:
        why = f"the saved state is not at step {step}; {same}"
      how += f" ({why})"
    self.origin = int(step)
    self._it = iter(self._iter_dataset())
    return how

  def _iter_dataset(self):
    d = self.data
    return _iter_dataset(LocalBatches(self.stream, self.global_batch, self.process_index,
                                      self.process_count, d.read_threads, d.prefetch,
                                      first=self.origin), d, self.put)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self.start(0)
    return next(self._it)

  def checkpoint(self):
    """(meta dict, grain-handler item) for the checkpoint: meta is JSON-able, the item a frozen
    copy of the iterator's state for ``grain.checkpoint.CheckpointSave``."""
    if self._it is None:
      self.start(0)
    return {"origin": self.origin, "layout": self.layout}, _FrozenState(self._it.get_state())

  def close(self):
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def state_holder():
  """An item for ``grain.checkpoint.CheckpointRestore`` that keeps the restored state."""
  return _StateHolder()


class _Padded:
  """A source padded to ``n`` records with copies of record 0 (``mask`` False)."""

  def __init__(self, source, n):
    self.source, self.n, self.real = source, n, len(source)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    real = i < self.real
    return dict(self.source[i if real else 0], mask=real)


class _KeepMask(grain.transforms.Map):
  """Preprocess (if given) keeping the record's ``mask``."""

  def __init__(self, prep=None):
    self.prep = prep

  def map(self, record):
    out = self.prep.map(record) if self.prep is not None else {
        "image": np.asarray(record["image"]), "label": np.int32(record["label"])}
    return dict(out, mask=np.bool_(record["mask"]))


def padded_batches(source, global_batch, process_index=0, process_count=1, prep=None,
                   read_threads=1, prefetch=2):
  """(iterable of this process's local batches {'image', 'label', 'mask'}, number of batches)
  covering every record of ``source`` once: global batch k holds records [k B, (k + 1) B), the
  last one padded with masked-out copies of record 0 (see module doc)."""
  steps = math.ceil(len(source) / global_batch)
  stream = grain.MapDataset.source(_Padded(source, steps * global_batch)).map(_KeepMask(prep))
  return LocalBatches(stream, global_batch, process_index, process_count, read_threads,
                      prefetch), steps


def eval_batches(data, split, global_batch, process_index=0, process_count=1):
  """(local batches, number of batches, number of examples) of ``split`` of ``config.data``,
  preprocessed as for training (no flip), covering every example once (``padded_batches``)."""
  source = sources.open_split(data, split)
  batches, steps = padded_batches(source, global_batch, process_index, process_count,
                                  Preprocess(data), data.read_threads, data.prefetch)
  return batches, steps, len(source)
