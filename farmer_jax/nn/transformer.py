"""The one transformer layer shared by the AF blocks, the AR prior and the distilled student.

Shape letters:
  B batch, T query tokens in this call, S cache length (max sequence length), C width,
  H heads, Dh head dim (C = H * Dh), F MLP hidden width, L layers.

Semantics follow TARFlow's blocks (pre-LayerNorm, eps 1e-5, fused q|k|v projection laid out
head-major, exact-erf GELU MLP, no final norm) so that TARFlow checkpoints map onto these params one
to one.

Attention is ``jax.nn.dot_product_attention`` (logits and softmax in fp32), causal by default;
``causal=False`` (the distilled student) attends to every token. Two call modes:
  * full sequence (training / likelihood);
  * with a fixed-size KV cache ``{'k','v': (B, S, H, Dh)}`` and a write ``index``: the T new
    tokens are written at positions index..index+T-1 and attend to every cached position <= their
    own (decoding; T may be > 1 to prefill a prefix; causal only).
Both modes take an optional attention temperature ``attn_temp`` (a static Python number): the
logits are q.k * Dh^-0.5 / attn_temp, TARFlow's ``attn_temp`` (its SDPA ``scale``); the default 1
passes no scale at all, so the default trace is the plain one.
LayerNorms run in fp32; matmuls in ``dtype`` (bf16 on accelerators); params are stored in fp32.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Cache = Optional[dict]


def dense_init(axes):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def zeros_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class LayerNormF32(nn.Module):
  """LayerNorm computed in fp32 (eps 1e-5, PyTorch's default), result cast to ``dtype``."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=zeros_init(("embed",)),
        name="ln")(
            x.astype(jnp.float32))
    return y.astype(self.dtype)


class Projection(nn.Module):
  """Multi-axis linear map contracting the last ``n_in`` input dims; output dims ``features``.

  Not ``nn.DenseGeneral``: that one initialises (and attaches logical-axis metadata to) a kernel
  flattened to 2-D, so per-dim logical names such as ("embed", None, "heads", "kv") fail under a
  mesh. Here the kernel is created unflattened, (*in_dims, *features), and every dim is named.
  """
  features: tuple
  axes: tuple                     # logical names, len = n_in + len(features)
  n_in: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = tuple(x.shape[-self.n_in:]) + tuple(self.features)
    in_axis = tuple(range(self.n_in))
    out_axis = tuple(range(self.n_in, len(shape)))
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis,
                                            out_axis=out_axis)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape,
                        jnp.float32)
    bias = self.param("bias", zeros_init(self.axes[self.n_in:]), tuple(self.features),
                      jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype),
                      axes=(tuple(range(x.ndim - self.n_in, x.ndim)), in_axis))
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Pre-LN multi-head self-attention (causal unless ``causal=False``). x: (B, T, C) -> (B, T,
  C)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x, cache: Cache = None, index=None, attn_temp: float = 1.0):
    b, t, c = x.shape
    h_ = self.num_heads
    dh = c // h_
    # logits scale: None (jax's own Dh^-0.5, the default trace) unless a temperature is set
    scale = None if attn_temp == 1 else dh ** -0.5 / attn_temp
    h = LayerNormF32(self.dtype, name="norm")(x)
    qkv = Projection((3, h_, dh), ("embed", None, "heads", "kv"), 1, self.dtype, name="qkv")(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # (B, T, H, Dh)
    if cache is None:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, scale=scale)
      new_cache = None
    elif not self.causal:
      raise ValueError("a KV cache decodes token by token: it needs causal attention")
    else:
      ck = jax.lax.dynamic_update_slice_in_dim(
          cache["k"], k.astype(cache["k"].dtype), index, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(
          cache["v"], v.astype(cache["v"].dtype), index, axis=1)
      s = ck.shape[1]
      q_pos = index + jnp.arange(t)
      mask = jnp.arange(s)[None, :] <= q_pos[:, None]  # (T, S): cached keys up to own position
      out = jax.nn.dot_product_attention(
          q, ck.astype(q.dtype), cv.astype(q.dtype), mask=mask[None, None], scale=scale)
      new_cache = {"k": ck, "v": cv}
    out = Projection((c,), ("heads", "kv", "embed"), 2, self.dtype, name="proj")(out)
    return out, new_cache


class Mlp(nn.Module):
  """Pre-LN MLP C -> F -> C with exact (erf) GELU."""
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = LayerNormF32(self.dtype, name="norm")(x)
    h = nn.Dense(
        self.mlp_ratio * c,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=dense_init(("embed", "mlp")),
        bias_init=zeros_init(("mlp",)),
        name="fc1")(
            h)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(
        c,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=dense_init(("mlp", "embed")),
        bias_init=zeros_init(("embed",)),
        name="fc2")(
            h)


class Layer(nn.Module):
  """One residual layer: x + attn(x); x + mlp(x). Written as an ``nn.scan`` body: (carry=x,
  xs=cache; index and attn_temp broadcast)."""
  num_heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x, cache: Cache, index, attn_temp: float = 1.0):
    a, new_cache = Attention(self.num_heads, self.dtype, self.causal, name="attn")(
        x, cache, index, attn_temp)
    x = x + a
    x = x + Mlp(self.mlp_ratio, self.dtype, name="mlp")(x)
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
    return x, new_cache


class Transformer(nn.Module):
  """L layers under ``nn.scan`` (params stacked on a leading 'layers' axis), optional remat; causal
  unless ``causal=False``.

  __call__(x (B, T, C), cache=None | {'k','v': (L, B, S, H, Dh)}, index=None, attn_temp=1.0)
  -> (x, new_cache); ``attn_temp`` (static) divides every layer's attention logits.
  """
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  remat: bool = False
  causal: bool = True

  @nn.compact
  def __call__(self, x, cache: Cache = None, index=None, attn_temp: float = 1.0):
    layer = Layer
    if self.remat:   # attn_temp (argument 4, counting self) must stay a static Python number
      layer = nn.remat(layer, prevent_cse=False, static_argnums=(4,))
    scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x = x.astype(self.dtype)
    layers = scanned(self.num_heads, self.mlp_ratio, self.dtype, self.causal, name="layers")
    x, new_cache = layers(x, cache, index, attn_temp)
    return x, new_cache


def init_cache(depth, batch, length, num_heads, head_dim, dtype=jnp.float32):
  """Zero KV cache for a ``Transformer``: {'k','v': (L, B, S, H, Dh)}."""
  shape = (depth, batch, length, num_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
