"""The three MNIST variants of the CGN paper, built from raw MNIST with vectorised numpy.

Recipes (../shared/spec/datasets.md section 4; the authors' ``mnists/dataloader.py``):

* ``colored_MNIST`` -- Learning-Not-to-Learn's Colored MNIST, whose generator was never published;
  we build the closest documented replica: foreground = MNIST pixel >= 129, one flat colour per
  image c = clip(palette[k]/255 + N(0, 0.02 I3), 0, 1) quantised to round(255 c), background exactly
  black; k = label (train: all 60000 MNIST train images) or k ~ U{0..9} independent of the label
  (test: the 10000 MNIST test images). Then the authors' transform: PIL NEAREST resize 28 -> 32.
  Not bit-identical to the authors' ``.npy`` (its noise draws are unknown) -- say so with results.
* ``double_colored_MNIST`` -- digit from torch-nearest resize 28 -> 32, binarised at > 0.1; one
  object and one background colour per image from the named lists (object list = background list
  shifted by 4), each plus its own N(0, 0.01^2) per channel; train = MNIST train[:50000] (colours
  by label), test = MNIST train[50000:] (object and background classes drawn independently).
* ``wildlife_MNIST`` -- same digits and split; object / background textures = the class-indexed
  name-sorted JPEGs, PIL NEAREST resized to 150x150, reflect-padded by 3, one random 32x32 crop each
  (independent for object and background).

Determinism: every random quantity has its own ``np.random.default_rng([seed, variant, split,
stream])`` stream, so ``limit=n`` builds exactly the first n images of the full build.

Frozen draws: the authors' loaders redraw test colours/textures (and train noise/crops) at every
access; their classifier, however, trains and tests on tensors dumped once (``generate_data.py``).
We likewise freeze one draw per image (deterministic in the seed). To train a CGN on fresh draws
per epoch as the authors' loader does, call ``make_split`` with ``seed=(seed, epoch)``.

Storage: Colored and Wildlife MNIST are exactly uint8-derived and are stored as uint8 (lossless);
Double-colored MNIST's colour noise is not, so it is stored as float32 in [-1, 1], bit-identical to
the authors' arithmetic (float32 rgb/255 + noise, then (x - 0.5)/0.5).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from PIL import ImageColor

from cgn_jax.data import storage
from cgn_jax.data.storage import DataError

VARIANTS = ("colored_MNIST", "double_colored_MNIST", "wildlife_MNIST")
RECIPE_VERSION = 1
IMAGE_SIZE = 32
AUTHORS_TRAIN_SIZE = 50000  # Double-colored / Wildlife: MNIST train[:50000] / train[50000:]
_VARIANT_CODE = {name: i + 1 for i, name in enumerate(VARIANTS)}
_SPLIT_CODE = {"train": 0, "test": 1}

# LNTL palette as claimed by a third-party colouriser (datasets.md 4a; colors json key
# colored_mnist_lntl.palette_claimed), classes 0..9, RGB 0..255.
LNTL_PALETTE = np.array([
    (220, 20, 60), (0, 128, 128), (253, 233, 16), (0, 149, 182), (237, 145, 33),
    (145, 30, 188), (70, 240, 240), (250, 197, 187), (210, 245, 60), (128, 0, 0)], np.uint8)
LNTL_COLOR_VAR = 0.02          # variance per channel in [0,1] units (the "var_0.020" file)
LNTL_THRESHOLD = 129           # foreground iff gray >= 129
# The authors' background colour names (PIL.ImageColor), classes 0..9.
DC_BACKGROUND_NAMES = ("darkgreen", "darkblue", "#b03060", "orangered", "yellow", "burlywood",
                       "lime", "aqua", "fuchsia", "#6495ed")
DC_NOISE_STD = 0.01
DIGIT_THRESHOLD = 0.1          # Double-colored / Wildlife binarisation of the [0,1] digit
TEXTURE_SIZE = 150
TEXTURE_PAD = 3


def pil_nearest_index(src: int, dst: int) -> np.ndarray:
  """Source rows of PIL's NEAREST resize src -> dst: floor((d + 0.5) * src / dst) (centres)."""
  return ((2 * np.arange(dst) + 1) * src) // (2 * dst)


def torch_nearest_index(src: int, dst: int) -> np.ndarray:
  """Source rows of torch ``F.interpolate(mode='nearest')``: floor(d * src / dst) (no centring)."""
  return (np.arange(dst) * src) // dst


