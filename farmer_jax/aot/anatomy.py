"""A compiled program read from its optimized HLO text (``compiled.as_text()``): the collectives
per step (kind, count, bytes; async ones, and whether compute runs while they are in flight), the
fusions and which hold the matmuls (with their FLOPs), and the HBM bytes its top-level ops move.

Everything is counted per execution of the program on one device and multiplied by the trip
counts of the ``while`` loops it sits in (``scan`` over blocks and layers; nested loops multiply):
XLA's ``cost_analysis()`` counts a loop body once. A trip count is the one XLA records in the
loop's ``backend_config`` (``known_trip_count``), else it is read from the loop's induction
variable: the condition's bound, the body's step and the initial constant (the TPU compiler
records none, and its windowed-einsum loops step by 2).

The HLO of a compiled TPU (or CPU) module is scheduled (``is_scheduled=true``): the order of the
instructions in a computation is their execution order, so an async collective overlaps the
compute scheduled between its ``-start`` and its ``-done``. TPU's async collective fusion (with
farmer_jax/xla_options.py's options) writes that pair as two fusions rooted in the custom-calls
``AsyncCollectiveStart`` / ``AsyncCollectiveDone``, the compute fusions between them running the
collective's steps (its ``chain_id`` ties them); a collective fused with its consumer is counted
too, TPU's all-reduce-scatter fusion (an all-reduce and the slice each device keeps) as the
reduce-scatter it is.

A pure function of the text: ``tests/test_anatomy.py`` checks it on programs compiled on CPU and
on handwritten HLO.
"""

import collections
import dataclasses
import json
import math
import re
from typing import Dict, Optional, Tuple

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast", "ragged-all-to-all")

# bytes per element; sub-byte types round up per element (an upper bound, none are used here)
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}

# ops that move no data of their own: structure, aliases, control
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "iota",
               "opt-barrier", "add-dependency", "domain", "copy-start", "copy-done"}
_MATMULS = ("dot", "convolution")

_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = (.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_ARRAY_LAYOUT = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\](\{[^{}]*\})?")
_REF = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instr:
  """One HLO instruction: its result ``type`` text, ``opcode``, operand names and the rest of
  its line (``attrs``)."""
  name: str
  type: str
  opcode: str
  operands: Tuple[str, ...]
  args: str
  attrs: str
  root: bool = False


def _closing(text, start):
  """The index just past the bracket that closes the one at ``text[start]``."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, stack = 0, []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
      depth += 1
    elif stack and c == stack[-1]:
      stack.pop()
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instr(line):
  m = _INSTR.match(line)
  if not m:
    return None
  root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
  if rest.startswith("("):
    end = _closing(rest, 0)
  else:
    end = rest.index(" ")
  type_, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _closing(rest, op.end() - 1)
  args = rest[op.end():close - 1]
  return Instr(name, type_, op.group(1), tuple(_REF.findall(args)), args,
               rest[close:].lstrip(", "), root)


def parse_module(text):
  """HLO text -> ({computation: [Instr in order]}, entry computation name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    ins = _parse_instr(line)
    if ins is not None:
      comps[current].append(ins)
  return comps, entry


def type_bytes(type_text, hbm_only=False):
  """Bytes of an HLO type: an array, or the sum over a tuple's arrays. ``hbm_only``: leave out
  the arrays whose layout puts them in another memory space than the default (``S(1)``: a TPU
  core's on-chip VMEM)."""
  total = 0
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(type_text):
    if hbm_only and re.search(r"S\([1-9]\d*\)", layout):
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def _dims(type_text):
  m = _ARRAY.search(re.sub(r"\{[^{}]*\}", "", type_text))
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _attr(ins, key):
  m = re.search(rf"\b{key}=%([\w.\-]+)", ins.attrs)
  return m.group(1) if m else None


def _root(body):
  """The root instruction of a computation's instruction list, or None."""
  return next((i for i in body if i.root), None)


def _async_fusion(ins, comps):
  """'start' / 'done' for a fusion of TPU's async collective fusion (its fused computation's
  root is the custom-call AsyncCollectiveStart / AsyncCollectiveDone), else None."""
  if ins.opcode != "fusion":
    return None
  root = _root(comps.get(_attr(ins, "calls"), ()))
  if root is None or root.opcode != "custom-call":
    return None
  m = re.search(r'custom_call_target="AsyncCollective(Start|Done)"', root.attrs)
  return m.group(1).lower() if m else None


def _inner_collective(ins, comps):
  """The collective instruction inside the computation ``ins`` calls, or None."""
  return next((i for i in comps.get(_attr(ins, "calls"), ()) if i.opcode in KINDS), None)


def _chain(ins):
  """What ties the steps of one async collective fusion together: the collective's chain_id
  (frontend attribute), else its channel_id."""
  m = re.search(r'chain_id="(\w+)"', ins.attrs) or re.search(r"channel_id=(\d+)", ins.attrs)
  return m.group(0) if m else None


def group_size(ins):
  """How many devices take part in each group of a collective (its replica_groups), 0 if not
  stated (collective-permute, or all devices)."""
  a = ins.attrs
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", a)   # iota form: [groups, size]<=[...]
  if m:
    return int(m.group(2))
  # mesh form: mesh['a'=8,'b'=4] (device_ids=...) {'a'}
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(.*?\))?\s*\{([^}]*)\}", a)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[n]) for n in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", a)   # explicit groups
  if m:
    return len([d for d in m.group(1).split(",") if d])
  return 0


