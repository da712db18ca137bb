"""Colour-jitter augmentation of the [Re] (FACT_AI) report, as a jit-able JAX function on batches.

torchvision ``ColorJitter(0.1, 0.1, 0.1, 0.1)`` semantics per image: brightness, contrast and
saturation factors ~ U[0.9, 1.1], hue shift ~ U[-0.1, 0.1], applied in a random order drawn per
image; the adjustments are torchvision's tensor formulas (grayscale 0.2989/0.587/0.114, blends
clamped to [0, 1], its RGB<->HSV conversion).

Value range: torchvision's float colour ops assume [0, 1] images. The [Re] code applied them to
images already normalised to [-1, 1], so every blend clamped away the negative half of the range.
Here [-1, 1] inputs are mapped to [0, 1], jittered, and mapped back (datasets.md section 4d).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

_GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights (not ITU-R 601's 0.299)


def _gray(img: jax.Array) -> jax.Array:
  return (_GRAY[0] * img[..., 0] + _GRAY[1] * img[..., 1] + _GRAY[2] * img[..., 2])[..., None]


def _blend(a: jax.Array, b: jax.Array, ratio: jax.Array) -> jax.Array:
  return jnp.clip(ratio * a + (1.0 - ratio) * b, 0.0, 1.0)


def adjust_brightness(img: jax.Array, factor: jax.Array) -> jax.Array:
  """One HWC image in [0, 1]."""
  return _blend(img, jnp.zeros_like(img), factor)


def adjust_contrast(img: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend towards the mean grey level of the whole image."""
  return _blend(img, jnp.mean(_gray(img)), factor)


def adjust_saturation(img: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(img, _gray(img), factor)


def rgb_to_hsv(img: jax.Array) -> jax.Array:
  """torchvision's _rgb2hsv for [..., 3] arrays in [0, 1]; hue in [0, 1)."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.max(img, axis=-1)
  minc = jnp.min(img, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  div = jnp.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  # Ties resolved in torchvision's order: red first, then green, then blue.
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.fmod(h / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """torchvision's _hsv2rgb (sector select, p/q/t clamped to [0, 1])."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  table = jnp.stack([jnp.stack([v, q, p, p, t, v], -1), jnp.stack([t, v, v, q, p, p], -1),
                     jnp.stack([p, p, t, v, v, q], -1)], -1)  # [..., sector, channel]
  return jnp.take_along_axis(table, i[..., None, None], axis=-2)[..., 0, :]


def adjust_hue(img: jax.Array, shift: jax.Array) -> jax.Array:
  hsv = rgb_to_hsv(img)
  return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0)))


# All 24 orders of the four adjustments; drawing a row index is a uniform random permutation, like
# torch.randperm(4), and compiles far faster than jax.random.permutation's sorts.
_ORDERS = jnp.array(list(itertools.permutations(range(4))), jnp.int32)


def _jitter_one(img: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  ops = (lambda x: adjust_brightness(x, factors[0]), lambda x: adjust_contrast(x, factors[1]),
         lambda x: adjust_saturation(x, factors[2]), lambda x: adjust_hue(x, factors[3]))
  # A loop rather than four unrolled switches: the branches are traced and compiled once.
  return jax.lax.fori_loop(0, 4, lambda step, x: jax.lax.switch(order[step], ops, x), img)


def color_jitter(key: jax.Array, images: jax.Array, brightness: float = 0.1, contrast: float = 0.1,
                 saturation: float = 0.1, hue: float = 0.1) -> jax.Array:
  """Jitters each NHWC image in [-1, 1] independently; returns [-1, 1] images (jit-able).

  Per image (torchvision ``ColorJitter.get_params``): brightness, contrast, saturation factors
  ~ U[1 - s, 1 + s], hue shift ~ U[-hue, hue], and a uniformly random order of the four.
  Inputs are clipped to [0, 1] after the shift (Double-colored MNIST's colour noise leaves it by a
  few hundredths; torchvision's first clamped blend would do the same).
  """
  n = images.shape[0]
  k_order, k_factors = jax.random.split(key)
  lo = jnp.array([1 - brightness, 1 - contrast, 1 - saturation, -hue], jnp.float32)
  hi = jnp.array([1 + brightness, 1 + contrast, 1 + saturation, hue], jnp.float32)
  factors = jax.random.uniform(k_factors, (n, 4), minval=lo, maxval=hi)
  orders = _ORDERS[jax.random.randint(k_order, (n,), 0, len(_ORDERS))]
  x = jnp.clip((images + 1.0) * 0.5, 0.0, 1.0)
  return jax.vmap(_jitter_one)(x, factors, orders) * 2.0 - 1.0
