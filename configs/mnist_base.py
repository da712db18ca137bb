"""Shared builder of the MNIST CGN configs; each dataset file states only what differs.

Fields mirror the authors' experiment cfg.yaml (mnists/experiments/cgn_<ds>/cfg.yaml, shipped in
shared/data/pretrained/mnist_cgn/) field by field; comments name the yaml key.
"""

from __future__ import annotations

import os

import ml_collections

from configs.common import DATA_DIR, check_variant, loop_config, tiny_log

VARIANTS = ("", "default", "re", "tiny")


def cgn_config(dataset: str, mask: float, perc: list[float], init_type: str, init_gain: float,
               disc: str, ndf: int, variant: str) -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "train_cgn_mnist"
  c.dataset = dataset                      # TRAIN.DATASET
  c.data_dir = DATA_DIR                    # raw MNIST (mnist/*.gz), textures/, colors/
  c.dataset_dir = ""                       # built variant; default <workdir>/data/<dataset>
  c.dataset_limit = -1                     # >0: first N images per split (tests)
  c.data_seed = 0
  c.seed = 0
  c.num_devices = -1                       # first N local devices; -1 = all
  c.vgg_checkpoint = os.environ.get("CGN_VGG16", "")  # converted torchvision vgg16 (or its .pth)

  c.model = ml_collections.ConfigDict()
  c.model.n_classes = 10                   # MODEL.N_CLASSES
  c.model.latent_sz = 32                   # MODEL.LATENT_SZ
  c.model.ngf = 32                         # MODEL.NGF
  c.model.img_sz = 32
  c.model.init_type = init_type            # MODEL.INIT_TYPE
  c.model.init_gain = init_gain            # MODEL.INIT_GAIN
  c.model.disc = disc                      # MODEL.DISC
  c.model.ndf = ndf                        # MODEL.NDF

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16                  # TRAIN.BATCH_SIZE
  c.train.epochs = 15                      # TRAIN.EPOCHS
  c.train.num_steps = -1                   # >0 overrides epochs
  c.train.lr = 2e-4                        # LR.LR
  c.train.betas = (0.5, 0.999)             # LR.BETAS
  c.train.color_var = 0.02                 # TRAIN.COLOR_VAR (the Colored-MNIST recipe's jitter)

  c.lambdas = ml_collections.ConfigDict()
  c.lambdas.mask = mask                    # LAMBDAS.MASK
  c.lambdas.perc = tuple(perc)             # LAMBDAS.PERC (passed as *style* weights)
  c.lambdas.ssim = 0.0                     # [Re] extra (FACT_AI train_cgn_ssim.py); 0 = off

  c.augment = ml_collections.ConfigDict()
  c.augment.color_jitter = False           # [Re] extra (FACT_AI dataloader_augment.py), in [0,1]

  # LOG.SAVE_ITER 4000 for both the sample sheets and the checkpoints.
  c.log = loop_config(every_steps=100, checkpoint_every=4000, sample_every=4000)

  if variant in ("", "default"):
    pass
  elif variant == "re":  # the [Re] report's extras
    c.lambdas.ssim = 1.0
    c.augment.color_jitter = True
  elif variant == "tiny":  # seconds on a CPU; used by tests
    c.dataset_limit = 256
    c.model.ngf = 8
    c.model.ndf = min(ndf, 32)
    c.train.batch_size = 8
    c.train.num_steps = 12
    c.log.every_steps = 4
    c.log.sample_every = 12
    c.log.checkpoint_every = 6
    tiny_log(c.log)
  c.lock()
  return c
