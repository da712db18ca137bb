"""Classifier data for the ImageNet invariant ensemble: ImageNet, counterfactuals, cue-conflict, IN-9.

The authors' torch pipeline (imagenet/dataloader.py, imagenet/train_classifier.py of
autonomousvision/counterfactual_generative_networks) rebuilt on numpy + PIL, without TensorFlow:

* **Rows** (:class:`Rows`): image paths plus named label columns, from an ImageNet class-folder tree
  (:func:`image_folder`, :func:`imagenet_split`), a counterfactual run (:func:`counterfactual_rows`),
  the Geirhos cue-conflict stimuli (:func:`cue_conflict_rows`) or an IN-9 variant (:func:`in9_rows`).
* **Transforms**: torchvision's ``RandomResizedCrop(224) + RandomHorizontalFlip`` (training) and
  ``Resize(256) + CenterCrop(224)`` (evaluation), then ``ToTensor + Normalize``, NHWC float32. The
  PIL calls, rounding and float32 order are torchvision's PIL path, so evaluation inputs should be
  bit-identical to the authors' (checked against hand computations; torch is not installed here).
  Random draws come from a numpy Generator: training crops follow torchvision's distribution, not
  torch's RNG stream.
* **Batch sources** with the interface of ``batches.EpochBatches`` that the shared loop
  (cgn_jax/training.py) drives: ``batch(step)`` is a pure function of ``(seed, step)`` -- the epoch
  order is ``default_rng([seed, stream, 0, epoch])``, the augmentation of row ``r`` of the global
  batch ``default_rng([seed, stream, 1, step, r])`` -- so resuming at a step is exact and the rows do
  not depend on the process count. Each process decodes only its contiguous slice of the global
  batch (``parallel.from_host_rows`` assembles them). :class:`EvalBatches` covers every row once,
  padding the last batch and returning a ``mask``.

Parallel decoding uses a ``concurrent.futures.ThreadPoolExecutor`` instead of grain (which we do not
depend on): PIL releases the GIL while it decodes and resizes, and numpy while it normalises, so
threads scale over cores without worker processes, pickling or shared memory. Each image is written
straight into its slot of the batch array; the next ``prefetch`` batches are decoded while the
current one trains.

TFDS: its prepared ``imagenet2012`` files are not read. Its manual dir holds
``ILSVRC2012_img_{train,val}.tar``; extracted (and the per-class train tars extracted into
``<wnid>/``), that is the class-folder tree read here (see :func:`imagenet_split`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import re
import threading
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from cgn_jax.data import imagenet_cfs
from cgn_jax.data.storage import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# IN-9 statistics: the authors' Imagenet9 loader (imagenet/dataloader.py:275-276), from the
# backgrounds-challenge code; applied to the stored images without resize or crop.
IN9_MEAN = (0.4717, 0.4499, 0.3837)
IN9_STD = (0.2600, 0.2516, 0.2575)
IN9_VARIANTS = ("original", "mixed_same", "mixed_rand", "only_fg")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # matched case-insensitively
CF_LABELS = ("shape_label", "texture_label", "bg_label")
_WNID = re.compile(r"^n\d{8}$")
# Geirhos naming: <shape><n>-<texture><m>.png, optionally behind a 'prefix_' (model-vs-human's
# session copies); the authors slice the texture with [:-5], which assumes a one-digit m.
_CUE = re.compile(r"^(?:.*_)?([a-z]+)(\d+)-([a-z]+)(\d+)\.(?:png|jpe?g)$", re.IGNORECASE)
_AUTHORS_CF_HEADER = "im_name,shape_cls,texture_cls,bg_cls"


def eval_file(name: str) -> str:
  """``<DATA_DIR>/eval/<name>`` (configs.common.DATA_DIR, imported late: configs sit above us)."""
  from configs.common import DATA_DIR  # pylint: disable=import-outside-toplevel
  return os.path.join(DATA_DIR, "eval", name)


# -- transforms -------------------------------------------------------------------------------------


def normalize(pixels: Any, mean: Sequence[float], std: Sequence[float],
              out: Optional[np.ndarray] = None) -> np.ndarray:
  """uint8 HWC RGB -> float32 ``(v / 255 - mean) / std``, in torchvision's float32 op order."""
  x = np.asarray(pixels, dtype=np.uint8)
  out = np.empty(x.shape, np.float32) if out is None else out
  np.divide(x, np.float32(255), out=out, dtype=np.float32)
  out -= np.asarray(mean, np.float32)
  out /= np.asarray(std, np.float32)
  return out


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
  """torchvision ``Resize(size)``: shorter side to ``size``, the longer one truncated, bilinear."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return img
  new = (size, int(size * long / short))
  return img.resize(new if w <= h else new[::-1], Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """torchvision ``CenterCrop``: offsets ``int(round(margin / 2))`` (Python's half-to-even)."""
  w, h = img.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, h, w) of torchvision's ``RandomResizedCrop.get_params``.

  Ten tries of an area fraction ~ U(scale) and an aspect ratio log-uniform in ``ratio``, rounded; the
  first that fits is placed uniformly. Else the centred crop of the whole image clamped to the ratio.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """RandomResizedCrop(size, scale, ratio, bilinear) + horizontal flip + normalise (needs a rng)."""
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: float = 0.5
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def __call__(self, img: Image.Image, rng: Optional[np.random.Generator],
               out: Optional[np.ndarray] = None) -> np.ndarray:
    if rng is None:
      raise ValueError("TrainTransform draws random crops; it needs a numpy Generator")
    top, left, h, w = random_resized_crop_params(*img.size, rng, self.scale, self.ratio)
    # Crop, then resize (torchvision's resized_crop): PIL's resize(box=...) would filter across the
    # box edge with pixels outside the crop.
    pixels = np.asarray(img.crop((left, top, left + w, top + h))
                        .resize((self.size, self.size), Image.BILINEAR))
    if rng.random() < self.flip:
      pixels = pixels[:, ::-1]
    return normalize(pixels, self.mean, self.std, out)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Resize(resize) (shorter side, bilinear) + CenterCrop(size) + normalise; no randomness."""
  size: int = 224
  resize: int = 256
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    return normalize(center_crop(resize_shorter(img, self.resize), self.size), self.mean, self.std,
                     out)


@dataclasses.dataclass(frozen=True)
class AsIsTransform:
  """Normalise only (the authors' IN-9 loader); every image must already be size x size."""
  size: int = 224
  mean: tuple[float, ...] = IN9_MEAN
  std: tuple[float, ...] = IN9_STD

  def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    if img.size != (self.size, self.size):
      raise ValueError(f"image is {img.size[0]}x{img.size[1]}, not {self.size}x{self.size}; use "
                       f"EvalTransform(mean=IN9_MEAN, std=IN9_STD) to resize and crop it")
    return normalize(img, self.mean, self.std, out)


class Transform(Protocol):
  """PIL RGB image (+ Generator, or None if deterministic) -> float32 [size, size, 3], into ``out``."""
  size: int

  def __call__(self, img: Image.Image, rng: Optional[np.random.Generator],
               out: Optional[np.ndarray] = None) -> np.ndarray:
    ...


def load_image(path: str) -> Image.Image:
  """The RGB image at ``path`` (torchvision's default loader), or a DataError naming the file."""
  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except OSError as e:
    raise DataError(f"cannot read image {path} ({e}); replace or delete the file") from e


# -- rows ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rows:
  """Image paths and their label columns (``name -> [n]`` arrays); ``classes`` names ``label``."""
  paths: Sequence[str]
  labels: Mapping[str, np.ndarray]
  classes: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.paths)

  def select(self, keep: np.ndarray) -> "Rows":
    """The rows at the indices (or boolean mask) ``keep``."""
    idx = np.arange(len(self))[keep]
    return Rows([self.paths[i] for i in idx], {k: v[idx] for k, v in self.labels.items()},
                self.classes)


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _listdir(path: str, what: str, fix: str) -> list[os.DirEntry]:
  if not os.path.isdir(path):
    raise DataError(f"no {what} at {os.path.abspath(path)}; {fix}")
  with os.scandir(path) as it:
    return sorted(it, key=lambda e: e.name)


