"""Reading a compiled program's HLO (farmer_jax/aot/anatomy.py): collectives counted per loop
iteration times the loops' trip counts (nested loops multiply) with the bytes of their shapes, on a
program compiled on CPU over 8 fake devices whose collectives are known by construction; the async
start/done overlap rule, sliced reads and in-place writes on handwritten HLO; the roofline's
arithmetic."""

import json
import re
import subprocess
import sys

import pytest

from conftest import fake_devices_env
from farmer_jax.aot import anatomy

# An FSDP-sharded weight stack (L, D, D), its rows split over 8 devices, applied in a scan of L
# layers (nested: OUTER x INNER) that gathers each layer's weight whole before its matmul: one
# all-gather of D x D float32 per iteration, nothing else collective.
_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
OUTER, INNER, D, B = 3, 4, 64, 16
mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))

def f(ws, x):
  def layer(x, w):
    return jnp.tanh(x @ jax.sharding.reshard(w, P())), None
  def block(x, w_block):
    return jax.lax.scan(layer, x, w_block)[0], None
  return jax.lax.scan(block, x, ws)[0]

ws = jax.ShapeDtypeStruct((OUTER, INNER, D, D), jnp.float32,
                          sharding=NamedSharding(mesh, P(None, None, "fsdp")))
x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
with jax.set_mesh(mesh):
  text = jax.jit(f).lower(ws, x).compile().as_text()
json.dump({"text": text}, sys.stdout)
"""
OUTER, INNER, D, B = 3, 4, 64, 16


@pytest.fixture(scope="module")
def scanned_hlo():
  r = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True,
                     timeout=300, env=fake_devices_env(8))
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout)["text"]


def test_collectives_are_counted_per_iteration_times_nested_trip_counts(scanned_hlo):
  a = anatomy.analyze(scanned_hlo)
  assert sorted(a.loops.values()) == [OUTER, INNER]
  gathers = [c for c in a.collectives if c.kind == "all-gather"]
  assert len(gathers) == 1 and len(a.collectives) == 1
  g = gathers[0]
  # one gather per inner iteration: OUTER x INNER per step, each the whole D x D fp32 weight
  assert g.count == OUTER * INNER
  assert g.bytes == D * D * 4 and g.group == 8
  assert a.by_kind()[("all-gather", False, False)] == (OUTER * INNER, OUTER * INNER * D * D * 4)
  # the matmul: (B/8, D) x (D, D) per device per layer
  assert a.matmul_flops == OUTER * INNER * 2 * (B // 8) * D * D


def test_trip_counts_are_read_from_the_loop_condition_without_xla_s_note(scanned_hlo):
  bare = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", scanned_hlo)
  assert "known_trip_count" not in bare
  a = anatomy.analyze(bare)
  assert sorted(a.loops.values()) == [OUTER, INNER] and not a.unknown_loops
  assert a.collectives[0].count == OUTER * INNER


# A scheduled module by hand: a loop of 6 whose body starts two async all-gathers of a bf16
# (4, 128) shard into (32, 128), one done right away, the other after a matmul fusion (a
# convolution of (32, 128) x (128, 256)); a reduce-scatter wrapped in async-start/done; a fusion
# that reads one layer of a stacked (6, 128, 256) buffer (through a nested fusion), and one that
# updates one row of a (6, 32, 256) buffer in place.
_STATE = "(s32[], bf16[4,128], bf16[6,128,256], bf16[6,32,256], f32[64,128])"
_HANDWRITTEN = """HloModule m, is_scheduled=true

