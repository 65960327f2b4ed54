"""How exact the AF is in bf16 at the paper presets' depth: x -> z -> x round trips and log-dets
computed in bfloat16 against float32.

  python benchmarks/bf16_roundtrip.py [--preset 1.1B/16] [--width 64] [--scale 0.05] [--batch 2]

The AF of ``imagenet256:<preset>`` keeps its structure (blocks x layers, patch, image
size, tokens, token dim) at a reduced width; its params are a random init perturbed by N(0,
scale^2) (a trained model's log-scales are not available here, so the numbers show the mechanism,
not a trained model's error). Images: uniform random pixels dequantized to model space.

For each compute dtype it reports
  * the round trip x -> z (forward, a full causal pass) -> x (the exact inverse, a KV-cache
    decode), both in that dtype: the largest error in model units and in 8-bit levels, and the
    fraction of pixels whose uint8 value changes;
  * decoding the float32 latents in that dtype against decoding them in float32 (what sampling
    sees: latents from the prior, the AF inverse in the model's dtype);
  * the log-det against float32's, in nats and in bits/dim.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import configlib
from farmer_jax.config.parse import parse_model
from farmer_jax.conventions import to_uint8
from farmer_jax.model import Farmer, init_params


def perturbed(cfg, seed, scale):
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(
      tree, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="1.1B/16")
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--scale", type=float, default=0.05)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()

  c = configlib.load(f"imagenet256:{a.preset}")
  base = dataclasses.replace(parse_model(c), flow_width=a.width, flow_heads=max(a.width // 64, 1),
                             prior="standard_normal", dimred="none")
  cfgs = {name: dataclasses.replace(base, dtype=name) for name in ("float32", "bfloat16")}
  m = base
  print(f"AF of {a.preset}: {m.flow_blocks} blocks x {m.flow_layers} layers, width {m.flow_width}; "
        f"{m.image_size}x{m.image_size}x{m.channels}, patch {m.patch_size}: N = {m.num_tokens} "
        f"tokens of d = {m.token_dim}; params: random init + N(0, {a.scale}^2); batch {a.batch}")
  params = perturbed(cfgs["float32"], a.seed, a.scale)
  rng = np.random.default_rng(a.seed)
  pixels = rng.integers(0, 256, (a.batch, m.image_size, m.image_size, m.channels))
  x = jnp.asarray((pixels + rng.random(pixels.shape)) / 128.0 - 1.0, jnp.float32)
  y = jnp.zeros((a.batch,), jnp.int32)

  def encode(cfg):
    return jax.jit(lambda p, xx: Farmer(cfg).apply({"params": p}, xx, y, method=Farmer.encode))

  def decode(cfg):
    return jax.jit(lambda p, z: Farmer(cfg).apply({"params": p}, z, y, method=Farmer.decode)[0])

  dims = m.image_size * m.image_size * m.channels
  z32, ld32 = encode(cfgs["float32"])(params, x)
  x32 = decode(cfgs["float32"])(params, z32)
  ref = to_uint8(np.asarray(x32), m.pixels)
  print("dtype     | round trip: max err (levels), pixels changed | decode of fp32 z vs fp32: "
        "max err (levels), pixels changed | log-det vs fp32: nats, bits/dim | seconds")
  for name, cfg in cfgs.items():
    t0 = time.perf_counter()
    z, ld = encode(cfg)(params, x)
    back = decode(cfg)(params, z)
    dec = decode(cfg)(params, z32)
    jax.block_until_ready((back, dec))
    seconds = time.perf_counter() - t0
    rt = float(jnp.max(jnp.abs(back.astype(jnp.float32) - x)))
    rt_px = float(np.mean(to_uint8(np.asarray(back, np.float32), m.pixels) != pixels))
    de = float(jnp.max(jnp.abs(dec.astype(jnp.float32) - x32)))
    de_px = float(np.mean(to_uint8(np.asarray(dec, np.float32), m.pixels) != ref))
    dld = float(jnp.max(jnp.abs(ld.astype(jnp.float32) - ld32)))
    print(f"{name:9} | {rt:.2e} ({rt * 128:.3f}), {rt_px:.2%} | {de:.2e} ({de * 128:.3f}), "
          f"{de_px:.2%} | {dld:.3f}, {dld / dims / np.log(2):.2e} | {seconds:.0f}")


if __name__ == "__main__":
  main()