def _class_index(path: Optional[str]) -> dict[str, int]:
  with open(path or eval_file("imagenet_class_index.json")) as f:
    return {wnid: int(i) for i, (wnid, _) in json.load(f).items()}


def image_folder(root: str, class_index: Optional[str] = None,
                 labels_file: Optional[str] = None) -> Rows:
  """``root/<class_dir>/*.{JPEG,jpg,png}`` -> rows with an int32 ``label``.

  Class dirs that are all ImageNet WNIDs get their standard ImageNet index (``class_index``: the
  ``imagenet_class_index.json``, default ``<DATA_DIR>/eval``), so a subset keeps the 1000-way ids;
  other names are numbered in sorted order like torchvision's ImageFolder. A flat folder of images
  (Kaggle's val) takes its WNIDs from ``labels_file`` or a ``LOC_val_solution.csv`` above it.
  """
  entries = _listdir(root, "image folder", "point the config at the folder that holds one "
                     "sub-folder per class")
  dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
  if not dirs and any(_is_image(e.name) for e in entries):
    return _flat_folder(root, entries, class_index, labels_file)
  names = [d.name for d in dirs]
  index = _class_index(class_index) if names and all(_WNID.match(n) for n in names) else {}
  if not index or not all(n in index for n in names):
    index = {n: i for i, n in enumerate(names)}
  paths, labels = [], []
  for d in dirs:
    files = [f.path for f in _listdir(d.path, "class folder", "") if _is_image(f.name)]
    paths += files
    labels += [index[d.name]] * len(files)
  if not paths:
    raise DataError(f"{os.path.abspath(root)} holds no {'/'.join(IMAGE_EXTENSIONS)} images in "
                    f"class sub-folders; extract the dataset there or fix the path")
  return Rows(paths, {"label": np.asarray(labels, np.int32)}, tuple(names))


