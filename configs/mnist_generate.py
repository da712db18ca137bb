"""Counterfactual MNIST from a CGN (mnists/generate_data.py, batched and sharded).

  python -m cgn_jax.main --config configs/mnist_generate.py --workdir runs/gen \
      --config.dataset=wildlife_MNIST

generates 5e4 counterfactuals of the authors' pretrained ``wildlife_MNIST.pth`` (the default
checkpoint follows ``dataset``: ``pretrained/mnist_cgn/<dataset>.pth`` under ``$CGN_DATA``, default
``../shared/data``) into ``runs/gen/wildlife_MNIST_counterfactual`` (uint8 shards + manifest; label
= shape class, plus texture and bg columns), with ``wildlife_MNIST_counterfactual_preview.png``
beside it: digits whose shape, texture and background come from different classes. The default
dataset (double_colored_MNIST, 5e4 images) took 3 min 4 s on this project's 2-core CPU shared at
load ~9; with no_cfs 10, 1e6 images took 16 min (README, "Counterfactual generation speed"). The
authors' defaults: dataset_size 5e4, no_cfs 1, batch 100. ``dataset`` is one of colored_MNIST,
double_colored_MNIST, wildlife_MNIST; ``checkpoint`` may also be a converted directory or ``<train
workdir>/generator``. Rerunning the command reuses a complete dataset of the same settings and
checkpoint bytes, continues a killed run after its last complete shard (the same files as an
uninterrupted run), and regenerates after any other change. ``:tiny`` uses random weights and
64-image shards (tests).
"""

import os

import ml_collections

from configs.common import DATA_DIR, check_variant

VARIANTS = ("", "tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "generate_mnist"
  c.dataset = "double_colored_MNIST"   # --dataset
  # --weight_path: the authors' pretrained CGN of `dataset` unless set ('' = random weights).
  pretrained = os.path.join(DATA_DIR, "pretrained", "mnist_cgn", "")
  c.checkpoint = ml_collections.FieldReference(pretrained) + c.get_ref("dataset") + ".pth"
  c.dataset_size = 50000               # --dataset_size (default 5e4)
  c.no_cfs = 1                         # --no_cfs
  c.batch_size = 100                   # cgn.batch_size in generate_cf_dataset
  c.seed = 0
  # Sub-pixel upsample+conv: 9/4 fewer FLOPs in the texture convs, outputs within ~1e-6 of the
  # faithful path (tests/test_mnist_parity.py); set False for bit-faithful generation.
  c.fast_upsample = True
  c.shard_size = 0                     # images per shard; 0: about 256 MB each
  c.out_dir = ""
  c.progress_bar = True
  if variant == "tiny":
    c.checkpoint = ""
    c.dataset_size = 400
    c.no_cfs = 2
    c.batch_size = 20
    c.shard_size = 64                  # several shards, so that resuming is exercised
    c.progress_bar = False

  c.lock()
  return c
