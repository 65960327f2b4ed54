"""TARFlow-style autoregressive flow (AF) with an exact log-det and an exact, jit-compiled
sequential inverse.

Shape letters: B batch, N tokens, d token dim, C width, L layers per block, n blocks, H heads, Dh
head dim.

Block t (0-based) works in a permuted token order: identity for even t, flip for odd t (the learned
position embedding is permuted with the tokens). In that order a causal transformer reads tokens
x_{<i}; its zero-initialised output projection gives 2d values per token, shifted right by one token
(token 0 gets zeros and passes unchanged); the first d are the log-scale a, the last d the shift b:

    z_i = (x_i - b_i) * exp(-a_i),      log|det dz/dx| = -sum_{i,j} a_ij      (summed, nats)
    x_i = z_i * exp(a_i) + b_i          (inverse, token by token with a fixed-size KV cache)

With ``final_norm`` (default; ``model.flow_final_norm``) the transformer output is layer-normalised
before ``proj_out``, so (a, b) are bounded functions of the input whatever its magnitude: the
inverse of an off-manifold latent (e.g. a sample from an undertrained prior) cannot feed ever-larger
tokens back into the next token's (a, b) and overflow fp32. TARFlow has no such norm
(``final_norm=False`` reproduces its block exactly).

Params are stacked on a leading 'blocks' axis (and 'layers' inside). With ``unroll`` False the
blocks (and each block's layers) run under ``nn.scan`` (the default: compile time does not grow
with n); with ``unroll`` True (``model.unroll``) they are unrolled: a Python loop over the same
stacked params, each block's flip static, no residuals or KV caches stacked per step (faster on
CPU, more compile time; docs/performance.md). The AR prior's order relative to the last block
(model.ar_order) is turned into a flip by ``ModelConfig.ar_flip``, which relies on the flip rule
of ``block_flips`` below (and of the unrolled loops: block t flips iff t is odd).

Labels: with ``num_classes`` > 0 a class embedding is added to every token; the label
``NO_LABEL`` (any label < 0) gets the mean class embedding (TARFlow's unconditional rule).

``AutoregressiveFlow.inverse`` optionally applies TARFlow's guidance (CFG on the affine params of
every token, with an attention temperature on the unconditional branch); see its docstring.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax.config.schema import AF_GUIDE_WHAT
from farmer_jax.nn import transformer as tfm

NO_LABEL = -1     # the AF label meaning 'no class' (model.flow_label maps the AR null class to it)


class AFBlock(nn.Module):
  """One affine autoregressive flow block.

  Scan body: __call__((x (B, N, d), logdet (B,)), flip (), y (B,) | None) -> ((z, logdet'), None).
  ``decode_step`` is the single-token inverse step used by ``AutoregressiveFlow.inverse``.
  """
  num_tokens: int
  token_dim: int
  width: int
  depth: int
  num_heads: int
  num_classes: int = 0               # > 0: class embedding added to every token (off in FARMER)
  mlp_ratio: int = 4
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  final_norm: bool = True  # LayerNorm before proj_out: (a, b) stay bounded for any input magnitude
  causal: bool = True      # False: the distilled student's bidirectional copy (distill/student.py)
  unroll: bool = False     # the transformer's layers as a Python loop (``tfm.Transformer``)
  attn_chunk: int = 0      # query chunk size of its causal attention (``tfm.attend``; 0 = one)
  attention: str = "xla"   # ``tfm.attend``'s impl
  remat_policy: str = "nothing_saveable"

  def setup(self):
    self.proj_in = tfm.Projection((self.width,), ("token", "embed"), 1, self.dtype)
    self.pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("seq", "embed")), (self.num_tokens, self.width), jnp.float32)
    if self.num_classes:
      self.class_embed = self.param(
          "class_embed",
          nn.with_logical_partitioning(nn.initializers.normal(0.01), ("classes", "embed")),
          (self.num_classes, self.width), jnp.float32)
    self.transformer = tfm.Transformer(self.depth, self.num_heads, mlp_ratio=self.mlp_ratio,
                                       dtype=self.dtype, remat=self.remat, causal=self.causal,
                                       unroll=self.unroll, attn_chunk=self.attn_chunk,
                                       attention=self.attention, remat_policy=self.remat_policy)
    if self.final_norm:
      self.norm_out = tfm.LayerNormF32(jnp.float32)
    self.proj_out = tfm.Projection((2 * self.token_dim,), ("embed", "token"), 1, jnp.float32,
                                   zero=True)

  def _class(self, y):
    """(B, 1, C) class embedding; y None or y < 0 (``NO_LABEL``) -> the mean embedding."""
    mean = jnp.mean(self.class_embed, axis=0)
    if y is None:
      return mean[None, None]
    e = jnp.where((y >= 0)[:, None], self.class_embed[jnp.clip(y, 0)], mean[None])
    return e[:, None]

  def _params_out(self, h):
    """Hidden states (B, T, C) -> (a, b) each (B, T, d) in fp32."""
    h = h.astype(jnp.float32)
    if self.final_norm:
      h = self.norm_out(h)
    out = self.proj_out(h)
    return out[..., :self.token_dim], out[..., self.token_dim:]

  def _embed(self, x, pos, y):
    h = self.proj_in(x.astype(self.dtype)) + pos.astype(self.dtype)
    if self.num_classes:
      h = h + self._class(y).astype(self.dtype)
    return h

  def shift_scale(self, xp, flip, y=None):
    """(a, b) of every token from x in the block's (permuted) order, one causal pass: xp (B, N, d)
    -> a, b each (B, N, d), token i's from x_{<i} (token 0's are zeros)."""
    pos = _flip(flip, self.pos_embed, 0)
    h, _ = self.transformer(self._embed(xp, pos[None], y))
    a, b = self._params_out(h)
    a = jnp.pad(a[:, :-1], ((0, 0), (1, 0), (0, 0)))           # shift right: token i uses x_{<i}
    b = jnp.pad(b[:, :-1], ((0, 0), (1, 0), (0, 0)))
    return a, b

  def __call__(self, carry, flip, y=None):
    x, logdet = carry
    z, a = self.transform(x, flip, y)
    logdet = logdet - jnp.sum(a, axis=(1, 2))
    return (z, logdet), None

  def transform(self, x, flip, y=None):
    """The block's map: x (B, N, d) -> (z (B, N, d), a (B, N, d) the log-scales in the block's
    (permuted) token order; log|det| = -sum a)."""
    x = x.astype(jnp.float32)
    xp = _flip(flip, x)
    a, b = self.shift_scale(xp, flip, y)
    zp = (xp - b) * jnp.exp(-a)
    return _flip(flip, zp), a

  def decode_step(self, x_tok, i, flip, y, cache, attn_temp=1.0):
    """Feeds permuted-order token i (B, 1, d) at cache slot i; returns (a, b) for token i+1, each
    (B, 1, d). ``attn_temp`` (static) divides the attention logits (guidance's weak branch)."""
    pos_idx = self.num_tokens - 1 - i if flip is True else (
        i if flip is False else jnp.where(flip, self.num_tokens - 1 - i, i))
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embed, pos_idx, 1, axis=0)
    h, cache = self.transformer(self._embed(x_tok.astype(jnp.float32), pos[None], y), cache, i,
                                attn_temp)
    a, b = self._params_out(h)
    return (a, b), cache


