"""Layers with the exact semantics of their torch counterparts, shared by every model family.

Everything is NHWC. Each class documents the torch behaviour it reproduces because that behaviour
(not Flax's default) is what the converted checkpoints were trained with.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cgn_jax.models import conv_dw

Array = jax.Array


class TorchBatchNorm(nn.Module):
  """torch.nn.BatchNorm{1,2}d over the last axis.

  Semantic traps reproduced here: torch's ``momentum`` weighs the *new* batch statistic (Flax's
  weighs the old one), normalisation uses the biased batch variance but the running variance is
  updated with the *unbiased* one, and ``num_batches_tracked`` counts train-mode calls.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None  # output dtype; None keeps the input's (bf16 in, bf16 out)
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", self.bias_init, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    nbt = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
    if train:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = x.size // c
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * var * (n / max(n - 1, 1))
        nbt.value = nbt.value + 1
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean.astype(x.dtype)) / jnp.sqrt(var + self.epsilon).astype(x.dtype)
    return (y * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(self.dtype or x.dtype)


def instance_norm(x: Array, eps: float = 1e-5) -> Array:
  """torch.nn.InstanceNorm2d(affine=False, track_running_stats=False): per-sample, per-channel,
  biased variance, identical in train and eval."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps)


def upsample_nearest(x: Array, factor: int = 2) -> Array:
  """nn.Upsample(scale_factor=factor) (mode 'nearest') for an integer factor: pixel repetition."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def avg_pool_floor(x: Array, k: int) -> Array:
  """nn.AvgPool2d(k) (stride k, no padding, floor mode): windows that do not fit are dropped,
  so e.g. a 5x5 map with k=3 keeps only its top-left 3x3 window."""
  return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


def max_pool_torch(x: Array, k: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> Array:
  """nn.MaxPool2d with torch padding (-inf) and optional ceil mode.

  In ceil mode torch adds a last window that may start inside the padded input but overhang it; the
  overhang is padded with -inf here. torch drops such a window if it would start in the right padding.
  The gradient is torch's too: all of it goes to the first maximum of a window (``_max_pool_taps``).
  """
  def extra(size: int) -> int:
    padded = size + 2 * padding
    if not ceil_mode:
      return 0
    out = -(-(padded - k) // stride) + 1
    if (out - 1) * stride >= size + padding:
      out -= 1
    return max(0, (out - 1) * stride + k - padded)

  h, w = x.shape[1], x.shape[2]
  pads = ((0, 0), (padding, padding + extra(h)), (padding, padding + extra(w)), (0, 0))
  return _max_pool_taps(jnp.pad(x, pads, constant_values=-jnp.inf), k, stride)


def _pool_windows(x: Array, k: int, stride: int) -> list[Array]:
  """The k*k strided slices of a padded NHWC map, one per window tap in row-major order."""
  oh, ow = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  return [x[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
          for i in range(k) for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_taps(x: Array, k: int, stride: int) -> Array:
  """VALID max pool of an already padded map as a max over k*k strided slices.

  Not reduce_window: its select_and_scatter gradient is ~8x slower on XLA:CPU. The custom VJP saves
  one int8 "winning tap" per output instead of the chain of k*k maxima that plain autodiff keeps,
  and it routes the whole gradient to the *first* maximum in row-major order, as torch's kernel
  does; autodiff of ``maximum`` would split a tie 0.5/0.5 (ties are common: ReLU zeros).
  """
  out = None
  for win in _pool_windows(x, k, stride):
    out = win if out is None else jnp.maximum(out, win)
  return out


def _max_pool_taps_fwd(x, k, stride):
  wins = _pool_windows(x, k, stride)
  out, tap = wins[0], jnp.zeros(wins[0].shape, jnp.int8)
  for t, win in enumerate(wins[1:], 1):
    better = win > out  # strict: an equal later value does not take over, like torch
    out, tap = jnp.where(better, win, out), jnp.where(better, jnp.int8(t), tap)
  return out, (tap, x.shape)


def _max_pool_taps_bwd(k, stride, res, g):
  tap, shape = res
  oh, ow = g.shape[1], g.shape[2]
  dx = None
  zero = jnp.zeros((), g.dtype)
  for i in range(k):
    for j in range(k):
      # Output (a, b) of tap (i, j) read input (a*stride + i, b*stride + j): an interior pad puts it back.
      cfg = ((0, 0, 0), (i, shape[1] - i - (oh - 1) * stride - 1, stride - 1),
             (j, shape[2] - j - (ow - 1) * stride - 1, stride - 1), (0, 0, 0))
      d = jax.lax.pad(jnp.where(tap == i * k + j, g, zero), zero, cfg)
      dx = d if dx is None else dx + d
  return (dx,)


_max_pool_taps.defvjp(_max_pool_taps_fwd, _max_pool_taps_bwd)


def leaky_relu(x: Array) -> Array:
  """LeakyReLU(0.2), the authors' only slope."""
  return nn.leaky_relu(x, 0.2)


def _phase_taps(k: Array, phase: int, axis: int) -> Array:
  """Collapses the three taps along ``axis`` onto the two input rows/columns one output parity sees."""
  k0, k1, k2 = (jnp.take(k, i, axis) for i in range(3))
  return jnp.stack([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], axis)


def upsample2_conv3x3(x: Array, kernel: Array, subpixel: bool = False,
                      dw_rule: str = "auto") -> Array:
  """conv3x3(pad 1)(nearest_upsample_x2(x)) for an HWIO kernel, optionally by sub-pixel phases.

  Every output phase (row parity a, column parity b) of a 3x3 conv over a 2x nearest-upsampled map
  only sees two distinct input rows and columns, so it equals a 2x2 conv on the low-resolution input
  with summed taps (a=0: rows i-1 <- k0, i <- k1+k2; a=1: i <- k0+k1, i+1 <- k2). The four phase
  kernels run as *one* 2x2 conv with 4*C_out outputs over the input padded by 1, which gives an
  (H+1)x(W+1) map; phase (a, b) is its window starting at (a, b). That is ~9/4 fewer FLOPs in one
  wide conv (1.6x faster than four narrow ones on CPU); the tap sums change float rounding at the
  1e-7 level, so parity paths keep ``subpixel=False``.
  """
  if not subpixel:
    return conv_dw.conv(upsample_nearest(x), kernel.astype(x.dtype), 1, 1, dw_rule)
  n, h, w, cin = x.shape
  cout = kernel.shape[-1]
  # [2 rows, 2 cols, C_in, 2 (a), 2 (b), C_out]
  phases = jnp.stack([jnp.stack([_phase_taps(_phase_taps(kernel, a, 0), b, 1) for b in (0, 1)], -2)
                      for a in (0, 1)], -3)
  y = conv_dw.conv(x, phases.reshape(2, 2, cin, 4 * cout).astype(x.dtype), 1, 1, dw_rule)
  y = y.reshape(n, h + 1, w + 1, 2, 2, cout)
  rows = [jnp.stack([y[:, a:a + h, b:b + w, a, b] for b in (0, 1)], 3) for a in (0, 1)]
  return jnp.stack(rows, 2).reshape(n, 2 * h, 2 * w, cout)  # (N, H, 2[a], W, 2[b], C) -> (N, 2H, 2W, C)


class Conv2d(nn.Module):
  """nn.Conv2d (square kernel, symmetric zero padding, NHWC/HWIO): the parameters and values of
  ``nn.Conv``, with the kernel gradient of ``dw_rule`` (``conv_dw``; "auto" measures which rule is
  fastest for this shape on the running CPU)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dw_rule: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return conv_dw.conv(x, kernel, self.stride, self.padding, self.dw_rule) + bias
