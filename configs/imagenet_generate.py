"""Counterfactual ImageNet data from a CGN (the authors' imagenet/generate_data.py), batched.

  # a dataset; the authors' README: --mode random --n_data 100 --truncation 0.5 --run_name RUN_NAME
  python -m cgn_jax.main --config configs/imagenet_generate.py --workdir runs/imagenet_cfs \
      --config.checkpoint=imagenet/weights/cgn.pth --config.run_name=train \
      --config.n_data=100 --config.truncation=0.5
  # an interpolation sheet; the README's barn (425) -> whale (147)
  python -m cgn_jax.main --config configs/imagenet_generate.py --workdir runs/imagenet_cfs \
      --config.checkpoint=imagenet/weights/cgn.pth --config.run_name=barn_to_whale \
      --config.mode=fixed_classes --config.classes='(425, 425, 425)' --config.interp=all \
      --config.interp_cls=147 --config.truncation=0.3 --config.n_data=1

The dataset lands in ``<workdir>/<run_name>/``: ``ims/<run_name>_<i:07d>_x_gen.jpg``, ``labels.csv``
(``idx,im_name,shape_cls,texture_cls,bg_cls``; the authors' loader reads it with
``read_csv(index_col=0)``) and ``manifest.json``, and beside it ``<run_name>_preview.png`` (its
first 16 images); rerunning the same command completes an interrupted run (killed at any point: the
same files as an uninterrupted one), a larger ``n_data`` extends it with the same first images, and
other settings or other checkpoint bytes under the same path are refused. ``checkpoint`` is the
authors' ``cgn.pth`` (converted once per content into ``<workdir>/converted/<sha256[:16]>``) or a
CGN exported by the training job (``<train workdir>/cgn``); it brings its own architecture. With the
authors' weights expect their counterfactuals (shape of one class, texture of another, background of
a third); a sheet shows ``x_gen`` (and, for ``interp`` shape/text/bg, that mechanism's output) over
``midpoints + 2`` columns. ``:tiny`` (random weights of configs/imagenet.py:tiny's 32-px
architecture) writes 10 images in about a minute on a busy 2-core CPU, nearly all of it compilation
(a rerun finds them complete and returns in seconds): it shows the plumbing, not images.
"""

import ml_collections

from configs import imagenet
from configs.common import check_variant

VARIANTS = ("", "tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  train = imagenet.get_config("tiny" if variant == "tiny" else "")
  c = ml_collections.ConfigDict()
  c.job = "generate_imagenet"
  c.checkpoint = ""                # --weights_path: cgn.pth, a converted dir or <train workdir>/cgn
  c.allow_random_init = False      # True: random weights of `model` when checkpoint is empty
  c.run_name = "train"             # --run_name (README: one run 'train', one 'val')
  c.mode = "random"                # --mode: random | best_classes | fixed_classes
  c.classes = (0, 0, 0)            # --classes (shape, texture, bg) for fixed_classes; default [0, 0, 0]
  c.n_data = 100                   # --n_data (required there; the README's example uses 100)
  c.truncation = 1.0               # --truncation default 1.0 (README examples: 0.5, sheets 0.3)
  c.seed = 0                       # image i draws from fold_in(key(seed), i)
  # Global images per forward pass, split over the devices. --batch_sz is 1 there because a
  # larger batch was saved as one grid image; here every image gets its own file.
  c.batch_size = 16
  c.num_devices = -1               # -1: every device (a 1-D 'data' mesh)
  c.normalize = "minmax"           # save_image(normalize=True): per-image min-max; "fixed": [-1, 1]
  c.jpeg_quality = 75              # PIL's default, hence torchvision save_image's
  c.num_writers = 8                # threads encoding/writing JPEGs
  c.save_npy = False               # debug: also <name>_x_gen.npy, the float32 model output
  c.progress_bar = True
  # Interpolation sheets instead of a dataset (--interp '' | all | shape | text | bg).
  c.interp = ""
  c.midpoints = 6                  # --midpoints default 6: 8 columns
  c.interp_cls = -1                # --interp_cls default -1: a random target class per sheet
  c.u_fixed = train.u_fixed        # the authors' imagenet/data/u_fixed.pth (as .npy or .pth)
  # Architecture for random weights only (a checkpoint brings its own); the training job's fields.
  c.model = ml_collections.ConfigDict(train.model.to_dict())
  if variant == "tiny":
    c.allow_random_init = True
    c.run_name = "tiny"
    c.n_data = 10
    c.batch_size = 4
    c.midpoints = 2
    c.num_writers = 2
    c.progress_bar = False

  c.lock()
  return c
