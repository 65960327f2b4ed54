"""FARMER on ImageNet 256x256, class-conditional, presets exactly as the paper's Table 1.

  farmer_jax train --config=imagenet256:1.1B/16,data_dir=gs://bucket/tfds \
      --workdir=gs://bucket/farmer_1.1b_p16
  farmer_jax train --config=imagenet256:model=1.9B/8,batch=1024,data_dir=... ...
  # on v5p-64: 8 data-parallel groups of 4 chips, FSDP inside each (docs/performance.md)
  farmer_jax train --config=imagenet256:1.1B/16,dp=8,data_dir=... ...
  # on GPUs: cuDNN's fused attention (bf16), configlib.gpu (docs/performance.md "GPUs")
  farmer_jax train --config=imagenet256:1.1B/16,gpu,data_dir=/data/tfds ...
  # a dataset written by `farmer_jax prepare` (already 256x256): data=tfds:NAME,resize=none
  farmer_jax distill --config=imagenet256:1.1B/16,distill=1,data_dir=... \
      --teacher=gs://bucket/farmer_1.1b_p16 --workdir=gs://bucket/farmer_1.1b_p16_student
  # the distillation preset: 60 epochs (paper), lr 1e-4 -> 1e-6 as pretraining (not stated)

Data (docs/data.md): config.data.name=tfds:imagenet2012 from an ArrayRecord data_dir, images
center-cropped per image with the ADM recipe (resize=center_crop), random horizontal flips (not
stated by the paper; as DiT).

preset  | AR layers x width | AF blocks x layers x width | patch | N    | d   | d_I | K_I | K_R | M
--------|-------------------|----------------------------|-------|------|-----|-----|-----|-----|---
1.1B/16 | 12 x 768          | 28 x 4 x 768               | 16    | 256  | 768 | 128 | 64  | 200 | 64
1.1B/8  | 12 x 768          | 28 x 4 x 768               | 8     | 1024 | 192 | 128 | 64  | 200 | 64
1.9B/16 | 24 x 1024         | 32 x 6 x 768               | 16    | 256  | 768 | 128 | 64  | 200 | 64
1.9B/8  | 24 x 1024         | 32 x 6 x 768               | 8     | 1024 | 192 | 128 | 64  | 200 | 64

Paper recipe: AdamW (0.9, 0.95), wd 0.03, lr 1e-4 -> 1e-6 cosine with 5000 warmup steps, 320 epochs,
Gaussian dequantization sigma 0.1 -> 0.005 (cosine; the paper does not state the units: here they
are model units, the [-1, 1] scale of x, so 0.005 is 0.64 of 256 levels; docs/math.md). Not stated
by the paper and chosen here: batch
256 (override with batch=), head dim 64, MLP ratio 4, label drop 0.1, bf16 compute with fp32 params,
remat on. The patch-8 split d_I = 128 of d = 192 follows the issue's instruction to keep Table 1's
d_I (the paper does not give it). Expected results (paper Table 2, FID-50k with resampling CFG):
5.40 / 5.02 / 3.96 / 3.60 for the four presets. The AR prior runs opposite to the last AF block
(model.ar_order='alternate': the paper's "final permute" read as its stated purpose, the AR prior as
one more block of the alternation; two literal readings give 'same', which the quickstart ablation
measured worse on both seeds: docs/math.md, "AR order").

Parameter counts (tests/test_config.py, exact closed form): AF 849M / 828M / 1.424B / 1.400B for the
four presets, within 3% of Table 1 (828M, 1.4B). AR 296M for 1.1B/16 (Table 1: 295M). The other
three ARs cannot match Table 1 with the linear GMM heads the paper describes, whose redundant head
K_R (1 + 2 d_R) (C + 1) dominates: for 1.9B/16 it alone is 200 * 1281 * 1025 = 263M, and with the
24 x 1024 trunk (302M) the AR is 583M, not 498M (the paper does not say what differs). At patch 8,
d_R = 64 shrinks that head to 200 * 129 * (C + 1), so the AR is 119M (1.1B/8) and 348M (1.9B/8);
Table 1 gives one AR count per model size, apparently the patch-16 one.
"""

import ml_collections

from farmer_jax import configlib

MODELS = {
    "1.1B": dict(ar_depth=12, ar_width=768, ar_heads=12, flow_blocks=28, flow_layers=4,
                 flow_width=768, flow_heads=12),
    "1.9B": dict(ar_depth=24, ar_width=1024, ar_heads=16, flow_blocks=32, flow_layers=6,
                 flow_width=768, flow_heads=12),
}
IMAGENET_TRAIN_IMAGES = 1_281_167

