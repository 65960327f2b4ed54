"""Quickstart: FARMER on MNIST-5k (data/mnist.py), 32x32x1, patch 4 (N = 64 tokens of d = 16).

  farmer_jax train --config=quickstart --workdir=/tmp/farmer_quickstart

Trains in under 10 minutes on 2 CPU cores, then prints the test bits/dim (uniform dequantization,
500 test images), scores 1,000 samples at cfg 0 and 1,000 with resampling CFG by MNIST-FID and class
consistency (a digit classifier trained in seconds on the bundled train split) and writes
samples.png (one row per class, CFG). ``--config=quickstart:tiny``
is the reduced variant the test suite trains.
"""

import ml_collections

from farmer_jax import configlib as common


def get_config(arg=None):
  a = common.parse_arg(arg, size="base", distill=False)
  c = ml_collections.ConfigDict()
  c.data = common.base_data(name="mnist5k", image_size=32, channels=1, num_classes=10)
  c.model = common.base_model(
      patch_size=4,
      # a class-conditional AF (TARFlow's; the paper's AF is unconditional) and a deeper AR
      # with 8 class repeats: measured on the MNIST class consistency of CFG samples, docs/eval.md
      flow_blocks=4, flow_layers=1, flow_width=64, flow_heads=2, flow_class_conditional=True,
      flow_final_norm=True, ar_order="alternate",
      ar_width=64, ar_depth=3, ar_heads=2, class_repeats=8,
      dimred="farmer", d_informative=4, mixtures_informative=16, mixtures_redundant=16,
      scale_fn="squareplus", scale_floor=1e-6,
      mlp_ratio=4, dtype="float32", remat=False,
      # CPU execution (benchmarks/vs_torch.py): unrolled AF blocks/layers, einsum attention
      unroll=True, attention="einsum",
  )
  c.train = common.base_train()
  c.train.update(steps=3000, batch_size=32, lr=1e-3, min_lr=1e-5, warmup_steps=100, grad_clip=1.0,
                 ema_decay=0.0, noise_max=0.1, noise_min=0.005, log_every=100)
  # test bpd, then MNIST-FID and class consistency of 100 samples per class at cfg 0 and at the
  # sampler below (eval/mnist_quality.py)
  c.eval = common.base_eval(batch_size=250, split="test", mnist_quality=True,
                            quality_per_class=100)
  # resampling CFG w = 3 with lowered temperatures (informative and redundant scales, mixture
  # weights) and redundant variances: the measured best class consistency / MNIST-FID
  # (docs/eval.md); per-token redundant pools, which measure the same as Algorithm 1's one shared
  # pool of 64 + 64 here (docs/ablations.md)
  c.sample = common.base_sample(per_class=8, seed=0, guidance="resampling", cfg=3.0, t_pi=0.8,
                                t_sigma=0.6, t_sigma_v=0.7, redundant_var_scale=0.3,
                                redundant_pool="per_token", redundant_candidates=16)
  common.base_mesh(c)
  if a.size == "tiny":      # what the test suite trains: same data and code path, toy widths
    c.model.update(
        flow_blocks=2, flow_layers=1, flow_width=32, flow_class_conditional=False, ar_width=32,
        ar_depth=1, class_repeats=2, mixtures_informative=4, mixtures_redundant=4)
    c.train.update(steps=200, batch_size=32, lr=3e-3, warmup_steps=20, log_every=50)
    c.eval.update(batch_size=100, mnist_quality=False)
    c.sample.update(per_class=2, guidance="none", cfg=0.0, t_pi=1.0, t_sigma=1.0, t_sigma_v=1.0,
                    redundant_var_scale=1.0)
  elif a.size != "base":
    raise ValueError(f"quickstart size must be 'base' or 'tiny', got {a.size!r}")
  if a.distill:   # `farmer_jax distill` of a quickstart run: Algorithm 2's train settings
    c.train.update(steps=1000 if a.size == "base" else 100, lr=1e-3, min_lr=1e-5,
                   warmup_steps=50 if a.size == "base" else 10, ema_decay=0.0)
  return c
