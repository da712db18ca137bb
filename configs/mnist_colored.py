"""CGN on Colored MNIST (mnists/experiments/cgn_colored_MNIST/cfg.yaml).

  python -m cgn_jax.main --config configs/mnist_colored.py --workdir runs/cgn_colored

15 epochs x 3750 steps of batch 16. Expect masks that cover the digit, foregrounds in the class
colour and black backgrounds, as in ``configs/mnist_sample.py`` with the authors' checkpoint.
Variants: ``:re`` (SSIM + colour jitter of the [Re] report), ``:tiny`` (tests, seconds).
"""

from configs.mnist_base import VARIANTS, cgn_config

__all__ = ["VARIANTS", "get_config"]


def get_config(variant: str = ""):
  return cgn_config("colored_MNIST", mask=0.1, perc=[0.05, 0.1, 0.01, 0.0], init_type="orthogonal",
                    init_gain=0.1, disc="linear", ndf=512, variant=variant)
