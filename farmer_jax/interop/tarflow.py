"""TARFlow (apple/ml-tarflow ``transformer_flow.Model``) state_dicts <-> our AF params.

Shape letters: n blocks, L layers per block, T = N tokens ((img/p)^2), Dp = d token dim (c*p^2),
W = C width, H heads (W / 64), Dh = 64 head dim, F MLP width (4W), K classes.

    state_dict = load_state_dict("afhq_model_8_768_8_8_0.07.pth")      # numpy, no torch needed
    mcfg = dataclasses.replace(ModelConfig(), **config_for_tarflow(**tarflow_hparams(state_dict)))
    flow_params = tarflow_to_params(state_dict, mcfg)    # params['flow'] of Farmer(mcfg)
    z, logdet = make_flow(mcfg).apply({'params': flow_params}, patchify(x, mcfg.patch_size), y)
    state_dict == params_to_tarflow(flow_params, mcfg)   # the exact inverse (fp32, lossless)

What the mapping does (each checked against a PyTorch re-implementation in tests/test_tarflow.py):

* Layout. Our blocks are scanned: every leaf has a leading (n,) axis, transformer leaves a further
  (L,) axis. ``Linear.weight`` (out, in) is our ``kernel.T`` (in, out).
* Attention. TARFlow's fused ``qkv`` output feature (s*H + h)*64 + e (s in q, k, v) is our
  ``qkv/kernel`` (W, 3, H, Dh) = ``weight.T.reshape(W, 3, H, 64)`` (bias ``reshape(3, H, 64)``);
  ``proj`` reads merged heads h*64 + e: our ``proj/kernel`` (H, Dh, W) =
  ``weight.T.reshape(H, 64, W)``. TARFlow's head dim is always 64, so ``model.flow_heads`` must be
  ``flow_width // 64``. Logit scale 1/sqrt(64) on both sides.
* LayerNorm eps 1e-5 (ours is the same, ``nn/transformer.py``), affine, in fp32; GELU exact (erf)
  on both sides; pre-LN residual layers with no norm after the last one.
* No final norm. TARFlow's block maps the last layer's output straight to ``proj_out``; our
  ``model.flow_final_norm=True`` (the default) adds a LayerNorm there, so an import needs
  ``model.flow_final_norm=False`` (refused otherwise).
* Patch features. TARFlow patchifies with ``unfold``: feature (c, ph, pw), index c*p^2 + i*p + j;
  ours is (ph, pw, c), index (i*p + j)*c_in + c (``flow/patchify.py``). The columns of
  ``proj_in.weight``, and the rows of both halves of ``proj_out`` (and its bias), are permuted
  once here; nothing else sees the token features.
* Output halves. TARFlow's ``proj_out`` rows [:Dp] are the log-scale a, rows [Dp:] the shift b,
  ``z = (x - b) * exp(-a)``, with the zero-row shift (token 0 is the identity). Ours: the first d
  outputs are a, the last d are b, the same formula and shift: the order is kept.
* Token order. Block b runs on flipped tokens iff b is odd, the (natural-order) ``pos_embed``
  flipped with them, on both sides.
* Classes. ``class_embed`` (K, 1, W) is our (K, W); it exists iff the flow is class conditional
  (``model.flow_class_conditional`` and ``data.num_classes`` = K). Unconditional TARFlow models
  (K = 0) have none: ``model.flow_class_conditional=False``.
* VP variant (``nvp=False``). ``proj_out`` is (Dp, W): only the shift b, with a = 0. It imports
  into our affine block with a zero log-scale half (kernel and bias), so the function is exactly
  TARFlow's (log-det 0). ``params_to_tarflow(..., nvp=False)`` exports it back and refuses a
  non-zero a half. Training the imported flow would of course move a away from 0.
* Buffers. ``blocks.{b}.attn_mask`` (the causal tril) and ``var`` are buffers: checked for shape
  when present, never required, not stored in our params. ``var`` (T, Dp) is TARFlow's prior
  variance: all ones for nvp models; a VP model learns it (EMA of z^2) and its ``reverse``
  scales the latent by ``sqrt(var)`` before the blocks. ``tarflow_var`` returns it in our (N, d)
  layout (multiply a N(0, I) draw by its square root to sample as TARFlow does).

Conventions that differ (nothing to convert in the params; convert results when comparing):

* Log-det. TARFlow's block returns ``-mean(a)`` over (T, Dp), the per-dimension log-det, and
  ``Model.forward`` sums that over blocks; ours is the sum over tokens, features and blocks:
  ours = TARFlow's * N*d. TARFlow's ``get_loss`` is ``0.5*mean(z^2) - mean(logdets)`` (nats/dim
  without 0.5*log(2*pi)); ours in the same units is ``0.5*mean(z^2) - mean(logdet) / (N*d)``.
* Pixels. TARFlow maps images to [-1, 1] with ``Normalize(0.5, 0.5)`` after ``ToTensor``
  (v/255*2 - 1) for training with Gaussian noise, and (v + u)/256*2 - 1 (bin width 1/128) for
  bits/dim; our model space is (v + u)/128 - 1 and bin centres (v + 0.5)/128 - 1 (docs/math.md),
  so a TARFlow model sees inputs shifted by at most half a bin (1/256) relative to its training
  data under our centre mapping; bits/dim with uniform noise agree exactly. Images are NCHW
  there, NHWC here.
* Unconditional labels. TARFlow's forward uses the mean class embedding for ``y=None`` and for
  every ``y < 0``; its ``reverse`` uses the mean for ``y=None`` but indexes ``class_embed[y]``
  otherwise, so ``y=-1`` there selects the LAST class (python negative indexing), not the mean.
  Ours uses the mean for ``NO_LABEL`` (-1, any y < 0) and for None in both directions, i.e. our
  inverse with NO_LABEL reproduces TARFlow's ``reverse(z, y=None)``.
* Sampling extras TARFlow's ``reverse`` has and ``AutoregressiveFlow.inverse`` does not: CFG on
  (a, b) with an unconditional branch, its attention temperature and annealing.
"""

