"""Every loss of the MNIST and ImageNet CGN, as pure, jit-able and differentiable JAX functions.

Semantics follow the authors' ``shared/losses.py`` (and ``nn.MSELoss`` in ``mnists/train_cgn.py``);
each function names the class it reproduces. The SSIM term is the [Re] reproduction's extra
(``mnists/train_cgn_ssim.py``, pytorch_msssim 1.0.0). Images are NHWC.

Which loss is a scalar and which a per-sample vector follows the original, because the training
code reduces them differently: MaskLoss and BackgroundLoss return one value per sample and callers
take ``.mean()``; everything else is already a batch mean.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax import patches as patches_lib

Array = jax.Array
FeaturesFn = Callable[..., Sequence[Array]]  # fn(images, num_blocks) -> hooked activations

# The authors scale every style term by w**2 * 5e3 (PerceptualLossModel.forward).
STYLE_SCALE = 5e3
_HIGHEST = jax.lax.Precision.HIGHEST  # grams and SSIM sums must not drop to TF32/bf16 on GPUs


# ---------------------------------------------------------------------------------------------
# Reconstruction and adversarial losses

def reconstruction_loss(a: Array, b: Array, weight: float = 1.0, kind: str = "l1") -> Array:
  """ReconstructionLoss(kind, weight): ``weight * mean(|a-b|)`` (l1) or ``weight * mean((a-b)^2)``."""
  if kind == "l1":
    return weight * jnp.mean(jnp.abs(a - b))
  if kind == "l2":
    return weight * jnp.mean(jnp.square(a - b))
  raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")


def adversarial_mse_loss(validity: Array, real: bool) -> Array:
  """``nn.MSELoss()(validity, ones/zeros)``: the MNIST CGN's LSGAN-style adversarial loss.

  The generator step uses ``real=True`` on fakes; the discriminator averages the real and fake
  terms itself (``(L(real, 1) + L(fake, 0)) / 2``).
  """
  return jnp.mean(jnp.square(validity - (1.0 if real else 0.0)))


# ---------------------------------------------------------------------------------------------
# Perceptual losses (PerceptualLossModel / PerceptualLoss / PercLossText)

def nll_loss(log_probs: Array, labels: Array) -> Array:
  """F.nll_loss: the batch mean of -log p at the label."""
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))


def cross_entropy(logits: Array, labels: Array) -> Array:
  """nn.CrossEntropyLoss: ``nll_loss`` of the log-softmax, computed in float32 (bf16 logits too)."""
  return nll_loss(jax.nn.log_softmax(logits.astype(jnp.float32)), labels)


def gram_matrix(features: Array) -> Array:
  """Per-sample ``F F^T / (c*h*w)`` of NHWC features -> [N, C, C] (float32 even for bf16 input)."""
  n, h, w, c = features.shape
  return _gram(features.astype(jnp.float32).reshape(n, h * w, c)) / (c * h * w)


@jax.custom_vjp
def _gram(f: Array) -> Array:
  """``F^T F`` per sample. Its own VJP because autodiff of the einsum takes two products for the
  two uses of F (``F @ dG`` and ``F @ dG^T``); ``F @ (dG + dG^T)`` is one, half the backward."""
  return jnp.einsum("npc,npd->ncd", f, f, precision=_HIGHEST)


def _gram_fwd(f):
  return _gram(f), f


def _gram_bwd(f, g):
  return (jnp.einsum("npc,ncd->npd", f, g + jnp.swapaxes(g, 1, 2), precision=_HIGHEST),)


_gram.defvjp(_gram_fwd, _gram_bwd)


def _static(w) -> float | None:
  """A weight's Python value when it is known at trace time, else None."""
  try:
    return float(w)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def perceptual_loss_from_features(feats_x: Sequence[Array], feats_y: Sequence[Array],
                                  content_weights: Sequence[float],
                                  style_weights: Sequence[float]) -> tuple[Array, Array]:
  """The authors' content + Gram-style sum on precomputed hooked activations.

  Term k of the content part is ``mean|f_x - f_y| * w_k``; term k of the style part is
  ``mean|G(f_x) - G(f_y)| * w_k**2 * 5e3``. Note the style weight is *squared*: a config weight of
  4 is an effective 80000.

  Returns:
    ``(total, terms)`` with ``terms`` [2L] = content_0..L-1 then style_0..L-1 (the authors'
    ``metrics``). A term whose weight is a static 0 is exactly 0 and its features may be absent
    (``feats_*`` shorter than the weights).
  """
  terms = []
  for kind, weights in (("content", content_weights), ("style", style_weights)):
    for k, w in enumerate(weights):
      sw = _static(w)
      if sw == 0.0:
        terms.append(jnp.zeros((), jnp.float32))
        continue
      fx, fy = feats_x[k].astype(jnp.float32), feats_y[k].astype(jnp.float32)
      if kind == "content":
        terms.append(jnp.mean(jnp.abs(fx - fy)) * w)
      else:
        # Same operation order as torch: (l1 * w**2) * 5e3, each product rounded to float32.
        l1 = jnp.mean(jnp.abs(gram_matrix(fx) - gram_matrix(fy)))
        terms.append(l1 * (sw ** 2 if sw is not None else jnp.square(w)) * STYLE_SCALE)
  total = jnp.zeros((), jnp.float32)
  for t in terms:  # torch's sum(list) adds left to right
    total = total + t
  return total, jnp.stack(terms)


