"""U^2-Net (U2NET) and its small variant U2NETP in Flax, as in the authors' imagenet/models/u2net.py.

The ImageNet CGN runs a frozen U2NET on the shape mechanism's pre-mask (and on the background for
the background loss), so eval mode — BatchNorm with running statistics — is the default path.
Parameter names follow the torch modules (``stage1/rebnconvin/conv_s1``) so that the converter's
mapping reads like the checkpoint. Works for any input size, square or not: every pooling is torch's
ceil mode and every upsampling is an exact align_corners=True bilinear resize to the skip's size.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cgn_jax.models import loading
from cgn_jax.models.layers import TorchBatchNorm, max_pool_torch

Array = jax.Array

# Stage order of the torch module: six encoder stages, five decoder stages.
STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6",
          "stage5d", "stage4d", "stage3d", "stage2d", "stage1d")
# RSU height per stage; 0 marks RSU-4F (height 4, dilations instead of pooling).
HEIGHTS = (7, 6, 5, 4, 0, 0, 0, 4, 5, 6, 7)
# (mid_ch, out_ch) per stage.
WIDTHS = {
    "u2net": ((32, 64), (32, 128), (64, 256), (128, 512), (256, 512), (256, 512),
              (256, 512), (128, 256), (64, 128), (32, 64), (16, 64)),
    "u2netp": ((16, 64),) * 11,
}
# The stage whose output feeds side output k (side1..side6).
SIDE_SOURCES = ("stage1d", "stage2d", "stage3d", "stage4d", "stage5d", "stage6")


@functools.lru_cache(maxsize=None)
def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of torch's align_corners=True linear interpolation along one axis.

  Mirrors torch's float32 arithmetic: scale = (in-1)/(out-1) (0 when out == 1), src = scale*i,
  i0 = floor(src), i1 = i0+1 clamped at the last pixel, weights 1-frac and frac.
  """
  scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
  src = np.float32(scale) * np.arange(n_out, dtype=np.float32)
  i0 = np.minimum(src.astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def resize_bilinear_align_corners(x: Array, size: tuple[int, int]) -> Array:
  """F.interpolate(x, size, mode='bilinear', align_corners=True) for NHWC ``x``, any target size.

  Trap: jax.image.resize's bilinear is the half-pixel (align_corners=False) convention, and the
  official U-2-Net repo uses that too — but the CGN authors' copy aligns the corner pixels, so the
  grid is ``i*(in-1)/(out-1)``. Written as two gathers and lerps (width, then height, as torch's
  CPU kernel nests them) rather than a matmul, which accelerators may run in reduced precision.
  """
  h, w = size
  if (x.shape[1], x.shape[2]) == (h, w):
    return x  # the grid is then exactly the identity
  for axis, n_out in ((2, w), (1, h)):
    i0, i1, w0, w1 = _bilinear_taps(x.shape[axis], n_out)
    shape = [1, 1, 1, 1]
    shape[axis] = n_out
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    x = jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1
  return x


def _pool(x: Array) -> Array:
  # Trap: every MaxPool2d(2, 2) is ceil_mode=True, so an odd side keeps its last row/column
  # (e.g. 25 -> 13, not 12) and the decoder's resize targets follow these sizes.
  return max_pool_torch(x, 2, 2, ceil_mode=True)


def _hw(x: Array) -> tuple[int, int]:
  return x.shape[1], x.shape[2]


class REBNConv(nn.Module):
  """Conv3x3 (padding = dilation, so the size is kept) -> BatchNorm (eps 1e-5) -> ReLU."""
  features: int
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    d = self.dilation
    x = nn.Conv(self.features, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                dtype=self.dtype, name="conv_s1")(x)
    return nn.relu(TorchBatchNorm(epsilon=1e-5, dtype=self.dtype, name="bn_s1")(x, train))


class RSU(nn.Module):
  """Residual U-block RSU-L (``height`` L = 4..7), or RSU-4F when ``height`` is 0.

  RSU-L: encoder convs 1..L-1 with a ceil-mode 2x2 max pool between them, a dilation-2 conv at the
  bottom, and a decoder that concatenates [upsampled decoder, encoder skip] (that channel order).
  RSU-4F keeps the resolution and dilates by 1, 2, 4 (bottom 8) instead of pooling.
  The block returns its decoder output plus its input conv (``rebnconvin``).
  """
  height: int
  mid: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    fused = self.height == 0
    levels = 4 if fused else self.height
    dil = (lambda i: 2 ** (i - 1)) if fused else (lambda i: 1)
    conv = functools.partial(REBNConv, dtype=self.dtype)

    hxin = conv(self.out, name="rebnconvin")(x, train)
    enc, hx = [], hxin
    for i in range(1, levels):
      if i > 1 and not fused:
        hx = _pool(hx)
      hx = conv(self.mid, dil(i), name=f"rebnconv{i}")(hx, train)
      enc.append(hx)
    bottom = 2 ** (levels - 1) if fused else 2
    hx = conv(self.mid, bottom, name=f"rebnconv{levels}")(hx, train)
    for i in range(levels - 1, 0, -1):
      if not fused:
        hx = resize_bilinear_align_corners(hx, _hw(enc[i - 1]))
      hx = conv(self.out if i == 1 else self.mid, dil(i), name=f"rebnconv{i}d")(
          jnp.concatenate([hx, enc[i - 1]], axis=-1), train)
    return hx + hxin


class U2Net(nn.Module):
  """U2NET (``variant='u2net'``) or U2NETP (``'u2netp'``) on NHWC input.

  ``__call__`` returns sigmoid(d0) [N, H, W, out_ch] in float32 — the authors' version returns only
  this fused map (the official U-2-Net repo returns seven). With ``debug=True`` it returns
  ``(out, intermediates)``: ``d0_logits``, the stage outputs ``stage{3,4,5,6,5d,4d,3d}`` and the
  side convs ``side1..side6`` before upsampling.
  """
  variant: str = "u2net"
  out_ch: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, debug: bool = False):
    """Args:
      x: [N, H, W, C] images, any H and W.
      train: batch statistics (and running-stat updates) instead of the frozen running stats.
      debug: also return the intermediates named in the class docstring (NHWC, compute dtype).

    Returns:
      sigmoid(d0) in float32, or ``(sigmoid(d0), intermediates)`` when ``debug``.
    """
    if self.variant not in WIDTHS:
      raise ValueError(f"unknown U2Net variant '{self.variant}'; choose one of {sorted(WIDTHS)}")
    x = x.astype(self.dtype)
    stage = {name: RSU(h, mid, out, dtype=self.dtype, name=name)
             for name, h, (mid, out) in zip(STAGES, HEIGHTS, WIDTHS[self.variant])}
    hx, feats = x, {}
    for k, name in enumerate(STAGES[:6]):
      if k > 0:
        hx = _pool(hx)
      hx = feats[name] = stage[name](hx, train)
    for name, skip in zip(STAGES[6:], ("stage5", "stage4", "stage3", "stage2", "stage1")):
      hx = resize_bilinear_align_corners(hx, _hw(feats[skip]))
      hx = feats[name] = stage[name](jnp.concatenate([hx, feats[skip]], axis=-1), train)

    side_conv = functools.partial(nn.Conv, self.out_ch, (3, 3), padding=((1, 1), (1, 1)),
                                  dtype=self.dtype)
    sides = [side_conv(name=f"side{k}")(feats[src]) for k, src in enumerate(SIDE_SOURCES, 1)]
    full = _hw(sides[0])
    d0 = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="outconv")(
        jnp.concatenate([resize_bilinear_align_corners(s, full) for s in sides], axis=-1))
    out = jax.nn.sigmoid(d0.astype(jnp.float32))
    if not debug:
      return out
    inter = {"d0_logits": d0}
    inter.update({n: feats[n] for n in ("stage3", "stage4", "stage5", "stage6",
                                        "stage5d", "stage4d", "stage3d")})
    inter.update({f"side{k}": s for k, s in enumerate(sides, 1)})
    return out, inter


def U2NET(**kwargs) -> U2Net:  # pylint: disable=invalid-name
  """The full U^2-Net (44M parameters), the ImageNet CGN's mask refiner."""
  return U2Net(variant="u2net", **kwargs)


def U2NETP(**kwargs) -> U2Net:  # pylint: disable=invalid-name
  """The small U^2-Net (1.1M parameters)."""
  return U2Net(variant="u2netp", **kwargs)


def load(checkpoint: str, cache_dir: str | None = None,
         **module_kwargs: Any) -> tuple[U2Net, Any]:
  """U2NET or U2NETP from a converted dir or the authors' ``u2net.pth``/``u2netp.pth`` (converted
  once into ``cache_dir``; ``None`` is ``loading.default_cache_dir()``).

  Args:
    checkpoint: the directory or the ``.pth``.
    cache_dir: where a ``.pth`` is converted to.
    **module_kwargs: ``U2Net`` fields other than the stored variant, e.g. ``dtype``.

  Returns:
    The module (built from the stored model_config) and its variables.
  """
  variables, meta = loading.load_converted(checkpoint, "u2net", cache_dir)
  return U2Net(**meta["model_config"], **module_kwargs), variables