def resize_mask(on: np.ndarray, index: np.ndarray, channels: int = 3) -> np.ndarray:
  """(N, 28, 28) bool -> (N, 32, 32 * channels) bool, nearest with row/column map ``index``.

  The channel axis is folded into the rows of the result (reshape to (N, 32, 32, channels)):
  compositing then runs over contiguous rows of 96 values, which numpy does several times faster
  than broadcasting a trailing axis of 3.
  """
  # Two np.take calls, not one fancy index: numpy lays a multi-index gather out axis-permuted in
  # memory, which makes every later elementwise op on it 4-30 times slower.
  return np.asarray(on).take(index, axis=1).take(np.repeat(index, channels), axis=2)


def _per_pixel(values: np.ndarray) -> np.ndarray:
  """(N, 3) per-image colours -> (N, 1, 96) rows matching ``resize_mask``'s folded layout."""
  return np.tile(values, (1, IMAGE_SIZE))[:, None, :]


def _rng(seed: int | Sequence[int], variant: str, split: str, stream: int) -> np.random.Generator:
  seeds = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
  return np.random.default_rng([*seeds, _VARIANT_CODE[variant], _SPLIT_CODE[split], stream])


def _labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
    raise ValueError("labels must be a 1-D array of digits 0..9")
  return labels.astype(np.int32)


# -- colours -------------------------------------------------------------------------------------


def dc_colors() -> tuple[np.ndarray, np.ndarray]:
  """(background, object) uint8 (10, 3) colour tables of Double-colored MNIST, from the names."""
  bg = np.array([ImageColor.getcolor(n, "RGB") for n in DC_BACKGROUND_NAMES], np.uint8)
  # The authors build the object list as colors1[i - 6] (negative indexing), i.e. class i takes
  # background colour (i + 4) mod 10.
  return bg, np.roll(bg, -4, axis=0)


def load_colors(path: str | None) -> dict[str, np.ndarray]:
  """Colour tables: from ``mnist_variant_colors.json`` if given, else the built-in constants."""
  bg, obj = dc_colors()
  out = {"lntl_palette": LNTL_PALETTE, "dc_background": bg, "dc_object": obj}
  if path is None:
    return out
  try:
    with open(path) as f:
      js = json.load(f)

    def table(entries):
      return np.array([e["rgb255"] for e in sorted(entries, key=lambda e: e["class"])], np.uint8)

    out = {"lntl_palette": table(js["colored_mnist_lntl"]["palette_claimed"]),
           "dc_background": table(js["double_colored_mnist"]["background"]),
           "dc_object": table(js["double_colored_mnist"]["object"])}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: not a readable colour table ({type(e).__name__}: {e}); "
                    "pass colors_path=None to use the built-in tables") from e
  for k, v in out.items():
    if v.shape != (10, 3):
      raise DataError(f"{path}: {k} has shape {v.shape}, need 10 RGB colours")
  return out


# -- builders (one call = one frozen draw) --------------------------------------------------------