import collections
import re

import numpy as np

from farmer_jax.errors import UserError

HEAD_DIM = 64          # TARFlow's MetaBlock head_dim (never overridden by its Model)
BUFFERS = ("attn_mask", "var")

_FIELDS = dict(
    image_size="data.image_size", channels="data.channels", num_classes="data.num_classes",
    patch_size="model.patch_size", flow_width="model.flow_width",
    flow_heads="model.flow_heads", flow_blocks="model.flow_blocks",
    flow_layers="model.flow_layers", flow_class_conditional="model.flow_class_conditional",
    flow_final_norm="model.flow_final_norm", mlp_ratio="model.mlp_ratio")


def _norm(torch_name, ours):
  """A LayerNorm's (weight, bias) keys -> our (scale, bias) under ``ours``."""
  return ((f"{torch_name}.weight", ours + ("ln", "scale"), "vec"),
          (f"{torch_name}.bias", ours + ("ln", "bias"), "vec"))


def _dense(torch_name, ours, weight_kind, bias_kind="vec"):
  """A linear layer's (weight, bias) keys -> our (kernel, bias) under ``ours``."""
  return ((f"{torch_name}.weight", ours + ("kernel",), weight_kind),
          (f"{torch_name}.bias", ours + ("bias",), bias_kind))


# per-layer TARFlow keys (under blocks.{b}.attn_blocks.{l}.) -> (our path under layers, kind)
_LAYER_KEYS = (
    *_norm("attention.norm", ("attn", "norm")),
    *_dense("attention.qkv", ("attn", "qkv"), "qkv_w", "qkv_b"),
    *_dense("attention.proj", ("attn", "proj"), "proj_w"),
    *_norm("mlp.norm", ("mlp", "norm")),
    *_dense("mlp.main.0", ("mlp", "fc1"), "linear"),
    *_dense("mlp.main.2", ("mlp", "fc2"), "linear"),
)


def config_for_tarflow(in_channels, img_size, patch_size, channels, num_blocks,
                       layers_per_block, num_classes=0, nvp=True, expansion=4):
  """TARFlow ``Model(...)`` hyper-parameters -> ModelConfig overrides (a dict for
  ``dataclasses.replace``). Argument names are ``transformer_flow.Model``'s (train.py's flags:
  --channel_size, --img_size, --patch_size, --channels, --blocks, --layers_per_block);
  ``expansion`` is the MLP ratio (4 in TARFlow). ``nvp`` changes no config field (both variants
  import into the same block) and is accepted so ``config_for_tarflow(**tarflow_hparams(sd))``
  works.

  TARFlow -> ours: in_channels -> channels, img_size -> image_size, patch_size -> patch_size,
  channels -> flow_width, channels // 64 -> flow_heads, num_blocks -> flow_blocks,
  layers_per_block -> flow_layers, expansion -> mlp_ratio, num_classes K > 0 -> num_classes=K and
  flow_class_conditional=True (K = 0 -> flow_class_conditional=False; num_classes is then the AR
  prior's and is left alone); always flow_final_norm=False.
  """
  del nvp
  if channels % HEAD_DIM:
    raise UserError(f"TARFlow width channels={channels} is not a multiple of its head dim "
                    f"{HEAD_DIM}: not a TARFlow Model")
  if img_size % patch_size:
    raise ValueError(f"patch_size={patch_size} does not divide img_size={img_size}")
  out = dict(image_size=img_size, channels=in_channels, patch_size=patch_size,
             flow_width=channels, flow_heads=channels // HEAD_DIM, flow_blocks=num_blocks,
             flow_layers=layers_per_block, mlp_ratio=expansion,
             flow_class_conditional=num_classes > 0, flow_final_norm=False)
  if num_classes:
    out["num_classes"] = num_classes
  return out