def _flat_folder(root: str, entries: list[os.DirEntry], class_index: Optional[str],
                 labels_file: Optional[str]) -> Rows:
  if labels_file is None:
    up = [os.path.join(root, *[".."] * k, "LOC_val_solution.csv") for k in range(5)]
    labels_file = next((p for p in up if os.path.isfile(p)), None)
  if labels_file is None:
    raise DataError(f"{os.path.abspath(root)} holds images but no class sub-folders and no "
                    f"LOC_val_solution.csv was found above it; sort the images into <wnid>/ folders "
                    f"or pass labels_file")
  with open(labels_file) as f:  # Kaggle: ImageId,PredictionString ("<wnid> x0 y0 x1 y1 ...")
    wnid_of = {r[0]: r[1].split()[0] for r in csv.reader(f) if len(r) >= 2 and r[0] != "ImageId"}
  index = _class_index(class_index)
  paths, labels = [], []
  for e in entries:
    if _is_image(e.name):
      stem = os.path.splitext(e.name)[0]
      if stem not in wnid_of or wnid_of[stem] not in index:
        raise DataError(f"{labels_file} has no ImageNet label for {e.name}; use the matching file")
      paths.append(e.path)
      labels.append(index[wnid_of[stem]])
  return Rows(paths, {"label": np.asarray(labels, np.int32)})


def imagenet_split(root: str, split: str = "train", class_index: Optional[str] = None) -> Rows:
  """ImageNet ``split`` ('train' or 'val') under ``root``, in any of the usual layouts.

  Tried in order: ``root/<split>`` (the authors' imagenet/data/imagenet), ``root/ILSVRC2012_img_
  <split>`` (TFDS's manual dir with its tars extracted) and ``root/ILSVRC/Data/CLS-LOC/<split>``
  (Kaggle's download; its flat val is labelled through ``LOC_val_solution.csv``).
  """
  split = {"validation": "val"}.get(split, split)
  tried = [os.path.join(root, split), os.path.join(root, f"ILSVRC2012_img_{split}"),
           os.path.join(root, "ILSVRC", "Data", "CLS-LOC", split)]
  for path in tried:
    if os.path.isdir(path):
      return image_folder(path, class_index)
  raise DataError(f"no ImageNet {split} split under {os.path.abspath(root)} (tried "
                  f"{', '.join(tried)}); extract ILSVRC2012 there or set the ImageNet path")


def _cf_run_dirs(path: str, split: str) -> list[str]:
  if os.path.isfile(os.path.join(path, "labels.csv")):
    return [path]
  if os.path.isdir(path):
    subs = sorted(e.path for e in os.scandir(path) if e.is_dir() and e.name.startswith(split)
                  and os.path.isfile(os.path.join(e.path, "labels.csv")))
    if subs:  # the authors' layout: <cf_data>/train*/ and <cf_data>/val*/ runs
      return subs
    if any(re.fullmatch(r"labels_\d{3}\.csv", n) for n in os.listdir(path)):
      raise DataError(f"{path} has per-process labels_*.csv but no labels.csv: the generation did not "
                      f"finish; rerun the generate job with the same config to complete it")
  raise DataError(f"no counterfactual dataset at {os.path.abspath(path)} (need labels.csv + ims/, or "
                  f"{split}*/ runs holding them); run the generate job or fix the path")