# Paper Table 6: resampling-CFG settings per model (T_pi, T_sigma proposal temps; s_c, s_u
# candidates; T_pi_v, T_sigma_v evaluation temps; T_s resampling temperature; w guidance scale).
SAMPLING = {
    "1.1B/16":
        dict(t_pi=1.0, t_sigma=0.9, s_c=5, s_u=5, t_pi_v=0.2, t_sigma_v=0.9, t_s=1.1, cfg=2.5),
    "1.1B/8":
        dict(t_pi=1.0, t_sigma=1.0, s_c=5, s_u=5, t_pi_v=0.2, t_sigma_v=0.9, t_s=1.1, cfg=2.0),
    "1.9B/16":
        dict(t_pi=1.0, t_sigma=0.9, s_c=5, s_u=5, t_pi_v=0.2, t_sigma_v=0.9, t_s=1.1, cfg=3.5),
    "1.9B/8":
        dict(t_pi=1.0, t_sigma=1.0, s_c=5, s_u=5, t_pi_v=0.1, t_sigma_v=1.0, t_s=1.1, cfg=1.5),
}


def get_config(arg=None):
  a = configlib.parse_arg(arg, model="1.1B/16", batch=256, epochs=320, data="tfds:imagenet2012",
                         data_dir="", resize="center_crop", distill=False, gpu=False, dp=1)
  if not isinstance(a.dp, int) or a.dp < 1:
    raise ValueError(f"imagenet256: dp={a.dp!r} is not a number of data-parallel groups (an "
                     "integer >= 1 that divides the device count). Fix: e.g. dp=4")
  size, _, patch = a.model.partition("/")
  if size not in MODELS or patch not in ("8", "16"):
    raise ValueError(
        f"model preset {a.model!r} unknown; use one of 1.1B/16, 1.1B/8, 1.9B/16, 1.9B/8")
  c = ml_collections.ConfigDict()
  # tfds:imagenet2012 stores the original JPEGs (sizes vary): center-cropped per image on the fly.
  # A dataset written by `farmer_jax prepare` is already 256x256 (resize=none reads it faster).
  c.data = configlib.base_data(name=a.data, data_dir=a.data_dir, image_size=256, channels=3,
                               num_classes=1000, resize=a.resize, random_flip=True,
                               read_threads=16, prefetch=4)
  c.model = configlib.base_model(
      patch_size=int(patch),
      flow_class_conditional=False,
      flow_final_norm=True,
      ar_order="alternate",
      class_repeats=64,
      dimred="farmer",
      d_informative=128,
      mixtures_informative=64,
      mixtures_redundant=200,
      scale_fn="squareplus",
      scale_floor=1e-6,
      mlp_ratio=4,
      dtype="bfloat16",
      remat=True,
      # 1.9B/8's per-layer saved activations (6 x 32 layers of (B, 1024, 768)) overflow a v5e
      # chip at batch 16 per chip (16.2 of 15.75 GiB; 7.2 with this): docs/scaling.md
      remat_blocks=a.model == "1.9B/8",
      **MODELS[size])
  c.train = configlib.base_train()
  c.train.update(batch_size=a.batch, steps=a.epochs * IMAGENET_TRAIN_IMAGES // a.batch, lr=1e-4,
                 min_lr=1e-6, warmup_steps=5000, weight_decay=0.03, noise_max=0.1, noise_min=0.005,
                 label_drop=0.1, log_every=100,
                 # a lost node or preemption costs at most 1000 steps; keep 3 + every 50k-th
                 ckpt_every=1000, ckpt_keep=3, ckpt_keep_period=50_000)
  if a.distill:   # `farmer_jax distill` (Algorithm 2): the paper's 60 extra epochs on the AF only
    c.train.update(steps=60 * IMAGENET_TRAIN_IMAGES // a.batch, warmup_steps=1000, ema_decay=0.0)
  c.eval = configlib.base_eval(batch_size=256, split="validation")
  # The redundant tokens as Algorithm 1 writes them: ONE candidate pool per image ("s, s' larger in
  # here", the size not given), every z^R_i picked from it. Our size: as many candidates per group
  # as the image has tokens (N = 256 at patch 16, 1024 at patch 8), so flat weights could give
  # every token its own candidate. redundant_pool=per_token draws a fresh pool per token instead;
  # docs/sampling.md (Redundant token) has both measured.
  c.sample = configlib.base_sample(
      per_class=4,
      seed=0,
      guidance="resampling",
      redundant_pool="shared",
      redundant_candidates=(256 // int(patch)) ** 2,
      redundant_var_scale=1.0,
      **SAMPLING[a.model])
  configlib.base_mesh(c)
  # FSDP over every device: the state of the larger presets replicated per chip does not fit
  # v5e's 15.75 GiB (docs/scaling.md); on one host (8 GPUs) this is fsdp=8. dp=N: N data-parallel
  # groups, FSDP inside each. On v5p-64 (32 chips) 1.1B/16's step read from its compiled form
  # estimates 35% MFU with FSDP over all 32 chips (XLA splits every sharded matmul into a loop of
  # 8 collective-permute windows whose partial results go through HBM), 58% with dp=4 and 60% with
  # dp=8 under XLA's defaults, 65% with dp=8 and train.xla_options='tpu' (async collectives; the
  # default) (docs/performance.md, "TPU programs, read from their compiled form")
  c.mesh = (("data", a.dp), ("fsdp", -1))
  return configlib.gpu(c) if a.gpu else c
