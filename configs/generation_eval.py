"""Inception Score, FID and mask statistics of generated images (job ``evaluate_generation``).

  # a folder of images (any size), FID against a folder of real images, whose statistics are kept
  python -m cgn_jax.main --config configs/generation_eval.py --workdir runs/eval_folder \
      --config.path=samples/ --config.inception_checkpoint=pt_inception-2015-12-05-6726825d.pth \
      --config.fid_reference=/data/imagenet/val --config.save_reference_stats=runs/in_val_stats.npz
  # an ImageNet CGN (the authors' cgn.pth, an exported dir or a train_cgn_imagenet workdir),
  # sampled on the fly; Re-CGN's protocol: 2000 images, truncation 0.5, 2 splits
  python -m cgn_jax.main --config configs/generation_eval.py --workdir runs/eval_cgn \
      --config.source=cgn --config.path=imagenet/weights/cgn.pth --config.num_images=2000 \
      --config.splits=2 --config.inception_checkpoint=pt_inception-2015-12-05-6726825d.pth

Weights (download once; nothing here downloads): pytorch-fid's FID Inception
``https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth``
(``network=fid``, the default: the graph FID and TF's Inception Score were defined on), or
torchvision's ImageNet Inception-v3
``https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth`` (``network=torchvision``,
the network of sbarratt's IS code that Re-CGN used). Either file is converted once into
``<workdir>/converted`` (or convert it yourself: ``python -m converters inception_v3_fid SRC DST``).

Writes ``<workdir>/generation_metrics.json``: ``inception_score`` {mean, std, splits, num_images,
network, preprocessing}, ``fid`` (null without ``fid_reference``), ``mask`` {mean, std,
frac_empty, frac_full, empty_below, full_above} (null for sources without masks) and ``source``.
The paper's Table 1 (its own IS code is unpublished): BigGAN 202.9, the full CGN 130.2 with
mu_mask 0.3. The FID network runs ~2 images per second per CPU core (8 images: 3.6 CPU-s).
``:tiny`` evaluates a folder in batches of 4 with 2 splits (tests: the random-weight fixture, so
the numbers mean nothing); ``:recgn`` is Re-CGN's experiments/inception_score.py exactly, including
``transform_input=True`` on [-1, 1] inputs (their inception_v3(pretrained=True) sets it), to
compare with their numbers — not a correct IS.
"""

import ml_collections

from configs.common import check_variant

VARIANTS = ("", "tiny", "recgn")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "evaluate_generation"
  c.source = "folder"              # folder | dataset (generate_imagenet run dir) | cgn
  c.path = ""                      # the folder, the run dir, or the CGN checkpoint / train workdir
  # Salimans et al. 2016 (improved-gan inception_score.py): 50k images, 10 splits. A folder or
  # dataset uses its first num_images images (sorted), -1 = all; a CGN needs a count.
  c.num_images = 50_000
  c.splits = 10
  c.batch_size = 100               # global, split over every device (and host)
  c.num_devices = -1               # -1: every device (a 1-D 'data' mesh)
  c.num_loaders = 8                # threads decoding and resizing image files
  # source=cgn: image i from fold_in(key(seed), i), as generate_imagenet.
  c.seed = 0
  c.truncation = 0.5               # [Re] experiments/inception_score.py (the paper does not say)
  c.mode = "random_same"           # [Re] inception_score.py: one random class for all mechanisms
  c.normalize = "minmax"           # generate_data.py save_image(normalize=True); "fixed": [-1, 1]
  c.network = "fid"                # fid (pytorch-fid's TF graph) | torchvision
  c.inception_checkpoint = ""      # see the docstring
  c.transform_input = False        # torchvision only; True = Re-CGN's (wrong) input remapping
  c.fid_reference = ""             # "" = no FID; a folder of real images, or a .npz (mu, sigma)
  c.save_reference_stats = ""      # with a reference folder: also write its stats .npz here
  c.mask_empty_below = 0.1         # shared/losses.py MaskLoss interval [0.1, 0.9]
  c.mask_full_above = 0.9
  c.progress_bar = True
  if variant == "tiny":
    c.num_images = -1
    c.splits = 2
    c.batch_size = 4
    c.num_loaders = 2
    c.progress_bar = False
  if variant == "recgn":           # [Re] experiments/inception_score.py + inception_score_pytorch
    c.source = "cgn"
    c.num_images = 2000            # generate_images: n_data 2000
    c.splits = 2                   # inception_score(images, splits=2, resize=True)
    c.batch_size = 32              # inception_score's default batch_size
    c.network = "torchvision"      # torchvision inception_v3(pretrained=True), 1000 classes
    c.transform_input = True
  c.lock()
  return c