def trip_count(ins, comps):
  """A while loop's trip count: XLA's ``known_trip_count``, else read from its induction
  variable: the condition ``i < N`` on a tuple element, the body's ``i + step`` on it and its
  initial constant (0 when not a constant); None when neither says."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
  if m:
    return int(m.group(1))
  cond = comps.get(_attr(ins, "condition"), [])
  bound = _compare_bound(cond, comps)
  if bound is None:
    return None
  index, limit = bound
  step = _step(comps.get(_attr(ins, "body"), []), index, comps)
  if not step or step <= 0:
    return None
  init = 0
  caller = next((c for c in comps.values() if ins in c), [])
  by = {i.name: i for i in caller}
  tup = by.get(ins.operands[0]) if ins.operands else None
  if tup is not None and tup.opcode == "tuple" and index < len(tup.operands):
    start = _through_copies(by.get(tup.operands[index]), by)
    if start is not None and start.opcode == "constant" and re.fullmatch(r"-?\d+", start.args):
      init = int(start.args)
  return max(0, -(-(limit - init) // step))


def _through_copies(ins, by):
  while ins is not None and ins.opcode in ("copy", "bitcast", "convert") and ins.operands:
    ins = by.get(ins.operands[0])
  return ins


def _const(ins):
  if ins is not None and ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.args):
    return int(ins.args)
  return None


def _gte_index(ins):
  """k if ``ins`` is get-tuple-element k of a parameter, else None."""
  if ins is not None and ins.opcode == "get-tuple-element":
    m = re.search(r"index=(\d+)", ins.attrs)
    return int(m.group(1)) if m else None
  return None


def _binary(ins, comps, by, opcode):
  """The two operands (instructions of the same computation) of ``ins`` if it is ``opcode``, or
  a fusion whose root is ``opcode`` of its two parameters; None otherwise. With it, for a
  compare, its direction."""
  if ins is None:
    return None
  if ins.opcode == opcode:
    ops, attrs = ins.operands, ins.attrs
  elif ins.opcode == "fusion":
    body = comps.get(_attr(ins, "calls"), [])
    root = _root(body)
    params = {i.name: int(i.args) for i in body if i.opcode == "parameter"}
    if root is None or root.opcode != opcode or any(o not in params for o in root.operands):
      return None
    ops, attrs = [ins.operands[params[o]] for o in root.operands], root.attrs
  else:
    return None
  if len(ops) != 2:
    return None
  d = re.search(r"direction=(\w+)", attrs)
  return by.get(ops[0]), by.get(ops[1]), d.group(1) if d else ""


def _compare_bound(cond, comps):
  """(tuple index, N) of a loop condition ``element[index] < N``, or None."""
  by = {i.name: i for i in cond}
  root = _root(cond)
  b = _binary(root, comps, by, "compare")
  if b is None:
    return None
  lhs, rhs, direction = b
  lhs, rhs = _through_copies(lhs, by), _through_copies(rhs, by)
  if direction == "LT" and _gte_index(lhs) is not None and _const(rhs) is not None:
    return _gte_index(lhs), _const(rhs)
  if direction == "GT" and _gte_index(rhs) is not None and _const(lhs) is not None:
    return _gte_index(rhs), _const(lhs)
  return None


def _step(body, index, comps):
  """The constant a loop body adds to its tuple element ``index``, or None."""
  by = {i.name: i for i in body}
  root = _root(body)
  if root is None or root.opcode != "tuple" or index >= len(root.operands):
    return None
  b = _binary(_through_copies(by.get(root.operands[index]), by), comps, by, "add")
  if b is None:
    return None
  a, c, _ = b
  a, c = _through_copies(a, by), _through_copies(c, by)
  if _gte_index(a) == index and _const(c) is not None:
    return _const(c)
  if _gte_index(c) == index and _const(a) is not None:
    return _const(a)
  return None


def _edges(ins, comps):
  """(callee, factor, how) of the computations one instruction runs: a loop body ``factor`` times
  (its trip count), fused computations ('fused'), async-wrapped ones ('async'), others once."""
  if ins.opcode == "while":
    n = trip_count(ins, comps)
    return [(_attr(ins, "body"), n, "body"), (_attr(ins, "condition"), n, "condition")]
  out = []
  if ins.opcode == "fusion":
    out.append((_attr(ins, "calls"), 1, "fused"))
  elif ins.opcode.startswith("async-start") or ins.opcode == "async-start":
    out.append((_attr(ins, "calls"), 1, "async"))
  elif ins.opcode in ("call", "custom-call"):
    callee = _attr(ins, "to_apply") or _attr(ins, "calls")
    if callee:
      out.append((callee, 1, "called"))
  elif ins.opcode == "conditional":
    m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
    names = _REF.findall(m.group(1)) if m else []
    names += [_attr(ins, k) for k in ("true_computation", "false_computation") if _attr(ins, k)]
    out += [(c, 1, "called") for c in names]
  return out


def multipliers(comps, entry):
  """(times each computation runs per program execution, how it is reached: 'entry', 'body',
  'called', 'fused', 'async', 'condition', loops whose trip count is unknown (counted once))."""
  callers = collections.defaultdict(list)
  unknown = []
  for c, instrs in comps.items():
    for ins in instrs:
      for callee, n, how in _edges(ins, comps):
        if callee is None:
          continue
        if n is None:
          if how == "body":
            unknown.append(ins.name)
          n = 1
        callers[callee].append((c, n, how))
  memo = {entry: 1}
  how_of = {entry: "entry"}

  def times(c, seen=()):
    if c in memo:
      return memo[c]
    if c in seen:
      return 0
    total = 0
    for caller, n, how in callers.get(c, ()):
      total += times(caller, seen + (c,)) * n
      how_of.setdefault(c, how)
    memo[c] = total
    return total

  for c in comps:
    times(c)
  return memo, how_of, tuple(unknown)


def _op_name(ins):
  m = re.search(r'op_name="([^"]*)"', ins.attrs)
  return m.group(1) if m else ""


def matmul_flops(ins, types):
  """FLOPs (2 per multiply-add) of a dot or convolution instruction."""
  out = math.prod(_dims(ins.type)) if _dims(ins.type) else 1
  if ins.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    lhs = _dims(types.get(ins.operands[0], "")) if ins.operands else []
    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
    return 2 * out * k
  return 2 * out * _conv_contraction(ins, types)


def _conv_contraction(ins, types):
  """Multiply-adds per output element of a convolution: the kernel's input features times, per
  spatial dim, the window positions that fall on the input rather than its padding (averaged
  over the output positions). XLA writes an einsum's shared (batch-like) dims as spatial dims of
  a window padded on both sides, where each output position meets one input element: they
  count 1, as they should."""
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  lhs = _dims(types.get(ins.operands[0], "")) if ins.operands else []
  rhs = _dims(types.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
  out = _dims(ins.type)
  if not m or len(m.group(2)) != len(rhs) or len(m.group(1)) != len(lhs):
    return 1
  lhs_l, rhs_l, out_l = m.groups()
  k = rhs[rhs_l.index("i")]
  w = re.search(r"window=\{([^}]*)\}", ins.attrs)
  field = lambda key: re.search(rf"{key}=([\dx_]+)", w.group(1)) if w else None
  sizes = [int(v) for v in field("size").group(1).split("x")] if field("size") else []
  pads = ([tuple(int(p) for p in v.split("_")) for v in field("pad").group(1).split("x")]
          if field("pad") else [(0, 0)] * len(sizes))
  strides = ([int(v) for v in field("stride").group(1).split("x")] if field("stride")
             else [1] * len(sizes))
  for d, (size, (lo, _), stride) in enumerate(zip(sizes, pads, strides)):
    n, o = lhs[lhs_l.index(str(d))], out[out_l.index(str(d))]
    hits = sum(max(0, min(size, n + lo - j * stride) - max(0, lo - j * stride))
               for j in range(o))
    k *= hits / o
  return k


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: ``kind`` (KINDS), async or not, its buffer ``bytes`` (the full,
  gathered / unreduced side: the larger of operands and result), devices per ``group``, ``count``
  executions per step, and for an async one the fusions and matmul FLOPs scheduled between its
  start and its done (compute it may overlap)."""
  name: str
  kind: str
  asynchronous: bool
  bytes: int
  group: int
  count: int
  computation: str
  fusions_between: int = 0
  flops_between: float = 0.0
  op_name: str = ""

  @property
  def total_bytes(self):
    return self.bytes * self.count

  @property
  def overlapped(self):
    """Whether matmul compute is scheduled while it is in flight."""
    return self.asynchronous and self.flops_between > 0


