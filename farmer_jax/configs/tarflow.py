"""TARFlow (apple/ml-tarflow) models in farmer_jax: the AF with an N(0, I) prior
(``model.prior='standard_normal'``) and TARFlow's pixel mapping 2v/255 - 1 (``model.pixels``).

  # a converted public checkpoint (the architecture is read off the file; this config adds the data)
  farmer_jax convert --from=tarflow --ckpt=afhq_model_8_768_8_8_0.07.pth --out=/tmp/afhq \\
      --config=tarflow:afhq256 --config.data.name=tfds:afhq
  # or train one here (the README of apple/ml-tarflow lists these runs)
  farmer_jax train --config=tarflow:imagenet64 --config.data.name=tfds:NAME --workdir=R

Presets (TARFlow's README table: image, patch, width, blocks x layers, noise sigma, classes):
afhq256 (256, 8, 768, 8x8, 0.07, 3), imagenet64 (64, 2, 768, 8x8, 0.05, 1000),
imagenet64_uncond (same, 0 classes), imagenet128 (128, 4, 1024, 8x8, 0.15, 1000), and tiny
(MNIST-5k 32x32x1, patch 4, width 64, 2x1: what the tests train). ``data.name`` is empty for the
presets without bundled data: set it to your dataset.
"""

from farmer_jax.interop.convert import tarflow_run_config

PRESETS = {
    # name: (img_size, patch_size, channels (width), blocks, layers, noise_std, classes, in_ch)
    "afhq256": (256, 8, 768, 8, 8, 0.07, 3, 3),
    "imagenet64": (64, 2, 768, 8, 8, 0.05, 1000, 3),
    "imagenet64_uncond": (64, 2, 768, 8, 8, 0.05, 0, 3),
    "imagenet128": (128, 4, 1024, 8, 8, 0.15, 1000, 3),
    "tiny": (32, 4, 64, 2, 1, 0.05, 10, 1),
}


def get_config(arg="afhq256"):
  if arg not in PRESETS:
    raise ValueError(f"unknown TARFlow preset {arg!r}; use one of {sorted(PRESETS)}")
  img, patch, width, blocks, layers, noise, classes, in_ch = PRESETS[arg]
  hp = dict(in_channels=in_ch, img_size=img, patch_size=patch, channels=width, num_blocks=blocks,
            layers_per_block=layers, num_classes=classes, nvp=True)
  # TARFlow's self-denoising of samples at the training noise is in c.sample.denoise_sigma
  c = tarflow_run_config(hp, noise_std=noise, data_name="mnist5k" if arg == "tiny" else "")
  if arg == "tiny":   # a CPU model: unrolled AF, einsum attention (benchmarks/vs_torch.py)
    c.model.update(unroll=True, attention="einsum")
    c.train.update(steps=100, batch_size=32, lr=1e-3, warmup_steps=10, log_every=50)
    c.eval.update(batch_size=100)
    c.sample.update(per_class=2)
  return c
