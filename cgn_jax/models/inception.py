"""Inception-v3 for the Inception Score and FID: torchvision's graph and pytorch-fid's FID graph.

One module, two graphs (``graph``), one parameter layout (the torch attribute names, so
``params['Mixed_5b']['branch1x1']['conv']['kernel']`` is ``Mixed_5b.branch1x1.conv.weight``):

* ``"torchvision"`` — ``torchvision.models.Inception3`` (``transform_input=False`` unless asked),
  the network of sbarratt's ``inception_score.py``, which the Re-CGN reproduction used;
* ``"fid"`` — pytorch-fid's ``fid_inception_v3()``, the port of TF's ``pt_inception-2015-12-05``
  graph that FID (and the original Inception Score) numbers in the literature come from. Same
  layers, three differences in the pooling branches, each below where it bites.

The same weights give different numbers under the two graphs (logits up to 10 apart on the
fixture), so a mixed-up graph shows. Eval mode only: BatchNorm uses its running statistics (eps
1e-3, torchvision's ``BasicConv2d``), dropout is the identity; the evaluation network is frozen.

Pre-processing (:func:`preprocess`) is pytorch-fid's ``InceptionV3`` wrapper: uint8 / 255, bilinear
resize to 299 with ``F.interpolate(align_corners=False)`` semantics (:func:`resize_bilinear`), then
``2x - 1``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from cgn_jax.models import loading
from cgn_jax.models.layers import TorchBatchNorm, max_pool_torch

Array = jax.Array

GRAPHS = ("fid", "torchvision")
# Converter families (converters/inception.py): torchvision's IMAGENET1K_V1 layout (AuxLogits,
# 1000 classes) and pytorch-fid's pt_inception-2015-12-05 layout (no AuxLogits, 1008 classes).
FAMILIES = ("inception_v3", "inception_v3_fid")
DEFAULT_FAMILY = {"torchvision": "inception_v3", "fid": "inception_v3_fid"}
BN_EPS = 1e-3  # torchvision BasicConv2d: BatchNorm2d(eps=0.001), not torch's default 1e-5
SIZE = 299
# Inception3._transform_input: maps ImageNet-normalised input ((x - mean) / std) to (x - 0.5) / 0.5.
_TV_MEAN = (0.485, 0.456, 0.406)
_TV_STD = (0.229, 0.224, 0.225)


# Every weight comes from a converted checkpoint, so the initialisers only give shapes. Flax checks
# each param by tracing its initialiser (an eval_shape per param, on every apply): lecun_normal's
# truncated normal made that 4 of the 9 s of tracing this network on a CPU; zeros costs nothing.
_ZEROS = nn.initializers.zeros


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps 1e-3, eval) -> ReLU, torchvision's ``BasicConv2d``."""
  features: int
  kernel_size: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), (self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                kernel_init=_ZEROS, name="conv")(x)
    return nn.relu(TorchBatchNorm(epsilon=BN_EPS, name="bn")(x, train=False))


def _pool_branch(x: Array, kind: str) -> Array:
  """The 3x3, stride 1, pad 1 pool in front of the ``branch_pool`` conv of blocks A, C and E.

  torchvision (``"avg"``): ``F.avg_pool2d`` with the default ``count_include_pad=True``, so a border
  window divides its sum by 9 although it covers 6 (edge) or 4 (corner) real pixels. pytorch-fid
  (``"avg_valid"``): ``count_include_pad=False``, the TF graph's behaviour: divide by the real
  count.
  pytorch-fid's Mixed_7c (``"max"``): a *max* pool, a bug of the TF graph that FID kept.
  """
  if kind == "max":
    return max_pool_torch(x, 3, 1, padding=1)
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=kind == "avg")


class InceptionA(nn.Module):
  pool_features: int
  pool: str
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(conv(48, 1, name="branch5x5_1")(x))
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(_pool_branch(x, self.pool))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_torch(x, 3, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  pool: str
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(_pool_branch(x, self.pool))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(conv(192, 1, name="branch3x3_1")(x))
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_torch(x, 3, 2)], axis=-1)


