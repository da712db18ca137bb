"""The invariant classifier ensemble on ImageNet + counterfactual ImageNet (the authors'
imagenet/train_classifier.py, run as their README says: ``-a resnet50 -b 32 --lr 0.001 --epochs 45
--pretrained --cf_data CF_DATA_PATH``).

  # torchvision's ImageNet ResNet-50 (resnet50-0676ba61.pth or -19c8e357.pth), converted once
  python -m converters resnet50 resnet50-0676ba61.pth /ckpt/resnet50
  python -m cgn_jax.main --config configs/imagenet_classifier.py --workdir runs/in_cgn \
      --config.data.imagenet_dir=/data/imagenet --config.data.cf_dir=runs/cf_imagenet \
      --config.data.cue_conflict_dir=/data/cue-conflict --config.data.in9_dir=/data/bg_challenge \
      --config.pretrained=/ckpt/resnet50

Per step: a real batch with cross-entropy on ``avg`` (the mean of the three heads' logits) plus a
counterfactual batch of ``cf_ratio * batch_size`` with each head's cross-entropy on its own label,
gradients summed, one SGD step. After every epoch: ImageNet val top-1/top-5 per head, shape bias per
head on cue-conflict and IN-9 (whichever folders are given), in ``results.json``. Expect the paper's
shape-bias table (IN+CGN heads: shape 54.8 / texture 16.7 / background 22.9 % shape bias, ImageNet
top-1 74.0) and Backgrounds table (IN-9 94.2, Mixed-Same 83.4, Mixed-Rand 80.1, BG-gap 3.3) after 45
epochs. Variants: ``:baseline`` (ImageNet only, the paper's IN row), ``:tiny`` and
``:tiny_baseline`` (synthetic folders, a width-8 ResNet, a minute on a CPU: the plumbing, not the
numbers).
"""

import ml_collections

from configs.common import check_variant, data_path, loop_config, tiny_log

VARIANTS = ("", "default", "cgn", "baseline", "tiny", "tiny_baseline")


def model_config() -> ml_collections.ConfigDict:
  """The ensemble's architecture (also read by configs/imagenet_classifier_eval.py)."""
  c = ml_collections.ConfigDict()
  c.blocks = (3, 4, 6, 3)    # -a resnet50 (torchvision Bottleneck counts)
  c.width = 64
  c.num_classes = 1000
  c.dtype = "float32"        # "bfloat16": compute in bf16 (accelerators); params stay f32
  return c


def data_config() -> ml_collections.ConfigDict:
  """Where the training and evaluation images are, and how they are cropped."""
  c = ml_collections.ConfigDict()
  c.imagenet_dir = ""         # ImageFolder root with train/ and val/ (dataloader.py: data/imagenet)
  c.cf_dir = ""               # the generation job's folder (ims/ + labels.csv); "" = baseline
  c.cue_conflict_dir = ""     # Geirhos' style-transfer stimuli (1280 images), per-epoch shape bias
  c.in9_dir = ""              # Backgrounds Challenge root (original/, mixed_same/, mixed_rand/ ...)
  c.imagenet_a_dir = ""       # optional OOD (Re-CGN): ImageNet-A, 200 WNID folders
  c.sketch_dir = ""           # optional OOD (Re-CGN): ImageNet-Sketch, 1000 WNID folders
  c.eval_dir = data_path("eval")  # the 16-class and IN-9 mappings
  c.image_size = 224          # RandomResizedCrop(224) / CenterCrop(224) (dataloader.py)
  c.resize = 256              # Resize(256) before the eval centre crop
  # Decoding runs on one thread per core (their -j 6 worker processes; PIL releases the GIL).
  c.synthetic = False         # tiny variants: build small synthetic folders in <workdir>/data
  return c


def eval_config() -> ml_collections.ConfigDict:
  """The paper's classifier evaluations (cgn_jax/evaluation/classifier_eval.py)."""
  c = ml_collections.ConfigDict()
  c.every_epochs = 1          # validate() after every epoch (and before training, in theirs)
  c.batch_size = 64
  c.in9_normalization = "in9"  # "in9": the authors' IN-9 statistics; "imagenet": the challenge's
  c.in9_as_is = True          # IN-9's 224x224 images fed as they are (dataloader.py Imagenet9)
  c.in9_variants = ("original", "mixed_same", "mixed_rand")  # the table's columns
  c.model_name = "IN+CGN"     # the tables' row name
  c.max_images = -1           # >0: the first N images of each evaluation set (quick looks)
  return c


def make_tiny(c: ml_collections.ConfigDict) -> None:
  """The ``:tiny`` model and data of the training and evaluation configs: a width-8 [1,1,1,1]
  ResNet on 32-px crops of synthetic folders."""
  c.data.synthetic = True
  c.model.blocks = (1, 1, 1, 1)
  c.model.width = 8
  c.data.image_size = 32
  c.data.resize = 36
  c.eval.batch_size = 16
  c.eval.in9_as_is = False       # the synthetic images are not 224x224
  tiny_log(c.log)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "train_classifier_imagenet"
  c.seed = 0                       # train_classifier.py --seed (default None: unseeded)
  c.num_devices = -1               # -1: every device (a 1-D 'data' mesh over all hosts)
  # train_classifier.py --pretrained: torchvision's ImageNet ResNet-50 as the backbone (its .pth
  # or a converted dir); the three heads are fresh in any case (classifier_ensemble.py get_head).
  c.pretrained = ""
  c.init_checkpoint = ""           # optional start: an ensemble (converted dir or the authors' .pth)

  c.model = model_config()
  c.data = data_config()

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32          # -b 32 (README, one GPU); global, split over devices and hosts
  c.train.cf_ratio = 1.0           # --cf_ratio default: cf batch = int(cf_ratio * batch_size)
  c.train.epochs = 45              # --epochs 45
  c.train.lr = 1e-3                # --lr 0.001 (README; the argparse default is 0.1)
  c.train.lr_decay_every = 15      # adjust_learning_rate: x0.1 every 15 epochs (docstring says 30)
  c.train.momentum = 0.9           # --momentum
  c.train.weight_decay = 1e-4      # --wd (torch SGD: added to every gradient, BN and biases too)
  c.train.steps_per_epoch = -1     # -1: len(ImageNet train) // batch_size (drop_last)

  c.eval = eval_config()

  # print_freq 10 steps; a checkpoint after every epoch (save_checkpoint), two kept.
  c.log = loop_config(every_steps=10, checkpoint_every=0)
  c.log.checkpoint_every_epochs = 1

  if variant in ("", "default", "cgn"):
    pass
  elif variant == "baseline":      # the paper's ImageNet-only row: same recipe, no counterfactuals
    c.train.cf_ratio = 0.0
    c.eval.model_name = "IN"
  elif variant in ("tiny", "tiny_baseline"):
    make_tiny(c)
    c.train.batch_size = 8
    c.train.epochs = 2
    c.train.steps_per_epoch = 3
    c.train.lr = 0.05
    c.train.lr_decay_every = 1
    c.train.cf_ratio = 0.0 if variant == "tiny_baseline" else 1.0
    c.eval.model_name = "IN" if variant == "tiny_baseline" else "IN+CGN"
    c.log.every_steps = 3
  c.lock()
  return c