@dataclasses.dataclass(frozen=True)
class MatmulFusion:
  """A fusion (or a bare dot / convolution) holding matmuls: FLOPs per execution, ``count``
  executions per step, and the op_name of its largest matmul (where in the model it is)."""
  name: str
  flops: float
  count: int
  op_name: str

  @property
  def total_flops(self):
    return self.flops * self.count


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """A compiled program per device and step (loop-multiplied): its collectives, fusion counts by
  kind, matmul fusions, matmul FLOPs, HBM bytes read + written by top-level ops, the trip counts
  of its loops, and the loops whose trip count could not be read (counted once)."""
  collectives: Tuple[Collective, ...]
  fusions: Dict[str, int]
  matmuls: Tuple[MatmulFusion, ...]
  hbm_bytes: int
  loops: Dict[str, int]
  unknown_loops: Tuple[str, ...] = ()

  @property
  def matmul_flops(self):
    return sum(m.total_flops for m in self.matmuls)

  def by_kind(self):
    """{(kind, async, overlapped): (count, bytes)} per step."""
    out = collections.defaultdict(lambda: [0, 0])
    for c in self.collectives:
      row = out[(c.kind, c.asynchronous, c.overlapped)]
      row[0] += c.count
      row[1] += c.total_bytes
    return {k: tuple(v) for k, v in sorted(out.items())}