class InceptionE(nn.Module):
  pool: str
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    bp = conv(192, 1, name="branch_pool")(_pool_branch(x, self.pool))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Linear(nn.Module):
  """nn.Linear returning ``(x @ W, x @ W + b)``: the IS of the FID graph uses the logits without
  the bias (TF's original code and torch-fidelity read ``softmax/logits/MatMul``)."""
  features: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    kernel = self.param("kernel", _ZEROS, (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    xw = jnp.dot(x, kernel, precision=self.precision)
    return xw, xw + bias


class InceptionAux(nn.Module):
  """torchvision's ``InceptionAux`` on Mixed_6e (training-time head; kept so that the IMAGENET1K_V1
  weights convert completely)."""
  num_classes: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.avg_pool(x, (5, 5), (3, 3))  # F.avg_pool2d(5, stride=3), no padding: 17x17 -> 5x5
    x = BasicConv2d(128, 1, precision=self.precision, name="conv0")(x)
    x = BasicConv2d(768, 5, precision=self.precision, name="conv1")(x)
    x = jnp.mean(x, axis=(1, 2))
    return Linear(self.num_classes, self.precision, name="fc")(x)[1]


class InceptionV3(nn.Module):
  """``apply(variables, x)`` -> dict of ``Mixed_5d`` [N,35,35,288], ``Mixed_6e`` [N,17,17,768],
  ``pool3`` [N,2048] (mean of Mixed_7c over H, W: FID's features), ``logits`` and
  ``logits_unbiased`` [N, num_classes], and with ``with_aux`` (needs ``aux_logits``)
  ``aux_logits``. ``x`` is NHWC in [-1, 1] at 299x299 (see :func:`preprocess`); a jitted caller
  that returns only some of them lets XLA drop the rest.

  ``transform_input`` is torchvision's flag, which ``inception_v3(pretrained=True)`` silently sets:
  it treats the input as ImageNet-normalised and remaps it. Fed [-1, 1] images (as sbarratt's IS
  code and so Re-CGN do) it distorts them; ``True`` reproduces those numbers, not a correct IS.
  """
  graph: str = "fid"
  num_classes: int = 1008
  aux_logits: bool = False
  transform_input: bool = False
  # XLA on GPU/TPU may run float32 convs in TF32/bf16 passes by default; FID is sensitive to that.
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array, with_aux: bool = False) -> dict[str, Array]:
    if self.graph not in GRAPHS:
      raise ValueError(f"graph '{self.graph}' is not one of {', '.join(GRAPHS)}")
    fid = self.graph == "fid"
    avg = "avg_valid" if fid else "avg"
    if self.transform_input:
      if fid:
        raise ValueError("transform_input is torchvision's flag; the FID graph takes [-1, 1] input")
      # The constants in float64, then float32: torch's Python-float scalars.
      scale = (np.asarray(_TV_STD) / 0.5).astype(np.float32)
      shift = ((np.asarray(_TV_MEAN) - 0.5) / 0.5).astype(np.float32)
      x = x * scale + shift
    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = max_pool_torch(x, 3, 2)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = max_pool_torch(x, 3, 2)
    out = {}
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, avg, p, name=name)(x)
    out["Mixed_5d"] = x
    x = InceptionB(p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, avg, p, name=name)(x)
    out["Mixed_6e"] = x
    if self.aux_logits and (with_aux or self.is_initializing()):
      out["aux_logits"] = InceptionAux(self.num_classes, p, name="AuxLogits")(x)
    elif with_aux:
      raise ValueError("with_aux needs a model with aux_logits=True (torchvision's AuxLogits head)")
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(avg, p, name="Mixed_7b")(x)
    x = InceptionE("max" if fid else "avg", p, name="Mixed_7c")(x)
    out["pool3"] = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1); dropout: identity in eval
    out["logits_unbiased"], out["logits"] = Linear(self.num_classes, p, name="fc")(out["pool3"])
    return out


# ---------------------------------------------------------------------------------------------
# Pre-processing.