def _read_cf_labels(run: str) -> list[tuple[str, int, int, int]]:
  """(im_name, shape, texture, bg) from our labels.csv or the authors' (blank first column)."""
  manifest = os.path.join(run, "manifest.json")
  if os.path.isfile(manifest):
    with open(manifest) as f:
      info = json.load(f)
    if info.get("kind", "dataset") != "dataset" or not info.get("complete", True):
      raise DataError(f"{run} is not a finished counterfactual dataset ({manifest}: kind="
                      f"{info.get('kind')}, complete={info.get('complete')}); finish the generation")
  path = os.path.join(run, "labels.csv")
  with open(path) as f:
    header, first = f.readline().rstrip("\n"), f.readline().rstrip("\n")
  if header == imagenet_cfs.HEADER:
    if not first:
      return []
    run_name = first.split(",")[1].rsplit("_", 1)[0]
    lines = imagenet_cfs.read_labels(path, run_name).values()
    return [(c[1], int(c[2]), int(c[3]), int(c[4])) for c in (ln.split(",") for ln in lines)]
  if header.split(",", 1)[-1] == _AUTHORS_CF_HEADER:
    with open(path, newline="") as f:
      return [(r[1], int(r[2]), int(r[3]), int(r[4])) for r in list(csv.reader(f))[1:] if r]
  raise DataError(f"{path} starts with '{header}', neither '{imagenet_cfs.HEADER}' nor the "
                  f"authors' ',{_AUTHORS_CF_HEADER}'; it is not a counterfactual labels file")


def counterfactual_rows(path: str, split: str = "train", suffix: str = "x_gen",
                        check_files: bool = True) -> Rows:
  """Rows of a counterfactual set: ``ims/<im_name>_<suffix>.jpg`` with shape/texture/bg labels.

  ``path`` is one run (the generate job's ``<workdir>/<run_name>``) or the authors' ``--cf_data``
  folder, whose ``<split>*`` sub-runs are joined in sorted order. The authors' loader defaults to
  ``mode='silhouette'`` though their generator writes ``_x_gen``; ``suffix`` is that mode.
  """
  paths, table = [], []
  for run in _cf_run_dirs(path, split):
    rows = _read_cf_labels(run)
    ims = os.path.join(run, "ims")
    files = [os.path.join(ims, f"{r[0]}_{suffix}.jpg") for r in rows]
    if check_files:
      present = {e.name for e in _listdir(ims, "image folder", "the dataset is incomplete")}
      missing = [p for p in files if os.path.basename(p) not in present]
      if missing:
        raise DataError(f"{len(missing)} of the {len(files)} images in {run}/labels.csv are "
                        f"missing (first: {missing[0]}); resume the generation or pass the right "
                        f"suffix (not '{suffix}')")
    paths += files
    table += [r[1:] for r in rows]
  if not paths:
    raise DataError(f"{os.path.abspath(path)} lists no counterfactual images; generate some first")
  cols = np.asarray(table, np.int32)
  return Rows(paths, {name: cols[:, i] for i, name in enumerate(CF_LABELS)})


def cue_conflict_rows(root: str, categories: Optional[str] = None) -> Rows:
  """The Geirhos cue-conflict stimuli ``root/<shape>/<shape><n>-<texture><m>.png``.

  Labels: ``shape_label`` and ``texture_label`` (16-way, in the order of ``categories``, default
  ``<DATA_DIR>/eval/geirhos16_categories.json``) and ``conflict`` (bool): False for the images whose
  shape and texture category agree, which shape bias leaves out (the authors drop them).
  """
  with open(categories or eval_file("geirhos16_categories.json")) as f:
    index = {c: i for i, c in enumerate(json.load(f))}
  fix = "download texture-vs-shape's stimuli/style-transfer-preprocessed-512 there or fix the path"
  paths, shape, texture = [], [], []
  for d in _listdir(root, "cue-conflict folder", fix):
    if not d.is_dir() or d.name.startswith("."):
      continue
    for e in _listdir(d.path, "category folder", fix):
      if not _is_image(e.name):
        continue
      m = _CUE.match(e.name)
      if not m or m.group(1).lower() not in index or m.group(3).lower() not in index:
        raise DataError(f"{e.path}: not a '<shape><n>-<texture><m>.png' name of the 16 categories; "
                        f"remove the file")
      if d.name in index and d.name != m.group(1).lower():
        raise DataError(f"{e.path}: shape '{m.group(1)}' in the folder of '{d.name}'; move it")
      paths.append(e.path)
      shape.append(index[m.group(1).lower()])
      texture.append(index[m.group(3).lower()])
  if not paths:
    raise DataError(f"{os.path.abspath(root)} holds no cue-conflict images; {fix}")
  shape, texture = np.asarray(shape, np.int32), np.asarray(texture, np.int32)
  return Rows(paths, {"shape_label": shape, "texture_label": texture, "conflict": shape != texture},
              tuple(index))


