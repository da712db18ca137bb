"""The one MNIST input pipeline (CGN and classifier training): epochs, shuffle, this host's rows.

Batches are a pure function of the step: epoch ``e`` visits the images in the order
``np.random.default_rng([seed, e]).permutation(n)``, and step ``s`` is batch ``s % steps_per_epoch``
of epoch ``s // steps_per_epoch``. So the step alone is the data position, and a resumed run reads
exactly the batches the uninterrupted run would. Each host decodes only its own rows of a batch.
The last incomplete batch of an epoch is dropped (static shapes; the authors' sizes divide exactly).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cgn_jax import parallel
from cgn_jax.data import build, storage


def variant_dir(config: Any, workdir: str, field: str = "dataset_dir") -> str:
  """The built MNIST variant of ``config.dataset``: ``config.<field>`` or ``<workdir>/data/<name>``,
  built from raw MNIST on first use."""
  out = config.get(field) or os.path.join(workdir, "data", config.dataset)
  limit = config.dataset_limit if config.dataset_limit > 0 else None
  # Process 0 builds, the others wait and then find it built (a shared workdir is written once).
  parallel.main_process_first(f"build {out}", lambda: build.build_variant(
      config.dataset, config.data_dir, out, seed=config.data_seed, limit=limit))
  return out


def load_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(stored images, target labels int32, encoding) of a dataset in the storage format."""
  manifest = storage.read_manifest(path)
  images, labels = storage.read_split(path, split, decode=False)
  return images, labels[manifest["target"]].astype(np.int32), manifest["image"]["encoding"]


class EpochBatches:
  """``batch(step) -> {"image": float32 [b, H, W, 3] in [-1, 1], "label": int32 [b]}``, this host's
  rows ``b`` of the global batch."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, encoding: str, batch_size: int,
               seed: int):
    self.images, self.labels, self.encoding = images, labels, encoding
    self.batch_size, self.seed = batch_size, seed
    self.steps_per_epoch = len(labels) // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch size {batch_size} exceeds the {len(labels)} training images; "
                       f"choose a smaller batch size")
    self._epoch, self._perm = -1, None

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
    return self._perm

  def batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    idx = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
    idx = idx[parallel.host_rows(self.batch_size)]
    return {"image": storage.decode_images(self.images[idx], self.encoding),
            "label": self.labels[idx]}

  def position(self, step: int) -> dict[str, int]:
    epoch, i = divmod(step, self.steps_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": i, "seed": self.seed}