def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of torch's bilinear ``align_corners=False`` along one axis.

  As ATen's ``area_pixel_compute_source_index`` and ``guard_index_and_lambda`` for a float tensor:
  ``src = (in/out) * (dst + 0.5) - 0.5`` with the ratio a float32 division, clamped below at 0 (so
  the first output pixels copy the first input pixel when upsampling), ``i0 = min(floor(src),
  in - 1)``, ``i1 = i0 + 1`` except at the last pixel, ``w1 = src - i0``, ``w0 = 1 - w1``. Trap:
  torch's CPU build evaluates ``ratio * x - 0.5`` as one fused multiply-add, so ``src`` is rounded
  to float32 once; rounding the product first moves 3 of the 299 weights of 256 -> 299 by one ulp
  (5e-7 in the image). The float64 product of two float32 values is exact, which emulates the FMA.
  """
  scale = np.float32(n_in) / np.float32(n_out)
  dst = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
  w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_bilinear(x, size: tuple[int, int] = (SIZE, SIZE)):
  """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` (antialias off) on NHWC.

  Works on numpy (host, float32 arithmetic) and JAX arrays alike. Not ``jax.image.resize``: its
  ``'bilinear'`` antialiases when downsampling (a triangle kernel widened by the scale), which torch
  does not, and it places samples differently at the borders. Written as gathers and two lerps, W
  first and then H like ATen's separable loop, rather than as a matmul with an interpolation
  matrix: on GPU/TPU a default-precision float32 matmul may round through TF32/bf16.
  """
  h, w = size
  if x.shape[1:3] == (h, w):  # torch copies when the size is unchanged; the lerp would too
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  i0, i1, w0, w1 = _linear_taps(x.shape[2], w)
  x = x[:, :, i0] * w0[None, None, :, None] + x[:, :, i1] * w1[None, None, :, None]
  i0, i1, w0, w1 = _linear_taps(x.shape[1], h)
  x = x[:, i0] * w0[None, :, None, None] + x[:, i1] * w1[None, :, None, None]
  return x.astype(xp.float32)


def to_unit(images_uint8):
  """uint8 -> float32 in [0, 1] as ``ToTensor``: a true division by 255 (multiplying by 1/255
  differs from it in the last bit for some values)."""
  xp = np if isinstance(images_uint8, np.ndarray) else jnp
  return images_uint8.astype(xp.float32) / xp.float32(255.0)


def preprocess(images, size: tuple[int, int] = (SIZE, SIZE)):
  """pytorch-fid's wrapper: uint8 NHWC (or float in [0, 1]) -> resized to 299 -> ``2x - 1``."""
  x = to_unit(images) if images.dtype == np.uint8 else images
  return 2 * resize_bilinear(x, size) - 1


PREPROCESSING = ("uint8/255, bilinear resize to 299 (torch F.interpolate, align_corners=False, "
                 "no antialias), 2x-1")


# ---------------------------------------------------------------------------------------------
# Loading.

def load(checkpoint: str, graph: str = "fid", cache_dir: str | None = None,
         family: str | None = None, **module_kwargs: Any) -> tuple[InceptionV3, Any]:
  """Inception-v3 from a converted dir or a ``.pth`` of either layout, run as ``graph``.

  Args:
    checkpoint: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (github.com/mseitzer/
      pytorch-fid, release ``fid_weights``), torchvision's ``inception_v3_google-0cc3c7bd.pth``
      (download.pytorch.org/models), or a directory made by ``python -m converters FAMILY SRC DST``.
    graph: ``"fid"`` or ``"torchvision"``; weights and graph are independent choices.
    cache_dir: where a ``.pth`` is converted once; ``None`` is ``loading.default_cache_dir()``.
    family: the layout of a ``.pth``; ``None`` takes a converted dir's own family, or for a file
      the usual one of ``graph`` (torchvision: ``inception_v3``, fid: ``inception_v3_fid``).

  Returns:
    ``(module, variables)``.
  """
  if graph not in GRAPHS:
    raise ValueError(f"graph '{graph}' is not one of {', '.join(GRAPHS)}")
  family = loading.pick_family(checkpoint, family, FAMILIES, DEFAULT_FAMILY[graph],
                               "cgn_jax.models.inception")
  variables, meta = loading.load_converted(checkpoint, family, cache_dir)
  return InceptionV3(graph=graph, **meta["model_config"], **module_kwargs), variables
