"""The paper's two classifier tables for any ensemble checkpoint (the authors' validate() of
imagenet/train_classifier.py, as its own job): one command per table.

  # shape vs texture: ImageNet val top-1/top-5 and cue-conflict shape bias per head
  python -m cgn_jax.main --config configs/imagenet_classifier_eval.py:shape_bias \
      --workdir runs/eval_in_cgn --config.checkpoint=runs/in_cgn \
      --config.data.imagenet_dir=/data/imagenet --config.data.cue_conflict_dir=/data/cue-conflict
  # Backgrounds Challenge: IN-9 original / mixed_same / mixed_rand and the BG-gap
  python -m cgn_jax.main --config configs/imagenet_classifier_eval.py:backgrounds \
      --workdir runs/eval_in_cgn --config.checkpoint=runs/in_cgn --config.data.in9_dir=/data/bg_challenge

``checkpoint`` is a training workdir (its exported ``ensemble/``, else its newest checkpoint), a
converted dir, the authors' ensemble ``.pth``, or a torchvision ResNet ``.pth`` (one head, the
paper's ResNet-50 baseline). Writes ``results.json`` and ``tables.md`` (ours beside the paper's:
IN+CGN shape head 54.8 / texture head 16.7 / background head 22.9 % shape bias, top-1 74.0; IN-9
94.2, Mixed-Same 83.4, Mixed-Rand 80.1, BG-gap 3.3). ``:tiny_shape_bias`` / ``:tiny_backgrounds``
run a random width-8 ensemble on synthetic folders in seconds (the plumbing, not the numbers).
``:ood`` evaluates Re-CGN's ImageNet-A (argmax over its 200 classes) and ImageNet-Sketch (top-1)
from ``data.imagenet_a_dir`` / ``data.sketch_dir``.
"""

import ml_collections

from configs.common import check_variant
from configs.imagenet_classifier import data_config, eval_config, make_tiny, model_config

TABLES = {"shape_bias": ("imagenet", "shape_bias"), "backgrounds": ("backgrounds",),
          "ood": ("imagenet_a", "sketch"),  # Re-CGN's out-of-distribution sets
          "all": ("imagenet", "shape_bias", "backgrounds")}
VARIANTS = ("", "default", *TABLES, "tiny", *(f"tiny_{t}" for t in TABLES))


def get_config(variant: str = "all") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "evaluate_classifier_imagenet"
  c.seed = 0
  c.num_devices = -1
  c.checkpoint = ""                # see the docstring
  c.family = ""                    # "" = what the checkpoint says; "resnet50" for a torchvision .pth
  c.allow_random_init = False      # an empty checkpoint evaluates a random model (plumbing only)
  c.model = model_config()         # used for a training workdir without an export, or random init
  c.data = data_config()
  c.eval = eval_config()
  c.eval.batch_size = 64           # global, split over devices and hosts
  c.log = ml_collections.ConfigDict()
  c.log.progress_bar = True
  tiny = variant.startswith("tiny")
  table = variant[len("tiny_"):] if variant.startswith("tiny_") else ("all" if tiny else variant)
  if table in ("", "default"):
    table = "all"
  c.sets = TABLES[table]
  if tiny:
    c.allow_random_init = True
    make_tiny(c)
  c.lock()
  return c