%matmul (p0: bf16[32,128], p1: bf16[128,256]) -> bf16[32,256] {
  %p0 = bf16[32,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  ROOT %conv = bf16[32,256]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf,
    metadata={op_name="mlp/dot_general"}
}

%slice (n0: bf16[6,128,256], n1: s32[]) -> bf16[1,128,256] {
  %n0 = bf16[6,128,256]{2,1,0} parameter(0)
  %n1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = bf16[1,128,256]{2,1,0} dynamic-slice(%n0, %n1, %zero, %zero),
    dynamic_slice_sizes={1,128,256}
}

%take (s0: bf16[6,128,256], s1: s32[]) -> bf16[128,256] {
  %s0 = bf16[6,128,256]{2,1,0} parameter(0)
  %s1 = s32[] parameter(1)
  %layer = bf16[1,128,256]{2,1,0} fusion(%s0, %s1), kind=kLoop, calls=%slice
  ROOT %bc = bf16[128,256]{1,0} bitcast(%layer)
}

%put (u0: bf16[6,32,256], u1: bf16[32,256], u2: s32[]) -> bf16[6,32,256] {
  %u0 = bf16[6,32,256]{2,1,0} parameter(0)
  %u1 = bf16[32,256]{1,0} parameter(1)
  %u2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %row = bf16[1,32,256]{2,1,0} bitcast(%u1)
  ROOT %dus = bf16[6,32,256]{2,1,0} dynamic-update-slice(%u0, %row, %u2, %z, %z)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%rs (r0: f32[64,128]) -> f32[8,128] {
  %r0 = f32[64,128]{1,0} parameter(0)
  ROOT %reduce-scatter = f32[8,128]{1,0} reduce-scatter(%r0), replica_groups=[1,8]<=[8],
    dimensions={0}, to_apply=%add
}

%body (param: STATE) -> STATE {
  %param = STATE parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %shard = bf16[4,128]{1,0} get-tuple-element(%param), index=1
  %stack = bf16[6,128,256]{2,1,0} get-tuple-element(%param), index=2
  %out = bf16[6,32,256]{2,1,0} get-tuple-element(%param), index=3
  %g = f32[64,128]{1,0} get-tuple-element(%param), index=4
  %ag0 = (bf16[4,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%shard),
    replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ag0d = bf16[32,128]{1,0} all-gather-done(%ag0)
  %ag1 = (bf16[4,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%shard),
    replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %rs0 = ((f32[64,128]{1,0}), f32[8,128]{1,0}) async-start(%g), calls=%rs
  %w = bf16[128,256]{1,0} fusion(%stack, %i), kind=kLoop, calls=%take
  %y = bf16[32,256]{1,0} fusion(%ag0d, %w), kind=kOutput, calls=%matmul
  %ag1d = bf16[32,128]{1,0} all-gather-done(%ag1)
  %rs0d = f32[8,128]{1,0} async-done(%rs0)
  %new = bf16[6,32,256]{2,1,0} fusion(%out, %y, %i), kind=kLoop, calls=%put
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = STATE tuple(%next, %shard, %stack, %new, %g)
}

%cond (cp: STATE) -> pred[] {
  %cp = STATE parameter(0)
  %ci = s32[] get-tuple-element(%cp), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}

ENTRY %main (x: STATE) -> STATE {
  %x = STATE parameter(0)
  ROOT %loop = STATE while(%x), condition=%cond, body=%body
}
"""


def _handwritten():
  """The module above, each instruction on one line as XLA prints it."""
  return re.sub(r",\n    ", ", ", _HANDWRITTEN).replace("STATE", _STATE)


def test_async_collectives_overlap_only_the_compute_between_start_and_done():
  a = anatomy.analyze(_handwritten())
  assert a.loops == {"loop": 6}
  by = {c.name: c for c in a.collectives}
  assert set(by) == {"ag0", "ag1", "rs0"}
  conv_flops = 2 * 32 * 256 * 128
  # done right after its start: nothing overlaps it
  assert by["ag0"].asynchronous and not by["ag0"].overlapped and by["ag0"].flops_between == 0
  # the weight slice and the matmul fusion run while ag1 and the reduce-scatter are in flight
  for name in ("ag1", "rs0"):
    assert by[name].overlapped and by[name].fusions_between == 2
    assert by[name].flops_between == conv_flops
  assert (by["ag1"].kind, by["ag1"].bytes, by["ag1"].group, by["ag1"].count) == (
      "all-gather", 32 * 128 * 2, 8, 6)
  assert (by["rs0"].kind, by["rs0"].bytes, by["rs0"].group) == ("reduce-scatter", 64 * 128 * 4, 8)
  assert a.matmul_flops == 6 * conv_flops
  assert [m.op_name for m in a.matmuls] == ["mlp/dot_general"]


def test_hbm_traffic_reads_slices_and_writes_in_place_updates():
  a = anatomy.analyze(_handwritten())
  ag = (4 + 32) * 128 * 2                # each all-gather reads its shard, writes the whole
  rs = (64 + 8) * 128 * 4                # the reduce-scatter reads its operand, writes a part
  take = 2 * 128 * 256 * 2 + 4           # one layer of the stack read (and the index), written
  matmul = (32 * 128 + 128 * 256 + 32 * 256) * 2
  put = 2 * 32 * 256 * 2 + 4             # the update read, and written into the buffer in place
  add = 2 * 4 + 4                        # the counter
  assert a.hbm_bytes == 6 * (2 * ag + rs + take + matmul + put + add)


# TPU's async collective fusion (libtpu with farmer_jax.xla_options.TPU_OPTIONS), as
# the compiled train step prints it, reduced: a fusion whose root is the custom-call
# AsyncCollectiveStart starts an all-gather of a bf16 (8, 128) shard into (32, 128) over 4
# devices; a compute fusion (a (16, 64) x (64, 128) matmul) runs a step of it, its in-flight
# buffers passing through; a fusion rooted in AsyncCollectiveDone hands the gathered buffer over.
# And TPU's all-reduce-scatter fusion (synchronous): an f32 (64, 128) all-reduce over 4 devices
# and the (16, 128) dynamic-slice of it each keeps, a reduce-scatter.
_AC_STATE = "(bf16[8,128], bf16[32,128], u32[])"
_ASYNC_FUSION = """HloModule m, is_scheduled=true

%start_c (a0: bf16[8,128]) -> AC_STATE {
  %a0 = bf16[8,128]{1,0} parameter(0)
  %ag = bf16[32,128]{1,0} all-gather(%a0), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %cs = AC_STATE custom-call(%ag), custom_call_target="AsyncCollectiveStart"
}

%step_c (b0: bf16[16,64], b1: bf16[64,128], b2: bf16[8,128], b3: bf16[32,128], b4: u32[]) ->
    (bf16[16,128], bf16[8,128], bf16[32,128], u32[]) {
  %b0 = bf16[16,64]{1,0} parameter(0)
  %b1 = bf16[64,128]{1,0} parameter(1)
  %b2 = bf16[8,128]{1,0} parameter(2)
  %b3 = bf16[32,128]{1,0} parameter(3)
  %b4 = u32[] parameter(4)
  %mm = bf16[16,128]{1,0} convolution(%b0, %b1), dim_labels=bf_io->bf,
    metadata={op_name="attn/qkv/dot_general"}
  %ag2 = bf16[32,128]{1,0} all-gather(%b2), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %tt = (bf16[16,128], bf16[8,128], bf16[32,128], u32[]) tuple(%mm, %b2, %ag2, %b4)
}

%done_c (d0: bf16[8,128], d1: bf16[32,128], d2: u32[]) -> bf16[32,128] {
  %d0 = bf16[8,128]{1,0} parameter(0)
  %d1 = bf16[32,128]{1,0} parameter(1)
  %d2 = u32[] parameter(2)
  %ag3 = bf16[32,128]{1,0} all-gather(%d0), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %cd = bf16[32,128]{1,0} custom-call(%d0, %d1, %ag3, %d2),
    custom_call_target="AsyncCollectiveDone"
}

%sum (s0: f32[], s1: f32[]) -> f32[] {
  %s0 = f32[] parameter(0)
  %s1 = f32[] parameter(1)
  ROOT %s = f32[] add(%s0, %s1)
}

%ars_c (r0: f32[64,128]) -> f32[16,128] {
  %r0 = f32[64,128]{1,0} parameter(0)
  %ar = f32[64,128]{1,0} all-reduce(%r0), channel_id=9, replica_groups=[1,4]<=[4],
    to_apply=%sum
  %pid = u32[] partition-id()
  %c16 = u32[] constant(16)
  %row = u32[] multiply(%pid, %c16)
  %z = u32[] constant(0)
  ROOT %mine = f32[16,128]{1,0} dynamic-slice(%ar, %row, %z), dynamic_slice_sizes={16,128}
}

ENTRY %main (x: bf16[8,128], y: bf16[16,64], w: bf16[64,128], g: f32[64,128]) ->
    (bf16[16,128], bf16[32,128], f32[16,128]) {
  %x = bf16[8,128]{1,0} parameter(0)
  %y = bf16[16,64]{1,0} parameter(1)
  %w = bf16[64,128]{1,0} parameter(2)
  %g = f32[64,128]{1,0} parameter(3)
  %async-collective-start = AC_STATE fusion(%x), kind=kCustom, calls=%start_c
  %s0 = bf16[8,128]{1,0} get-tuple-element(%async-collective-start), index=0
  %s1 = bf16[32,128]{1,0} get-tuple-element(%async-collective-start), index=1
  %s2 = u32[] get-tuple-element(%async-collective-start), index=2
  %f = (bf16[16,128], bf16[8,128], bf16[32,128], u32[]) fusion(%y, %w, %s0, %s1, %s2),
    kind=kOutput, calls=%step_c
  %m = bf16[16,128]{1,0} get-tuple-element(%f), index=0
  %f1 = bf16[8,128]{1,0} get-tuple-element(%f), index=1
  %f2 = bf16[32,128]{1,0} get-tuple-element(%f), index=2
  %f3 = u32[] get-tuple-element(%f), index=3
  %async-collective-done = bf16[32,128]{1,0} fusion(%f1, %f2, %f3), kind=kCustom,
    calls=%done_c
  %ars = f32[16,128]{1,0} fusion(%g), kind=kOutput, calls=%ars_c
  ROOT %out = (bf16[16,128], bf16[32,128], f32[16,128]) tuple(%m, %async-collective-done, %ars)
}
"""


def test_tpu_async_collective_fusion_overlaps_the_compute_fusions_that_carry_it():
  text = re.sub(r",\n    ", ", ", _ASYNC_FUSION).replace("AC_STATE", _AC_STATE)
  text = text.replace(") ->\n    (", ") -> (")
  a = anatomy.analyze(text)
  c, rs = a.collectives   # the steps inside the compute and done fusions are the same gather
  assert (rs.kind, rs.asynchronous, rs.bytes, rs.group) == ("reduce-scatter", False, 64 * 128 * 4,
                                                            4)
  mm = 2 * 16 * 64 * 128
  assert (c.kind, c.asynchronous, c.bytes, c.group) == ("all-gather", True, 32 * 128 * 2, 4)
  assert c.overlapped and c.fusions_between == 1 and c.flops_between == mm
  assert a.matmul_flops == mm
  # the start reads the shard and writes its state; the step fusion reads its matmul's operands
  # and writes its product (the in-flight buffers pass through it); the done moves nothing;
  # the reduce-scatter reads its operand and writes its part
  start = 8 * 128 * 2 + (8 + 32) * 128 * 2 + 4
  step = (16 * 64 + 64 * 128 + 16 * 128) * 2
  assert a.hbm_bytes == start + step + (64 + 16) * 128 * 4


# Two async collective fusions in flight at once, interleaved as the scheduler leaves them: chain
# 3 gathers a bf16 (8, 128) shard into (32, 128), chain 5 a (4, 256) shard into (16, 256). Both
# start; a compute fusion (matmul 1) runs a step of each; chain 5 completes; a second compute
# fusion (matmul 2) runs another step of chain 3; chain 3 completes. Both have channel_id 7: only
# their chain_id tells them apart.
_TWO_CHAINS = """HloModule m, is_scheduled=true

%start_a (a0: bf16[8,128]) -> A_STATE {
  %a0 = bf16[8,128]{1,0} parameter(0)
  %ag = bf16[32,128]{1,0} all-gather(%a0), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %cs = A_STATE custom-call(%ag), custom_call_target="AsyncCollectiveStart"
}

%start_b (c0: bf16[4,256]) -> B_STATE {
  %c0 = bf16[4,256]{1,0} parameter(0)
  %agb = bf16[16,256]{1,0} all-gather(%c0), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="5"}
  ROOT %cs = B_STATE custom-call(%agb), custom_call_target="AsyncCollectiveStart"
}

%step_ab (b0: bf16[16,64], b1: bf16[64,128], b2: bf16[8,128], b3: bf16[32,128], b4: u32[],
    b5: bf16[4,256], b6: bf16[16,256], b7: u32[]) -> (bf16[16,128], bf16[8,128], bf16[32,128],
    u32[], bf16[4,256], bf16[16,256], u32[]) {
  %b0 = bf16[16,64]{1,0} parameter(0)
  %b1 = bf16[64,128]{1,0} parameter(1)
  %b2 = bf16[8,128]{1,0} parameter(2)
  %b3 = bf16[32,128]{1,0} parameter(3)
  %b4 = u32[] parameter(4)
  %b5 = bf16[4,256]{1,0} parameter(5)
  %b6 = bf16[16,256]{1,0} parameter(6)
  %b7 = u32[] parameter(7)
  %mm = bf16[16,128]{1,0} convolution(%b0, %b1), dim_labels=bf_io->bf,
    metadata={op_name="mlp/fc1/dot_general"}
  %ag2 = bf16[32,128]{1,0} all-gather(%b2), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="3"}
  %agb2 = bf16[16,256]{1,0} all-gather(%b5), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="5"}
  ROOT %tt = (bf16[16,128], bf16[8,128], bf16[32,128], u32[], bf16[4,256], bf16[16,256],
    u32[]) tuple(%mm, %b2, %ag2, %b4, %b5, %agb2, %b7)
}

%step_a (e0: bf16[16,128], e1: bf16[128,32], e2: bf16[8,128], e3: bf16[32,128],
    e4: u32[]) -> (bf16[16,32], bf16[8,128], bf16[32,128], u32[]) {
  %e0 = bf16[16,128]{1,0} parameter(0)
  %e1 = bf16[128,32]{1,0} parameter(1)
  %e2 = bf16[8,128]{1,0} parameter(2)
  %e3 = bf16[32,128]{1,0} parameter(3)
  %e4 = u32[] parameter(4)
  %mm2 = bf16[16,32]{1,0} convolution(%e0, %e1), dim_labels=bf_io->bf,
    metadata={op_name="mlp/fc2/dot_general"}
  %ag3 = bf16[32,128]{1,0} all-gather(%e2), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %tt = (bf16[16,32], bf16[8,128], bf16[32,128], u32[]) tuple(%mm2, %e2, %ag3, %e4)
}

%done_a (d0: bf16[8,128], d1: bf16[32,128], d2: u32[]) -> bf16[32,128] {
  %d0 = bf16[8,128]{1,0} parameter(0)
  %d1 = bf16[32,128]{1,0} parameter(1)
  %d2 = u32[] parameter(2)
  %ag4 = bf16[32,128]{1,0} all-gather(%d0), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %cd = bf16[32,128]{1,0} custom-call(%d0, %d1, %ag4, %d2),
    custom_call_target="AsyncCollectiveDone"
}

%done_b (g0: bf16[4,256], g1: bf16[16,256], g2: u32[]) -> bf16[16,256] {
  %g0 = bf16[4,256]{1,0} parameter(0)
  %g1 = bf16[16,256]{1,0} parameter(1)
  %g2 = u32[] parameter(2)
  %agb4 = bf16[16,256]{1,0} all-gather(%g0), channel_id=7, replica_groups=[1,4]<=[4],
    dimensions={0}, frontend_attributes={chain_id="5"}
  ROOT %cd = bf16[16,256]{1,0} custom-call(%g0, %g1, %agb4, %g2),
    custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (x: bf16[8,128], xb: bf16[4,256], y: bf16[16,64], w: bf16[64,128],
    w2: bf16[128,32]) -> (bf16[16,32], bf16[32,128], bf16[16,256]) {
  %x = bf16[8,128]{1,0} parameter(0)
  %xb = bf16[4,256]{1,0} parameter(1)
  %y = bf16[16,64]{1,0} parameter(2)
  %w = bf16[64,128]{1,0} parameter(3)
  %w2 = bf16[128,32]{1,0} parameter(4)
  %start-a = A_STATE fusion(%x), kind=kCustom, calls=%start_a
  %s0 = bf16[8,128]{1,0} get-tuple-element(%start-a), index=0
  %s1 = bf16[32,128]{1,0} get-tuple-element(%start-a), index=1
  %s2 = u32[] get-tuple-element(%start-a), index=2
  %start-b = B_STATE fusion(%xb), kind=kCustom, calls=%start_b
  %t0 = bf16[4,256]{1,0} get-tuple-element(%start-b), index=0
  %t1 = bf16[16,256]{1,0} get-tuple-element(%start-b), index=1
  %t2 = u32[] get-tuple-element(%start-b), index=2
  %f = (bf16[16,128], bf16[8,128], bf16[32,128], u32[], bf16[4,256], bf16[16,256],
    u32[]) fusion(%y, %w, %s0, %s1, %s2, %t0, %t1, %t2), kind=kOutput, calls=%step_ab
  %m = bf16[16,128]{1,0} get-tuple-element(%f), index=0
  %f1 = bf16[8,128]{1,0} get-tuple-element(%f), index=1
  %f2 = bf16[32,128]{1,0} get-tuple-element(%f), index=2
  %f3 = u32[] get-tuple-element(%f), index=3
  %f4 = bf16[4,256]{1,0} get-tuple-element(%f), index=4
  %f5 = bf16[16,256]{1,0} get-tuple-element(%f), index=5
  %f6 = u32[] get-tuple-element(%f), index=6
  %done-b = bf16[16,256]{1,0} fusion(%f4, %f5, %f6), kind=kCustom, calls=%done_b
  %h = (bf16[16,32], bf16[8,128], bf16[32,128], u32[]) fusion(%m, %w2, %f1, %f2, %f3),
    kind=kOutput, calls=%step_a
  %m2 = bf16[16,32]{1,0} get-tuple-element(%h), index=0
  %h1 = bf16[8,128]{1,0} get-tuple-element(%h), index=1
  %h2 = bf16[32,128]{1,0} get-tuple-element(%h), index=2
  %h3 = u32[] get-tuple-element(%h), index=3
  %done-a = bf16[32,128]{1,0} fusion(%h1, %h2, %h3), kind=kCustom, calls=%done_a
  ROOT %out = (bf16[16,32], bf16[32,128], bf16[16,256]) tuple(%m2, %done-a, %done-b)
}
"""


def test_two_async_collective_fusions_in_flight_each_overlap_up_to_their_own_done():
  """Each chain's done is found by its chain_id: chain 3 overlaps both compute fusions, chain 5,
  completed between them, only the first; the steps inside the fusions are not collectives of
  their own, and the in-flight buffers passing through a fusion are not its HBM traffic."""
  text = re.sub(r",\n    ", ", ", _TWO_CHAINS)
  text = text.replace("A_STATE", "(bf16[8,128], bf16[32,128], u32[])")
  text = text.replace("B_STATE", "(bf16[4,256], bf16[16,256], u32[])")
  a = anatomy.analyze(text)
  by = {c.name: c for c in a.collectives}
  assert sorted(by) == ["start-a", "start-b"]
  mm1, mm2 = 2 * 16 * 64 * 128, 2 * 16 * 128 * 32
  ca, cb = by["start-a"], by["start-b"]
  assert (ca.kind, ca.asynchronous, ca.bytes, ca.group) == ("all-gather", True, 32 * 128 * 2, 4)
  assert (cb.kind, cb.asynchronous, cb.bytes, cb.group) == ("all-gather", True, 16 * 256 * 2, 4)
  assert (ca.fusions_between, ca.flops_between) == (2, mm1 + mm2) and ca.overlapped
  assert (cb.fusions_between, cb.flops_between) == (1, mm1) and cb.overlapped
  assert a.matmul_flops == mm1 + mm2
  starts = (8 * 128 + (8 + 32) * 128) * 2 + 4 + (4 * 256 + (4 + 16) * 256) * 2 + 4
  steps = (16 * 64 + 64 * 128 + 16 * 128) * 2 + (16 * 128 + 128 * 32 + 16 * 32) * 2
  assert a.hbm_bytes == starts + steps


def test_roofline_adds_only_the_collective_time_no_compute_hides():
  a = anatomy.analyze(_handwritten())
  peak, hbm_bw, ici = 1e12, 1e11, 1e9
  r = anatomy.roofline(a, peak, hbm_bw, ici, analytic_flops=a.matmul_flops / 2)
  ag = 32 * 128 * 2 * 7 / 8 / ici
  rs = 64 * 128 * 4 * 7 / 8 / ici
  hidden = 2 * 32 * 256 * 128 / peak     # the matmul between start and done, at peak
  assert r.compute_s == pytest.approx(a.matmul_flops / peak)
  assert r.hbm_s == pytest.approx(a.hbm_bytes / hbm_bw)
  assert r.collective_s == pytest.approx(6 * (2 * ag + rs))
  assert r.exposed_s == pytest.approx(6 * (ag + (ag - hidden) + (rs - hidden)))
  assert r.step_s == pytest.approx(max(r.compute_s, r.hbm_s) + r.exposed_s)
  assert r.mfu == pytest.approx(a.matmul_flops / 2 / (r.step_s * peak))


@pytest.mark.parametrize("attrs,size", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", 4),
    ("replica_groups=[2,4]<=[8]", 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", 2),
    ("replica_groups=mesh['data'=2,'fsdp'=16] {'fsdp'}", 16),
    ("replica_groups=mesh['data'=2,'fsdp'=16] {'data','fsdp'}", 32),
    ("replica_groups=mesh['axis_0'=8,'axis_1'=4], device_ids=([4,8]T(1,0)) {'axis_0'}", 8),
])
def test_group_sizes_in_every_replica_group_syntax(attrs, size):
  ins = anatomy.Instr("x", "f32[8]", "all-reduce", (), "", attrs)
  assert anatomy.group_size(ins) == size


@pytest.mark.slow
def test_a_train_step_compiled_for_a_tpu_slice_reads_as_the_model():
  """Through libtpu, with no TPU: the quickstart's train step (scanned AF blocks x layers and AR
  layers of distinct lengths, bf16, remat, FSDP over a v5e 2x2 slice) read from its compiled HLO:
  every loop's trip count is found (the model's among them), and the matmul FLOPs are the
  analytic step's plus the rematerialised forward (1.47x measured at this width, where attention,
  recomputed too, is most of the FLOPs; the loops counted once would give well under 1, counted
  twice over 2)."""
  from farmer_jax import configlib, flops, sharding
  from farmer_jax.aot import compile as aot_compile, programs, slices
  from farmer_jax.config.parse import parse
  if slices.libtpu_missing():
    pytest.skip("libtpu is not installed (pip install 'farmer_jax[tpu-aot]')")
  s = slices.parse_slice("v5litepod-4")
  devices = slices.slice_devices(s)
  c = configlib.load("quickstart:tiny")
  c.model.update(unroll=False, attention="xla", flow_blocks=3, flow_layers=2, ar_depth=5,
                 dtype="bfloat16", remat=True)
  c.mesh = (("data", 1), ("fsdp", -1))
  run = parse(c, num_devices=4, num_processes=1, read_data=False)
  step = programs.train_programs(run, sharding.make_mesh(run.mesh, devices))[0]
  a = anatomy.analyze(aot_compile.compiled_of(step).as_text())
  assert not a.unknown_loops
  assert {3, 2, 5} <= set(a.loops.values())
  analytic = flops.train_step_flops(run.model, run.train.batch_size) / 4
  assert 1.0 <= a.matmul_flops / analytic <= 1.6
  r = anatomy.roofline(a, s.chip.peak_flops, s.chip.hbm_bandwidth, s.chip.ici_bandwidth, analytic)
  assert 0 < r.mfu <= 1 and r.step_s >= max(r.compute_s, r.hbm_s)


@pytest.mark.slow
def test_the_train_step_for_a_tpu_slice_compiles_with_async_collectives_that_overlap():
  """The trainer jits its step with xla_options.TPU_OPTIONS on a TPU mesh, so the program
  compiled for a slice (and run on one) starts its FSDP all-gathers asynchronously (TPU's async
  collective fusion) and runs matmuls while they are in flight: the quickstart at width 512,
  FSDP over a v5p-8 slice's 4 chips."""
  from farmer_jax import configlib, sharding
  from farmer_jax.aot import compile as aot_compile, programs, slices
  from farmer_jax.config.parse import parse
  if slices.libtpu_missing():
    pytest.skip("libtpu is not installed (pip install 'farmer_jax[tpu-aot]')")
  s = slices.parse_slice("v5p-8")
  devices = slices.slice_devices(s)
  c = configlib.load("quickstart:tiny")
  c.model.update(unroll=False, attention="xla", flow_blocks=3, flow_layers=2, ar_depth=5,
                 dtype="bfloat16", remat=True, flow_width=512, ar_width=512, flow_heads=4,
                 ar_heads=4)
  c.mesh = (("data", 1), ("fsdp", -1))
  run = parse(c, num_devices=4, num_processes=1, read_data=False)
  step = programs.train_programs(run, sharding.make_mesh(run.mesh, devices))[0]
  text = aot_compile.compiled_of(step).as_text()
  assert 'custom_call_target="AsyncCollectiveStart"' in text
  a = anatomy.analyze(text)
  gathers = [g for g in a.collectives if g.kind == "all-gather" and g.asynchronous]
  assert gathers and all(g.group == 4 for g in gathers)
  assert any(g.overlapped for g in gathers)