def block_flips(num_blocks):
  return jnp.arange(num_blocks) % 2 == 1


def _flip(flip, x, axis=1):
  """x reversed along ``axis`` if ``flip``: a Python bool (unrolled blocks: no select) or a traced
  () bool (scanned blocks)."""
  if isinstance(flip, bool):
    return jnp.flip(x, axis) if flip else x
  return jnp.where(flip, jnp.flip(x, axis), x)


def check_guidance(guidance, guide_what, attn_temp):
  """Validates ``AutoregressiveFlow.inverse``'s guidance arguments; returns (guidance, attn_temp)
  as Python floats. They select the traced program, so they must be static (not traced)."""
  try:
    guidance, attn_temp = float(guidance), float(attn_temp)
  except TypeError as e:          # a tracer (jax.errors.ConcretizationTypeError is a TypeError)
    raise TypeError("guidance and attn_temp must be static Python numbers (they choose the traced "
                    "program): pass them outside jit / as static arguments") from e
  if guide_what not in AF_GUIDE_WHAT:
    raise ValueError(f"guide_what={guide_what!r} is unknown; use one of {AF_GUIDE_WHAT}")
  if not guidance >= 0:
    raise ValueError(f"guidance={guidance} must be >= 0 (0 = no guidance)")
  if not attn_temp > 0:
    raise ValueError(f"attn_temp={attn_temp} must be > 0 (1 = the plain attention)")
  return guidance, attn_temp