def in9_rows(root: str, variant: str, classes: Optional[str] = None) -> Rows:
  """IN-9 ``variant`` (e.g. ``mixed_same``) at ``root/<variant>/val/<NN_name>/*`` -> ``label``.

  The label is the folder's number (the backgrounds challenge's ``00_dog`` ... ``08_fish``, which
  is also the sorted order the authors' ImageFolder uses), checked against the class names of
  ``classes`` (default ``<DATA_DIR>/eval/in9_classes.txt``: Dog, Bird, Vehicle, ...).
  """
  with open(classes or eval_file("in9_classes.txt")) as f:
    names = [ln.split()[0] for ln in f if ln.strip()]
  if not os.path.isdir(os.path.join(root, variant)):
    raise DataError(f"no IN-9 variant '{variant}' at {os.path.abspath(root)}; extract the "
                    f"backgrounds challenge data there (bg_challenge/<variant>/val/<NN_class>/)")
  val = os.path.join(root, variant, "val")
  val = val if os.path.isdir(val) else os.path.join(root, variant)
  rows = image_folder(val)
  labels = np.empty(len(rows), np.int32)
  for i, cls in enumerate(rows.classes):
    m = re.match(r"^(\d+)_(.*)$", cls)
    if not m or int(m.group(1)) >= len(names) or names[int(m.group(1))].lower() not in cls.lower():
      raise DataError(f"{val}/{cls}: not an IN-9 class folder '<NN>_<name>' of {names}; rename it")
    labels[rows.labels["label"] == i] = int(m.group(1))
  return Rows(rows.paths, {"label": labels}, tuple(names))


# -- batch sources ------------------------------------------------------------------------------------