def _fused_flops(comp, comps, types, seen=()):
  """(matmul FLOPs, op_name of the largest matmul) of a fused computation, nested calls in."""
  total, best = 0.0, (0.0, "")
  for ins in comps.get(comp, ()):
    if ins.opcode in _MATMULS:
      f = matmul_flops(ins, types)
      total += f
      best = max(best, (f, _op_name(ins)))
    callee = _attr(ins, "calls")
    if callee and callee not in seen:
      f, name = _fused_flops(callee, comps, types, seen + (comp,))
      total += f
      best = max(best, (f, name))
  return total, best[1]


def _through_views(name, comp_instrs):
  """The users of ``name`` in a computation, looking through bitcasts / reshapes."""
  out = []
  for i in comp_instrs:
    if name in i.operands:
      if i.opcode in ("bitcast", "reshape"):
        out += _through_views(i.name, comp_instrs)
      else:
        out.append((i, i.operands.index(name)))
  return out


def _hbm(type_text):
  return type_bytes(type_text, hbm_only=True)


def _fusion_traffic(ins, comps, types):
  """HBM bytes a fusion reads and writes: an operand only sliced inside (a scanned layer's
  weights or saved activations out of their stacked buffer) reads the slices; a buffer updated
  in place (dynamic-update-slice, the scan's stacked outputs) reads nothing and writes the
  update; nested fusions are looked into; everything else reads its operand and writes its
  result whole."""
  body = comps.get(_attr(ins, "calls"), [])
  step = _async_fusion(ins, comps)
  if step == "done":   # hands over the buffer the collective wrote
    return 0
  state = set() if step == "start" else _in_flight(body)
  params = {int(i.args): i for i in body if i.opcode == "parameter"}
  read = 0
  for k, op in enumerate(ins.operands):
    if k in params and params[k].name in state:
      continue
    sliced = _param_reads(params[k].name, body, comps) if k in params else None
    read += _hbm(types.get(op, "")) if sliced is None else sliced
  root = _root(body)
  if root is None:
    return read + _hbm(ins.type)
  if root.opcode == "tuple" and state:
    by = {i.name: i for i in body}
    return read + sum(_written(by[o], body, comps, types) if o in by else _hbm(types.get(o, ""))
                      for o in root.operands if o not in state)
  return read + _written(root, body, comps, types)


