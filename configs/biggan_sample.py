"""Class-conditional samples of BigGAN-deep (the generator inside the ImageNet CGN).

  python -m converters biggan biggan-deep-256/pytorch_model.bin /tmp/biggan256   # once
  python -m cgn_jax.main --config configs/biggan_sample.py --config.checkpoint=/tmp/biggan256 \
      --workdir /tmp/biggan_samples

writes ``samples/biggan_samples.png``: one row per class of ``classes``, ``n_per_class`` columns, at
``truncation``. ``checkpoint`` may also be the ``.pth``/``.bin`` itself (converted on first use into
``<workdir>/converted``). With the published weights expect recognisable ImageNet classes (golden
retriever, volcano, ...), sharper and less varied at lower truncation. About 80 s for the 16 default
images on a 2-core CPU (25 s compilation, then ~3.4 s per image); seconds on a GPU. An empty
checkpoint gives random weights of ``model.*`` (noise images; used to test the plumbing).
Variants: ``:tiny`` (random weights, width 4, 128 px; seconds; used by tests).
"""

import ml_collections

from configs.common import check_variant

VARIANTS = ("default", "tiny")


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "sample_biggan"
  c.checkpoint = ""                # converted Orbax dir or the .pth/.bin; "" = random weights
  c.classes = (207, 980, 972, 1)   # golden retriever, volcano, cliff, goldfish
  c.truncation = 0.4               # (0, 1]; the ImageNet CGN samples at 0.5 (imagenet/config.py)
  c.seed = 0
  c.n_per_class = 4
  c.batch_size = 8                 # images per forward pass
  c.dtype = "float32"              # "bfloat16" for accelerators
  c.sheet_name = "biggan_samples.png"
  # Used only without a checkpoint (random weights); a checkpoint brings its own architecture.
  # Defaults: the authors' BigGANConfig() (imagenet/models/biggan.py), i.e. biggan-deep-256.
  c.model = ml_collections.ConfigDict(dict(output_dim=256, channel_width=128))
  if variant == "tiny":
    c.classes = (1, 207, 980)
    c.n_per_class = 2
    c.batch_size = 6
    c.model.output_dim = 128
    c.model.channel_width = 4
  c.lock()
  return c
