"""A PyTorch reference of TARFlow's ``transformer_flow.Model`` (apple/ml-tarflow), written from its
documented semantics (docs: /work/shared/reference/anchor_code.md section 1) for the converter's
tests and the JAX-vs-PyTorch benchmark. Its ``state_dict`` has TARFlow's key names, shapes and
order (``var``, ``blocks.{b}.pos_embed`` / ``class_embed`` / ``attn_mask`` / ``proj_in.*`` /
``attn_blocks.{l}.attention.{norm,qkv,proj}.*`` / ``attn_blocks.{l}.mlp.{norm,main.0,main.2}.*`` /
``proj_out.*``), so its checkpoints load into TARFlow and back.

Shape letters: B batch, c image channels, S image side, p patch, T tokens ((S/p)^2), Dp token dim
(c*p^2, feature order (c, ph, pw) as ``F.unfold`` gives), W width, H heads (W / 64), K classes.

Semantics (TARFlow's): pre-LN (eps 1e-5, fp32) attention with a fused q|k|v projection laid out
(3, H, 64) and an exact-GELU MLP; block b works on flipped tokens iff b is odd (position embedding
flipped too); the class embedding is added to every token; ``proj_out`` gives [a | b] (nvp) or b
(VP, a = 0), shifted right one token with a zero row; ``z = (x - b) * exp(-a)``; log-det per
block ``-mean(a)`` over (T, Dp) (a per-dimension log-det), summed over blocks. Labels: forward
uses the mean class embedding for y None or y < 0; reverse uses it for y None only and indexes
``class_embed[y]`` otherwise (so y = -1 there is the last class, as in TARFlow). ``reverse`` has
TARFlow's guidance (``guidance``, ``guide_what``, ``attn_temp``, ``annealed_guidance``; see
``MetaBlock.reverse``). Not reproduced: ``update_prior``, bf16 autocast.
"""

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64


class Attention(nn.Module):
  """Pre-LN multi-head attention: (B, T, W) -> (B, T, W). ``cache``: a dict holding this layer's
  keys/values so far ((B, H, t, 64) each), extended in place (decoding one token at a time).
  ``attn_temp`` divides the logits (TARFlow's SDPA ``scale = head_dim^-0.5 / temp``)."""

  def __init__(self, width):
    super().__init__()
    self.norm = nn.LayerNorm(width)
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)
    self.heads = width // HEAD_DIM

  def forward(self, x, mask=None, cache=None, attn_temp=1.0):
    bsz, t, w = x.shape
    h = self.norm(x.float()).to(x.dtype)
    qkv = self.qkv(h).view(bsz, t, 3, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                  # (B, H, T, 64)
    if cache is not None:
      if cache:
        k = torch.cat([cache["k"], k], dim=2)
        v = torch.cat([cache["v"], v], dim=2)
      cache["k"], cache["v"] = k, v
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                       scale=HEAD_DIM ** -0.5 / attn_temp)
    return self.proj(o.transpose(1, 2).reshape(bsz, t, w))


class MLP(nn.Module):
  """Pre-LN W -> expansion*W -> W with exact GELU; ``main`` indices 0 and 2 hold the Linears."""

  def __init__(self, width, expansion=4):
    super().__init__()
    self.norm = nn.LayerNorm(width)
    self.main = nn.Sequential(nn.Linear(width, expansion * width), nn.GELU(),
                              nn.Linear(expansion * width, width))

  def forward(self, x):
    return self.main(self.norm(x.float()).to(x.dtype))


class AttentionBlock(nn.Module):
  def __init__(self, width, expansion=4):
    super().__init__()
    self.attention = Attention(width)
    self.mlp = MLP(width, expansion)

  def forward(self, x, mask=None, cache=None, attn_temp=1.0):
    x = x + self.attention(x, mask, cache, attn_temp)
    return x + self.mlp(x)