def _in_flight(body):
  """In a compute fusion that also runs a step of an async collective (TPU's async collective
  fusion with multiple steps): the collective's results and the parameters only the collective
  uses or the fusion passes through (its in-flight buffers, written once by the collective and
  counted at its start, or aliased). Empty for a fusion without such a collective (one in a
  chain: ``chain_id``)."""
  colls = {i.name for i in body if i.opcode in KINDS and 'chain_id="' in i.attrs}
  if not colls:
    return set()
  root = _root(body)

  def carried(name):
    uses = _through_views(name, body)
    return bool(uses) and all(u.opcode in KINDS or u.opcode == "custom-call" or u is root
                              for u, _ in uses)
  return colls | {i.name for i in body if i.opcode == "parameter" and carried(i.name)}


def _param_reads(name, body, comps):
  """Bytes read of parameter ``name`` of fused computation ``body`` when every use slices it or
  updates it in place (nested fusions looked into); None when a use reads it whole."""
  total = 0
  for u, j in _through_views(name, body):
    if u.opcode in ("dynamic-slice", "slice", "gather") and j == 0:
      total += _hbm(u.type)
    elif u.opcode == "dynamic-update-slice" and j == 0:
      continue
    elif u.opcode == "fusion":
      inner = comps.get(_attr(u, "calls"), [])
      p = next((i for i in inner if i.opcode == "parameter" and int(i.args) == j), None)
      r = _param_reads(p.name, inner, comps) if p is not None else None
      if r is None:
        return None
      total += r
    else:
      return None
  return total


def _written(root, body, comps, types):
  """Bytes a fused computation's ``root`` writes: the update of an in-place dynamic-update-slice,
  each element of a tuple, the root of a nested fusion; else the whole result."""
  by = {i.name: i for i in body}
  if root.opcode == "dynamic-update-slice":
    return _hbm(types.get(root.operands[1], ""))
  if root.opcode == "tuple":
    return sum(_written(by[o], body, comps, types) if o in by else _hbm(types.get(o, ""))
               for o in root.operands)
  if root.opcode == "fusion":
    inner = comps.get(_attr(root, "calls"), [])
    nested = _root(inner)
    if nested is not None:
      return _written(nested, inner, comps, types)
  return _hbm(root.type)


def _traffic(ins, comps, types):
  """HBM bytes a top-level instruction reads + writes (0 for structure and aliases)."""
  op = ins.opcode
  if op in _NO_TRAFFIC:
    return 0
  if op.endswith("-done"):   # an async op writes its result; its start read the operands
    return _hbm(ins.type)
  if op == "fusion":
    return _fusion_traffic(ins, comps, types)
  if op == "dynamic-slice":
    return 2 * _hbm(ins.type)
  if op == "dynamic-update-slice":
    return 2 * _hbm(types.get(ins.operands[1], ""))
  reads = sum(_hbm(types.get(o, "")) for o in ins.operands)
  return reads if op.endswith("-start") else reads + _hbm(ins.type)


