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

``DatasetWriter`` writes a dataset in one go into a hidden sibling directory
(``.NAME.incomplete-XXXX``) that is renamed into place only after the manifest is written there, so
``path`` either does not exist or is complete; an interrupted write leaves only that sibling
(safe to delete, and :func:`remove_leftovers` does).

``PartWriter`` writes a dataset over several runs (a generation job that may be killed), one part
per process: every part goes into the one deterministic staging directory ``.NAME.incomplete``
(part ``''``: ``train-00000...``; part ``p001``: ``train-p001-00000...``) and, after each complete
shard, rewrites its progress record ``progress.json`` / ``progress-p001.json`` atomically. A rerun
whose fingerprint (what determines the content) equals the record's keeps the recorded shards and
continues after them; anything else of that part is dropped. Once every part is closed, one process
calls :func:`install_parts`: the records are merged into the manifest (parts in the given order,
their shards listed part by part) and the directory is moved into place, replacing an older dataset
only then. Parts whose rows interleave in the dataset's order (each process holds some rows of
every batch) also get ``train.order.npy``, each stored row's position: ``read_split`` returns the
rows in the dataset's order (the one a single writer would have stored), ``iter_shards`` as stored.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

FORMAT = "cgn_jax.dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ORDER = "order"  # <split>.order.npy: each stored row's position, when writers interleave
_SHARD_BYTES = 256 * 2**20  # images per shard chosen so that one shard holds about this many bytes
_RESERVED = ("format", "format_version", "image", "label_columns", "target", "splits",
             "created_utc", "fingerprint")
_ENCODINGS = {"uint8": "uint8_unit", "float16": "float_signed", "float32": "float_signed"}
_STAGING = ".incomplete"


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


class _ShardFiles:
  """Encoding, label tables, shard files and their bookkeeping in one folder (both writers)."""

  def __init__(self, folder: str, image_dtype: str, label_columns: Sequence[str] | None,
               shard_size: int | None, part: str = ""):
    if image_dtype not in _ENCODINGS:
      raise ValueError(f"image_dtype must be one of {sorted(_ENCODINGS)}, got {image_dtype!r}")
    self._folder = folder
    self._dtype = np.dtype(image_dtype)
    self._columns = list(label_columns) if label_columns is not None else None
    self._shard_size = shard_size
    self._part = part
    self._image_shape: tuple[int, ...] | None = None
    self._quantized = False
    self._splits: dict[str, dict[str, Any]] = {}
    self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

  def _add(self, images: np.ndarray, labels: Any, split: str) -> None:
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

  def _image_info(self) -> dict[str, Any] | None:
    if self._image_shape is None:
      return None
    return {"shape": list(self._image_shape), "dtype": self._dtype.name, "layout": "NHWC",
            "encoding": _ENCODINGS[self._dtype.name], "quantized": self._quantized}

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
    info = self._splits.setdefault(split, _empty_info())
    stem = f"{split}-{self._part + '-' if self._part else ''}{len(info['shards']):05d}"
    for suffix, arr in (("images", images), ("labels", table)):
      _write_npy(os.path.join(self._folder, f"{stem}.{suffix}.npy"), arr)
    size = os.path.getsize(os.path.join(self._folder, stem + ".images.npy"))
    info["shards"].append({"stem": stem, "count": int(len(images)), "bytes": size})
    info["count"] += int(len(images))
    hist = info["label_histogram"]
    for i, name in enumerate(self._columns):
      hist[name] = _sum_histograms(hist.get(name, []), np.bincount(table[:, i]))


