"""Counterfactual MNIST from a CGN (mnists/generate_data.py, batched and sharded).

  python -m cgn_jax.main --config configs/mnist_generate.py --workdir runs/gen \
      --config.dataset=double_colored_MNIST \
      --config.checkpoint=../shared/data/pretrained/mnist_cgn/double_colored_MNIST.pth

writes ``<workdir>/<dataset>_counterfactual`` (uint8 shards + manifest; label = shape class, plus
texture and bg columns). The authors' defaults: dataset_size 5e4, no_cfs 1, batch 100. With
no_cfs 10, 1e6 images took 16 min on a 2-core CPU (README, "Counterfactual generation speed").
``checkpoint`` may be an authors' .pth, a converted directory or ``<train workdir>/generator``.
``:tiny`` uses random weights (tests).
"""

import os

import ml_collections

from configs.common import DATA_DIR


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "generate_mnist"
  c.dataset = "double_colored_MNIST"   # --dataset
  c.checkpoint = os.path.join(DATA_DIR, "pretrained", "mnist_cgn", "double_colored_MNIST.pth")  # --weight_path
  c.dataset_size = 50000               # --dataset_size (default 5e4)
  c.no_cfs = 1                         # --no_cfs
  c.batch_size = 100                   # cgn.batch_size in generate_cf_dataset
  c.seed = 0
  # Sub-pixel upsample+conv: 9/4 fewer FLOPs in the texture convs, outputs within ~1e-6 of the
  # faithful path (tests/test_mnist_parity.py); set False for bit-faithful generation.
  c.fast_upsample = True
  c.out_dir = ""
  c.progress_bar = True
  if variant == "tiny":
    c.checkpoint = ""
    c.dataset_size = 400
    c.no_cfs = 2
    c.batch_size = 20
    c.progress_bar = False
  elif variant:
    raise ValueError(f"unknown variant '{variant}'")
  c.lock()
  return c