def _collective_kind(ins, comps):
  """(kind, async) of a collective instruction, or None."""
  op = ins.opcode
  if op in KINDS:
    return op, False
  if op.endswith("-start") and op[:-len("-start")] in KINDS:
    return op[:-len("-start")], True
  if op == "async-start" or _async_fusion(ins, comps) == "start":
    inner = _inner_collective(ins, comps)
    if inner is not None:
      return inner.opcode, True
  if op == "fusion" and _async_fusion(ins, comps) is None:
    # a collective fused with its consumer (e.g. an all-reduce and the dynamic-slice of it a
    # device keeps), not a step of an async collective fusion (whose collective has a chain)
    inner = _inner_collective(ins, comps)
    if inner is not None and 'chain_id="' not in inner.attrs:
      root = _root(comps[_attr(ins, "calls")])
      if (inner.opcode == "all-reduce" and root.opcode == "dynamic-slice"
          and root.operands[0] == inner.name):
        # TPU's all-reduce-scatter fusion: a reduce-scatter (each device keeps its part)
        return "reduce-scatter", False
      return inner.opcode, False
  return None


def analyze(text):
  """The Anatomy of a compiled module's HLO text (per device, loop-multiplied)."""
  comps, entry = parse_module(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  types = {i.name: i.type for instrs in comps.values() for i in instrs}
  times, how, unknown = multipliers(comps, entry)
  scheduled = [c for c in comps if how.get(c) in ("entry", "body", "called")]
  loops = {}
  collectives, matmuls = [], []
  fusions = collections.Counter()
  hbm = 0
  for c in scheduled:
    n = times.get(c, 0)
    if not n:
      continue
    instrs = comps[c]
    for k, ins in enumerate(instrs):
      if ins.opcode == "while":
        loops[ins.name] = trip_count(ins, comps) or 1
      hbm += n * _traffic(ins, comps, types)
      if ins.opcode == "fusion":
        kind = re.search(r"kind=(\w+)", ins.attrs)
        fusions[kind.group(1) if kind else "?"] += n
        f, where = _fused_flops(_attr(ins, "calls"), comps, types)
        if f:
          matmuls.append(MatmulFusion(ins.name, f, n, where))
      elif ins.opcode in _MATMULS:
        matmuls.append(MatmulFusion(ins.name, matmul_flops(ins, types), n, _op_name(ins)))
      kind = _collective_kind(ins, comps)
      if kind is None:
        continue
      collectives.append(_collective(ins, kind, k, instrs, comps, types, n, c))
  return Anatomy(tuple(collectives), dict(fusions), tuple(matmuls), int(hbm), loops, unknown)


def _collective(ins, kind, k, instrs, comps, types, n, comp):
  """The Collective of instruction ``ins`` (position ``k`` of computation ``comp``)."""
  kind, is_async = kind
  inner = ins
  fused = ins.opcode == "fusion"
  if ins.opcode == "async-start" or fused:
    inner = _inner_collective(ins, comps)
  operand_bytes = sum(type_bytes(types.get(o, "")) for o in inner.operands)
  result_bytes = type_bytes(inner.type)
  fusions_between, flops_between = 0, 0.0
  if is_async:
    if fused:
      # async collective fusion: the done fusion of the same chain (the collective's state
      # passes through the compute fusions between, which run its steps)
      chain = _chain(inner)
      done = next((j for j in range(k + 1, len(instrs))
                   if _async_fusion(instrs[j], comps) == "done"
                   and _chain(_inner_collective(instrs[j], comps) or instrs[j]) == chain),
                  len(instrs))
    else:
      # the done that takes this start (or the end of the computation: the value leaves it)
      done = next((j for j in range(k + 1, len(instrs)) if ins.name in instrs[j].operands
                   and instrs[j].opcode.endswith("-done")), len(instrs))
    if done < len(instrs):
      result_bytes = type_bytes(instrs[done].type)
    for mid in instrs[k + 1:done]:
      if mid.opcode == "fusion" and _async_fusion(mid, comps) is None:
        fusions_between += 1
        flops_between += _fused_flops(_attr(mid, "calls"), comps, types)[0]
      elif mid.opcode in _MATMULS:
        flops_between += matmul_flops(mid, types)
  else:
    result_bytes = type_bytes(inner.type)
  return Collective(ins.name, kind, is_async, max(operand_bytes, result_bytes), group_size(inner),
                    n, comp, fusions_between, flops_between, _op_name(inner))


# --- the roofline ------------------------------------------------------------------------------

# bytes each device sends over its links per byte of the collective's buffer, as a ring moves
# them on n devices: all-reduce = reduce-scatter + all-gather
_RING = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
         "all-to-all": lambda n: (n - 1) / n, "all-reduce": lambda n: 2 * (n - 1) / n,
         "collective-permute": lambda n: 1.0, "collective-broadcast": lambda n: 1.0,
         "ragged-all-to-all": lambda n: (n - 1) / n}