class DatasetWriter(_ShardFiles):
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
    _check_meta(meta)
    self.path = os.path.abspath(path)
    if os.path.exists(self.path) and not overwrite:
      raise DataError(f"{self.path} exists already; remove it, pass overwrite=True, or choose "
                      "another path")
    check_replaceable(self.path)
    self._meta = meta
    self._target = target
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}{_STAGING}-", dir=parent)
    os.chmod(self._tmp, 0o755)  # mkdtemp's 0700 would survive the rename into place
    super().__init__(self._tmp, image_dtype, label_columns, shard_size)
    self._open = True

  def add(self, images: np.ndarray, labels: Any, split: str = "train") -> None:
    """Appends a chunk to ``split``; labels: 1-D array, (n, K) array or dict of named columns."""
    if not self._open:
      raise RuntimeError("writer is closed")
    self._add(images, labels, split)

  def close(self) -> str:
    """Writes the remaining shards and the manifest, then moves the dataset into place."""
    if not self._open:
      return self.path
    try:
      for split in list(self._pending):
        self._flush(split, final=True)
      if not self._splits:
        raise ValueError("nothing was added")
      manifest = _manifest(self._meta, self._image_info(), self._columns, self._target,
                           self._splits)
      _write_json(os.path.join(self._tmp, MANIFEST), manifest)
      _move_into_place(self._tmp, self.path)
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


class PartWriter(_ShardFiles):
  """One process's part of one split of a dataset built over one or more runs (resumable).

  Unlike ``DatasetWriter`` an error or a kill leaves what is written: the next ``PartWriter`` of
  the same ``path``, ``part`` and ``fingerprint`` continues after the last complete shard
  (``rows`` says how many images that part already holds). The caller feeds the remaining rows in
  the same order, ``close()``s, and one process then calls :func:`install_parts`.

  Args:
    path: the dataset directory (it appears only at :func:`install_parts`).
    fingerprint: JSON-able description of everything that determines the content; a record with
      another fingerprint is discarded, and the manifest stores it for reuse checks.
    part: ``''`` for a single writer, else a name unique among the writers (``p003``).
    split: the split this part writes.
    image_dtype, label_columns, shard_size: as for ``DatasetWriter``.
  """

  def __init__(self, path: str, fingerprint: Mapping[str, Any], *, part: str = "",
               split: str = "train", image_dtype: str = "uint8",
               label_columns: Sequence[str] | None = None, shard_size: int | None = None):
    if part and not re.fullmatch(r"[a-z0-9]+", part):
      raise ValueError(f"part {part!r} must be lower-case letters and digits")
    self.path = os.path.abspath(path)
    self.split = split
    staging = staging_dir(self.path)
    os.makedirs(staging, exist_ok=True)
    super().__init__(staging, image_dtype, label_columns, shard_size, part)
    self._fingerprint = _normalized(fingerprint)
    self._record_path = os.path.join(staging, _record_name(part))
    self.complete = False
    record = _read_record(self._record_path)
    if record is not None and self._accepts(record):
      self._image_shape = tuple(record["image"]["shape"]) if record["image"] else None
      self._quantized = bool(record["image"] and record["image"]["quantized"])
      self._columns = record["label_columns"]
      self._shard_size = record["shard_size"]
      self._splits = {split: record["info"]}
      self.complete = bool(record["complete"])
    keep = {self._record_path} | {os.path.join(staging, f"{s['stem']}.{k}.npy")
                                  for s in self._splits.get(split, _empty_info())["shards"]
                                  for k in ("images", "labels")}
    mine = _part_file_pattern(split, part)
    for name in os.listdir(staging):  # shards past the record, .part files, another run's part
      full = os.path.join(staging, name)
      if mine.match(name) and full not in keep:
        os.remove(full)
    if not self._splits:
      self._save_record()

  @property
  def rows(self) -> int:
    """Images this part holds in complete shards."""
    return self._splits.get(self.split, _empty_info())["count"]

  def add(self, images: np.ndarray, labels: Any) -> None:
    """Appends rows; complete shards (and the record) are written as they fill."""
    if self.complete:
      raise RuntimeError(f"part {self._part!r} of {self.path} is complete")
    self._add(images, labels, self.split)

  def close(self) -> None:
    """Writes the last (short) shard and marks the part complete."""
    if not self.complete:
      self._flush(self.split, final=True)
      self.complete = True
      self._save_record()

  def _write_shard(self, split: str, images: np.ndarray, table: np.ndarray) -> None:
    super()._write_shard(split, images, table)
    self._save_record()

  def _save_record(self) -> None:
    _write_json(self._record_path, {
        "format": FORMAT, "fingerprint": self._fingerprint, "part": self._part,
        "split": self.split, "complete": self.complete, "image": self._image_info(),
        "label_columns": self._columns, "shard_size": self._shard_size,
        "info": self._splits.get(self.split, _empty_info())})

  def _accepts(self, record: Mapping[str, Any]) -> bool:
    if (record.get("format") != FORMAT or record.get("fingerprint") != self._fingerprint
        or record.get("split") != self.split or record.get("part") != self._part):
      return False
    for shard in record["info"]["shards"]:  # a listed shard must still be there, whole
      base = os.path.join(self._folder, shard["stem"])
      if (not os.path.isfile(base + ".labels.npy") or not os.path.isfile(base + ".images.npy")
          or os.path.getsize(base + ".images.npy") != shard["bytes"]):
        return False
    return True


