"""The ImageNet CGN's loss ablation (paper Table 1): configs/imagenet.py with some lambdas zeroed.

  python scripts/loss_ablation.py --workdir runs/ablation --biggan_checkpoint=/ckpt/biggan256 \
      --u2net_checkpoint=/ckpt/u2net --vgg_checkpoint=/ckpt/vgg16 \
      --inception_checkpoint=pt_inception-2015-12-05-6726825d.pth
  # or one row's training alone (the driver also evaluates it):
  python -m cgn_jax.main --config configs/imagenet_ablation.py:no_shape \
      --workdir runs/ablation/no_shape/train --config.biggan_checkpoint=/ckpt/biggan256 \
      --config.u2net_checkpoint=/ckpt/u2net --config.vgg_checkpoint=/ckpt/vgg16

Rows (the lambdas [Re]'s experiments/loss_ablation.py ``disable_loss_from_config`` zeroes): ``full``
(none), ``no_shape`` (``binary``, ``mask``), ``no_text`` (``text``), ``no_bg`` (``bg``), ``no_rec``
(``l1``, ``perc``). Everything else is configs/imagenet.py's, including the authors' schedule
(train_cgn.py: 300 episodes of 4000 samples, ~167 h per row on a GTX 1080 Ti by the [Re] report's
timing); [Re]'s driver defaults to 50 episodes of 2048 (``--config.train.episodes=50
--config.train.accum_steps=128 --config.train.grad_scale=2048``). Expected, Inception Score /
mean mask mu_mask of the generated images (paper Table 1; BigGAN alone: IS 202.9): full 130.2 / 0.3,
no_shape 85.9 / 0.2, no_text 198.4 / 0.9, no_bg 195.6 / 0.1, no_rec 38.4 / 0.3. The lambdas are
inputs of the compiled train step, not constants in it, so all rows run one compiled program.
``tiny_<row>`` (``tiny`` = ``tiny_full``) is configs/imagenet.py:tiny with the same zeros, the
plumbing only: measured through the driver, ~6 CPU minutes for the first row (compiling) and ~1 for
each further one (its step from the persistent compilation cache).
"""

import ml_collections

from configs import imagenet
from configs.common import check_variant

# Row -> the lambdas it zeroes ([Re] experiments/loss_ablation.py, --disable_loss choices).
ZEROED = {
    "full": (),
    "no_shape": ("binary", "mask"),   # 'shape': LAMBDA.BINARY = LAMBDA.MASK = 0
    "no_text": ("text",),             # 'text': LAMBDA.TEXT = [0, 0, 0, 0]
    "no_bg": ("bg",),                 # 'background': LAMBDA.BG = 0
    "no_rec": ("l1", "perc"),         # 'reconstruction': LAMBDA.L1 = 0, LAMBDA.PERC = [0, 0, 0, 0]
}
ROWS = tuple(ZEROED)
# Paper Table 1: (Inception Score, mu_mask) per row; BigGAN-deep-256 alone has IS 202.9.
PAPER = {"full": (130.2, 0.3), "no_shape": (85.9, 0.2), "no_text": (198.4, 0.9),
         "no_bg": (195.6, 0.1), "no_rec": (38.4, 0.3)}
PAPER_BIGGAN_IS = 202.9

VARIANTS = ("", "default", *ROWS, "tiny", *(f"tiny_{r}" for r in ROWS))


def parse_variant(variant: str) -> tuple[str, bool]:
  """``variant`` -> (row, tiny)."""
  check_variant(variant, VARIANTS)
  tiny = variant.startswith("tiny")
  row = variant[len("tiny_"):] if variant.startswith("tiny_") else variant
  return (row if row in ROWS else "full"), tiny


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  row, tiny = parse_variant(variant)
  c = imagenet.get_config("tiny" if tiny else "")
  with c.unlocked():
    for name in ZEROED[row]:
      value = c.lambdas[name]
      c.lambdas[name] = tuple(0.0 for _ in value) if isinstance(value, tuple) else 0.0
  return c