ASSUMPTIONS = (
    "compute: the compiled program's matmul FLOPs (remat recomputation included) at the chip's "
    "dense bf16 peak; elementwise work, softmax and the optimizer update are taken as hidden "
    "under the matmuls or the HBM traffic",
    "HBM: the bytes the top-level ops read and write (each fusion's operands and result, sliced "
    "reads and in-place updates counted at the slice) at the chip's HBM bandwidth; compute and "
    "HBM traffic overlap perfectly (the step takes the larger of the two)",
    "collectives: ring algorithms over the group, (n-1)/n of the buffer per device (2(n-1)/n for "
    "an all-reduce) at the chip's one-way ICI bandwidth, all its links in use; no latency term; "
    "one slice (no DCN)",
    "overlap: an async collective hides under the matmul FLOPs scheduled between its start and "
    "done (at peak); several in flight at once may count the same compute; a synchronous one is "
    "exposed",
)


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A step's time estimate on one chip: compute, HBM and collective seconds, the collective
  seconds not hidden under compute, the step, and MFU (analytic FLOPs / (step x peak))."""
  compute_s: float
  hbm_s: float
  collective_s: float
  exposed_s: float
  step_s: float
  mfu: float
  analytic_flops: float
  program_flops: float

  def describe(self):
    bound = "compute" if self.compute_s >= self.hbm_s else "HBM"
    return (f"roofline: step {self.step_s * 1e3:.1f} ms = max(compute {self.compute_s * 1e3:.1f}, "
            f"HBM {self.hbm_s * 1e3:.1f}) ms ({bound}-bound) + exposed collectives "
            f"{self.exposed_s * 1e3:.1f} ms (of {self.collective_s * 1e3:.1f} ms in all); "
            f"estimated MFU {self.mfu:.1%} (analytic {self.analytic_flops:.3g} FLOPs per chip; "
            f"the program runs {self.program_flops / max(self.analytic_flops, 1):.2f}x that)")


def collective_seconds(c: Collective, ici_bandwidth):
  n = c.group or 1
  return c.bytes * _RING[c.kind](n) / ici_bandwidth if n > 1 or c.kind.startswith(
      "collective") else 0.0


def collective_times(a: Anatomy, peak_flops, ici_bandwidth):
  """{(kind, async, overlapped): (seconds, exposed seconds)} per step: each collective's ring
  time, less the matmul time (at ``peak_flops``) scheduled while an async one is in flight."""
  out = collections.defaultdict(lambda: [0.0, 0.0])
  for c in a.collectives:
    t = collective_seconds(c, ici_bandwidth)
    hidden = min(t, c.flops_between / peak_flops) if c.asynchronous else 0.0
    row = out[(c.kind, c.asynchronous, c.overlapped)]
    row[0] += c.count * t
    row[1] += c.count * (t - hidden)
  return {k: tuple(v) for k, v in sorted(out.items())}


def roofline(a: Anatomy, peak_flops, hbm_bandwidth, ici_bandwidth, analytic_flops):
  """The Roofline of Anatomy ``a`` on a chip of ``peak_flops`` (FLOP/s), ``hbm_bandwidth`` and
  ``ici_bandwidth`` (bytes/s, one way per chip), for ``analytic_flops`` per chip per step (the
  MFU numerator: flops.py's count of the step, divided by the chips). ASSUMPTIONS says what it
  takes and ignores."""
  compute = a.matmul_flops / peak_flops
  hbm = a.hbm_bytes / hbm_bandwidth
  times = collective_times(a, peak_flops, ici_bandwidth).values()
  total, exposed = sum(t for t, _ in times), sum(e for _, e in times)
  step = max(compute, hbm) + exposed
  mfu = analytic_flops / (step * peak_flops) if step else 0.0
  return Roofline(compute, hbm, total, exposed, step, mfu, analytic_flops, a.matmul_flops)


def describe(a: Anatomy, cost_bytes: Optional[float] = None, chip=None):
  """Lines: the collectives table (with ``chip``, an aot/slices.py Chip: their ring time and the
  part of it no matmul hides), fusions, matmul FLOPs and HBM bytes (next to XLA's ``bytes
  accessed``, which counts each loop body once, when given)."""
  gib = 2 ** 30
  times = collective_times(a, chip.peak_flops, chip.ici_bandwidth) if chip else {}
  lines = ["  collectives per step (per device):",
           "    kind                 async  overlapped   count    GiB" +
           ("     ms  exposed ms" if chip else "")]
  for key, (count, nbytes) in a.by_kind().items():
    kind, is_async, over = key
    ms = (f" {times[key][0] * 1e3:6.2f} {times[key][1] * 1e3:11.2f}" if chip else "")
    lines.append(f"    {kind:20s} {'yes' if is_async else 'no':5s}  {'yes' if over else 'no':10s} "
                 f"{count:7d} {nbytes / gib:8.2f}" + ms)
  fus = ", ".join(f"{k} {v}" for k, v in sorted(a.fusions.items()))
  lines.append(f"  fusions per step: {fus}; {sum(m.count for m in a.matmuls)} matmul fusions, "
               f"{a.matmul_flops:.3g} matmul FLOPs")
  hbm = f"  HBM traffic per step: {a.hbm_bytes / gib:.2f} GiB read + written by top-level ops"
  if cost_bytes:
    hbm += f" (XLA's bytes accessed, loop bodies once: {cost_bytes / gib:.2f} GiB)"
  lines.append(hbm)
  loops = ", ".join(f"{n}" for n in sorted(a.loops.values(), reverse=True))
  lines.append(f"  while loops' trip counts: {loops or 'none'}"
               + (f"; unknown (counted once): {len(a.unknown_loops)}" if a.unknown_loops else ""))
  return "\n".join(lines)


def matmul_role(op_name):
  """(the op's module path tail, its pass) of a matmul's op_name: e.g. ('mlp/fc1', 'backward');
  the pass is 'forward', 'recomputed' (a rematerialised forward inside the backward) or
  'backward'."""
  parts = [p for p in op_name.split("/") if p and not p.startswith("dot_general")]
  tail = "/".join(parts[-2:]) if parts else "?"
  tail = tail.replace("vmap(BTNH,BSNH->BNTS)", "QK^T").replace("vmap(BNTS,BSNH->BTNH)", "PV")
  if "rematted_computation" in op_name:
    return tail, "recomputed"
  return tail, "backward" if "transpose(" in op_name else "forward"


def top_matmuls(a: Anatomy, k=8):
  """The ``k`` (module tail, pass) with the most matmul FLOPs per step:
  [(tail, pass, FLOPs, executions)]."""
  by = collections.defaultdict(lambda: [0.0, 0])
  for m in a.matmuls:
    by[matmul_role(m.op_name)][0] += m.total_flops
    by[matmul_role(m.op_name)][1] += m.count
  rows = sorted(((t, p, v[0], v[1]) for (t, p), v in by.items()), key=lambda r: -r[2])
  return rows[:k]


def as_json(a: Anatomy, r: Optional[Roofline] = None):
  out = {"collectives": [{"kind": k, "async": s, "overlapped": o, "count": c, "bytes": b}
                         for (k, s, o), (c, b) in a.by_kind().items()],
         "fusions": a.fusions, "matmul_fusions": sum(m.count for m in a.matmuls),
         "matmul_flops": a.matmul_flops, "hbm_bytes": a.hbm_bytes,
         "loops": sorted(a.loops.values(), reverse=True)}
  if r is not None:
    out["roofline"] = dataclasses.asdict(r)
  return json.loads(json.dumps(out))
