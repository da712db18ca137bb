"""Evidence heatmaps of the MNIST CNNs, and the IoU of each with the digit's mask (Re-CGN's check).

  python -m cgn_jax.main --config configs/quickstart.py --workdir /tmp/cgn_quickstart
  python -m cgn_jax.main --config configs/mnist_heatmaps.py --workdir /tmp/cgn_heatmaps \
      --config.pipeline_dir=/tmp/cgn_quickstart

explains the quickstart's two Double-colored MNIST classifiers (trained on real data and on
counterfactuals) on the first 500 test images: occlusion sensitivity and integrated gradients,
``heatmaps.png``, ``heatmaps.npz`` and ``results.json`` in the workdir. Any ``train_classifier``
workdirs work too (``--config.classifiers.real=DIR --config.classifiers.counterfactual=DIR``).
Measured on one shared core of this project's CPU: 7 min 45 s. IoU with the digit mask (top
|mask| pixels, chance 0.068), counterfactual vs real CNN: integrated gradients 0.208 vs 0.171
(|heat|), 0.197 vs 0.102 (positive heat); occlusion the other way, 0.064 vs 0.252 and 0.066 vs
0.125 (README "Evidence heatmaps" says why).
``:tiny`` runs every step on 6 images with small settings (tests).

Not an experiment of the paper: Re-CGN (Bagad et al. 2022; their experiments/gradcam_utils.py)
report the IoU of Grad-CAM maps (torchmetrics' JaccardIndex, i.e. the min-max-scaled map > 0.5)
with the MNIST digit > 0.5; our defaults differ as the comments say.
"""

import ml_collections

from configs.common import DATA_DIR, check_variant

VARIANTS = ("", "tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "explain_classifier"
  # train_classifier workdirs (newest checkpoint), converted dirs or the authors' .pth; "" =
  # <pipeline_dir>/classifier_<name>, or skipped without a pipeline_dir.
  c.classifiers = ml_collections.ConfigDict({"real": "", "counterfactual": ""})
  c.pipeline_dir = ""                  # a quickstart workdir (configs/quickstart.py)
  c.dataset = "double_colored_MNIST"   # the quickstart's
  c.data_dir = DATA_DIR                # raw MNIST: the digit masks (and the variant if not built)
  c.dataset_dir = ""                   # built variant; "" = the pipeline's, else <workdir>/data/...
  c.dataset_limit = -1                 # for building the variant here only
  c.data_seed = 0
  c.split = "test"                     # the variant's unbiased split (colours independent of digit)
  c.num_images = 500                   # the first N of the split (Re-CGN: the whole test split)
  c.batch_size = 50
  # The class explained: "predicted" shows the evidence for the decision the CNN took (Re-CGN's
  # Grad-CAM default); "label" the evidence for the true digit.
  c.target = "predicted"
  c.score = "log_prob"                 # why not the probability: cgn_jax/evaluation/heatmaps.py
  # Re-CGN binarise the MNIST digit at > 0.5 of [0, 1] (>= 128); ours > 128: the same pixels but
  # for the grey level 128 itself.
  c.foreground_threshold = 128
  # 0: the heatmap's top |mask| pixels per image (no scale threshold); > 0: that share of pixels.
  c.iou_fraction = 0.0
  c.occlusion = ml_collections.ConfigDict()
  c.occlusion.patch = 4                # a stroke is 2-4 px wide at 32 x 32
  c.occlusion.stride = 2               # 15 x 15 = 225 positions per image
  c.occlusion.baseline = 0.0           # mid-grey in [-1, 1]: no digit, no background colour
  c.occlusion.chunk = 25               # positions per forward pass (x batch_size images)
  c.ig = ml_collections.ConfigDict()
  c.ig.steps = 32
  c.ig.rule = "trapezoid"              # error O(1/steps^2); see results' ig_completeness_error
  c.ig.baseline = 0.0                  # the same mid-grey image as the occlusion patch
  c.ig.chunk = 11                      # path points per pass: 33 = 3 passes
  c.sheet = ml_collections.ConfigDict()
  c.sheet.num_images = 8               # rows of heatmaps.png
  c.sheet.scale = 3
  if variant == "tiny":
    c.dataset_limit = 64
    c.num_images = 6
    c.batch_size = 4                   # a padded last batch
    c.occlusion.patch = 8
    c.occlusion.stride = 8
    c.occlusion.chunk = 8
    c.ig.steps = 4
    c.ig.chunk = 0
    c.sheet.num_images = 3
    c.sheet.scale = 1
  c.lock()
  return c
