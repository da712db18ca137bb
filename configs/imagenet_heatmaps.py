"""Evidence heatmaps of the invariant ensemble's heads: occlusion and integrated gradients.

  # a trained ensemble (train_classifier_imagenet's workdir, a converted dir or the authors' .pth)
  python -m cgn_jax.main --config configs/imagenet_heatmaps.py --workdir runs/heatmaps_in_cgn \
      --config.checkpoint=runs/in_cgn --config.images=/data/imagenet/val --config.num_images=8

explains the shape, texture and background heads and their average (``avg_preds``) on the first 8
images under ``images`` (recursively, sorted; WNID or integer class folders give the target, else
each head's top-1): ``heatmaps.png`` (rows: images; columns: the image, then per head its occlusion
and its integrated-gradients overlay), ``heatmaps.npz`` and ``results.json`` in the workdir, and a
table on stdout. Expect, from the paper's design (no trained ensemble has been run through this
here): the shape head's evidence on the object's outline, the texture head's on its surface, the
background head's around it. Cost per 224-px image: 169 occlusion forwards and 33 points of
integrated gradients (one forward, a backward per head) of a ResNet-50; measured with random
weights on one core of this project's 2-core CPU: 118 s (occlusion 35 s, integrated gradients
85 s) after ~30 s of compiling; not yet timed on a GPU. The random ResNet-50's completeness error
at 32 steps was 9-16% (results.json ``ig_completeness_error``; raise ``ig.steps`` if it is large).
``:tiny`` runs a random width-8 ensemble on 32-px crops (the plumbing, not the evidence; tests).

Not an experiment of the paper (the authors show no heatmaps of the ensemble); the defaults are
ours, as the comments say. The model's fields are configs/imagenet_classifier.py's.
"""

import ml_collections

from configs.common import check_variant, data_path
from configs.imagenet_classifier import model_config

VARIANTS = ("", "tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "explain_ensemble"
  c.seed = 0                       # the random initialisation only (allow_random_init)
  # A train_classifier_imagenet workdir (its ensemble/ export, else its newest checkpoint), a
  # converted dir, the authors' ensemble .pth or a torchvision ResNet .pth (family=resnet50,
  # heads=('logits',)), as configs/imagenet_classifier_eval.py.
  c.checkpoint = ""
  c.family = ""
  c.allow_random_init = False      # an empty checkpoint explains a random ensemble (plumbing only)
  c.model = model_config()         # a training workdir without an export, or random init
  c.data = ml_collections.ConfigDict()
  c.data.image_size = 224          # CenterCrop(224) after Resize(256): the authors' evaluation
  c.data.resize = 256              # transform (imagenet/dataloader.py), imagenet.EvalTransform
  c.data.eval_dir = data_path("eval")  # imagenet_class_index.json: WNID folders and class names
  c.images = ""                    # a folder of .png/.jpg images, searched recursively
  c.num_images = 8                 # the first N in sorted path order
  c.batch_size = 4                 # images per compiled call (the last batch is padded)
  # resnet.OUTPUT_KEYS: the three heads and their mean (the ensemble's prediction).
  c.heads = ("shape_preds", "texture_preds", "bg_preds", "avg_preds")
  c.target = "folder"              # "folder": the class folder's class if any, else the top-1
  c.score = "log_prob"             # why not the probability: cgn_jax/evaluation/heatmaps.py
  # The image that stands for "no evidence", in the occlusion patches and as the integrated
  # gradients' start: "mean" (the ImageNet mean colour, 0 after Normalize) or "black".
  c.baseline = "mean"
  c.occlusion = ml_collections.ConfigDict()
  c.occlusion.patch = 32           # ~1/7 of the 224-px side: an object part
  c.occlusion.stride = 16          # 13 x 13 = 169 positions per image
  c.occlusion.chunk = 13           # positions per forward pass (x batch_size images)
  c.ig = ml_collections.ConfigDict()
  c.ig.steps = 32
  c.ig.rule = "trapezoid"          # error O(1/steps^2); see results' ig_completeness_error
  c.ig.chunk = 11                  # path points per pass: 33 = 3 passes (x batch_size images)
  c.sheet = ml_collections.ConfigDict()
  c.sheet.num_images = 8           # rows of heatmaps.png
  c.sheet.scale = 1
  if variant == "tiny":
    c.allow_random_init = True
    c.model.blocks = (1, 1, 1, 1)  # configs/imagenet_classifier.py make_tiny's ensemble
    c.model.width = 8
    c.data.image_size = 32
    c.data.resize = 36
    c.num_images = 3
    c.batch_size = 2               # a padded last batch
    c.heads = ("shape_preds", "texture_preds", "bg_preds", "avg_preds")
    c.occlusion.patch = 16         # 2 x 2 positions, each pixel under one patch
    c.occlusion.stride = 16
    c.occlusion.chunk = 0
    c.ig.steps = 4
    c.ig.chunk = 0
    c.sheet.num_images = 3
  c.lock()
  return c
