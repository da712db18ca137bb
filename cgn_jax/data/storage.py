"""The on-disk format of every generated dataset: MNIST variants now, counterfactual sets later.

A dataset is a directory::

  manifest.json                what is inside (written last: no manifest = incomplete)
  train-00000.images.npy       (n, H, W, C) images, NHWC
  train-00000.labels.npy       (n, K) int32, one column per named label
  train-00001.images.npy ...   further shards of a large split
  test-00000.images.npy ...

Plain ``.npy`` files rather than ``.npz``: they need nothing but numpy to read (no TensorFlow, no
torch), load at disk speed, and can be memory-mapped, so a 10^6-image counterfactual set can be
streamed shard by shard instead of held in memory. Compression was measured and rejected: zlib on
this 2-core machine costs 5-12 s per 700 MB and makes every read slower.

Image encodings (``manifest['image']['encoding']``):

* ``uint8_unit``: uint8 v in [0, 255] of an image that lived in [0, 1] as v/255 (torchvision's
  ``ToTensor`` of a uint8 image). Decoded exactly as torch does it: ``(float32(v)/255 - 0.5)/0.5``.
  Used where the recipe is exactly uint8-derived (Colored and Wildlife MNIST) -- lossless.
* ``float_signed``: float16/float32 holding the final [-1, 1] image itself (no decode arithmetic).
  Used where the recipe produces non-integer values (Double-colored MNIST's colour noise, CGN
  outputs).

Every write goes into a hidden sibling directory (``.NAME.incomplete-XXXX``) that is renamed into
place only after the manifest is written there, so ``path`` either does not exist or is complete.
An interrupted write leaves only that sibling behind (safe to delete).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

FORMAT = "cgn_jax.dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_BYTES = 256 * 2**20  # images per shard chosen so that one shard holds about this many bytes
_RESERVED = ("format", "format_version", "image", "label_columns", "target", "splits",
             "created_utc")
_ENCODINGS = {"uint8": "uint8_unit", "float16": "float_signed", "float32": "float_signed"}


class DataError(Exception):
  """Missing, corrupt or mismatched data; the one-line message says what is wrong and what to do."""


def decode_images(stored: np.ndarray, encoding: str) -> np.ndarray:
  """Stored shard images -> float32 NHWC in [-1, 1] (see the module docstring for encodings)."""
  if encoding == "uint8_unit":
    # The same float32 operations, in the same order, as torchvision ToTensor (div 255) and
    # Normalize(0.5, 0.5) (sub 0.5, div 0.5): bit-identical to the authors' tensors. (In place on
    # one float32 copy: a 256-entry lookup table is slower in numpy.)
    x = np.asarray(stored).astype(np.float32)
    x /= np.float32(255)
    x -= np.float32(0.5)
    x /= np.float32(0.5)
    return x
  if encoding == "float_signed":
    return np.asarray(stored, dtype=np.float32)
  raise DataError(f"unknown image encoding {encoding!r}; this cgn_jax is too old for the dataset")


def encode_uint8(images_signed: np.ndarray) -> np.ndarray:
  """Float images in [-1, 1] -> nearest uint8_unit code (exact inverse of ``decode_images``)."""
  x = (np.asarray(images_signed, np.float32) + np.float32(1)) * np.float32(127.5)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class DatasetWriter:
  """Streams (images, labels) chunks of one or more splits into a dataset directory.

  Use as a context manager (an exception aborts and removes the partial output) or call
  ``close()``; nothing appears at ``path`` before ``close()`` succeeds.

  Args:
    path: the dataset directory to create.
    meta: JSON-able provenance stored at the manifest's top level, e.g. ``name``, ``seed``,
      ``recipe_version``, ``source``.
    image_dtype: 'uint8' (images given as uint8 are stored as-is; float images in [-1, 1] are
      quantised to the nearest code and the manifest says ``quantized``), 'float16' or 'float32'
      (float images in [-1, 1] stored as they are).
    label_columns: names of the label columns when labels are passed as a 2-D (n, K) array.
    target: the column that ``read_xy`` returns as the classification label (default: 'label' if
      there is such a column, else the first).
    shard_size: images per shard (default: about 256 MB per shard).
    overwrite: replace an existing dataset at ``path`` (only ever one that has a manifest).
  """

  def __init__(self, path: str, meta: Mapping[str, Any] | None = None, *,
               image_dtype: str = "uint8",
               label_columns: Sequence[str] | None = None, target: str | None = None,
               shard_size: int | None = None, overwrite: bool = False):
    if image_dtype not in _ENCODINGS:
      raise ValueError(f"image_dtype must be one of {sorted(_ENCODINGS)}, got {image_dtype!r}")
    meta = dict(meta or {})
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
      raise ValueError(f"meta keys {clash} are reserved by the manifest")
    self.path = os.path.abspath(path)
    if os.path.exists(self.path) and not overwrite:
      raise DataError(f"{self.path} exists already; remove it, pass overwrite=True, or choose "
                      "another path")
    if os.path.exists(self.path) and not os.path.isfile(os.path.join(self.path, MANIFEST)):
      raise DataError(f"{self.path} exists and is not a cgn_jax dataset; refusing to replace it")
    self._meta = meta
    self._dtype = np.dtype(image_dtype)
    self._columns = list(label_columns) if label_columns is not None else None
    self._target = target
    self._shard_size = shard_size
    self._image_shape: tuple[int, ...] | None = None
    self._quantized = False
    self._splits: dict[str, dict[str, Any]] = {}
    self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.incomplete-", dir=parent)
    os.chmod(self._tmp, 0o755)  # mkdtemp's 0700 would survive the rename into place
    self._open = True

  def add(self, images: np.ndarray, labels: Any, split: str = "train") -> None:
    """Appends a chunk to ``split``; labels: 1-D array, (n, K) array or dict of named columns."""
    if not self._open:
      raise RuntimeError("writer is closed")
    if not split or "/" in split or "." in split or "-" in split:
      raise ValueError(f"bad split name {split!r}")
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC, got shape {images.shape}")
    if self._image_shape is None:
      self._image_shape = tuple(images.shape[1:])
      if self._shard_size is None:
        per = int(np.prod(self._image_shape)) * self._dtype.itemsize
        self._shard_size = max(1, _SHARD_BYTES // per)
    elif tuple(images.shape[1:]) != self._image_shape:
      raise ValueError(f"image shape {images.shape[1:]} != {self._image_shape} of earlier chunks")
    images = self._encode(images)
    table = self._label_table(labels, len(images))
    self._pending.setdefault(split, []).append((images, table))
    self._flush(split, final=False)

  def close(self) -> str:
    """Writes the remaining shards and the manifest, then moves the dataset into place."""
    if not self._open:
      return self.path
    try:
      for split in list(self._pending):
        self._flush(split, final=True)
      if not self._splits:
        raise ValueError("nothing was added")
      if self._target is None:
        self._target = "label" if "label" in self._columns else self._columns[0]
      if self._target not in self._columns:
        raise ValueError(f"target {self._target!r} is not a label column {self._columns}")
      manifest = dict(self._meta)
      manifest.update(
          format=FORMAT, format_version=FORMAT_VERSION,
          created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          image={"shape": list(self._image_shape), "dtype": self._dtype.name, "layout": "NHWC",
                 "encoding": _ENCODINGS[self._dtype.name], "quantized": self._quantized},
          label_columns=self._columns, target=self._target, splits=self._splits)
      _write_json(os.path.join(self._tmp, MANIFEST), manifest)
      self._install()
    except BaseException:
      self.abort()
      raise
    self._open = False
    return self.path

  def abort(self) -> None:
    """Drops everything written so far."""
    self._open = False
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self) -> "DatasetWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()

  # -- internals ---------------------------------------------------------------------------------

  def _encode(self, images: np.ndarray) -> np.ndarray:
    if self._dtype == np.uint8:
      if images.dtype == np.uint8:
        return images
      if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"uint8 storage takes uint8 or float images, got {images.dtype}")
      self._quantized = True
      return encode_uint8(images)
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"{self._dtype} storage takes float images in [-1, 1], got {images.dtype}")
    return images.astype(self._dtype)

  def _label_table(self, labels: Any, n: int) -> np.ndarray:
    if isinstance(labels, Mapping):
      names = list(labels)
      cols = [np.asarray(labels[k]) for k in names]
    else:
      arr = np.asarray(labels)
      if arr.ndim == 1:
        names, cols = (self._columns or ["label"]), [arr]
      elif arr.ndim == 2 and self._columns is not None and arr.shape[1] == len(self._columns):
        names, cols = self._columns, [arr[:, i] for i in range(arr.shape[1])]
      else:
        raise ValueError(f"labels of shape {arr.shape}: pass a dict of columns, a 1-D array, or a "
                         "2-D array together with label_columns")
    if self._columns is None:
      self._columns = names
    if names != self._columns:
      raise ValueError(f"label columns {names} != {self._columns} of earlier chunks")
    for name, c in zip(names, cols):
      if c.shape != (n,) or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"label column {name!r}: need {n} integers, got {c.dtype} {c.shape}")
      if n and c.min() < 0:
        raise ValueError(f"label column {name!r} has negative values")
    return np.stack(cols, axis=1).astype(np.int32) if cols else np.zeros((n, 0), np.int32)

  def _flush(self, split: str, final: bool) -> None:
    chunks = self._pending.get(split, [])
    n = sum(len(c[0]) for c in chunks)
    while n >= self._shard_size or (final and n > 0):
      images = np.concatenate([c[0] for c in chunks]) if len(chunks) > 1 else chunks[0][0]
      table = np.concatenate([c[1] for c in chunks]) if len(chunks) > 1 else chunks[0][1]
      k = min(n, self._shard_size)
      self._write_shard(split, images[:k], table[:k])
      chunks = [(images[k:], table[k:])] if k < n else []
      n -= k
    self._pending[split] = chunks

  def _write_shard(self, split: str, images: np.ndarray, table: np.ndarray) -> None:
    info = self._splits.setdefault(split, {"count": 0, "label_histogram": {}, "shards": []})
    stem = f"{split}-{len(info['shards']):05d}"
    for suffix, arr in (("images", images), ("labels", table)):
      final = os.path.join(self._tmp, f"{stem}.{suffix}.npy")
      with open(final + ".part", "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
      os.replace(final + ".part", final)
    info["shards"].append({"stem": stem, "count": int(len(images)),
                           "bytes": os.path.getsize(os.path.join(self._tmp, stem + ".images.npy"))})
    info["count"] += int(len(images))
    hist = info["label_histogram"]
    for i, name in enumerate(self._columns):
      new = np.bincount(table[:, i])
      old = np.asarray(hist.get(name, []), np.int64)
      m = max(len(new), len(old))
      hist[name] = (np.pad(old, (0, m - len(old))) + np.pad(new, (0, m - len(new)))).tolist()

  def _install(self) -> None:
    if os.path.exists(self.path):  # overwrite=True and checked to be a dataset in __init__
      old = self._tmp + ".old"
      os.rename(self.path, old)
      os.rename(self._tmp, self.path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(self._tmp, self.path)


def _write_json(path: str, obj: Any) -> None:
  with open(path + ".part", "w") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")
  os.replace(path + ".part", path)


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the dataset at ``path``; DataError if there is none or it is not ours."""
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise DataError(f"no dataset at {os.path.abspath(path)}; build it first (cgn_jax.data.build)")
  if not os.path.isfile(mpath):
    raise DataError(f"{os.path.abspath(path)} has no {MANIFEST}: an incomplete or foreign dataset "
                    "directory; delete it and build it again")
  try:
    with open(mpath) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{mpath} is unreadable ({e}); delete the dataset and build it again") from e
  if manifest.get("format") != FORMAT:
    raise DataError(f"{mpath} is not a {FORMAT} manifest")
  if manifest.get("format_version", 0) > FORMAT_VERSION:
    raise DataError(f"{mpath} has format_version {manifest['format_version']}; upgrade cgn_jax")
  return manifest


