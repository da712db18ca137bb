"""CGN on Double-colored MNIST (mnists/experiments/cgn_double_colored_MNIST/cfg.yaml).

  python -m cgn_jax.main --config configs/mnist_double_colored.py --workdir runs/cgn_double_colored

15 epochs x 3125 steps of batch 16. Expect digit-shaped masks, object colour per class in the
foreground and the background colour per class. Variants: ``:re``, ``:tiny``.
"""

from configs.mnist_base import VARIANTS, cgn_config

__all__ = ["VARIANTS", "get_config"]


def get_config(variant: str = ""):
  return cgn_config("double_colored_MNIST", mask=0.3, perc=[0.0, 0.05, 0.0, 0.05],
                    init_type="orthogonal", init_gain=0.2, disc="linear", ndf=512, variant=variant)