def perceptual_loss(features_fn: FeaturesFn, x: Array, y: Array,
                    content_weights: Sequence[float] = (0, 0, 0, 0),
                    style_weights: Sequence[float] = (0, 0, 0, 0)) -> tuple[Array, Array]:
  """PerceptualLoss(cont_wgts, style_wgts)(x, y) on VGG16 activations.

  Args:
    features_fn: ``fn(images, num_blocks)`` returning the first ``num_blocks`` hooked activations,
      e.g. ``cgn_jax.models.vgg.features_fn(variables)``.
    x: input images (the generated ones), NHWC in [-1, 1] (no ImageNet normalisation, as the
      authors).
    y: target images. Not detached, like the original; callers stop gradients where the authors
      detach.
    content_weights, style_weights: one weight per hooked layer.

  Returns:
    ``(total, terms[8])``, see ``perceptual_loss_from_features``. Blocks after the last layer
    with a non-zero (or traced) weight are not computed; if all weights are static zeros, VGG does
    not run at all.
  """
  live = [k for ws in (content_weights, style_weights) for k, w in enumerate(ws)
          if _static(w) != 0.0]
  if not live:
    return perceptual_loss_from_features([], [], content_weights, style_weights)
  num_blocks = max(live) + 1
  # Two passes, target first, as the original. One pass over both batches stacked gives the same
  # numbers but makes autodiff take VGG's input gradient for the targets' half too, which the
  # callers never need (the targets are data): about twice the backward work. Each pass keeps its
  # rows on their devices when the batch is sharded.
  fy = features_fn(y.astype(x.dtype), num_blocks)
  fx = features_fn(x, num_blocks)
  return perceptual_loss_from_features(fx, fy, content_weights, style_weights)


def texture_loss(features_fn: FeaturesFn, key: Array, x_gt: Array, mask: Array, foreground: Array,
                 style_weights: Sequence[float] = (0, 5, 5, 0), patch_size: Sequence[int] = (15, 15),
                 sample_size: int = 100, n_up: int = 6, work_size: Sequence[int] = (128, 128)
                 ) -> tuple[Array, Array]:
  """PercLossText(style_wgts)(x_gt, mask, foreground), the ImageNet CGN's texture loss.

  The foreground is compared (style terms only) with a 6x6 grid of 15x15 patches drawn at random
  from the 100 patch positions of x_gt with the highest mean mask (see
  ``patches.sample_texture_targets`` for the recipe). x_gt, mask and the target grid are detached,
  as in the original, so only the texture mechanism gets a gradient. ``PercLossText``'s ``im_sz``
  argument is unused by the authors and has no counterpart here.

  Returns:
    ``(total, terms[8])``; ``key`` is a PRNG key that fixes the sampled patches.
  """
  targets, _ = patches_lib.sample_texture_targets(
      key, jax.lax.stop_gradient(mask), jax.lax.stop_gradient(x_gt), patch_size=patch_size,
      sample_size=sample_size, n_up=n_up, work_size=work_size)
  return perceptual_loss(features_fn, foreground, jax.lax.stop_gradient(targets),
                         content_weights=(0,) * len(style_weights), style_weights=style_weights)


# ---------------------------------------------------------------------------------------------
# Mask and background losses

