"""The CGN composition, written once: x = m * f + (1 - m) * b.

Every model (MNIST and ImageNet CGN), loss and sample sheet composes through this function, so the
analytic form of the image model lives in exactly one place.
"""

from __future__ import annotations

import jax

Array = jax.Array


def compose(mask: Array, foreground: Array, background: Array) -> Array:
  """Alpha-composites foreground over background; ``mask`` broadcasts over channels (N,H,W,1)."""
  return mask * foreground + (1 - mask) * background
