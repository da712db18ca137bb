"""Raw MNIST in its original order, from the IDX files or from a prepared TFDS 'mnist'.

Everything downstream (the authors' 50k/10k split of the training set, Colored MNIST's train set)
depends on MNIST's *original* order, so both sources return it:

* IDX files (``train-images-idx3-ubyte.gz`` ...; gzip or uncompressed; in ``data_dir``, in
  ``data_dir/mnist`` or in torchvision's ``data_dir/MNIST/raw``): parsed with numpy, header and
  sizes validated. Loads in well under a second.
* TFDS 'mnist' (optional extra ``cgn_jax[tfds]``), read with ``tfds.data_source`` -- no TensorFlow.
  TFDS stores records shuffled: at write time it sorts examples by md5(split name + str(key)), and
  the stock builder's key is the example's index in the IDX file. Sorting the indices by that hash
  therefore gives, for every record, its original MNIST index; we invert that permutation here. This
  is computed, not downloaded, so it works for any copy of the stock dataset (``tfds.load`` users
  with internet included); ``shared/data/tfds/mnist_record_to_mnist_index.npz`` (found by matching
  images) confirms it in the tests.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib

import numpy as np

from cgn_jax.data.storage import DataError

SPLITS = ("train", "test")
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
SPLIT_SIZES = {"train": 60000, "test": 10000}
# sha256 of the *uncompressed* canonical files (../shared/spec/datasets.md section 1).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FILE_NAMES = ", ".join(name + ".gz" for name in _FILES.values())
_HINT = (f"point --config.data_dir at the folder that holds the four MNIST IDX files ({FILE_NAMES}; "
         f"in it or in its mnist/ subfolder), e.g. the project's shared/data")
_DTYPE_CODES = {0x08: np.uint8}  # the only IDX element type MNIST uses


def find_mnist_dir(data_dir: str) -> str:
  """The folder with the IDX files: ``data_dir``, ``data_dir/mnist`` or ``data_dir/MNIST/raw``."""
  for cand in (data_dir, os.path.join(data_dir, "mnist"), os.path.join(data_dir, "MNIST", "raw")):
    if _idx_path(cand, _FILES[("train", "images")]) is not None:
      return cand
  raise DataError(f"no MNIST IDX files in {_where(data_dir)} or its mnist/ subfolder; {_HINT}")


def _where(data_dir: str) -> str:
  path = os.path.abspath(data_dir)
  return path if os.path.isdir(path) else f"{path} (which does not exist)"


def _idx_path(folder: str, name: str) -> str | None:
  for fname in (name + ".gz", name):
    p = os.path.join(folder, fname)
    if os.path.isfile(p):
      return p
  return None


def read_idx(path: str, *, sha256: str | None = None) -> np.ndarray:
  """Parses one IDX file (gzip or raw): a big-endian magic 0x0000TTNN, NN uint32 dims, then data."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except FileNotFoundError as e:
    raise DataError(f"{path} not found; {_HINT}") from e
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise DataError(f"{path} is not a valid gzip file ({type(e).__name__}: {e}); "
                    "download it again or decompress it and keep the raw file") from e
  if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
    raise DataError(f"{path}: contents differ from the canonical MNIST file (sha256 mismatch)")
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPE_CODES:
    raise DataError(f"{path}: bad IDX magic {raw[:4].hex()!r} (expected 0x00000801/0x00000803); "
                    "not an MNIST IDX file")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated IDX header")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  dtype = np.dtype(_DTYPE_CODES[raw[2]])
  expected = int(np.prod(dims)) * dtype.itemsize
  if len(raw) - header != expected:
    raise DataError(f"{path}: {len(raw) - header} data bytes, header {dims} needs {expected}; "
                    "the file is truncated or corrupt, download it again")
  return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def load_mnist_idx(data_dir: str, split: str, *, verify: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 28, 28), int64 labels (N,)) of ``split`` in the original MNIST order.

  Args:
    data_dir: see ``find_mnist_dir``.
    split: 'train' (60000) or 'test' (10000).
    verify: also compare the sha256 of the uncompressed contents with the canonical files.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  folder = find_mnist_dir(data_dir)
  out = []
  for kind, ndim in (("images", 3), ("labels", 1)):
    name = _FILES[(split, kind)]
    path = _idx_path(folder, name)
    if path is None:
      raise DataError(f"{os.path.join(folder, name)}[.gz] missing; {_HINT}")
    arr = read_idx(path, sha256=SHA256[name] if verify else None)
    if arr.ndim != ndim or (ndim == 3 and arr.shape[1:] != (28, 28)):
      raise DataError(f"{path}: shape {arr.shape}, expected ({'N, 28, 28' if ndim == 3 else 'N'}); "
                      "images and labels files swapped?")
    out.append(arr)
  images, labels = out
  if len(images) != len(labels):
    raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
  if len(images) != SPLIT_SIZES[split]:
    raise DataError(f"{folder}: {len(images)} {split} images, MNIST has {SPLIT_SIZES[split]}")
  if labels.max() > 9:
    raise DataError(f"{folder}: {split} labels outside 0..9; not MNIST")
  return images, labels.astype(np.int64)