class MetaBlock(nn.Module):
  """One affine autoregressive flow step on tokens (B, T, Dp)."""

  def __init__(self, token_dim, width, num_tokens, flip, layers, nvp=True, num_classes=0):
    super().__init__()
    self.proj_in = nn.Linear(token_dim, width)
    self.pos_embed = nn.Parameter(0.01 * torch.randn(num_tokens, width))
    self.class_embed = (nn.Parameter(0.01 * torch.randn(num_classes, 1, width))
                        if num_classes else None)
    self.attn_blocks = nn.ModuleList(AttentionBlock(width) for _ in range(layers))
    self.nvp = nvp
    self.proj_out = nn.Linear(width, 2 * token_dim if nvp else token_dim)
    with torch.no_grad():
      self.proj_out.weight.zero_()
    self.flip = flip
    self.register_buffer("attn_mask", torch.tril(torch.ones(num_tokens, num_tokens)))

  def _order(self, t, dim=1):
    return t.flip(dim) if self.flip else t

  def _class_fwd(self, y):
    """(B or 1, 1, W): the mean embedding for y None or y < 0."""
    mean = self.class_embed.mean(dim=0, keepdim=True)              # (1, 1, W)
    if y is None:
      return mean
    return torch.where((y < 0).view(-1, 1, 1), mean, self.class_embed[y.clamp(min=0)])

  def _class_rev(self, y):
    """TARFlow's reverse: the mean only for y None; otherwise class_embed[y] (y = -1: last)."""
    return self.class_embed.mean(dim=0, keepdim=True) if y is None else self.class_embed[y]

  def _split(self, out):
    if self.nvp:
      return out.chunk(2, dim=-1)
    return torch.zeros_like(out), out

  def forward(self, x, y=None):
    """x (B, T, Dp) -> (z (B, T, Dp), per-dimension log-det (B,))."""
    x = self._order(x)
    h = self.proj_in(x) + self._order(self.pos_embed, 0)
    if self.class_embed is not None:
      h = h + self._class_fwd(y)
    mask = self.attn_mask.bool()
    for blk in self.attn_blocks:
      h = blk(h, mask)
    out = self.proj_out(h)
    out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    a, b = self._split(out)
    z = (x - b) * torch.exp(-a.float()).to(a.dtype)
    return self._order(z), -a.mean(dim=(1, 2))

  def reverse_step(self, x_tok, pos_i, y, caches, attn_temp=1.0):
    """TARFlow's ``reverse_step``: feeds token i (B, 1, Dp) (position embedding ``pos_i`` (1, W))
    through the layers with the KV caches ``caches`` (one dict per layer); returns (a, b) for
    token i+1, each (B, 1, Dp)."""
    h = self.proj_in(x_tok) + pos_i
    if self.class_embed is not None:
      h = h + self._class_rev(y)
    for blk, cache in zip(self.attn_blocks, caches):
      h = blk(h, None, cache, attn_temp)
    return self._split(self.proj_out(h))

  @torch.no_grad()
  def reverse(self, z, y=None, guidance=0, guide_what="ab", attn_temp=1.0,
              annealed_guidance=False):
    """z (B, T, Dp) -> x, token by token with a KV cache. TARFlow's guidance: with guidance g > 0
    an unconditional step (y None, logits / attn_temp, its own 'uncond' caches) runs on the same
    recovered token; for step i (giving token i+1) ``gi = (i + 1) / (T - 1) * g`` if
    ``annealed_guidance`` else g, then a += gi (a - a_u) if 'a' in guide_what and
    b += gi (b - b_u) if 'b' in guide_what."""
    z = self._order(z)
    pos = self._order(self.pos_embed, 0)
    t = z.shape[1]
    caches = {"cond": [dict() for _ in self.attn_blocks],
              "uncond": [dict() for _ in self.attn_blocks]}
    xs = [z[:, :1]]
    for i in range(t - 1):
      a, b = self.reverse_step(xs[-1], pos[i:i + 1], y, caches["cond"])
      if guidance > 0 and guide_what:
        a_u, b_u = self.reverse_step(xs[-1], pos[i:i + 1], None, caches["uncond"], attn_temp)
        g = (i + 1) / (t - 1) * guidance if annealed_guidance else guidance
        if "a" in guide_what:
          a = a + g * (a - a_u)
        if "b" in guide_what:
          b = b + g * (b - b_u)
      xs.append(z[:, i + 1:i + 2] * torch.exp(a.float()).to(a.dtype) + b)
    return self._order(torch.cat(xs, dim=1))


class TARFlowReference(nn.Module):
  """TARFlow ``Model(in_channels, img_size, patch_size, channels, num_blocks, layers_per_block,
  nvp, num_classes)``.

  forward(x (B, c, S, S), y (B,) | None) -> (z (B, T, Dp), logdets (B,) per-dimension, summed over
  blocks); reverse(z (B, T, Dp), y, guidance=0, guide_what='ab', attn_temp=1.0,
  annealed_guidance=False) -> x (B, c, S, S); get_loss(z, logdets) -> scalar nats/dim.
  """

  def __init__(self, in_channels, img_size, patch_size, channels, num_blocks, layers_per_block,
               nvp=True, num_classes=0):
    super().__init__()
    self.img_size, self.patch_size = img_size, patch_size
    t = (img_size // patch_size) ** 2
    dp = in_channels * patch_size ** 2
    self.blocks = nn.ModuleList(
        MetaBlock(dp, channels, t, b % 2 == 1, layers_per_block, nvp, num_classes)
        for b in range(num_blocks))
    self.register_buffer("var", torch.ones(t, dp))

  def patchify(self, x):
    return F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)

  def unpatchify(self, x):
    return F.fold(x.transpose(1, 2), (self.img_size, self.img_size), self.patch_size,
                  stride=self.patch_size)

  def forward(self, x, y=None):
    x = self.patchify(x)
    logdets = torch.zeros((), device=x.device)
    for block in self.blocks:
      x, logdet = block(x, y)
      logdets = logdets + logdet
    return x, logdets

  @staticmethod
  def get_loss(z, logdets):
    return 0.5 * z.pow(2).mean() - logdets.mean()

  @torch.no_grad()
  def reverse(self, z, y=None, guidance=0, guide_what="ab", attn_temp=1.0,
              annealed_guidance=False):
    x = z * self.var.sqrt()
    for block in reversed(self.blocks):
      x = block.reverse(x, y, guidance, guide_what, attn_temp, annealed_guidance)
    return self.unpatchify(x)


@torch.no_grad()
def randomize_(model, seed=0, out_scale=0.02, scale=0.1):
  """Makes every parameter non-trivial, in place: Linear weights keep PyTorch's init except
  ``proj_out`` (zero in TARFlow), drawn N(0, out_scale^2) here so a and b depend on the tokens;
  biases, LayerNorm scales/shifts (1 + ...) and embeddings get N(0, scale^2) perturbations."""
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=g)
    if name.endswith("proj_out.weight"):
      p.copy_(out_scale * noise)
    elif name.endswith("embed"):
      p.copy_(0.5 * noise)
    elif p.ndim == 1 or "norm" in name:
      p.add_(scale * noise)
    else:
      torch.nn.init.uniform_(p, -p.shape[1] ** -0.5, p.shape[1] ** -0.5, generator=g)
  return model