_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def shared_pool() -> concurrent.futures.ThreadPoolExecutor:
  """One decoding pool for every source of the process (one thread per core)."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 4, "cgn-decode")
    return _POOL


def _decode(path: str, transform: Transform, rng: Optional[np.random.Generator],
            out: np.ndarray) -> None:
  try:
    transform(load_image(path), rng, out=out)
  except ValueError as e:
    raise DataError(f"{path}: {e}") from e


class _Source:
  """Decodes this process's rows of global batch ``k`` in the pool, ``prefetch`` batches ahead."""

  _limit = math.inf  # batches from here on are never prefetched

  def __init__(self, rows: Rows, batch_size: int, transform: Transform,
               process_index: Optional[int], process_count: Optional[int],
               pool: Optional[concurrent.futures.ThreadPoolExecutor], prefetch: int):
    if len(rows) == 0:
      raise DataError("the dataset has no images; check its path")
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      process_index, process_count = jax.process_index(), jax.process_count()
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"batch size {batch_size} does not split over {process_count} processes; "
                       f"choose a positive multiple of {process_count}")
    self.rows, self.batch_size, self.transform = rows, batch_size, transform
    self.local_batch_size = batch_size // process_count
    self._first = process_index * self.local_batch_size
    self._pool, self._prefetch = pool or shared_pool(), prefetch
    self._pending: dict[int, tuple[dict[str, np.ndarray], list]] = {}

  def _indices(self, k: int) -> np.ndarray:
    """Row ids of global batch ``k``; -1 marks padding."""
    raise NotImplementedError

  def _rng(self, k: int, row: int) -> Optional[np.random.Generator]:
    raise NotImplementedError

  def _extra(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {}

  def _submit(self, k: int) -> tuple[dict[str, np.ndarray], list]:
    idx = self._indices(k)[self._first:self._first + self.local_batch_size]
    valid = idx >= 0
    size = self.transform.size
    out = {"image": np.zeros((len(idx), size, size, 3), np.float32)}
    for name, col in self.rows.labels.items():
      out[name] = np.zeros(len(idx), col.dtype)
      out[name][valid] = col[idx[valid]]
    out.update(self._extra(idx))
    jobs = [self._pool.submit(_decode, self.rows.paths[j], self.transform,
                              self._rng(k, self._first + r), out["image"][r])
            for r, j in enumerate(idx) if j >= 0]
    return out, jobs

  def _get(self, k: int) -> dict[str, np.ndarray]:
    out, jobs = self._pending.pop(k, None) or self._submit(k)
    for other in list(self._pending):  # a jump (resume, the loop's shape probe at 0): drop stale
      if not k < other <= k + self._prefetch:
        for job in self._pending.pop(other)[1]:
          job.cancel()
    for nxt in range(k + 1, k + 1 + self._prefetch):
      if nxt < self._limit and nxt not in self._pending:
        self._pending[nxt] = self._submit(nxt)
    for job in jobs:
      job.result()
    return out

  def close(self) -> None:
    """Cancels the prefetched batches (the shared pool stays up)."""
    for _, jobs in self._pending.values():
      for job in jobs:
        job.cancel()
    self._pending.clear()


class ImageBatches(_Source):
  """Training batches: ``batch(step) -> {"image": float32 [b, S, S, 3], <label columns>: [b]}``.

  ``b = batch_size / process_count`` rows of the global batch, for this process. An epoch is
  ``steps_per_epoch`` batches (default ``len(rows) // batch_size``, the last partial batch dropped)
  drawn without replacement from ``ceil(steps_per_epoch * batch_size / len(rows))`` copies of the
  rows -- a plain shuffle unless ``steps_per_epoch`` asks for more rows than there are (the
  authors' counterfactual resampling, see :func:`ensemble_batches`).

  Args:
    rows: the images and their label columns (each returned under its own name).
    batch_size: the global batch; it must divide by ``process_count``.
    transform: e.g. ``TrainTransform()``; its ``size`` fixes the image shape.
    seed, stream: the epoch order and the augmentations derive from them and the step only; give
      two sources drawn in the same run different streams.
    steps_per_epoch: tie this source's epochs to another's (counterfactuals to ImageNet).
    process_index, process_count: this process's contiguous share of the global batch (default:
      jax's), the rows ``parallel.from_host_rows`` expects.
    pool: the decoding threads (default: :func:`shared_pool`).
    prefetch: batches decoded ahead of the one requested.
  """

  def __init__(self, rows: Rows, batch_size: int, transform: Transform, seed: int, *,
               steps_per_epoch: Optional[int] = None, stream: int = 0,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               pool: Optional[concurrent.futures.ThreadPoolExecutor] = None, prefetch: int = 2):
    super().__init__(rows, batch_size, transform, process_index, process_count, pool, prefetch)
    self.seed, self.stream = seed, stream
    self.steps_per_epoch = steps_per_epoch or len(rows) // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch size {batch_size} exceeds the {len(rows)} images; choose a smaller "
                       f"batch size")
    self._copies = math.ceil(self.steps_per_epoch * batch_size / len(rows))
    self._orders: dict[int, np.ndarray] = {}

  def order(self, epoch: int) -> np.ndarray:
    """The row ids of ``epoch``, in visiting order."""
    if epoch not in self._orders:
      if len(self._orders) > 2:
        self._orders.pop(min(self._orders))
      rng = np.random.default_rng([self.seed, self.stream, 0, epoch])
      ids = np.tile(np.arange(len(self.rows)), self._copies)
      self._orders[epoch] = rng.permutation(ids)[:self.steps_per_epoch * self.batch_size]
    return self._orders[epoch]

  def _indices(self, k: int) -> np.ndarray:
    epoch, i = divmod(k, self.steps_per_epoch)
    return self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

  def _rng(self, k: int, row: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, self.stream, 1, k, row])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return self._get(step)

  def position(self, step: int) -> dict[str, int]:
    epoch, i = divmod(step, self.steps_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": i, "seed": self.seed, "stream": self.stream}


class EvalBatches(_Source):
  """Every row once, in order: ``len(self)`` batches of ``{"image", <labels>, "mask", "index"}``.

  The last global batch is padded (zero images, label 0, ``mask`` False, ``index`` -1), so every
  process runs the same number of equally shaped steps; divide metrics by ``num_examples`` (or
  ``mask.sum()``), not by ``batch_size * len(self)`` as the authors' eval_bg_gap does.
  """

  def __init__(self, rows: Rows, batch_size: int, transform: Transform, *,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               pool: Optional[concurrent.futures.ThreadPoolExecutor] = None, prefetch: int = 2):
    super().__init__(rows, batch_size, transform, process_index, process_count, pool, prefetch)
    self.num_examples = len(rows)
    self._limit = math.ceil(self.num_examples / batch_size)

  def __len__(self) -> int:
    return self._limit

  def _indices(self, k: int) -> np.ndarray:
    ids = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
    return np.where(ids < self.num_examples, ids, -1)

  def _rng(self, k: int, row: int) -> None:
    return None

  def _extra(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"mask": idx >= 0, "index": idx.astype(np.int32)}

  def batch(self, k: int) -> dict[str, np.ndarray]:
    if not 0 <= k < len(self):
      raise IndexError(f"batch {k} of {len(self)}")
    return self._get(k)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for k in range(len(self)):
      yield self._get(k)


def cf_batch_size(cf_ratio: float, batch_size: int) -> int:
  """Counterfactual rows per step: ``int(cf_ratio * batch_size)`` (imagenet/dataloader.py:313)."""
  return int(cf_ratio * batch_size)


class EnsembleBatches:
  """``batch(step) -> {"real": ImageNet rows, "cf": counterfactual rows}`` (no "cf" without ``cf``).

  The two sources share the epoch, so both positions move in step.
  """

  def __init__(self, real: ImageBatches, cf: Optional[ImageBatches] = None):
    if cf is not None and cf.steps_per_epoch != real.steps_per_epoch:
      raise ValueError("the counterfactual source must have the real source's steps_per_epoch")
    self.real, self.cf, self.steps_per_epoch = real, cf, real.steps_per_epoch

  def batch(self, step: int) -> dict[str, dict[str, np.ndarray]]:
    out = {"real": self.real.batch(step)}
    if self.cf is not None:
      out["cf"] = self.cf.batch(step)
    return out

  def position(self, step: int) -> dict[str, Any]:
    out = {"real": self.real.position(step)}
    if self.cf is not None:
      out["cf"] = self.cf.position(step)
    return out

  def close(self) -> None:
    for src in (self.real, self.cf):
      if src is not None:
        src.close()


def ensemble_batches(real: Rows, cf: Optional[Rows], batch_size: int, cf_ratio: float, seed: int,
                     *, transform: Optional[Transform] = None,
                     steps_per_epoch: Optional[int] = None, **kwargs: Any) -> EnsembleBatches:
  """The invariant ensemble's per-step data: ``batch_size`` ImageNet rows and ``cf_ratio`` times as
  many counterfactual rows, both with the training transform (``cf_ratio=0`` or ``cf=None``: the
  ImageNet-only baseline).

  The authors' rule (imagenet/dataloader.py:313-314, 161-163, 181; train_classifier.py:197, 270):
  ``cf_batch = int(cf_ratio * batch)``, ``n_data = cf_batch * len(train_loader)``; every epoch draws
  ``n_data`` counterfactuals without replacement from the set repeated ``ceil(n_data / n_cf)`` times
  (``DataFrame.sample``), and ``zip`` pairs batch i of both loaders. Here the epoch is the real
  source's ``steps_per_epoch`` (default: last partial batch dropped, where their
  ``len(train_loader)`` counts it) and the draw is ``ImageBatches``' with ``stream=1``. ``kwargs``
  (process split, pool, prefetch) go to both sources.
  """
  transform = transform or TrainTransform()
  real_src = ImageBatches(real, batch_size, transform, seed, stream=0,
                          steps_per_epoch=steps_per_epoch, **kwargs)
  if cf is None or cf_ratio == 0:
    return EnsembleBatches(real_src)
  n_cf = cf_batch_size(cf_ratio, batch_size)
  if n_cf <= 0:
    raise ValueError(f"cf_ratio={cf_ratio} gives {n_cf} counterfactuals per batch of {batch_size}; "
                     f"raise cf_ratio to at least {1 / batch_size:g} (or 0 for no counterfactuals)")
  cf_src = ImageBatches(cf, n_cf, transform, seed, stream=1,
                        steps_per_epoch=real_src.steps_per_epoch, **kwargs)
  return EnsembleBatches(real_src, cf_src)
