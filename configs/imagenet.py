"""ImageNet CGN training (the authors' imagenet/train_cgn.py with imagenet/config.py).

  # once: the pretrained parts (see README "Converters")
  python -m converters biggan biggan-deep-256-pytorch_model.bin /ckpt/biggan256
  python -m converters u2net u2net.pth /ckpt/u2net
  python -m converters vgg16 vgg16-397923af.pth /ckpt/vgg16
  python -m cgn_jax.main --config configs/imagenet.py --workdir runs/cgn_imagenet \
      --config.biggan_checkpoint=/ckpt/biggan256 --config.u2net_checkpoint=/ckpt/u2net \
      --config.vgg_checkpoint=/ckpt/vgg16

Every episode is one optimizer update over ``micro_batch_size * accum_steps`` = 4000 generated
samples (the authors: batch 1 x 4000 accumulated passes), 300 episodes. Expect the sheets in
``<workdir>/samples`` (rows: classes 15, 251, 330, 382, 385, 483, 559, 751, 938, 947, 999; columns:
premask, mask, foreground, background, composite, x_gt) to move from four copies of the BigGAN image
towards a clean object mask and class textures after a few dozen episodes; the [Re] report measured
0.5 s per batch-1 pass on a GTX 1080 Ti (~167 h for the full schedule); scripts/gpu_check_imagenet.py
times ours. ``:tiny`` (random 32-px BigGANs, U2NETP, random VGG) trains on a 2-core CPU in about two
minutes (mostly compiling) and is what the tests run: it shows the plumbing, not images.
"""

import ml_collections

from configs.common import check_variant, data_path, loop_config, tiny_log

VARIANTS = ("", "tiny")

# The authors' fixed sample-sheet classes (imagenet/train_cgn.py save_sample_sheet).
SHEET_CLASSES = (15, 251, 330, 382, 385, 483, 559, 751, 938, 947, 999)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "train_cgn_imagenet"
  c.seed = 0
  # Pretrained parts: converted Orbax dirs, or the .pth/.bin (converted once into <workdir>/converted).
  c.biggan_checkpoint = ""         # biggan-deep-256 (pytorch-pretrained-BigGAN's pytorch_model.bin)
  c.u2net_checkpoint = ""          # U2NET u2net.pth
  c.vgg_checkpoint = ""            # torchvision vgg16; "" = random features (warning)
  c.cgn_checkpoint = ""            # optional start: the authors' cgn.pth or an exported CGN dir
  c.allow_random_init = False      # True: random BigGAN/U2-Net when their checkpoints are empty
  c.u_fixed = data_path("pretrained", "imagenet", "u_fixed.npy")  # sheet noise (.npy/.pth)
  c.sheet_classes = SHEET_CLASSES
  c.num_devices = -1               # -1: every device (a 1-D 'data' mesh)

  c.model = ml_collections.ConfigDict()
  c.model.output_dim = 256         # BigGAN-deep-256 (models/cgn.py: biggan256.pth)
  c.model.channel_width = 128
  c.model.layers = ()              # () = the published layout for output_dim
  c.model.attention_layer_position = 8
  c.model.u2net_variant = "u2net"  # models/cgn.py: U2NET
  c.model.dtype = "float32"        # "bfloat16": BigGAN block convolutions in bf16 (accelerators)
  c.truncation = 1.0               # train_cgn.py --truncation default (config.py MODEL.TRUNCATION)

  c.train = ml_collections.ConfigDict()
  c.train.episodes = 300           # train_cgn.py --episodes (one episode = one optimizer update)
  c.train.micro_batch_size = 16    # global, split over devices; train_cgn.py --batch_sz is 1
  c.train.accum_steps = 250        # 16 x 250 = train_cgn.py's 1 x --batch_acc 4000
  # torch sums .grad over the 4000 batch-1 passes; we average over the effective batch and
  # multiply back, so Adam sees the authors' gradient (the scale only matters against Adam's eps).
  c.train.grad_scale = 4000.0
  c.train.lr_shape = 8e-6          # config.py LR.SHAPE
  c.train.lr_texture = 3e-5        # config.py LR.TEXTURE (the paper says 1e-5)
  c.train.lr_bg = 1e-5             # config.py LR.BG
  c.train.b1 = 0.9                 # utils Optimizers.set: Adam betas (0.9, 0.999)
  c.train.b2 = 0.999

  c.lambdas = ml_collections.ConfigDict()
  c.lambdas.l1 = 100.0             # config.py LAMBDA.L1
  c.lambdas.perc = (4.0, 4.0, 4.0, 4.0)   # LAMBDA.PERC, passed as *style* weights
  c.lambdas.binary = 300.0         # LAMBDA.BINARY
  c.lambdas.mask = 500.0           # LAMBDA.MASK
  c.lambdas.mask_interval = (0.1, 0.9)    # shared/losses.py MaskLoss interval
  c.lambdas.text = (0.0, 5.0, 5.0, 0.0)   # LAMBDA.TEXT (PercLossText style weights)
  c.lambdas.bg = 2000.0            # LAMBDA.BG

  c.texture = ml_collections.ConfigDict()  # PercLossText's constants (shared/losses.py)
  c.texture.patch_size = 15
  c.texture.sample_size = 100
  c.texture.n_up = 6
  c.texture.work_size = 128

  # Metrics (means over the micro-batches) every episode; train_cgn.py --save_iter 4000 passes =
  # a checkpoint and a sheet every episode.
  c.log = loop_config(every_steps=1, checkpoint_every=1, sample_every=1, keep_checkpoints=3)

  if variant == "tiny":
    c.allow_random_init = True
    c.model.output_dim = 32
    c.model.channel_width = 4
    # 4 -> 32 px in three upsampling blocks: each block of the four BigGANs is compiled forward
    # and backward, so one block fewer is a quarter off every tiny run's compile (CI time); the
    # published layouts' non-upsampling blocks are covered by the BigGAN parity fixtures.
    c.model.layers = ((True, 16, 8), (True, 8, 4), (True, 4, 2))
    c.model.attention_layer_position = 1
    c.model.u2net_variant = "u2netp"
    c.sheet_classes = (15, 251, 330)
    c.train.episodes = 6
    c.train.micro_batch_size = 4
    c.train.accum_steps = 2
    c.train.grad_scale = 8.0
    c.train.lr_shape = c.train.lr_texture = c.train.lr_bg = 1e-3
    c.texture.patch_size = 7
    c.texture.sample_size = 20
    c.texture.work_size = 64
    c.log.checkpoint_every = 2
    c.log.sample_every = 3
    tiny_log(c.log)
  c.lock()
  return c