class FlowShape(nn.Module):
  """The fields of a stack of n AF blocks, shared by the flow and the distilled student
  (distill/student.py), whose params have the same layout."""
  num_tokens: int
  token_dim: int
  width: int
  num_blocks: int
  layers_per_block: int
  num_heads: int
  num_classes: int = 0
  mlp_ratio: int = 4
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  final_norm: bool = True
  unroll: bool = False    # blocks and layers as Python loops (see the module docstring)
  attn_chunk: int = 64    # query chunk size of the blocks' causal attention ('einsum' only)
  attention: str = "xla"  # ``tfm.attend``'s impl: 'xla' | 'cudnn' | 'einsum'
  remat_policy: str = "nothing_saveable"
  remat_blocks: bool = False  # rematerialise each scanned block whole (``AutoregressiveFlow``)

  def block_kwargs(self):
    return dict(
        num_tokens=self.num_tokens, token_dim=self.token_dim, width=self.width,
        depth=self.layers_per_block, num_heads=self.num_heads, num_classes=self.num_classes,
        mlp_ratio=self.mlp_ratio, dtype=self.dtype, remat=self.remat, final_norm=self.final_norm,
        unroll=self.unroll, attn_chunk=self.attn_chunk, attention=self.attention,
        remat_policy=self.remat_policy)

  def block_params(self):
    """The stacked block params, unboxed, and per block (unrolled) a function t -> block t's."""
    stacked = nn.unbox(self.variables["params"]["blocks"])
    return stacked, lambda t: jax.tree.map(lambda p: p[t], stacked)


