"""The distilled one-step AF inverse (paper Sec. 3.5, Algorithm 2): a student G = g_1 o ... o g_n
whose block g_t maps Z^t -> Z^{t-1} in ONE parallel pass, trained to reproduce the frozen teacher
AF's forward path backwards.

Shape letters: B batch, N tokens, d token dim, n blocks.

Each g_t is the teacher's block t with bidirectional attention (``AFBlock(causal=False)``), the
same params layout (so the student starts as a copy of ``params['flow']``), the same token order
(flipped for odd t) and the teacher's inverse formula, with (a, b) computed in one pass from the
student's own input instead of token by token: x_i = z_i * exp(a_i(z)) + b_i(z). The student is
not invertible; likelihoods always use the exact teacher.

Algorithm 2, per batch: Z^0 = patchified (dequantized) images, Z^t = f_t(Z^{t-1}) by the frozen
teacher; Z~^n = Z^n + s * eps with s ~ U[0, s_max] per example (s_max = 0.3) and eps ~ N(0, I);
the student blocks run in reverse, each on the student's own previous output; loss = mean over
blocks of the per-block MSE ||Z~^{t-1} - Z^{t-1}||^2 (averaged over elements).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.config.schema import ModelConfig
from farmer_jax.flow.autoregressive_flow import AFBlock, FlowShape, block_flips
from farmer_jax.flow.patchify import patchify, unpatchify
from farmer_jax.model import flow_label, make_flow

MAX_NOISE = 0.3     # s ~ U[0, 0.3] (paper Algorithm 2)


class StudentBlock(AFBlock):
  """g_t: Z^t -> Z^{t-1} in one pass (scan body: (z (B, N, d), flip, y) -> (x, x))."""

  def __call__(self, zc, flip, y=None):
    zp = jnp.where(flip, zc[:, ::-1], zc).astype(jnp.float32)
    a, b = self.shift_scale(zp, flip, y)
    xp = zp * jnp.exp(a) + b
    x = jnp.where(flip, xp[:, ::-1], xp)
    return x, x


class StudentFlow(FlowShape):
  """G: z (B, N, d) (= Z^n, flow order) -> (x (B, N, d) = Z~^0, path (n, B, N, d) with entry t
  = Z~^t, the output of g_{t+1}). Params: the teacher AF's layout ({'blocks': ...})."""

  @nn.compact
  def __call__(self, z, y=None):
    scanned = nn.scan(StudentBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast), length=self.num_blocks, reverse=True,
                      metadata_params={nn.PARTITION_NAME: "blocks"})
    blocks = scanned(**self.block_kwargs(), causal=False, name="blocks")
    return blocks(z.astype(jnp.float32), block_flips(self.num_blocks), y)


def make_student(cfg: ModelConfig) -> StudentFlow:
  """The student of a model config: the teacher AF's shapes (``model.make_flow``)."""
  return make_flow(cfg, StudentFlow)


def init_student(teacher_params):
  """The student's params at the start of distillation: a copy of the teacher's AF params."""
  return jax.tree.map(jnp.array, teacher_params["flow"])


def teacher_path(cfg: ModelConfig, teacher_params, x, y):
  """Images (B, H, W, c) in model space -> the frozen teacher's forward path (n + 1, B, N, d)."""
  flow = make_flow(cfg)
  tokens = patchify(x, cfg.patch_size)
  zs = flow.apply({"params": teacher_params["flow"]}, tokens, flow_label(cfg, y),
                  method=type(flow).path)
  return jax.lax.stop_gradient(zs)


def distill_loss(cfg: ModelConfig, student_params, teacher_params, x, y, rng,
                 max_noise=MAX_NOISE):
  """Algorithm 2's loss for images x (B, H, W, c) in model space: (mean over blocks of the
  per-block MSE, per-block MSE (n,) in flow block order)."""
  zs = teacher_path(cfg, teacher_params, x, y)
  k_s, k_eps = jax.random.split(rng)
  s = jax.random.uniform(k_s, (x.shape[0], 1, 1), maxval=max_noise)
  z_noisy = zs[-1] + s * jax.random.normal(k_eps, zs[-1].shape)
  _, path = make_student(cfg).apply({"params": student_params}, z_noisy, flow_label(cfg, y))
  per_block = jnp.mean(jnp.square(path - zs[:-1]), axis=(1, 2, 3))
  return jnp.mean(per_block), per_block


def student_decode(cfg: ModelConfig, student_params, z, y):
  """Latents in AR order (B, N, d) -> images (B, H, W, c) through the student (one parallel pass
  per block), the fast replacement of ``Farmer.decode``."""
  if cfg.ar_flip:
    z = z[:, ::-1]
  x, _ = make_student(cfg).apply({"params": student_params}, z, flow_label(cfg, y))
  return unpatchify(x, cfg.patch_size, cfg.image_size, cfg.channels)