def colored_mnist(digits: np.ndarray, labels: np.ndarray, *, train: bool, seed: int | Sequence[int],
                  palette: np.ndarray = LNTL_PALETTE, color_var: float = LNTL_COLOR_VAR,
                  split: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Colored MNIST (replica): uint8 (N, 32, 32, 3) images and {'label', 'texture'} columns.

  ``texture`` is the palette class of the colour (= label for train, uniform for test).
  """
  labels = _labels(labels)
  split = split or ("train" if train else "test")
  n = len(labels)
  k = labels if train else _rng(seed, "colored_MNIST", split, 0).integers(0, 10, n).astype(np.int32)
  noise = _rng(seed, "colored_MNIST", split, 1).normal(0.0, np.sqrt(color_var), (n, 3))
  color = np.clip(np.asarray(palette, np.float64)[k] / 255.0 + noise, 0.0, 1.0)
  color = np.rint(255.0 * color).astype(np.uint8)
  # Nearest resizing commutes with per-pixel colouring and thresholding, so threshold and resize the
  # 28x28 digit (PIL's index map) instead of the coloured image.
  mask = resize_mask(np.asarray(digits) >= LNTL_THRESHOLD, pil_nearest_index(28, IMAGE_SIZE))
  images = (mask.view(np.uint8) * _per_pixel(color)).reshape(n, IMAGE_SIZE, IMAGE_SIZE, 3)
  return images, {"label": labels, "texture": k}


# u/255 > 0.1 evaluated in float32 as the authors do (uint8/255., then > 0.1) for every grey level;
# it is monotone, so it reduces to u >= the first level where it holds (26).
_DIGIT_ON_FROM = int(np.argmax((np.arange(256, dtype=np.float32) / np.float32(255))
                               > np.float32(DIGIT_THRESHOLD)))


def digit_masks(digits: np.ndarray, channels: int = 1) -> np.ndarray:
  """(N, 32, 32, channels) bool digit masks of Double-colored / Wildlife MNIST.

  The authors resize with torch nearest, then binarise; thresholding first gives the same mask
  (nearest only copies pixels) on a smaller array.
  """
  n = len(digits)
  mask = resize_mask(np.asarray(digits) >= _DIGIT_ON_FROM, torch_nearest_index(28, IMAGE_SIZE),
                     channels)
  return mask.reshape(n, IMAGE_SIZE, IMAGE_SIZE, channels)


def _classes(labels, train, seed, variant, split) -> tuple[np.ndarray, np.ndarray]:
  if train:
    return labels, labels
  # Test: object and background classes are independent uniform draws, unrelated to the digit.
  return (_rng(seed, variant, split, 0).integers(0, 10, len(labels)).astype(np.int32),
          _rng(seed, variant, split, 1).integers(0, 10, len(labels)).astype(np.int32))


def double_colored_mnist(digits: np.ndarray, labels: np.ndarray, *, train: bool,
                         seed: int | Sequence[int], colors: dict[str, np.ndarray] | None = None,
                         noise_std: float = DC_NOISE_STD, split: str | None = None
                         ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Double-colored MNIST: float32 (N, 32, 32, 3) in [-1, 1] and {'label', 'texture', 'bg'}."""
  labels = _labels(labels)
  split = split or ("train" if train else "test")
  bg_table, obj_table = ((colors["dc_background"], colors["dc_object"]) if colors else dc_colors())
  obj_cls, bg_cls = _classes(labels, train, seed, "double_colored_MNIST", split)
  n = len(labels)

  def colour(table, cls, stream):
    # float32 rgb/255 plus float32 noise, then Normalize's (x - 0.5)/0.5, all in float32 like the
    # authors. Normalising the two colours of an image before compositing is bit-identical to
    # normalising the composite (the composite only copies them) and 1024 times cheaper.
    c = np.asarray(table, np.float32)[cls] / np.float32(255)
    c += _rng(seed, "double_colored_MNIST", split, stream).normal(0.0, noise_std, (n, 3)).astype(
        np.float32)
    return (c - np.float32(0.5)) / np.float32(0.5)

  obj = colour(obj_table, obj_cls, 2)
  bg = colour(bg_table, bg_cls, 3)
  mask = digit_masks(digits, 3).reshape(n, IMAGE_SIZE, -1)
  images = np.where(mask, _per_pixel(obj), _per_pixel(bg)).reshape(n, IMAGE_SIZE, IMAGE_SIZE, 3)
  return images, {"label": labels, "texture": obj_cls, "bg": bg_cls}


def load_textures(textures_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """(object, background) uint8 (10, 156, 156, 3): sorted JPEGs, NEAREST 150x150, reflect pad 3."""
  out = []
  for kind in ("object", "background"):
    # Sorted by file name like the authors' sorted(glob): sorted position == class.
    files = sorted(glob.glob(os.path.join(textures_dir, kind, "*.jpg")))
    if len(files) != 10:
      raise DataError(f"found {len(files)} textures in {os.path.join(textures_dir, kind)}, need 10 "
                      "(*.jpg); point textures_dir at the authors' mnists/data/textures folder")
    texs = []
    for f in files:
      with Image.open(f) as im:
        im = im.convert("RGB")  # no-op for the shipped RGB JPEGs
        arr = np.asarray(im.resize((TEXTURE_SIZE, TEXTURE_SIZE), Image.NEAREST))
      # torchvision's RandomCrop(padding=3, padding_mode='reflect') pads PIL images with np.pad.
      texs.append(np.pad(arr, ((TEXTURE_PAD,) * 2, (TEXTURE_PAD,) * 2, (0, 0)), mode="reflect"))
    out.append(np.stack(texs))
  return out[0], out[1]


def random_crops(textures: np.ndarray, classes: np.ndarray, rng: np.random.Generator,
                 size: int = IMAGE_SIZE) -> np.ndarray:
  """One uniformly placed size x size crop of textures[classes[i]] per i (like RandomCrop)."""
  t, h, w, c = textures.shape
  n = len(classes)
  top = rng.integers(0, h - size + 1, n)  # torch.randint(0, h - th + 1): edges included
  left = rng.integers(0, w - size + 1, n)
  # A (t, h-size+1, (w-size)*c+1, size, size*c) view of all windows over rows of w*c values; the
  # fancy index copies one contiguous 96-byte row segment per crop row.
  windows = sliding_window_view(textures.reshape(t, h, w * c), (size, size * c), axis=(1, 2))
  return windows[classes, top, left * c].reshape(n, size, size, c)


def wildlife_mnist(digits: np.ndarray, labels: np.ndarray, *, train: bool,
                   seed: int | Sequence[int], textures: tuple[np.ndarray, np.ndarray],
                   split: str | None = None
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Wildlife MNIST: uint8 (N, 32, 32, 3) images and {'label', 'texture', 'bg'} columns."""
  labels = _labels(labels)
  split = split or ("train" if train else "test")
  obj_cls, bg_cls = _classes(labels, train, seed, "wildlife_MNIST", split)
  obj = random_crops(textures[0], obj_cls, _rng(seed, "wildlife_MNIST", split, 2))
  bg = random_crops(textures[1], bg_cls, _rng(seed, "wildlife_MNIST", split, 3))
  images = np.where(digit_masks(digits, 3), obj, bg)
  return images, {"label": labels, "texture": obj_cls, "bg": bg_cls}


def variant_splits(name: str, mnist_train: tuple[np.ndarray, np.ndarray],
                   mnist_test: tuple[np.ndarray, np.ndarray] | None
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The MNIST images/labels behind each split of ``name``, in MNIST's original order."""
  if name == "colored_MNIST":
    return {"train": mnist_train, "test": mnist_test}
  if name in ("double_colored_MNIST", "wildlife_MNIST"):
    x, y = mnist_train
    return {"train": (x[:AUTHORS_TRAIN_SIZE], y[:AUTHORS_TRAIN_SIZE]),
            "test": (x[AUTHORS_TRAIN_SIZE:], y[AUTHORS_TRAIN_SIZE:])}
  raise ValueError(f"unknown MNIST variant {name!r}; choose one of {VARIANTS}")


def make_split(name: str, digits: np.ndarray, labels: np.ndarray, split: str,
               seed: int | Sequence[int], *,
               colors: dict[str, np.ndarray] | None = None,
               textures: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Builds one split of variant ``name`` from its MNIST digits (see ``variant_splits``)."""
  train = split == "train"
  if name == "colored_MNIST":
    palette = colors["lntl_palette"] if colors else LNTL_PALETTE
    return colored_mnist(digits, labels, train=train, seed=seed, palette=palette, split=split)
  if name == "double_colored_MNIST":
    return double_colored_mnist(digits, labels, train=train, seed=seed, colors=colors, split=split)
  if name == "wildlife_MNIST":
    if textures is None:
      raise ValueError("wildlife_MNIST needs textures (load_textures(textures_dir))")
    return wildlife_mnist(digits, labels, train=train, seed=seed, textures=textures, split=split)
  raise ValueError(f"unknown MNIST variant {name!r}; choose one of {VARIANTS}")


STORAGE_DTYPE = {"colored_MNIST": "uint8", "double_colored_MNIST": "float32",
                 "wildlife_MNIST": "uint8"}


def load_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(float32 NHWC images in [-1, 1], int32 digit labels) of a built variant (``build_variant``)."""
  return storage.read_xy(path, split)


def describe(name: str) -> str:
  """Short human-readable recipe summary stored in the manifest."""
  return {
      "colored_MNIST":
          "LNTL replica: gray>=129 mask, clip(palette/255+N(0,0.02)), PIL nearest 28->32; "
          "train=MNIST train (colour by label), test=MNIST test (random colour class)",
      "double_colored_MNIST":
          "authors' recipe: torch nearest 28->32, >0.1, colour lists + N(0,0.01^2); "
          "train=MNIST train[:50000], test=train[50000:] (random classes)",
      "wildlife_MNIST":
          "authors' recipe: torch nearest 28->32, >0.1, textures NEAREST 150 + reflect 3 + random "
          "32 crop; train=MNIST train[:50000], test=train[50000:] (random classes)",
  }[name]