def tfds_record_to_index(split: str, n: int) -> np.ndarray:
  """For record r of the stock TFDS 'mnist' split: the original MNIST index of its example.

  TFDS orders records by the 128-bit md5 of (split name, str(key)) and the stock builder keys each
  example by its position in the IDX file (tensorflow_datasets/core/hashing.py, shuffle.py).
  """
  base = hashlib.md5(split.encode())

  def key(i: int) -> int:
    h = base.copy()
    h.update(str(i).encode())
    return int.from_bytes(h.digest(), "big")

  return np.array(sorted(range(n), key=key), dtype=np.int64)


def load_mnist_tfds(tfds_data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 28, 28), int64 labels) from a prepared TFDS 'mnist', in the original order.

  Needs the ``tfds`` extra (tensorflow-datasets, array_record, importlib_resources), not TensorFlow.
  ``tfds_data_dir`` is the TFDS data dir (the folder that holds ``mnist/3.0.1``).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError("reading TFDS needs the optional extra: pip install 'cgn_jax[tfds]'") from e
  if not os.path.isdir(os.path.join(tfds_data_dir, "mnist")):
    raise DataError(f"no prepared TFDS 'mnist' under {os.path.abspath(tfds_data_dir)}; run "
                    "tfds.builder('mnist', data_dir=...).download_and_prepare() once (needs "
                    f"internet), or {_HINT}")
  try:
    src = tfds.data_source("mnist", data_dir=tfds_data_dir, split=split, download=False)
    records = src.__getitems__(list(range(len(src))))
  except Exception as e:  # TFDS raises many types for a missing/broken dataset
    raise DataError(f"cannot read TFDS 'mnist' {split} from {tfds_data_dir}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from e
  n = len(records)
  if n != SPLIT_SIZES[split]:
    raise DataError(f"TFDS 'mnist' {split} in {tfds_data_dir} has {n} records, MNIST has "
                    f"{SPLIT_SIZES[split]}")
  rec_images = np.stack([np.asarray(r["image"], np.uint8).reshape(28, 28) for r in records])
  rec_labels = np.array([int(r["label"]) for r in records], np.int64)
  order = tfds_record_to_index(split, n)
  images = np.empty_like(rec_images)
  labels = np.empty_like(rec_labels)
  images[order] = rec_images
  labels[order] = rec_labels
  return images, labels


def locate(data_dir: str, source: str = "auto") -> tuple[str, str]:
  """Where ``load_mnist`` reads MNIST from: ``("idx", folder)`` or ``("tfds", tfds data dir)``.

  source: 'idx' (the IDX files, see ``find_mnist_dir``), 'tfds' (``data_dir`` or ``data_dir/tfds``
  is a TFDS data dir with a prepared 'mnist'), or 'auto' (IDX if present, else TFDS).
  """
  if source not in ("auto", "idx", "tfds"):
    raise ValueError(f"source must be 'auto', 'idx' or 'tfds', got {source!r}")
  if source == "idx":
    return "idx", find_mnist_dir(data_dir)
  if source == "auto":
    try:
      return "idx", find_mnist_dir(data_dir)
    except DataError:
      pass
  for cand in (data_dir, os.path.join(data_dir, "tfds")):
    versions = os.path.join(cand, "mnist")
    if os.path.isdir(versions) and any(re.fullmatch(r"\d+\.\d+\.\d+", v) and
                                       os.path.isdir(os.path.join(versions, v))
                                       for v in os.listdir(versions)):
      return "tfds", cand
  if source == "tfds":
    raise DataError(f"no prepared TFDS 'mnist' (mnist/<version>/) in {_where(data_dir)} or its "
                    "tfds/ subfolder")
  raise DataError(f"neither MNIST IDX files nor a prepared TFDS 'mnist' in {_where(data_dir)}; "
                  f"{_HINT}")


def load_mnist(data_dir: str, split: str, *, source: str = "auto") -> tuple[np.ndarray, np.ndarray]:
  """MNIST ``split`` in original order from ``data_dir`` (found by ``locate``, same ``source``)."""
  kind, where = locate(data_dir, source)
  # Once the IDX files are there, their errors (a corrupt file, ...) are the user's to see.
  return load_mnist_idx(data_dir, split) if kind == "idx" else load_mnist_tfds(where, split)
