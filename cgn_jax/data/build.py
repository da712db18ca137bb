"""Builds an MNIST variant once, deterministically, into the on-disk dataset format.

``build_variant('double_colored_MNIST', data_dir, out_dir)`` reads raw MNIST from ``data_dir``
(IDX files in ``data_dir`` or ``data_dir/mnist``, else a prepared TFDS 'mnist'), textures from
``data_dir/textures`` and colour tables from ``data_dir/colors/mnist_variant_colors.json`` (each
also found one level up, next to ``data_dir``, or given explicitly), and writes ``out_dir``
(see ``storage``). A second call with the same recipe version, seed and limit returns at once.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import numpy as np

from cgn_jax.data import mnist_idx
from cgn_jax.data import mnist_variants as mv
from cgn_jax.data import storage
from cgn_jax.data.storage import DataError

COLORS_FILE = os.path.join("colors", "mnist_variant_colors.json")
TEXTURES_PER_KIND = 10  # one object and one background texture per class
_FIX = ("point --config.data_dir at the folder that holds mnist/, textures/ and colors/ (the "
        "project's shared/data, laid out like the authors' mnists/data)")


def _beside(data_dir: str, rel: str) -> str | None:
  for base in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
    if os.path.exists(os.path.join(base, rel)):
      return os.path.join(base, rel)
  return None


def default_paths(data_dir: str) -> dict[str, str | None]:
  """Where ``build_variant`` looks for textures and colours given ``data_dir`` (None: not found)."""
  return {"textures_dir": _beside(data_dir, "textures"),
          "colors_path": _beside(data_dir, COLORS_FILE)}


def check_sources(name: str, data_dir: str, textures_dir: str | None = None,
                  source: str = "auto") -> None:
  """Raises one DataError naming every input file that variant ``name`` lacks, before any work."""
  path = os.path.abspath(data_dir)
  if not os.path.isdir(path):
    raise DataError(f"--config.data_dir={path} does not exist; {_FIX}")
  missing = []
  try:
    mnist_idx.locate(data_dir, source)
  except DataError:
    missing.append(f"the MNIST IDX files ({mnist_idx.FILE_NAMES}, in it or in mnist/)")
  if name == "wildlife_MNIST":
    textures_dir = textures_dir or default_paths(data_dir)["textures_dir"]
    for kind in ("object", "background"):
      found = len(glob.glob(os.path.join(textures_dir, kind, "*.jpg"))) if textures_dir else 0
      if found != TEXTURES_PER_KIND:
        missing.append(f"textures/{kind}/*.jpg ({TEXTURES_PER_KIND} files, found {found})")
  if missing:
    raise DataError(f"--config.data_dir={path} lacks {'; '.join(missing)}; {_FIX}")


def build_arrays(name: str, data_dir: str, *, seed: int = 0, limit: int | None = None,
                 textures_dir: str | None = None, colors_path: str | None = None,
                 source: str = "auto", splits: tuple[str, ...] = ("train", "test")
                 ) -> tuple[dict[str, tuple[np.ndarray, dict[str, np.ndarray]]], dict[str, Any]]:
  """The variant in memory: ({split: (stored images, label columns)}, provenance dict).

  Images are uint8 (Colored, Wildlife) or float32 in [-1, 1] (Double-colored); ``limit`` keeps the
  first ``limit`` images of each split (the same images as the full build).
  """
  if name not in mv.VARIANTS:
    raise ValueError(f"unknown MNIST variant {name!r}; choose one of {mv.VARIANTS}")
  check_sources(name, data_dir, textures_dir, source)
  defaults = default_paths(data_dir)
  colors_path = colors_path or defaults["colors_path"]
  colors = mv.load_colors(colors_path)
  textures = None
  if name == "wildlife_MNIST":
    textures_dir = textures_dir or defaults["textures_dir"]
    textures = mv.load_textures(textures_dir)
  mnist_train = mnist_idx.load_mnist(data_dir, "train", source=source)
  mnist_test = (mnist_idx.load_mnist(data_dir, "test", source=source)
                if name == "colored_MNIST" else None)
  sources = mv.variant_splits(name, mnist_train, mnist_test)
  out = {}
  for split in splits:
    digits, labels = sources[split]
    if limit is not None:
      digits, labels = digits[:limit], labels[:limit]
    out[split] = mv.make_split(name, digits, labels, split, seed, colors=colors, textures=textures)
  prov = {"colors_path": os.path.abspath(colors_path) if colors_path else "built-in",
          "textures_dir": os.path.abspath(textures_dir) if textures else None,
          "colors": {k: v.tolist() for k, v in colors.items()}}
  return out, prov


def _matches(manifest: dict[str, Any], name: str, seed: int, limit: int | None) -> bool:
  return (manifest.get("name") == name and manifest.get("recipe_version") == mv.RECIPE_VERSION
          and manifest.get("seed") == seed and manifest.get("limit") == limit)


def build_variant(name: str, data_dir: str, out_dir: str, seed: int = 0, *,
                  limit: int | None = None, textures_dir: str | None = None,
                  colors_path: str | None = None, source: str = "auto",
                  overwrite: bool = False, verbose: bool = False) -> str:
  """Writes MNIST variant ``name`` to ``out_dir`` (reused if already built the same way).

  Args:
    name: 'colored_MNIST', 'double_colored_MNIST' or 'wildlife_MNIST' (the authors' names).
    data_dir: folder with raw MNIST (see ``mnist_idx.load_mnist``), e.g. ../shared/data.
    out_dir: dataset directory to create.
    seed: seeds every random draw (colours, noise, crops, test classes).
    limit: keep only the first ``limit`` images per split (tests, quick looks).
    textures_dir / colors_path: override the defaults found from ``data_dir``.
    source: MNIST source, 'auto' | 'idx' | 'tfds'.
    overwrite: rebuild over an existing dataset built another way (otherwise DataError).
  Returns:
    out_dir.
  """
  if os.path.exists(out_dir):
    try:
      manifest = storage.read_manifest(out_dir)
    except DataError as e:
      raise DataError(f"{out_dir} exists but is not a finished dataset ({e}); remove it") from e
    if _matches(manifest, name, seed, limit):
      return out_dir
    if not overwrite:
      raise DataError(
          f"{out_dir} holds {manifest.get('name')} (recipe {manifest.get('recipe_version')}, seed "
          f"{manifest.get('seed')}, limit {manifest.get('limit')}), not {name} (recipe "
          f"{mv.RECIPE_VERSION}, seed {seed}, limit {limit}); remove it or pass overwrite=True")
  t0 = time.time()
  splits, prov = build_arrays(name, data_dir, seed=seed, limit=limit, textures_dir=textures_dir,
                              colors_path=colors_path, source=source)
  t1 = time.time()
  meta = {"name": name, "recipe_version": mv.RECIPE_VERSION, "seed": seed, "limit": limit,
          "recipe": mv.describe(name), "source": os.path.abspath(data_dir), **prov}
  with storage.DatasetWriter(out_dir, meta, image_dtype=mv.STORAGE_DTYPE[name],
                             overwrite=overwrite) as w:
    for split, (images, labels) in splits.items():
      w.add(images, labels, split=split)
  if verbose:
    print(f"{name}: built in {t1 - t0:.1f} s, written in {time.time() - t1:.1f} s -> {out_dir}")
  return out_dir
