"""Counterfactual ImageNet images drawn from a CGN on the fly: per-index inputs, the jitted eval
forward, and the pixels as the authors save them.

Shared by the job that writes a counterfactual dataset (``cgn_jax/jobs/generate_imagenet.py``) and
the one that measures a CGN's samples (``cgn_jax/jobs/evaluate_generation.py``), so that image ``i``
of a seed is the same image in both. Moved here from generate_imagenet unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax.models import biggan as biggan_lib
from cgn_jax.models.imagenet_cgn import CGNConfig, ImagenetCGN

MODES = ("random", "best_classes", "fixed_classes")

# The authors' hand-picked ImageNet classes (generate_data.py): good shapes (masks), textures
# (foregrounds) and backgrounds, sampled by mode 'best_classes'.
MASKS = (9, 18, 22, 35, 56, 63, 96, 97, 119, 207, 225, 260, 275, 323, 330, 350, 370, 403, 411,
         414, 427, 438, 439, 441, 460, 484, 493, 518, 532, 540, 550, 559, 561, 570, 604, 647,
         688, 713, 724, 749, 751, 756, 759, 779, 780, 802, 814, 833, 841, 849, 850, 859, 869,
         872, 873, 874, 876, 880, 881, 883, 894, 897, 898, 900, 907, 930, 933, 945, 947, 949,
         950, 953, 963, 966, 967, 980)
FOREGROUND = (12, 15, 18, 25, 54, 66, 72, 130, 145, 207, 251, 267, 271, 275, 293, 323, 385,
              388, 407, 409, 427, 438, 439, 441, 454, 461, 468, 482, 483, 486, 490, 492, 509,
              530, 555, 607, 608, 629, 649, 652, 681, 688, 719, 720, 728, 737, 741, 751, 756,
              779, 800, 810, 850, 852, 854, 869, 881, 907, 911, 930, 936, 937, 938, 941, 949,
              950, 951, 954, 957, 959, 963, 966, 985, 987, 992)
BACKGROUNDS = (7, 9, 20, 30, 35, 46, 50, 65, 72, 93, 96, 97, 119, 133, 147, 337, 350, 353, 354,
               383, 429, 460, 693, 801, 888, 947, 949, 952, 953, 955, 958, 970, 972, 973, 974,
               977, 979, 998)


def class_pools(mode: str, classes, num_classes: int) -> tuple[np.ndarray, ...]:
  """Per mechanism (shape, texture, bg) the classes it draws from, uniformly."""
  if mode == "random":
    return (np.arange(num_classes, dtype=np.int32),) * 3
  if mode == "best_classes":
    if num_classes != 1000:
      raise ValueError(f"mode 'best_classes' lists ImageNet classes; the model has {num_classes}")
    return tuple(np.asarray(p, np.int32) for p in (MASKS, FOREGROUND, BACKGROUNDS))
  if mode == "fixed_classes":
    if len(classes) != 3 or not all(0 <= int(c) < num_classes for c in classes):
      raise ValueError(f"config.classes={tuple(classes)} must be three classes (shape, texture, bg) "
                       f"in 0..{num_classes - 1}")
    return tuple(np.asarray([c], np.int32) for c in classes)
  raise ValueError(f"config.mode='{mode}' is not one of {MODES}")


_DRAW_CHUNK = 64  # indices per draw call: one compilation for every batch size, mode and sheet


@functools.partial(jax.jit, static_argnames="z_dim")
def _draw(key, index, pools, sizes, truncation, z_dim: int):
  def one(i):
    k = jax.random.split(jax.random.fold_in(key, i), 5)
    cls = jnp.stack([pools[m, jax.random.randint(k[m], (), 0, sizes[m])] for m in range(3)])
    z = biggan_lib.truncated_noise(k[3], (z_dim,), truncation)
    return z, cls, jax.random.randint(k[4], (), 0, pools.shape[1])
  return jax.vmap(one)(index)


def draw_inputs(seed: int, index: np.ndarray, pools, truncation: float, z_dim: int,
                num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per image index: noise ``truncnorm(-2, 2) * truncation`` [n, z_dim], classes [n, 3] (shape,
  texture, bg) and a random interpolation target [n], each from ``fold_in(key(seed), i)`` alone."""
  # On the CPU backend: bit-identical noise whatever the accelerator (compiled erf_inv may differ in
  # its last bits between platforms).
  try:
    dev = jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    dev = jax.local_devices()[0]
  table = np.zeros((3, num_classes), np.int32)  # the pools as one shape, whatever the mode
  for m, pool in enumerate(pools):
    table[m, :len(pool)] = pool
  sizes = np.asarray([len(p) for p in pools], np.int32)
  index = np.asarray(index, np.int32)
  n = len(index)
  padded = np.pad(index, (0, -n % _DRAW_CHUNK if n else _DRAW_CHUNK))
  consts = jax.device_put((jax.random.key(seed), table, sizes, np.float32(truncation)), dev)
  outs = [_draw(consts[0], jax.device_put(padded[s:s + _DRAW_CHUNK], dev), *consts[1:], z_dim=z_dim)
          for s in range(0, len(padded), _DRAW_CHUNK)]
  z, cls, target = (np.concatenate([np.asarray(o[k]) for o in outs])[:n] for k in range(3))
  return z, cls, target


@functools.lru_cache(maxsize=4)
def forward_fn(cfg: CGNConfig, dtype: str) -> Callable:
  """``jit(variables, z, y_shape, y_text, y_bg, sel) -> {x_gen, mask, foreground, background}`` in
  eval mode. Labels are class vectors [B, num_classes] for datasets (exact one-hots, which embed
  exactly like int ids) and sheets (soft vectors) alike, and the truncation's statistics selection
  is data: one compilation per shape serves every run of the process (hence the cache)."""
  model = ImagenetCGN(cfg, dtype=jnp.dtype(dtype))

  def fwd(variables, z, y_shape, y_text, y_bg, sel):
    out = model.apply(variables, z, y_shape, y_text, y_bg, sel, train=False, with_x_gt=False,
                      with_bg_mask=False)
    return {k: out[k] for k in ("x_gen", "mask", "foreground", "background")}

  return jax.jit(fwd)


@functools.partial(jax.jit, static_argnames="minmax")
def to_uint8(x: jax.Array, minmax: bool) -> jax.Array:
  """[-1, 1] NHWC -> uint8 as torchvision's ``save_image(normalize=True)`` (per-image min-max) or,
  with ``minmax=False``, its ``value_range=(-1, 1)`` (clamp, then linear)."""
  x = x.astype(jnp.float32)
  if minmax:
    lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
    hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
    x = (x - lo) / jnp.maximum(hi - lo, 1e-5)
  else:
    x = (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0
  return jnp.floor(jnp.clip(x * 255.0 + 0.5, 0.0, 255.0)).astype(jnp.uint8)


def selection(truncation: float, cfg: CGNConfig) -> biggan_lib.StatSelection:
  """The authors' float64 statistics selection, as arrays: traced, so any truncation reuses one
  compilation (BigGAN's weighted-row path equals the indexed one exactly)."""
  s = biggan_lib.stat_selection(truncation, cfg.biggan.n_stats)
  return biggan_lib.StatSelection(np.int32(s.start), np.float32(s.coef), np.float32(s.one_minus))