def _block_ids(state_dict, pattern):
  ids = set()
  for k in state_dict:
    m = re.match(pattern, k)
    if m:
      ids.add(int(m.group(1)))
  return ids


def tarflow_hparams(state_dict, in_channels=3):
  """The ``transformer_flow.Model(...)`` kwargs a state_dict was made with, read from its key
  names and shapes: in_channels (given: only c*p^2 is stored; 3 for RGB), img_size, patch_size,
  channels, num_blocks, layers_per_block, num_classes, nvp, expansion. ValueError when the
  state_dict is not shaped like a TARFlow Model's."""
  sd = state_dict
  blocks = _block_ids(sd, r"blocks\.(\d+)\.")
  layers = _block_ids(sd, r"blocks\.0\.attn_blocks\.(\d+)\.")
  need = ("blocks.0.proj_in.weight", "blocks.0.pos_embed", "blocks.0.proj_out.weight",
          "blocks.0.attn_blocks.0.mlp.main.0.weight")
  missing = [k for k in need if k not in sd]
  if not blocks or not layers or missing:
    raise ValueError(f"not a TARFlow state_dict: no {missing or ['blocks.{b}.attn_blocks.{l}.*']}")
  width, dp = np.shape(sd["blocks.0.proj_in.weight"])
  tokens = np.shape(sd["blocks.0.pos_embed"])[0]
  patch = int(round((dp / in_channels) ** 0.5))
  side = int(round(tokens ** 0.5))
  if patch * patch * in_channels != dp or side * side != tokens:
    raise ValueError(f"blocks.0.proj_in.weight {tuple(np.shape(sd['blocks.0.proj_in.weight']))} "
                     f"(token dim {dp}) and blocks.0.pos_embed "
                     f"{tuple(np.shape(sd['blocks.0.pos_embed']))} ({tokens} tokens) do not fit "
                     f"in_channels={in_channels} with a square patch and image: pass the right "
                     "in_channels, or check those keys")
  ce = sd.get("blocks.0.class_embed")
  out_rows = np.shape(sd["blocks.0.proj_out.weight"])[0]
  return dict(in_channels=in_channels, img_size=side * patch, patch_size=patch,
              channels=int(width), num_blocks=max(blocks) + 1,
              layers_per_block=max(layers) + 1,
              num_classes=0 if ce is None else int(np.shape(ce)[0]), nvp=out_rows != dp,
              expansion=int(np.shape(sd["blocks.0.attn_blocks.0.mlp.main.0.weight"])[0])
              // int(width))


def patch_permutation(patch_size, channels):
  """(Dp,) int: our feature o = (i*p + j)*c_in + c takes TARFlow's feature perm[o] = c*p^2 + i*p
  + j (ours = tarflow[..., perm]; tarflow = ours[..., argsort(perm)])."""
  p = patch_size
  return np.arange(p * p * channels).reshape(channels, p, p).transpose(1, 2, 0).reshape(-1)


def _check_config(mcfg):
  bad = []
  if mcfg.flow_final_norm:
    bad.append("model.flow_final_norm=True: TARFlow's block has no LayerNorm before proj_out; "
               "set model.flow_final_norm=False")
  if mcfg.flow_width % HEAD_DIM or mcfg.flow_heads != mcfg.flow_width // HEAD_DIM:
    bad.append(f"model.flow_heads={mcfg.flow_heads} with model.flow_width={mcfg.flow_width}: "
               f"TARFlow's heads are {HEAD_DIM} wide; set model.flow_heads="
               f"{max(mcfg.flow_width // HEAD_DIM, 1)} (flow_width a multiple of {HEAD_DIM})")
  if bad:
    raise ValueError("config cannot hold a TARFlow model: " + "; ".join(bad))


def _num_classes(mcfg):
  return mcfg.num_classes if mcfg.flow_class_conditional else 0


def _expected(mcfg, nvp):
  """OrderedDict TARFlow key -> shape, in TARFlow's state_dict order, buffers included."""
  t, dp, w = mcfg.num_tokens, mcfg.token_dim, mcfg.flow_width
  f, k = mcfg.mlp_ratio * w, _num_classes(mcfg)
  layer = dict(vec=None, qkv_w=(3 * w, w), qkv_b=(3 * w,), proj_w=(w, w))
  sizes = {"mlp.main.0.weight": (f, w), "mlp.main.0.bias": (f,), "mlp.main.2.weight": (w, f)}
  out = collections.OrderedDict(var=(t, dp))
  for b in range(mcfg.flow_blocks):
    pre = f"blocks.{b}."
    out[pre + "pos_embed"] = (t, w)
    if k:
      out[pre + "class_embed"] = (k, 1, w)
    out[pre + "attn_mask"] = (t, t)
    out[pre + "proj_in.weight"] = (w, dp)
    out[pre + "proj_in.bias"] = (w,)
    for li in range(mcfg.flow_layers):
      for name, _, kind in _LAYER_KEYS:
        out[f"{pre}attn_blocks.{li}.{name}"] = sizes.get(name) or layer[kind] or (w,)
    rows = 2 * dp if nvp else dp
    out[pre + "proj_out.weight"] = (rows, w)
    out[pre + "proj_out.bias"] = (rows,)
  return out


def _is_buffer(key):
  return key.rsplit(".", 1)[-1] in BUFFERS


def _hint(key, mcfg, sd_blocks, sd_layers):
  """The config fields (short names, '/'-separated) a bad key points at; ``sd_blocks`` /
  ``sd_layers``: the block and (block 0's) layer indices the state_dict has."""
  m = re.match(r"blocks\.(\d+)\.(?:attn_blocks\.(\d+)\.)?(.*)", key)
  if not m:
    return "image_size/patch_size/channels" if key == "var" else "not a TARFlow key"
  b, li, rest = int(m.group(1)), m.group(2), m.group(3)
  if b >= mcfg.flow_blocks or b not in sd_blocks:
    return "flow_blocks"
  if li is not None and (int(li) >= mcfg.flow_layers or int(li) not in sd_layers):
    return "flow_layers"
  if rest == "class_embed":
    return "num_classes/flow_class_conditional"
  if rest in ("pos_embed", "attn_mask"):
    return "image_size/patch_size" + ("/flow_width" if rest == "pos_embed" else "")
  if rest.startswith(("proj_in", "proj_out")):
    return "patch_size/channels/flow_width"
  if rest.startswith("mlp.main"):
    return "mlp_ratio/flow_width"
  return "flow_width"


def _suggestion(state_dict, mcfg):
  """' The state_dict looks like ...: set ...' or '' when its shapes cannot be read."""
  try:
    hp = tarflow_hparams(state_dict, mcfg.channels)
    want = config_for_tarflow(**hp)
  except (ValueError, ZeroDivisionError, KeyError, IndexError, TypeError):
    return ""
  if not want["flow_class_conditional"]:
    want.pop("num_classes", None)
  fixes = [f"{_FIELDS[k]}={v!r}" for k, v in want.items() if getattr(mcfg, k) != v]
  if not fixes:
    return ""
  hp_text = ", ".join(f"{k}={v}" for k, v in hp.items())
  return (f" The state_dict looks like TARFlow Model({hp_text}) (in_channels taken from "
          f"data.channels): set {', '.join(fixes)}.")


def _listing(items, limit=12):
  items = list(items)
  text = "; ".join(items[:limit])
  return text + (f"; ... ({len(items) - limit} more)" if len(items) > limit else "")


def _validate(state_dict, mcfg, nvp):
  want = _expected(mcfg, nvp)
  problems = []
  missing = [k for k in want if k not in state_dict and not _is_buffer(k)]
  extra = [k for k in state_dict if k not in want]
  shapes = [k for k in want if k in state_dict and tuple(np.shape(state_dict[k])) != want[k]]
  sd_blocks = _block_ids(state_dict, r"blocks\.(\d+)\.")
  sd_layers = _block_ids(state_dict, r"blocks\.0\.attn_blocks\.(\d+)\.")

  def fields(keys):
    hints = (_hint(k, mcfg, sd_blocks, sd_layers).split("/") for k in keys)
    return ", ".join(dict.fromkeys(_FIELDS.get(f, f) for fs in hints for f in fs))

  if missing:
    problems.append(f"missing keys [{_listing(missing)}] (check {fields(missing)})")
  if extra:
    problems.append(f"unexpected keys [{_listing(extra)}] (check {fields(extra)})")
  if shapes:
    shown = [f"{k} {tuple(np.shape(state_dict[k]))} != expected {want[k]}" for k in shapes]
    problems.append(f"wrong shapes [{_listing(shown)}] (check {fields(shapes)})")
  if problems:
    raise ValueError("TARFlow state_dict does not match the model config: "
                     + "; ".join(problems) + "." + _suggestion(state_dict, mcfg))


def _f32(a):
  return np.asarray(a, dtype=np.float32)


def _detect_nvp(state_dict, mcfg):
  w = state_dict.get("blocks.0.proj_out.weight")
  return not (w is not None and tuple(np.shape(w)) == (mcfg.token_dim, mcfg.flow_width))


def tarflow_to_params(state_dict, mcfg):
  """TARFlow ``Model.state_dict()`` (name -> array, e.g. from ``torch_checkpoint.
  load_state_dict``) -> the params pytree of ``make_flow(mcfg)`` (``params['flow']`` of a
  Farmer), fp32 numpy leaves. nvp (affine) and VP (shift-only) models are both accepted (told
  apart by ``proj_out``'s shape). ValueError listing every missing, unexpected or wrong-shape key
  and the config fields to change; a config TARFlow cannot fill (``model.flow_final_norm=True``,
  heads not 64 wide) is refused first."""
  _check_config(mcfg)
  nvp = _detect_nvp(state_dict, mcfg)
  _validate(state_dict, mcfg, nvp)
  sd = {k: _f32(v) for k, v in state_dict.items()}
  n, nl, w, dp = mcfg.flow_blocks, mcfg.flow_layers, mcfg.flow_width, mcfg.token_dim
  h = w // HEAD_DIM
  perm = patch_permutation(mcfg.patch_size, mcfg.channels)

  def conv(a, kind):
    if kind == "vec":
      return a
    if kind == "linear":
      return a.T
    if kind == "qkv_w":
      return a.T.reshape(w, 3, h, HEAD_DIM)
    if kind == "qkv_b":
      return a.reshape(3, h, HEAD_DIM)
    return a.T.reshape(h, HEAD_DIM, w)   # proj_w

  layers = {}
  for name, path, kind in _LAYER_KEYS:
    leaf = np.stack([np.stack([conv(sd[f"blocks.{b}.attn_blocks.{li}.{name}"], kind)
                               for li in range(nl)]) for b in range(n)])
    node = layers
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = leaf

  def out_half(b, part):
    wt, bias = sd[f"blocks.{b}.proj_out.weight"], sd[f"blocks.{b}.proj_out.bias"]
    if not nvp and part == 0:
      return np.zeros((w, dp), np.float32), np.zeros((dp,), np.float32)
    rows = slice(dp * part, dp * (part + 1)) if nvp else slice(0, dp)
    return wt[rows].T[:, perm], bias[rows][perm]

  halves = [[out_half(b, part) for part in (0, 1)] for b in range(n)]
  blocks = {
      "pos_embed": np.stack([sd[f"blocks.{b}.pos_embed"] for b in range(n)]),
      "proj_in": {"kernel": np.stack([sd[f"blocks.{b}.proj_in.weight"].T[perm]
                                      for b in range(n)]),
                  "bias": np.stack([sd[f"blocks.{b}.proj_in.bias"] for b in range(n)])},
      "proj_out": {"kernel": np.stack([np.concatenate([a[0], bb[0]], axis=1)
                                       for a, bb in halves]),
                   "bias": np.stack([np.concatenate([a[1], bb[1]]) for a, bb in halves])},
      "transformer": {"layers": layers},
  }
  if _num_classes(mcfg):
    blocks["class_embed"] = np.stack([sd[f"blocks.{b}.class_embed"][:, 0] for b in range(n)])
  return {"blocks": blocks}


def tarflow_var(state_dict, mcfg):
  """TARFlow's prior variance buffer ``var`` (T, Dp) in our (N, d) feature order (all ones for
  nvp models; learned for VP ones, used by its sampler as z * sqrt(var))."""
  if "var" not in state_dict:
    raise ValueError("the state_dict has no 'var' buffer")
  v = _f32(state_dict["var"])
  if v.shape != (mcfg.num_tokens, mcfg.token_dim):
    raise ValueError(f"var has shape {v.shape}, expected {(mcfg.num_tokens, mcfg.token_dim)} "
                     f"(check data.image_size/model.patch_size/data.channels)")
  return v[:, patch_permutation(mcfg.patch_size, mcfg.channels)]


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree, dtype=np.float32)