def binary_loss(mask: Array, weight: float) -> Array:
  """BinaryLoss(weight): ``weight * mean(H2(p))`` with the binary entropy in bits.

  No epsilon, as the original: a mask of exactly 0 or 1 gives NaN (0 * -inf). The CGNs clamp their
  masks away from {0, 1} before this loss (ImageNet: [1e-4, 1-1e-4]; MNIST: sigmoid output).
  """
  h = -mask * jnp.log2(mask) - (1 - mask) * jnp.log2(1 - mask)
  return weight * jnp.mean(h)


def mask_loss(mask: Array, weight: float, interval: Sequence[float] = (0.1, 0.9)) -> Array:
  """MaskLoss(weight, interval): per-sample ``weight * (relu(lo - m) + relu(m - hi))``, m = mean mask.

  Returns a vector [N]: the original does not reduce over the batch; training takes the mean.
  """
  m = jnp.mean(mask.reshape(mask.shape[0], -1), axis=1)
  lo, hi = interval
  return weight * (jnp.maximum(0.0, lo - m) + jnp.maximum(0.0, m - hi))


def background_loss(bg_mask: Array, weight: float) -> Array:
  """BackgroundLoss(weight): per-sample ``max(0, weight * mean(bg_mask))`` -> [N].

  ``bg_mask`` is U2-Net's object mask of the generated background; the loss pushes it to zero.
  """
  return jnp.maximum(0.0, weight * jnp.mean(bg_mask.reshape(bg_mask.shape[0], -1), axis=1))


# ---------------------------------------------------------------------------------------------
# SSIM ([Re] reproduction's extra term)

def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """pytorch_msssim's normalised 1-D Gaussian, computed in float32 like the package."""
  coords = np.arange(size, dtype=np.float32) - np.float32(size // 2)
  g = np.exp(-(coords ** 2) / np.float32(2 * sigma ** 2)).astype(np.float32)
  return (g / g.sum()).astype(np.float32)


def _gaussian_filter(x: Array, win: np.ndarray) -> Array:
  """Depthwise separable 'valid' smoothing along H then W; an axis shorter than the window is skipped.

  pytorch_msssim 1.0.0 only warns (and does not smooth) along a too-short axis; kept as is.
  """
  c = x.shape[-1]
  for axis in (1, 2):
    if x.shape[axis] < len(win):
      warnings.warn(f"ssim: image axis of size {x.shape[axis]} is shorter than the {len(win)}-tap "
                    "window; it is not smoothed (as in pytorch_msssim)", stacklevel=3)
      continue
    shape = (len(win), 1) if axis == 1 else (1, len(win))
    kernel = jnp.broadcast_to(jnp.asarray(win).reshape(shape + (1, 1)), shape + (1, c))
    x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", feature_group_count=c,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
  return x


def ssim(x: Array, y: Array, data_range: float = 255.0, size_average: bool = True,
         win_size: int = 11, win_sigma: float = 1.5, k: tuple[float, float] = (0.01, 0.03)) -> Array:
  """``pytorch_msssim.ssim`` 1.0.0 (nonnegative_ssim=False) on NHWC images.

  Trap: the package's default ``data_range`` is 255, even for images in [0, 1] or [-1, 1]; the [Re]
  code logs that value. ``size_average=False`` returns one value per image [N] (channels
  averaged). dm-pix's ``ssim`` differs (its own filter and padding conventions), so it is not used.
  """
  win = gaussian_window(win_size, win_sigma)
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
  # The five smoothings of the original in one depthwise pass over stacked channels.
  mu1, mu2, ex2, ey2, exy = jnp.split(
      _gaussian_filter(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), win), 5, axis=-1)
  mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
  sigma1_sq, sigma2_sq, sigma12 = ex2 - mu1_sq, ey2 - mu2_sq, exy - mu1_mu2
  cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
  ssim_map = ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map
  per_channel = jnp.mean(ssim_map, axis=(1, 2))  # [N, C]
  return jnp.mean(per_channel) if size_average else jnp.mean(per_channel, axis=1)


def ssim_loss(x: Array, y: Array, data_range: float = 1.0) -> Array:
  """``1 - SSIM(data_range=1, channel=3)(x, y)``, the [Re] reproduction's SSIM term.

  Unlike the [Re] code (which wrapped x in ``Variable(requires_grad=False)``, i.e. detached it in
  current torch), the gradient reaches the generator here.
  """
  return 1.0 - ssim(x, y, data_range=data_range)
