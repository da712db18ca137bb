"""The MNIST CNN classifier (mnists/train_classifier.py defaults).

  python -m cgn_jax.main --config configs/mnist_classifier.py --workdir runs/clf_dc_real \
      --config.dataset=double_colored_MNIST --config.train_on=real
  python -m cgn_jax.main --config configs/mnist_classifier.py --workdir runs/clf_dc_cf \
      --config.train_on=counterfactual --config.cf_dataset_dir=runs/gen/double_colored_MNIST_counterfactual

Trained on the real (colour-biased) training split, test accuracy on the unbiased test split is
low (the classifier learns colour; the paper's Table 2 "original" row); trained on counterfactuals it
is high (paper: 95.1 / 89.0 / 85.7 for colored / double-colored / wildlife). Results go to
``<workdir>/results.json`` after every epoch; a killed run resumes from its last epoch checkpoint.
``:tiny`` trains 3 epochs on 512 real images (tests).
"""

import ml_collections

from configs.common import DATA_DIR, check_variant, loop_config, tiny_log

VARIANTS = ("", "tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "train_classifier"
  c.dataset = "double_colored_MNIST"   # --dataset (its real test split is always the test set)
  c.train_on = "counterfactual"        # real | counterfactual | mixed ([Re]: "with real images")
  c.data_dir = DATA_DIR
  c.real_dataset_dir = ""              # built variant; default <workdir>/data/<dataset>
  c.cf_dataset_dir = ""                # from the generation job
  c.dataset_limit = -1
  c.max_train_images = -1              # >0: train on a seeded subset (quick runs)
  c.data_seed = 0
  c.seed = 0
  c.batch_size = 64                    # --batch_size
  c.eval_batch_size = 640              # the authors' test loader: batch_size * 10
  c.epochs = 10                        # --epochs
  c.lr = 1.0                           # --lr (Adadelta)
  c.gamma = 0.7                        # --gamma (StepLR, step_size=1 epoch)
  c.num_devices = -1                   # -1: every device (a 1-D 'data' mesh)
  # The loop logs one row per epoch (its means) whatever every_steps says; checkpoints per epoch.
  c.log = loop_config(every_steps=0, checkpoint_every=0)
  c.log.checkpoint_every_epochs = 1
  if variant == "tiny":
    c.train_on = "real"
    c.dataset_limit = 512
    c.batch_size = 32
    c.eval_batch_size = 128
    c.epochs = 3
    tiny_log(c.log)
  c.lock()
  return c
