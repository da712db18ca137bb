"""MNIST quickstart: the whole CGN pipeline on Double-colored MNIST, briefly, on a CPU.

  python -m cgn_jax.main --config configs/quickstart.py --workdir /tmp/cgn_quickstart

Writes ``authors_cgn_sheet.png`` (the authors' pretrained colored-MNIST CGN: mask, foreground,
background, composite per class), builds Double-colored MNIST, trains a CGN for a few hundred steps,
generates counterfactuals, trains the CNN on real and on counterfactual data and prints both test
accuracies. Measured on this project's 2-core CPU: 12 min 20 s (CGN ~1.1 steps/s, 10k
counterfactuals in 29 s, classifier ~4 steps/s). Expect the real-data classifier at ~100 % train /
~10 % test accuracy (it learns colour, and the test colours are shuffled); 400 CGN steps (with
random VGG features unless ``cgn.vgg_checkpoint`` is set) are far too few for useful
counterfactuals, so that classifier also stays near 10 %. The point is to see every stage run; the
real numbers come from the authors' checkpoints (README: "Reproducing the MNIST table").
``:tiny`` runs every stage in seconds (tests).
"""


import ml_collections

from configs import mnist_classifier, mnist_double_colored, mnist_generate, mnist_sample


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  tiny = variant == "tiny"
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant '{variant}'")
  c = ml_collections.ConfigDict()
  c.job = "mnist_pipeline"
  sample = mnist_sample.get_config("colored")
  c.authors_checkpoint = "" if tiny else sample.checkpoint
  c.cgn = mnist_double_colored.get_config("tiny" if tiny else "")
  c.generate = mnist_generate.get_config("tiny" if tiny else "")
  c.classifier = mnist_classifier.get_config("tiny" if tiny else "")
  if not tiny:
    with c.cgn.unlocked():
      c.cgn.train.num_steps = 400
      c.cgn.log.every_steps = 50
      c.cgn.log.sample_every = 200
      c.cgn.log.checkpoint_every = 200
    with c.generate.unlocked():
      c.generate.dataset_size = 10000
      c.generate.no_cfs = 10
    with c.classifier.unlocked():
      c.classifier.epochs = 2
      c.classifier.max_train_images = 10000
  with c.generate.unlocked():
    c.generate.dataset = c.cgn.dataset
  with c.classifier.unlocked():
    c.classifier.dataset = c.cgn.dataset
    c.classifier.dataset_limit = c.cgn.dataset_limit
  c.lock()
  return c
