"""Analytic FLOPs of a FARMER (or TARFlow-prior) model: forward pass and train step.

Counts matmul FLOPs only (2 per multiply-add), as MFU conventions do (PaLM appendix B; MaxText):
elementwise work (LayerNorm, GELU, softmax, exp of log-scales, GMM log-probs) is memory-bound and
left out. Attention is counted at full size (the causal mask does not skip work in XLA's
attention). Backward = 2x forward (a gradient w.r.t. the inputs and one w.r.t. the weights per
matmul), so a train step is 3x the forward. ``tests/test_flops.py`` checks these counts against
XLA's ``compiled.cost_analysis()['flops']`` on small configs.

Shape letters: B batch, N tokens, d token dim, C width, F = mlp_ratio * C, L layers, n blocks,
M class prefix, d_I / d_R informative / redundant dims, K_I / K_R mixtures.
"""

from farmer_jax.config.schema import ModelConfig


def transformer_flops(tokens, width, depth, mlp_ratio, batch=1):
  """Forward matmul FLOPs of ``depth`` pre-LN layers over ``tokens`` tokens of width C: qkv 3C^2,
  proj C^2, MLP 2FC per token, and attention logits + values 2 N^2 C per layer (x2 per MAC)."""
  t, c = tokens, width
  per_token = 2 * (3 * c * c + c * c + 2 * mlp_ratio * c * c)
  attention = 2 * 2 * t * t * c
  return batch * depth * (t * per_token + attention)


def flow_flops(m: ModelConfig, batch=1):
  """Forward FLOPs of the AF: per block proj_in (d -> C), the transformer, proj_out (C -> 2d)."""
  n, d, c = m.num_tokens, m.token_dim, m.flow_width
  per_block = (2 * n * d * c + transformer_flops(n, c, m.flow_layers, m.mlp_ratio)
               + 2 * n * c * 2 * d)
  return batch * m.flow_blocks * per_block


def prior_flops(m: ModelConfig, batch=1):
  """Forward FLOPs of the AR prior (0 for ``prior='standard_normal'``): token embedding
  (d_I -> C) of N tokens, the transformer over M + N positions, the informative GMM head over N
  positions and the redundant head once."""
  if m.prior != "ar":
    return 0
  n, c = m.num_tokens, m.ar_width
  k_i = m.mixtures_informative
  head_i = k_i * (1 + 2 * m.d_i)
  out = 2 * n * m.d_i * c
  out += transformer_flops(m.class_repeats + n, c, m.ar_depth, m.mlp_ratio)
  out += 2 * n * c * head_i
  if m.dimred == "farmer":
    out += 2 * c * m.mixtures_redundant * (1 + 2 * m.d_r)
  return batch * out


def forward_flops(m: ModelConfig, batch=1):
  """Forward FLOPs of the whole model (AF + prior) on ``batch`` images."""
  return flow_flops(m, batch) + prior_flops(m, batch)


def train_step_flops(m: ModelConfig, batch):
  """FLOPs of one train step (forward + backward) on a global batch: 3x the forward."""
  return 3 * forward_flops(m, batch)


def flops_per_image(m: ModelConfig):
  """Train-step FLOPs per image (what images/s multiplies into FLOP/s)."""
  return train_step_flops(m, 1)
