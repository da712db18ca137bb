"""Patch extraction, torch-exact bicubic resizing and the texture loss's random patch grids.

CGN's texture loss (the authors' ``shared/losses.py``: ``get_all_patches``, ``get_sampled_patches``,
``PercLossText``) compares the generated foreground with a 6x6 grid of patches cut from the
*object* region of the real image x_gt. This file holds everything of that loss except the
perceptual comparison itself (which lives in ``cgn_jax/losses.py``), written for ``jit``: the patch
positions are drawn with an explicit PRNG key and all shapes are static.

Everything is NHWC.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _round_up_odd(patch_size: Sequence[int]) -> tuple[int, int]:
  # The authors add (s+1) % 2, so an even size grows by one: 2 -> 3, 10 -> 11.
  ph, pw = (int(s) for s in patch_size)
  return ph + (ph + 1) % 2, pw + (pw + 1) % 2


def get_all_patches(x: Array, patch_size: Sequence[int] = (10, 10), pad: bool = True) -> Array:
  """All stride-1 patches of a batch, as the authors' ``get_all_patches`` returns them.

  Args:
    x: images [N, H, W, C].
    patch_size: (height, width); even sizes are rounded *up* to odd, like the original.
    pad: reflect-pad first so that there is one patch around (almost) every pixel.

  Returns:
    [N * P, ph, pw, C], images in order and each image's patches in row-major order of their
    top-left corner.
  """
  ph, pw = _round_up_odd(patch_size)
  if pad:
    # Trap of the original: it builds the tuple (ph//2, ph//2, pw//2, pw//2), but ReflectionPad2d
    # reads it as (left, right, top, bottom). So the *height* is padded by pw//2 and the width by
    # ph//2. For square patches (the only ones the authors use) this is harmless; for others the
    # padded call does not give one patch per pixel. Reproduced as is.
    x = jnp.pad(x, ((0, 0), (pw // 2, pw // 2), (ph // 2, ph // 2), (0, 0)), mode="reflect")
  n, h, w, c = x.shape
  nh, nw = h - ph + 1, w - pw + 1
  if nh < 1 or nw < 1:
    raise ValueError(f"patch {ph}x{pw} does not fit a {h}x{w} image")
  rows = np.arange(nh)[:, None] + np.arange(ph)[None, :]
  cols = np.arange(nw)[:, None] + np.arange(pw)[None, :]
  p = x[:, rows][:, :, :, cols]  # [n, nh, ph, nw, pw, c]
  return p.transpose(0, 1, 3, 2, 4, 5).reshape(n * nh * nw, ph, pw, c)


# ---------------------------------------------------------------------------------------------
# torch bicubic resize. jax.image.resize('bicubic') uses Keys' a = -0.5 and antialiasing when
# downsampling; torch's F.interpolate(mode='bicubic', align_corners=False) uses a = -0.75, no
# antialiasing, and clamps the four taps at the border (replicate). Both resizes of the texture
# loss run through torch's variant in the original, so this one is written out exactly.

_A = np.float32(-0.75)


def _fma32(a, b, c):
  # float32 fused multiply-add: a*b is exact in float64, so one rounding to float32 remains.
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices [4, out] and float32 weights [4, out] of torch's bicubic kernel along one axis.

  torch computes the weights in float32 (its op math type for float). Its x86 build contracts
  some of the multiply-adds into FMAs; which ones was measured against torch 2.x here (the source
  index and the first two steps of the outer cubic piece) and is emulated below, so that the
  weights are bit-identical. On other builds they differ by an ulp at most.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)  # torch computes the scale in the op's math type (float)
  src = _fma32(scale, np.arange(out_size, dtype=f32) + f32(0.5), f32(-0.5))  # no clamp at 0 (cubic)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)

  def near(x):  # |x| <= 1: ((A+2) x - (A+3)) x^2 + 1
    p = _fma32(_A + f32(2), x, -(_A + f32(3)))
    return (p * x * x + f32(1)).astype(f32)

  def far(x):  # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
    p = _fma32(_A, x, -f32(5) * _A)
    p = _fma32(p, x, f32(8) * _A)
    return (p * x - f32(4) * _A).astype(f32)

  one = f32(1)
  w = np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)]).astype(f32)
  idx = np.clip(i0[None, :] + np.arange(-1, 3)[:, None], 0, in_size - 1)
  return idx, w


def _resize_axis(x: Array, out_size: int, axis: int) -> Array:
  idx, w = _cubic_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  out = None
  for k in range(4):  # same accumulation order as torch: ((x0*w0 + x1*w1) + x2*w2) + x3*w3
    term = jnp.take(x, idx[k], axis=axis) * jnp.asarray(w[k].reshape(shape), x.dtype)
    out = term if out is None else out + term
  return out


def resize_bicubic_torch(x: Array, size: Sequence[int]) -> Array:
  """``F.interpolate(x, size, mode='bicubic', align_corners=False)`` (antialias off) on NHWC.

  Like torch, it interpolates along W first and then along H. Values may overshoot the input
  range (cubic kernels ring); torch does not clamp either.
  """
  h, w = (int(s) for s in size)
  return _resize_axis(_resize_axis(x, w, axis=2), h, axis=1)


# ---------------------------------------------------------------------------------------------
# The texture loss's targets (the authors' get_sampled_patches with PercLossText's arguments).

def patch_means(prob: Array, patch_size: Sequence[int]) -> Array:
  """Mean over C x ph x pw of every un-padded patch: [N, P] in ``get_all_patches`` order.

  Same numbers as ``get_all_patches(prob, patch_size, pad=False).mean((1, 2, 3))`` without
  materialising the patches (12996 of them per 128x128 image for 15x15).
  """
  ph, pw = _round_up_odd(patch_size)
  s = jax.lax.reduce_window(jnp.sum(prob, axis=-1), 0.0, jax.lax.add, (1, ph, pw), (1, 1, 1),
                            "VALID")
  return (s / (prob.shape[-1] * ph * pw)).reshape(prob.shape[0], -1)


def sample_texture_targets(key: Array, mask: Array, images: Array,
                           patch_size: Sequence[int] = (15, 15), sample_size: int = 100,
                           n_up: int = 6, work_size: Sequence[int] = (128, 128)
                           ) -> tuple[Array, Array]:
  """Per image: a ``n_up x n_up`` grid of patches from its most object-like regions.

  The authors' recipe (defaults = ``PercLossText``'s: patch 15x15, top 100, 6x6 grid):
  1. bicubic-resize mask and image to ``work_size`` (128x128 regardless of the input size);
  2. score every un-padded patch position by the mean of the resized mask under it;
  3. keep the ``sample_size`` best positions and draw ``n_up**2`` of them uniformly *with*
     replacement (torch.randint into the top set);
  4. cut those patches from the resized image and tile them row-major (make_grid, padding 0)
     into a (n_up*ph) x (n_up*pw) image;
  5. bicubic-resize the grid back to the input size.
  The original draws from torch's global RNG, image by image; here each image gets its own key
  split from ``key``, so equal keys give equal targets on any device layout. Where patch means tie
  exactly at the top-k boundary (a large saturated mask) the original keeps whichever tied
  positions torch's unstable argsort puts last; ``lax.top_k`` keeps the lowest indices. Neither
  choice is meaningful, but the two are not the same set.

  Args:
    key: PRNG key, or a typed key array [N] (one per image).
    mask: [N, H, W, 1] mask (the CGN's mask in [0, 1]).
    images: [N, H, W, C] images the patches are cut from (x_gt).
    patch_size, sample_size, n_up, work_size: the authors' constants (see above).

  Returns:
    ``(targets [N, H, W, C], positions [N, n_up**2])``; ``positions`` are flat row-major indices
    into the ``(Hw - ph + 1) x (Ww - pw + 1)`` grid of patch corners at ``work_size``.
  """
  out_hw = images.shape[1:3]
  ph, pw = _round_up_odd(patch_size)
  wh, ww = (int(s) for s in work_size)
  prob = resize_bicubic_torch(mask, (wh, ww))
  paint = resize_bicubic_torch(images, (wh, ww))
  means = patch_means(prob, (ph, pw))
  k = min(sample_size, means.shape[1])  # argsort()[-k:] silently takes all when there are fewer
  _, top = jax.lax.top_k(means, k)  # order within the top set is irrelevant: draws are uniform
  n = images.shape[0]
  # A typed key array of shape [N] gives each image its own key (the training step draws them per
  # example, so micro-batching and device count do not change the patches); one key is split.
  keys = key if (jnp.ndim(key) == 1 and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)) \
      else jax.random.split(key, n)
  picks = jax.vmap(lambda kk: jax.random.randint(kk, (n_up * n_up,), 0, k))(keys)
  positions = jnp.take_along_axis(top, picks, axis=1)
  nw = ww - pw + 1
  rows, cols = positions // nw, positions % nw

  def cut(img, r, c):
    return jax.lax.dynamic_slice(img, (r, c, 0), (ph, pw, img.shape[-1]))

  patches = jax.vmap(jax.vmap(cut, in_axes=(None, 0, 0)))(paint, rows, cols)  # [N, n_up^2, ph, pw, C]
  grid = patches.reshape(n, n_up, n_up, ph, pw, -1).transpose(0, 1, 3, 2, 4, 5)
  grid = grid.reshape(n, n_up * ph, n_up * pw, -1)
  return resize_bicubic_torch(grid, out_hw), positions
