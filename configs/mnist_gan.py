"""The class-conditional GAN baseline of the MNIST table ([Re]'s mnists/train_gan.py).

  python -m cgn_jax.main --config configs/mnist_gan.py:wildlife_MNIST --workdir runs/gan_wildlife \
      --config.train.num_steps=2000
  python -m cgn_jax.main --config configs/mnist_generate.py --workdir runs/gan_wildlife \
      --config.dataset=wildlife_MNIST --config.checkpoint=runs/gan_wildlife/generator \
      --config.dataset_size=10000 --config.no_cfs=10

trains the GAN (cgn_jax/models/mnist_gan.py) on the real, biased training split and exports
``<workdir>/generator``; the generation job then writes ``<workdir>/wildlife_MNIST_gan``, which the
classifier reads as ``--config.cf_dataset_dir``. A GAN imitates the training data, colour bias
included, so a CNN trained on its samples stays near the "Original" row (paper Table 2 "GAN" test
accuracy: 40.7 / 10.8 / 10.4 %). [Re]'s runs: batch 16, their kept checkpoints at step 50,000
(colored) and 40,000 (double-colored, wildlife), the defaults here. Measured on this project's
2-core CPU shared at load ~7: 0.73 steps/s, ~0.2 s of CPU per step, so [Re]'s 40,000 steps are
~15 h there; the MNIST table's GAN row here was trained 634 steps (README).

Variants: ``:colored_MNIST``, ``:double_colored_MNIST``, ``:wildlife_MNIST`` (``""`` is
double-colored) and ``:tiny`` (a few steps on 256 images, small nets; tests).
"""

import ml_collections

from configs.common import DATA_DIR, check_variant, loop_config, tiny_log

DATASETS = ("colored_MNIST", "double_colored_MNIST", "wildlife_MNIST")
VARIANTS = ("", "tiny") + DATASETS
# The step of [Re]'s kept checkpoint (mnists/experiments/gan_<ds>/details.json, "ckp_<step>.pth").
RE_STEPS = {"colored_MNIST": 50000, "double_colored_MNIST": 40000, "wildlife_MNIST": 40000}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "train_gan_mnist"
  c.dataset = variant if variant in DATASETS else "double_colored_MNIST"  # cfg TRAIN.DATASET
  c.data_dir = DATA_DIR
  c.dataset_dir = ""                       # built variant; default <workdir>/data/<dataset>
  c.dataset_limit = -1                     # >0: first N images per split (tests)
  c.data_seed = 0
  c.seed = 0
  c.num_devices = -1

  c.model = ml_collections.ConfigDict()
  c.model.n_classes = 10                   # cfg MODEL.N_CLASSES
  c.model.latent_sz = 32                   # cfg MODEL.LATENT_SZ
  c.model.ngf = 28                         # GenConv has MODEL.NGF 32; 28 = the CGN's capacity
  c.model.ndf = 512                        # cfg MODEL.NDF, DiscLin (cfg MODEL.DISC: linear)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16                  # train_gan.py --batch_size
  c.train.num_steps = RE_STEPS[c.dataset]  # [Re]'s kept checkpoint; <= 0: epochs
  c.train.epochs = 15                      # train_gan.py --epochs (used when num_steps <= 0)
  c.train.lr = 2e-4                        # cfg LR.LR
  c.train.betas = (0.5, 0.999)             # cfg LR.BETAS
  c.train.loss = "bce"                     # train_gan.py: BCEWithLogitsLoss (MSE commented out)

  # train_gan.py --save_iter 10000 (samples and weights).
  c.log = loop_config(every_steps=500, checkpoint_every=10000, sample_every=10000)
  if variant == "tiny":
    c.dataset_limit = 256
    c.model.ngf = 4
    c.model.ndf = 32
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.log.every_steps = 2
    c.log.checkpoint_every = 3
    c.log.sample_every = 6
    tiny_log(c.log)
  c.lock()
  return c
