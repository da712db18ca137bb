"""MNIST quickstart: CGN's point on Double-colored MNIST, and every stage of the pipeline, on a CPU.

  python -m cgn_jax.main --config configs/quickstart.py --workdir /tmp/cgn_quickstart

Draws the authors' pretrained Double-colored CGN (``samples/authors_cgn_sheet.png``), builds
Double-colored MNIST, trains a CGN for 20 steps (the training plumbing: checkpoints, metrics, sheets
in ``cgn/``; far too short to make counterfactuals, so nothing below uses it), generates 4e4
counterfactuals from the *authors'* CGN (``generate.checkpoint``, their .pth converted on first
use), trains the CNN one epoch on 1e4 real and on the 4e4 counterfactual images and prints both
test accuracies beside the paper's. Measured on this project's 2-core CPU, shared (load 3-5.5):
6 min 32 s and 6 min 59 s, 0.9 GB in the workdir; both runs printed 9.74 % trained on real data
(the CNN learns colour; the test colours are shuffled) and 67.93 % on counterfactuals. The paper
(Table 2) reports 89.0 % after 10 epochs; README "Reproducing the MNIST table" has 88.71 % from 1e5
counterfactuals, 10 epochs.
``:tiny`` runs every stage in seconds with random weights, counterfactuals from its brief CGN
(tests).
"""

import ml_collections

from configs import mnist_classifier, mnist_double_colored, mnist_generate
from configs.common import check_variant

VARIANTS = ("", "tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.job = "mnist_pipeline"
  c.cgn = mnist_double_colored.get_config("tiny" if tiny else "")
  c.generate = mnist_generate.get_config("tiny" if tiny else "")
  c.classifier = mnist_classifier.get_config("tiny" if tiny else "")
  # One dataset for every stage (``--config.cgn.dataset=wildlife_MNIST`` switches them all); the
  # counterfactuals' generator follows it: the authors' ``pretrained/mnist_cgn/<dataset>.pth``,
  # whose sheet the pipeline also draws. :tiny's "" means the CGN the pipeline trains.
  with c.generate.unlocked():
    c.generate.dataset = c.cgn.get_ref("dataset")
  with c.classifier.unlocked():
    c.classifier.dataset = c.cgn.get_ref("dataset")
    c.classifier.dataset_limit = c.cgn.get_ref("dataset_limit")
  # Overrides of ``classifier`` per training source: the real-data CNN fits its colour shortcut
  # within one short epoch, the counterfactual one needs every step the time budget allows.
  c.classifier_per_source = ml_collections.ConfigDict({"real": {}, "counterfactual": {}})
  if not tiny:
    with c.cgn.unlocked():  # the loop's plumbing (checkpoints, metrics, sheets), not a usable CGN
      c.cgn.train.num_steps = 20
      c.cgn.log.every_steps = 10
      c.cgn.log.sample_every = 10
      c.cgn.log.checkpoint_every = 10
    with c.generate.unlocked():
      c.generate.dataset_size = 40000  # 1 epoch: 625 steps; 5e4 (781 steps) gave 71.1 %
      c.generate.no_cfs = 10
    with c.classifier.unlocked():  # one pass over many counterfactuals: StepLR decays per epoch
      c.classifier.epochs = 1        # (measured: 3 epochs x 1e4 -> 54 %, 1 x 3e4 -> 57 %)
    c.classifier_per_source.real.max_train_images = 10000
  c.lock()
  return c