def staging_dir(path: str) -> str:
  """Where ``PartWriter`` builds the dataset ``path``: the hidden sibling ``.NAME.incomplete``."""
  path = os.path.abspath(path)
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{_STAGING}")


def dataset_state(path: str, fingerprint: Mapping[str, Any]) -> str:
  """``'complete'`` (``path`` holds a dataset of this fingerprint), ``'staged'`` (it is complete in
  the staging directory, only not yet moved into place) or ``'todo'``."""
  want = _normalized(fingerprint)
  for state, folder in (("complete", os.path.abspath(path)), ("staged", staging_dir(path))):
    try:
      with open(os.path.join(folder, MANIFEST)) as f:
        if json.load(f).get("fingerprint") == want:
          return state
    except (OSError, ValueError):
      pass
  return "todo"


def install_parts(path: str, meta: Mapping[str, Any], parts: Sequence[str], *,
                  split: str = "train", target: str | None = None,
                  order: np.ndarray | None = None) -> str:
  """Merges the closed parts' records into the manifest and moves the dataset into place.

  Call once (one process), after every part's ``close()``. Files of the staging directory that no
  record lists (another run's parts, records) are removed first. ``order[r]`` is the position of
  stored row ``r`` (the parts' rows one after the other) in the dataset's order, when the parts
  interleave (rows of several processes): ``read_split`` returns the rows in that order. Returns
  ``path``.
  """
  meta = dict(meta)
  _check_meta(meta)
  path = os.path.abspath(path)
  staging = staging_dir(path)
  records = []
  for part in parts:
    record = _read_record(os.path.join(staging, _record_name(part)))
    if record is None or not record["complete"]:
      raise DataError(f"part {part or '(single)'} of {path} is not complete; rerun the job")
    records.append(record)
  if len({json.dumps(r["fingerprint"], sort_keys=True) for r in records}) != 1:
    raise DataError(f"the parts of {path} were written by different runs; rerun the job")
  full = [r for r in records if r["info"]["count"]]
  if not full:
    raise ValueError("nothing was added")
  image = dict(full[0]["image"], quantized=any(r["image"]["quantized"] for r in full))
  for r in full:
    if (r["image"]["shape"], r["image"]["dtype"], r["label_columns"]) != (
        image["shape"], image["dtype"], full[0]["label_columns"]):
      raise DataError(f"the parts of {path} hold different images or labels; rerun the job")
  merged = _empty_info()
  for r in full:
    merged["count"] += r["info"]["count"]
    merged["shards"] += r["info"]["shards"]
    for name, counts in r["info"]["label_histogram"].items():
      merged["label_histogram"][name] = _sum_histograms(
          merged["label_histogram"].get(name, []), np.asarray(counts, np.int64))
  keep = {MANIFEST} | {f"{s['stem']}.{k}.npy" for s in merged["shards"]
                       for k in ("images", "labels")}
  if order is not None:
    order = np.asarray(order, np.int64)
    if not np.array_equal(np.sort(order), np.arange(merged["count"])):
      raise ValueError(f"order is not a permutation of the {merged['count']} stored rows")
    merged["order"] = f"{split}.{_ORDER}.npy"
    _write_npy(os.path.join(staging, merged["order"]), order)
    keep.add(merged["order"])
  manifest = _manifest(meta, image, full[0]["label_columns"], target, {split: merged})
  manifest["fingerprint"] = records[0]["fingerprint"]
  _write_json(os.path.join(staging, MANIFEST), manifest)
  for name in os.listdir(staging):
    if name not in keep:
      full_name = os.path.join(staging, name)
      shutil.rmtree(full_name) if os.path.isdir(full_name) else os.remove(full_name)
  return install_staged(path)