class AutoregressiveFlow(FlowShape):
  """n AF blocks under ``nn.scan``.

  __call__(x (B, N, d), y (B,) | None) -> (z (B, N, d), logdet (B,) summed in nats)
  token_logdet(x, y) -> (z, logdet (B, N) per token, in x's token order)
  inverse(z (B, N, d), y (B,) | None, guidance=0.0, guide_what='ab', attn_temp=1.0,
          annealed=False) -> x (B, N, d), the exact inverse (fp32), optionally guided
  """

  @nn.compact
  def __call__(self, x, y=None):
    logdet0 = jnp.zeros((x.shape[0],), jnp.float32)
    carry = (x.astype(jnp.float32), logdet0)
    if self.unroll and not self.is_initializing():
      _, block_t = self.block_params()
      block = AFBlock(**self.block_kwargs(), parent=None)
      for t in range(self.num_blocks):
        carry, _ = block.apply({"params": block_t(t)}, carry, t % 2 == 1, y)
      return carry
    # remat_blocks: the backward keeps each block's input (B, N, d) only, not every layer's
    # (B, N, C), and recomputes the block's forward once more
    block = nn.remat(AFBlock, prevent_cse=False) if self.remat_blocks else AFBlock
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast), length=self.num_blocks,
                      metadata_params={nn.PARTITION_NAME: "blocks"})
    blocks = scanned(**self.block_kwargs(), name="blocks")
    (z, logdet), _ = blocks(carry, block_flips(self.num_blocks), y)
    return z, logdet

  def path(self, x, y=None):
    """The forward pass keeping every intermediate (what distillation supervises with):
    x (B, N, d) -> (n + 1, B, N, d), entry t = Z^t (Z^0 = x, Z^t = f_t(Z^{t-1}), Z^n = z)."""
    block = AFBlock(**self.block_kwargs(), parent=None)
    logdet0 = jnp.zeros((x.shape[0],), jnp.float32)

    def step(z, xs):
      bp, flip = xs
      (z, _), _ = block.apply({"params": bp}, (z, logdet0), flip, y)
      return z, z

    x = x.astype(jnp.float32)
    stacked = nn.unbox(self.variables["params"]["blocks"])
    _, zs = jax.lax.scan(step, x, (stacked, block_flips(self.num_blocks)))
    return jnp.concatenate([x[None], zs])

  def token_logdet(self, x, y=None):
    """The forward pass with the log-det per token: x (B, N, d) -> (z (B, N, d), logdet (B, N)
    fp32 nats), entry i = -sum over blocks and channels of the log-scales of the token at input
    position i (each flipped block's undone), so its sum over tokens is ``__call__``'s logdet."""
    block = AFBlock(**self.block_kwargs(), parent=None)

    def step(z, xs):
      bp, flip = xs
      z, a = block.apply({"params": bp}, z, flip, y, method=AFBlock.transform)
      return z, -_flip(flip, jnp.sum(a, axis=-1))

    stacked = nn.unbox(self.variables["params"]["blocks"])
    z, per_block = jax.lax.scan(step, x.astype(jnp.float32),
                                (stacked, block_flips(self.num_blocks)))
    return z, jnp.sum(per_block, axis=0)

  def inverse_jacobi(self, z, y=None, max_iters=None, tol=0.0):
    """The exact AF inverse by parallel fixed-point (Jacobi) iterations, no training:
    z (B, N, d) -> (x (B, N, d) fp32, iterations (n,) int32 per block, in flow order).

    Per block (reverse order), in the block's token order: x <- z * exp(a(x)) + b(x), every token
    at once from one causal pass on the current estimate, starting from x = z. After k iterations
    tokens 0..k are exact, so ``max_iters`` = N - 1 (the default) gives the sequential inverse up to
    round-off; ``tol`` > 0 stops a block once the largest change of an iteration is <= tol.
    """
    block = AFBlock(**self.block_kwargs(), parent=None)
    n = self.num_tokens
    cap = n - 1 if max_iters is None else int(max_iters)

    def invert_block(zc, xs):
      bp, flip = xs
      zp = jnp.where(flip, zc[:, ::-1], zc)

      def update(x):
        a, b = block.apply({"params": bp}, x, flip, y, method=AFBlock.shift_scale)
        return zp * jnp.exp(a) + b

      def cond(state):
        _, k, change = state
        return (k < cap) & (change > tol)

      def body(state):
        x, k, _ = state
        new = update(x)
        return new, k + 1, jnp.max(jnp.abs(new - x))

      xp, iters, _ = jax.lax.while_loop(cond, body, (zp, jnp.int32(0), jnp.float32(jnp.inf)))
      return jnp.where(flip, xp[:, ::-1], xp), iters

    stacked = nn.unbox(self.variables["params"]["blocks"])
    x, iters = jax.lax.scan(invert_block, z.astype(jnp.float32),
                            (stacked, block_flips(self.num_blocks)), reverse=True)
    return x, iters

  def inverse(self, z, y=None, guidance=0.0, guide_what="ab", attn_temp=1.0, annealed=False):
    """Exact inverse x = F^{-1}(z): z (B, N, d) -> x (B, N, d), fp32; ``y`` as in ``__call__``.

    Blocks are visited in reverse order by ``lax.scan`` over this flow's stacked block params;
    inside each block, tokens are recovered one at a time by a ``lax.scan`` that feeds the last
    recovered token through the block's transformer with a fixed-size KV cache (no Python loop
    over tokens or blocks).

    Guidance (TARFlow's ``MetaBlock.reverse``, apple/ml-tarflow ``transformer_flow.py``; off by
    default): with ``guidance`` g > 0, every block also runs a weak branch on the same recovered
    tokens with its own KV cache: the mean class embedding (``y`` None) and attention logits
    divided by ``attn_temp``. Token i+1 (i = 0..N-2, in the block's order) then uses

        a <- a + g_i (a - a_u)   if 'a' in guide_what,    b <- b + g_i (b - b_u)   if 'b' in it,
        g_i = g (constant)  or, with ``annealed``,  g_i = g (i + 1) / (N - 1)  (g/(N-1) .. g),

    (a_u, b_u) the weak branch's params; both branches read the guided tokens. For conditional
    models this is CFG (attn_temp 1 is plain CFG); for unconditional ones (or ``y`` None) the two
    branches differ only by ``attn_temp``: TARFlow's unconditional guidance. guidance == 0 (the
    default) traces the unguided program only (``attn_temp``, ``annealed`` and ``guide_what`` then
    have no effect). guidance, attn_temp, guide_what and annealed are static: a change recompiles.

    Raises ValueError for guide_what not in ('a', 'b', 'ab'), guidance < 0 or attn_temp <= 0.
    """
    guidance, attn_temp = check_guidance(guidance, guide_what, attn_temp)
    guided = guidance > 0
    block = AFBlock(**self.block_kwargs(), parent=None)
    n, bsz = self.num_tokens, z.shape[0]
    head_dim = self.width // self.num_heads
    if guided:  # g_i for token i+1, i = 0..N-2, in float64 as TARFlow (+ a spare entry for N = 1)
      ramp = np.arange(1, n) / max(n - 1, 1) if annealed else np.ones(n - 1)
      g_tok = jnp.asarray(np.append(guidance * ramp, 0.0).astype(np.float32))

    def invert_block(zc, xs):
      bp, flip = xs
      zp = _flip(flip, zc)
      if self.unroll:     # layer params sliced once per block, not on every token step
        bp = dict(bp, transformer=tfm.split_layers(bp["transformer"], self.layers_per_block))
      cache = tfm.init_cache(self.layers_per_block, bsz, n, self.num_heads, head_dim, self.dtype,
                             stacked=not self.unroll)
      caches = (cache, cache) if guided else (cache,)

      def token_step(carry, i):
        xr, caches = carry
        x_tok = jax.lax.dynamic_slice_in_dim(xr, i, 1, axis=1)
        (a, b), cache = block.apply({"params": bp}, x_tok, i, flip, y, caches[0],
                                    method=AFBlock.decode_step)
        if guided:    # the weak branch: mean class embedding, tempered attention, its own cache
          (a_u, b_u), cache_u = block.apply({"params": bp}, x_tok, i, flip, None, caches[1],
                                            attn_temp, method=AFBlock.decode_step)
          g = g_tok[i]
          if "a" in guide_what:
            a = a + g * (a - a_u)
          if "b" in guide_what:
            b = b + g * (b - b_u)
          caches = (cache, cache_u)
        else:
          caches = (cache,)
        z_next = jax.lax.dynamic_slice_in_dim(zp, i + 1, 1, axis=1)
        x_next = z_next * jnp.exp(a) + b
        xr = jax.lax.dynamic_update_slice_in_dim(xr, x_next, i + 1, axis=1)
        return (xr, caches), None

      (xp, _), _ = jax.lax.scan(token_step, (zp, caches), jnp.arange(n - 1))
      return _flip(flip, xp), None

    stacked, block_t = self.block_params()
    x = z.astype(jnp.float32)
    if self.unroll:
      for t in reversed(range(self.num_blocks)):
        x, _ = invert_block(x, (block_t(t), t % 2 == 1))
      return x
    x, _ = jax.lax.scan(invert_block, x, (stacked, block_flips(self.num_blocks)), reverse=True)
    return x