def _split_info(manifest: Mapping[str, Any], path: str, split: str) -> Mapping[str, Any]:
  if split not in manifest["splits"]:
    raise DataError(f"{path} has no split {split!r} (it has {sorted(manifest['splits'])})")
  return manifest["splits"][split]


def _load_npy(file: str, mmap: bool, count: int) -> np.ndarray:
  try:
    arr = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f"{file} is missing or corrupt ({type(e).__name__}: {str(e)[:120]}); "
                    "delete the dataset and build it again") from e
  if len(arr) != count:
    raise DataError(f"{file} holds {len(arr)} rows, the manifest says {count}; rebuild the dataset")
  return arr


def iter_shards(path: str, split: str, *, mmap: bool = True, decode: bool = False
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
  """Yields (images, labels dict) per shard; with mmap and without decode, images load lazily."""
  manifest = read_manifest(path)
  enc = manifest["image"]["encoding"]
  for shard in _split_info(manifest, path, split)["shards"]:
    base = os.path.join(path, shard["stem"])
    images = _load_npy(base + ".images.npy", mmap, shard["count"])
    table = _load_npy(base + ".labels.npy", False, shard["count"])
    labels = {name: table[:, i] for i, name in enumerate(manifest["label_columns"])}
    yield (decode_images(images, enc) if decode else images), labels


def read_split(path: str, split: str, *, decode: bool = True
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The whole split in memory: (images, {column: int32 labels}).

  With ``decode`` (default) images are float32 NHWC in [-1, 1]; without, the stored array (uint8
  codes or float16/float32), a quarter of the memory for uint8 -- decode batches later with
  ``decode_images(batch, manifest['image']['encoding'])``.
  """
  parts = list(iter_shards(path, split, mmap=False, decode=decode))
  images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
  labels = {k: (np.concatenate([p[1][k] for p in parts]) if len(parts) > 1 else parts[0][1][k])
            for k in parts[0][1]}
  return images, labels


def read_xy(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(float32 NHWC images in [-1, 1], int32 labels of the manifest's target column)."""
  images, labels = read_split(path, split)
  return images, labels[read_manifest(path)["target"]]
