"""The one transformer layer shared by the AF blocks, the AR prior and the distilled student.

Shape letters:
  B batch, T query tokens in this call, S cache length (max sequence length), C width,
  H heads, Dh head dim (C = H * Dh), F MLP hidden width, L layers.

Semantics follow TARFlow's blocks (pre-LayerNorm, eps 1e-5, fused q|k|v projection laid out
head-major, exact-erf GELU MLP, no final norm) so that TARFlow checkpoints map onto these params one
to one.

Attention (``attend``) takes head-major (B, H, T, Dh) q, k, v, logits and softmax in fp32, through
``jax.nn.dot_product_attention`` ('xla' / 'cudnn') or two einsums ('einsum', ``model.attention``);
causal by default, ``causal=False`` (the distilled student) attends to every token. Two call modes:
  * full sequence (training / likelihood); with 'einsum', causal attention can be split into query
    chunks of ``attn_chunk`` tokens, chunk i reading keys of chunks <= i only (masked blocks are
    skipped);
  * with a fixed-size KV cache ``{'k','v': (B, H, S, Dh)}`` per layer and a write ``index``: the T
    new tokens are written at positions index..index+T-1 and attend to every cached position <=
    their own (decoding; T may be > 1 to prefill a prefix; causal only).
Both modes take an optional attention temperature ``attn_temp`` (a static Python number): the
logits are q.k * Dh^-0.5 / attn_temp, TARFlow's ``attn_temp`` (its SDPA ``scale``).
LayerNorms run in fp32; matmuls in ``dtype`` (bf16 on accelerators); params are stored in fp32.

Layers run under ``nn.scan`` or, with ``unroll`` (``Transformer``), as a Python loop over the same
stacked params (one program per layer: more compile time, no per-step slicing/stacking of weights,
residuals and KV caches; faster on CPU, see benchmarks/vs_torch.py).
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.errors import UserError

Dtype = Any
Cache = Optional[dict]


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
  """The model's linear map of tokens (..., *in_dims) -> (..., *features), contracting the last
  ``n_in`` dims: the MLP, the attention's q|k|v and output projections, the AF's and the AR prior's
  token embeddings and heads. fp32 params; the kernel (*in_dims, *features) fan-average uniform
  (xavier) or, with ``zero``, zeros; the bias zeros.

  Not ``nn.DenseGeneral``: that one initialises (and attaches logical-axis metadata to) a kernel
  flattened to 2-D, so per-dim logical names such as ("embed", None, "heads", "kv") fail under a
  mesh. Here the kernel is created unflattened and every dim is named. The product runs on the
  tokens flattened to one leading axis, (N, *in_dims): the same function, and autodiff's weight
  gradient contracts that one axis, a product XLA:CPU runs as Eigen's matrix product (with batch
  and tokens contracted it ran as a slower generic contraction; docs/performance.md). The
  flattening keeps a batch sharding as it is; a sharded token axis (a 'seq' sharding rule) would
  be resharded first.
  """
  features: tuple
  axes: tuple                     # logical names, len = n_in + len(features)
  n_in: int = 1
  dtype: Dtype = jnp.float32
  zero: bool = False

  @nn.compact
  def __call__(self, x):
    shape = tuple(x.shape[-self.n_in:]) + tuple(self.features)
    in_axis = tuple(range(self.n_in))
    out_axis = tuple(range(self.n_in, len(shape)))
    init = nn.initializers.zeros_init() if self.zero else nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape,
                        jnp.float32)
    bias = self.param("bias", zeros_init(self.axes[self.n_in:]), tuple(self.features),
                      jnp.float32)
    lead = x.shape[:x.ndim - self.n_in]
    tokens = x.astype(self.dtype).reshape((math.prod(lead),) + x.shape[len(lead):])
    y = jnp.tensordot(tokens, kernel.astype(self.dtype),
                      axes=(tuple(range(1, 1 + self.n_in)), in_axis))
    return y.reshape(lead + tuple(self.features)) + bias.astype(self.dtype)


def gelu_exact(x):
  """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (PyTorch's form). Not
  ``nn.gelu(approximate=False)``: its erfc form lowers on XLA:CPU to two polynomials and selects,
  forward and backward."""
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


def attend(q, k, v, scale, causal=True, chunk=0, mask=None, impl="xla"):
  """Head-major attention: q (B, H, T, Dh), k, v (B, H, S, Dh) -> (B, H, T, Dh); logits
  q.k * scale and softmax in fp32. ``mask`` (T, S) bool (True = attend), else causal (T == S) or
  full.

  ``impl``: 'xla' / 'cudnn' = ``jax.nn.dot_product_attention`` with that implementation (cuDNN's
  fused kernel needs a GPU and bf16/fp16); 'einsum' = two einsums and an fp32 softmax here, the
  fastest on XLA:CPU (no transposes of the probabilities), where causal with 0 < ``chunk`` < T (T
  divisible by it) runs query chunk i (``chunk`` tokens) on the keys of chunks <= i only, so the
  masked upper blocks cost nothing (2 chunks: 3/4 of the logits work, 4: 5/8). Without ``mask``
  (training, likelihood) its backward pass is written out (``_chunked_attention_bwd``) so that
  every product of it runs on XLA:CPU's GEMM library; being a custom VJP, it has no forward-mode
  derivative (``jax.jvp``, ``jax.jacfwd``: use 'xla')."""
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise UserError(f"model.attention='cudnn' needs a GPU (this backend is "
                    f"{jax.default_backend()!r}); use 'xla', or 'einsum' on CPU")
  if impl != "einsum":
    sw = lambda a: jnp.swapaxes(a, 1, 2)                      # (B, T, H, Dh), jax's layout
    out = jax.nn.dot_product_attention(
        sw(q), sw(k), sw(v), scale=scale, is_causal=causal and mask is None,
        mask=None if mask is None else mask[None, None],
        implementation=None if impl == "xla" else impl)
    return sw(out)
  if mask is None:
    t = q.shape[2]
    tq = chunk if causal and 0 < chunk < t and t % chunk == 0 else t
    return _chunked_attention(q, k, v, float(scale), causal, tq)
  return _attention_chunk(q, k, v, scale, mask)[0]


def _attention_chunk(q, k, v, scale, mask):
  """Einsum attention of queries q (B, H, T, Dh) on keys/values k, v (B, H, S, Dh), ``mask`` (T,
  S) or None: the output and the fp32 probabilities (B, H, T, S)."""
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhts,bhsd->bhtd", p.astype(v.dtype), v), p


def _query_chunks(t, tq, causal, keys):
  """(first query, end query, keys read) per chunk of ``tq`` of the ``t`` queries: chunk i reads
  the keys of chunks <= i when causal, all ``keys`` otherwise."""
  return [(a, a + tq, a + tq if causal else keys) for a in range(0, t, tq)]


def _causal_mask(a, b):
  """Queries a..b-1 against keys 0..b-1: each sees its own position and those before."""
  return jnp.arange(b)[None, :] <= jnp.arange(a, b)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_attention(q, k, v, scale, causal, tq):
  return _chunked_attention_fwd(q, k, v, scale, causal, tq)[0]


def _chunked_attention_fwd(q, k, v, scale, causal, tq):
  outs, probs = [], []
  for a, b, s in _query_chunks(q.shape[2], tq, causal, k.shape[2]):
    out, p = _attention_chunk(q[:, :, a:b], k[:, :, :s], v[:, :, :s], scale,
                              _causal_mask(a, b) if causal else None)
    outs.append(out)
    probs.append(p)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out, (q, k, v, tuple(probs))


def _transposed_product(a, b):
  """a (B, H, K, M), b (B, H, K, N) -> a^T b (B, H, M, N), with a transposed in memory first: a
  batched dot contracting both operands' second-to-last dims runs on XLA:CPU as a generic loop
  (Eigen), the plain product on its GEMM library; the barrier keeps XLA from folding the
  transpose back into the dot."""
  a_t = jax.lax.optimization_barrier(jnp.swapaxes(a, 2, 3))
  return jnp.einsum("bhmk,bhkn->bhmn", a_t, b)


def _chunked_attention_bwd(scale, causal, tq, res, d_out):
  """The gradients of ``_chunked_attention``, with the products laid out for XLA:CPU's GEMM
  library (``_transposed_product``); the same math as autodiff of the forward."""
  q, k, v, probs = res
  d_q = []
  d_k = jnp.zeros(k.shape, jnp.float32)
  d_v = jnp.zeros(v.shape, v.dtype)
  for (a, b, s), p in zip(_query_chunks(q.shape[2], tq, causal, k.shape[2]), probs):
    g = d_out[:, :, a:b]
    d_p = jnp.einsum("bhtd,bhsd->bhts", g, v[:, :, :s]).astype(jnp.float32)
    d_logits = p * (d_p - jnp.sum(p * d_p, axis=-1, keepdims=True)) * jnp.float32(scale)
    d_q.append(jnp.einsum("bhts,bhsd->bhtd", d_logits, k[:, :, :s],
                          preferred_element_type=jnp.float32).astype(q.dtype))
    d_k = d_k.at[:, :, :s].add(_transposed_product(d_logits, q[:, :, a:b].astype(jnp.float32)))
    d_v = d_v.at[:, :, :s].add(_transposed_product(p.astype(v.dtype), g))
  d_q = d_q[0] if len(d_q) == 1 else jnp.concatenate(d_q, axis=2)
  return d_q, d_k.astype(k.dtype), d_v


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


class Attention(nn.Module):
  """Pre-LN multi-head self-attention (causal unless ``causal=False``). x: (B, T, C) -> (B, T,
  C). ``attn_chunk``: query chunk size of the full-sequence causal path (``attend``; 0 = one)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = True
  attn_chunk: int = 0
  attention: str = "xla"         # ``attend``'s impl

  @nn.compact
  def __call__(self, x, cache: Cache = None, index=None, attn_temp: float = 1.0):
    b, t, c = x.shape
    h_ = self.num_heads
    dh = c // h_
    scale = dh ** -0.5 / attn_temp               # TARFlow's SDPA scale
    h = LayerNormF32(self.dtype, name="norm")(x)
    qkv = Projection((3, h_, dh), ("embed", None, "heads", "kv"), 1, self.dtype, name="qkv")(h)
    # (B, H, T, Dh) each, by a split: its backward pass is one concatenation, where indexing
    # pads and adds each slice (docs/performance.md)
    q, k, v = (jnp.swapaxes(a[:, :, 0], 1, 2) for a in jnp.split(qkv, 3, axis=2))
    if cache is None:
      out = attend(q, k, v, scale, self.causal, self.attn_chunk, impl=self.attention)
      new_cache = None
    elif not self.causal:
      raise ValueError("a KV cache decodes token by token: it needs causal attention")
    else:
      ck = jax.lax.dynamic_update_slice_in_dim(
          cache["k"], k.astype(cache["k"].dtype), index, axis=2)
      cv = jax.lax.dynamic_update_slice_in_dim(
          cache["v"], v.astype(cache["v"].dtype), index, axis=2)
      s = ck.shape[2]
      q_pos = index + jnp.arange(t)
      mask = jnp.arange(s)[None, :] <= q_pos[:, None]  # (T, S): cached keys up to own position
      out = attend(q, ck.astype(q.dtype), cv.astype(q.dtype), scale, mask=mask,
                   impl=self.attention)
      new_cache = {"k": ck, "v": cv}
    out = jnp.swapaxes(out, 1, 2)                             # (B, T, H, Dh)
    out = Projection((c,), ("heads", "kv", "embed"), 2, self.dtype, name="proj")(out)
    return out, new_cache


class Mlp(nn.Module):
  """Pre-LN MLP C -> F -> C with exact (erf) GELU (``gelu_exact``)."""
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = LayerNormF32(self.dtype, name="norm")(x)
    h = Projection((self.mlp_ratio * c,), ("embed", "mlp"), 1, self.dtype, name="fc1")(h)
    h = gelu_exact(h)
    return Projection((c,), ("mlp", "embed"), 1, self.dtype, name="fc2")(h)


class Layer(nn.Module):
  """One residual layer: x + attn(x); x + mlp(x). Written as an ``nn.scan`` body: (carry=x,
  xs=cache; index and attn_temp broadcast)."""
  num_heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  causal: bool = True
  attn_chunk: int = 0
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, cache: Cache, index, attn_temp: float = 1.0):
    a, new_cache = Attention(self.num_heads, self.dtype, self.causal, self.attn_chunk,
                             self.attention, name="attn")(x, cache, index, attn_temp)
    x = x + a
    x = x + Mlp(self.mlp_ratio, self.dtype, name="mlp")(x)
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
    return x, new_cache