def params_to_tarflow(flow_params, mcfg, nvp=True, var=None):
  """Our flow params (``params['flow']`` of a Farmer, or the whole Farmer params) -> a TARFlow
  ``Model.state_dict()`` as an OrderedDict of fp32 numpy arrays with TARFlow's key order,
  buffers included (``attn_mask`` the causal tril; ``var`` ones, or ``var`` (N, d) given in our
  feature order). The exact inverse of ``tarflow_to_params``. ``nvp=False`` writes the VP variant
  (proj_out = the shift half only) and requires the log-scale half to be zero."""
  _check_config(mcfg)
  tree = flow_params
  if "blocks" not in tree and "flow" in tree:
    tree = tree["flow"]
  try:
    import flax.linen as nn
    tree = nn.unbox(tree)
  except ImportError:  # pragma: no cover - flax is a dependency
    pass
  blocks = tree["blocks"]
  n, nl, w, dp, t = (mcfg.flow_blocks, mcfg.flow_layers, mcfg.flow_width, mcfg.token_dim,
                     mcfg.num_tokens)
  inv = np.argsort(patch_permutation(mcfg.patch_size, mcfg.channels))
  k_out = _get(blocks, ("proj_out", "kernel"))
  b_out = _get(blocks, ("proj_out", "bias"))
  want = (n, w, 2 * dp)
  if k_out.shape != want:
    raise ValueError(f"flow params proj_out kernel {k_out.shape} != {want} for this config: the "
                     f"params were made for another model config")
  if not nvp and (np.any(k_out[..., :dp]) or np.any(b_out[..., :dp])):
    raise ValueError("nvp=False (TARFlow's VP variant) has no log-scale output, but these params' "
                     "log-scale half of proj_out is non-zero; export with nvp=True")
  if var is None:
    var_t = np.ones((t, dp), np.float32)
  else:
    var_t = np.asarray(var, np.float32)
    if var_t.shape != (t, dp):
      raise ValueError(f"var has shape {var_t.shape}, expected {(t, dp)} (our (N, d) order)")
    var_t = var_t[:, inv]
  out = collections.OrderedDict(var=var_t)
  layers = blocks["transformer"]["layers"]
  conv = dict(vec=lambda a: a, linear=lambda a: a.T,
              qkv_w=lambda a: a.reshape(w, 3 * w).T, qkv_b=lambda a: a.reshape(3 * w),
              proj_w=lambda a: a.reshape(w, w).T)
  leaves = {name: _get(layers, path) for name, path, _ in _LAYER_KEYS}
  mask = np.tril(np.ones((t, t), np.float32))
  for b in range(n):
    pre = f"blocks.{b}."
    out[pre + "pos_embed"] = _get(blocks, ("pos_embed",))[b]
    if _num_classes(mcfg):
      out[pre + "class_embed"] = _get(blocks, ("class_embed",))[b][:, None, :]
    out[pre + "attn_mask"] = mask.copy()
    out[pre + "proj_in.weight"] = _get(blocks, ("proj_in", "kernel"))[b][inv].T
    out[pre + "proj_in.bias"] = _get(blocks, ("proj_in", "bias"))[b]
    for li in range(nl):
      for name, _, kind in _LAYER_KEYS:
        out[f"{pre}attn_blocks.{li}.{name}"] = conv[kind](leaves[name][b, li])
    ka, kb = k_out[b][:, :dp][:, inv], k_out[b][:, dp:][:, inv]
    ba, bb = b_out[b][:dp][inv], b_out[b][dp:][inv]
    out[pre + "proj_out.weight"] = (np.concatenate([ka, kb], axis=1) if nvp else kb).T
    out[pre + "proj_out.bias"] = np.concatenate([ba, bb]) if nvp else bb
  out = collections.OrderedDict((k, np.ascontiguousarray(v, np.float32)) for k, v in out.items())
  _validate(out, mcfg, nvp)
  return out
