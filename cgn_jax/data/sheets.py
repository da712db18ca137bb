"""Image grids as PNG files: dataset contact sheets and training sample sheets.

``save_image_grid`` follows torchvision's ``save_image`` layout (``nrow`` images per row, a
``padding``-pixel border) for [-1, 1] NHWC images, and writes atomically (temp file + rename) so a
viewer or a crash never sees a half-written PNG.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cgn_jax.composer import compose


def image_grid(images: np.ndarray, nrow: int, *, padding: int = 2, pad_value: float = 1.0,
               scale: int = 1) -> np.ndarray:
  """NHWC images in [-1, 1] (C = 1 or 3) -> one uint8 HxWx3 grid, ``nrow`` images per row."""
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be NHWC with 1 or 3 channels, got {x.shape}")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if scale > 1:
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, _ = x.shape
  ncol = min(nrow, n)
  nrows = -(-n // ncol)
  grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3),
                 pad_value, np.float32)
  for i in range(n):
    r, c = divmod(i, ncol)
    y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = x[i]
  return np.rint(np.clip((grid + 1) * 127.5, 0, 255)).astype(np.uint8)


def save_image_grid(path: str, images: np.ndarray, nrow: int, **kwargs) -> str:
  """Writes ``image_grid(images, nrow, **kwargs)`` as a PNG at ``path`` atomically; returns it."""
  grid = image_grid(images, nrow, **kwargs)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".png", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(grid).save(f, format="PNG")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make every sheet unreadable to other users
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def class_rows(images: np.ndarray, labels: np.ndarray, per_class: int,
               classes: Sequence[int] = range(10)) -> np.ndarray:
  """The first ``per_class`` images of each class, class by class (blank -1 images if too few)."""
  out = []
  for k in classes:
    sel = np.asarray(images)[np.asarray(labels) == k][:per_class]
    if len(sel) < per_class:
      blank = np.full((per_class - len(sel),) + np.asarray(images).shape[1:], -1.0, np.float32)
      sel = np.concatenate([np.asarray(sel, np.float32), blank])
    out.append(np.asarray(sel, np.float32))
  return np.stack(out)  # (classes, per_class, H, W, C)


def contact_sheet(path: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], per_class: int = 8,
                  scale: int = 2) -> str:
  """Rows = classes 0..9; for each split (e.g. train, test) ``per_class`` columns, a gap between."""
  blocks = [class_rows(x, y, per_class) for x, y in splits.values()]
  gap = np.zeros((10, 1) + blocks[0].shape[2:], np.float32)  # mid-grey spacer column
  parts = []
  for i, b in enumerate(blocks):
    parts += ([gap] if i else []) + [b]
  rows = np.concatenate(parts, axis=1)
  return save_image_grid(path, rows.reshape((-1,) + rows.shape[2:]), nrow=rows.shape[1],
                         scale=scale)


def mnist_cgn_sheet(model: Any, variables: dict, key: jax.Array, path: str, n_per_class: int = 2,
                    n_classes: int = 10, train: bool = False) -> str:
  """An MNIST CGN's sheet: rows = classes; per sample four columns: mask, foreground, background,
  composite (``train``: batch statistics, as during training; the stats are not updated)."""
  cols = _mnist_sheet_columns(model, variables, key, n_per_class, n_classes, train)
  grid = np.asarray(cols).reshape((n_classes, n_per_class * 4) + cols.shape[2:])
  return save_image_grid(path, grid.reshape((-1,) + cols.shape[2:]), nrow=n_per_class * 4, scale=2)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _mnist_sheet_columns(model, variables, key, n_per_class: int, n_classes: int, train: bool):
  """(N, 4, H, W, C): one compiled forward (op by op it takes seconds of dispatch per sheet)."""
  ys = jnp.repeat(jnp.arange(n_classes), n_per_class)
  out = model.apply(variables, ys, key, train=train, mutable=["batch_stats"] if train else False)
  out = out[0] if train else out
  x = compose(out["mask"], out["foreground"], out["background"])
  mask = jnp.broadcast_to(out["mask"] * 2 - 1, x.shape)  # [0,1] -> [-1,1] like the images
  return jnp.stack([mask, out["foreground"], out["background"], x], axis=1)