class Transformer(nn.Module):
  """L layers, params stacked on a leading 'layers' axis, optional remat; causal unless
  ``causal=False``.

  __call__(x (B, T, C), cache=None | KV cache, index=None, attn_temp=1.0) -> (x, new_cache);
  ``attn_temp`` (static) divides every layer's attention logits. The cache is stacked,
  {'k','v': (L, B, H, S, Dh)}, or per layer, a tuple of L {'k','v': (B, H, S, Dh)} (``init_cache``
  with ``stacked=False``: no slicing or restacking per call, the layout for ``unroll``); the new
  cache comes back in the layout it came in.

  ``unroll`` False: the layers run under ``nn.scan``. True: a Python loop over the stacked params
  (params may also come pre-split, see ``split_layers``): the backward pass keeps each layer's
  residuals in their own buffers instead of stacking them into (L, ...) arrays and slicing them
  back out. Init always goes through ``nn.scan``, so both give the same params.
  """
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  remat: bool = False
  causal: bool = True
  unroll: bool = False
  attn_chunk: int = 0            # query chunk size of full-sequence causal attention (``attend``)
  attention: str = "xla"         # ``attend``'s impl: 'xla' | 'cudnn' | 'einsum'
  # what a rematerialised layer keeps (with remat): a jax.checkpoint_policies name
  remat_policy: str = "nothing_saveable"

  @nn.compact
  def __call__(self, x, cache: Cache = None, index=None, attn_temp: float = 1.0):
    x = x.astype(self.dtype)
    per_layer = isinstance(cache, (tuple, list))
    if not self.unroll or self.is_initializing():
      layer = Layer
      if self.remat:   # attn_temp (argument 4, counting self) must stay a static Python number
        layer = nn.remat(layer, prevent_cse=False, static_argnums=(4,),
                         policy=getattr(jax.checkpoint_policies, self.remat_policy))
      scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      layers = scanned(self.num_heads, self.mlp_ratio, self.dtype, self.causal, self.attn_chunk,
                       self.attention, name="layers")
      if per_layer:
        cache = jax.tree.map(lambda *c: jnp.stack(c), *cache)
      x, new_cache = layers(x, cache, index, attn_temp)
      if per_layer:
        new_cache = tuple(jax.tree.map(lambda c, i=i: c[i], new_cache) for i in range(self.depth))
      return x, new_cache
    params = self.variables["params"]
    if "layers" in params:
      stacked = nn.unbox(params["layers"])
      layer_params = [jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(self.depth)]
    else:
      layer_params = [nn.unbox(params[f"layer_{i}"]) for i in range(self.depth)]
    caches = cache
    if cache is not None and not per_layer:
      caches = [jax.tree.map(lambda c, i=i: c[i], cache) for i in range(self.depth)]
    layer = Layer(self.num_heads, self.mlp_ratio, self.dtype, self.causal, self.attn_chunk,
                  self.attention, parent=None)

    def run(p, x, c, index):
      return layer.apply({"params": p}, x, c, index, attn_temp)

    if self.remat:
      run = jax.checkpoint(run, policy=getattr(jax.checkpoint_policies, self.remat_policy))
    new_caches = []
    for i in range(self.depth):
      x, c = run(layer_params[i], x, None if cache is None else caches[i], index)
      new_caches.append(c)
    if cache is None:
      return x, None
    if per_layer:
      return x, tuple(new_caches)
    return x, jax.tree.map(lambda *c: jnp.stack(c), *new_caches)


def split_layers(params, depth):
  """A ``Transformer``'s params with the stacked 'layers' subtree split into 'layer_0'..
  'layer_{L-1}' (what an unrolled Transformer also takes): slice once, e.g. outside a decode
  loop, rather than on every call."""
  params = dict(params)
  stacked = nn.unbox(params.pop("layers"))
  for i in range(depth):
    params[f"layer_{i}"] = jax.tree.map(lambda p, i=i: p[i], stacked)
  return params


def init_cache(depth, batch, length, num_heads, head_dim, dtype=jnp.float32, stacked=True):
  """Zero KV cache for a ``Transformer``: {'k','v': (L, B, H, S, Dh)}, or with ``stacked``
  False a tuple of L {'k','v': (B, H, S, Dh)}."""
  shape = (batch, num_heads, length, head_dim)
  if not stacked:
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(depth))
  shape = (depth,) + shape
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