def install_staged(path: str) -> str:
  """Moves a complete staging directory (manifest written) to ``path``, replacing a dataset."""
  path = os.path.abspath(path)
  check_replaceable(path)
  _move_into_place(staging_dir(path), path)
  return path


def remove_leftovers(path: str) -> list[str]:
  """Removes what killed writers of ``path`` leave beside it: ``DatasetWriter``'s
  ``.NAME.incomplete-XXXX`` directories and the replaced copies ``.NAME.old``; returns them."""
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  stale = re.compile(rf"^\.{re.escape(name)}(\{_STAGING}-.+|\.old)$")
  removed = []
  if os.path.isdir(parent):
    for entry in os.listdir(parent):
      if stale.match(entry):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        removed.append(os.path.join(parent, entry))
  return removed


def _empty_info() -> dict[str, Any]:
  return {"count": 0, "label_histogram": {}, "shards": []}


def _sum_histograms(old, new) -> list[int]:
  old, new = np.asarray(old, np.int64), np.asarray(new, np.int64)
  m = max(len(new), len(old))
  return (np.pad(old, (0, m - len(old))) + np.pad(new, (0, m - len(new)))).tolist()


def _check_meta(meta: Mapping[str, Any]) -> None:
  clash = sorted(set(meta) & set(_RESERVED))
  if clash:
    raise ValueError(f"meta keys {clash} are reserved by the manifest")


def check_replaceable(path: str) -> None:
  """DataError unless ``path`` is free or holds a dataset (which a writer may then replace)."""
  if os.path.exists(path) and not os.path.isfile(os.path.join(path, MANIFEST)):
    raise DataError(f"{path} exists and is not a cgn_jax dataset; refusing to replace it")


def _manifest(meta, image, columns, target, splits) -> dict[str, Any]:
  if target is None:
    target = "label" if "label" in columns else columns[0]
  if target not in columns:
    raise ValueError(f"target {target!r} is not a label column {columns}")
  manifest = dict(meta)
  manifest.update(
      format=FORMAT, format_version=FORMAT_VERSION,
      created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      image=image, label_columns=columns, target=target, splits=splits)
  return manifest


def _move_into_place(src: str, path: str) -> None:
  """Renames ``src`` to ``path``; an existing ``path`` goes aside first and is deleted after."""
  if os.path.exists(path):
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old")
    if os.path.exists(old):
      shutil.rmtree(old)
    os.rename(path, old)
    os.rename(src, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(src, path)


def _record_name(part: str) -> str:
  return f"progress-{part}.json" if part else "progress.json"


def _part_file_pattern(split: str, part: str) -> re.Pattern:
  prefix = f"{re.escape(split)}-{re.escape(part) + '-' if part else ''}"
  shard = rf"{prefix}\d{{5,}}\.(images|labels)\.npy"
  return re.compile(rf"^({shard}|{re.escape(_record_name(part))})(\.part)?$")


def _read_record(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _normalized(obj: Any) -> Any:
  """``obj`` as it reads back from JSON (tuples become lists), so comparisons match the files."""
  return json.loads(json.dumps(obj))


def _write_npy(path: str, arr: np.ndarray) -> None:
  with open(path + ".part", "wb") as f:
    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
  os.replace(path + ".part", path)


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
  order_file = _split_info(read_manifest(path), path, split).get("order")
  if order_file:  # rows of several writers: back into the dataset's order
    order = _load_npy(os.path.join(path, order_file), False, len(images))
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    images, labels = images[where], {k: v[where] for k, v in labels.items()}
  return images, labels


def read_xy(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(float32 NHWC images in [-1, 1], int32 labels of the manifest's target column)."""
  images, labels = read_split(path, split)
  return images, labels[read_manifest(path)["target"]]
