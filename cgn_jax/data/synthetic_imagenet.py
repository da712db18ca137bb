"""Tiny synthetic stand-ins for ImageNet, counterfactual ImageNet, cue-conflict and IN-9.

The ``:tiny`` classifier configs and the tests run every ImageNet classifier job end to end on a
CPU with these folders: the same layouts as the real data (ImageFolder of WNIDs; ``ims/`` +
``labels.csv``; ``<category>/<shape><n>-<texture><m>.png``; ``<variant>/val/<NN_name>/``), a few
images each. Each class has its own colour, so a tiny network can fit them and the loss falls. The
pictures mean nothing; the numbers they give show the plumbing only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_collections
import numpy as np
from PIL import Image

from cgn_jax.data import imagenet_cfs

IN9_DIRS = ("00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore", "05_insect",
            "06_musical instrument", "07_primate", "08_fish")
IN9_VARIANTS = ("original", "mixed_same", "mixed_rand", "only_fg")
_DONE = ".complete.json"


def _classes(eval_dir: str) -> list[int]:
  """One ImageNet class per IN-9 class and per cue-conflict category: every evaluation has
  classes the tiny model has seen."""
  with open(os.path.join(eval_dir, "geirhos16_imagenet_indices.json")) as f:
    geirhos = json.load(f)
  return sorted(set(_classes_in9(eval_dir)) | {v[0] for v in geirhos.values()})


def _colour(c: int) -> np.ndarray:
  return np.random.default_rng(1000 + c).uniform(30, 225, 3)


def _image(rng: np.random.Generator, fg: int, bg: int | None = None, size=(40, 48)) -> Image.Image:
  """A class-coloured blob on a background of another colour (``bg``) or on grey noise."""
  h, w = size
  base = _colour(bg) if bg is not None else np.full(3, 128.0)
  img = base + rng.normal(0, 20, (h, w, 3))
  yy, xx = np.mgrid[:h, :w]
  cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
  blob = (yy - cy) ** 2 / (0.3 * h) ** 2 + (xx - cx) ** 2 / (0.3 * w) ** 2 < 1
  img[blob] = _colour(fg) + rng.normal(0, 10, (int(blob.sum()), 3))
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def resolve(data: ml_collections.ConfigDict, workdir: str, seed: int) -> ml_collections.ConfigDict:
  """A copy of a config's ``data`` section with the synthetic folders (built once in
  ``<workdir>/data``) filled in when ``data.synthetic`` is set."""
  data = ml_collections.ConfigDict(data.to_dict())
  if data.synthetic:
    for k, v in build(os.path.join(workdir, "data"), data.eval_dir, seed).items():
      data[k] = v
  return data


def build(root: str, eval_dir: str, seed: int = 0, per_class: int = 4) -> dict[str, str]:
  """Writes the four folders under ``root`` once (a finished build is reused); returns their paths.

  The build goes to a temporary sibling first and is renamed into place, so a killed build leaves
  nothing that looks finished.
  """
  paths = {"imagenet_dir": os.path.join(root, "imagenet"), "cf_dir": os.path.join(root, "cf"),
           "cue_conflict_dir": os.path.join(root, "cue_conflict"), "in9_dir": os.path.join(root, "in9"),
           # The OOD sets are ImageFolders of WNIDs too: the synthetic val split stands in for both.
           "imagenet_a_dir": os.path.join(root, "imagenet", "val"),
           "sketch_dir": os.path.join(root, "imagenet", "val")}
  spec = {"seed": seed, "per_class": per_class, "version": 1}
  done = os.path.join(root, _DONE)
  if os.path.exists(done):
    with open(done) as f:
      if json.load(f) == spec:
        return paths
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  try:
    _write_all(tmp, eval_dir, seed, per_class)
    with open(os.path.join(tmp, _DONE), "w") as f:
      json.dump(spec, f)
    if os.path.exists(root):
      shutil.rmtree(root)
    os.replace(tmp, root)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return paths


def _write_all(root: str, eval_dir: str, seed: int, per_class: int) -> None:
  rng = np.random.default_rng(seed)
  with open(os.path.join(eval_dir, "imagenet_class_index.json")) as f:
    wnids = {int(k): v[0] for k, v in json.load(f).items()}
  classes = _classes(eval_dir)
  for split, n in (("train", per_class), ("val", max(1, per_class // 2))):
    for c in classes:
      folder = os.path.join(root, "imagenet", split, wnids[c])
      os.makedirs(folder)
      for i in range(n):
        _image(rng, c).save(os.path.join(folder, f"{wnids[c]}_{i}.JPEG"), quality=95)

  # Counterfactuals: shape, texture and background classes drawn independently, as generated.
  run = "tiny"
  ims = os.path.join(root, "cf", "ims")
  os.makedirs(ims)
  rows = {}
  for i in range(len(classes) * per_class):
    s, t, b = (int(c) for c in rng.choice(classes, 3))
    name = imagenet_cfs.image_name(run, i)
    _image(rng, t, b).save(os.path.join(ims, f"{name}_x_gen.jpg"), quality=95)
    rows[i] = f"{i},{name},{s},{t},{b}"
  imagenet_cfs.write_rows(os.path.join(root, "cf", "labels.csv"), rows)

  with open(os.path.join(eval_dir, "geirhos16_categories.json")) as f:
    categories = json.load(f)
  with open(os.path.join(eval_dir, "geirhos16_imagenet_indices.json")) as f:
    members = json.load(f)
  for k, shape in enumerate(categories):
    folder = os.path.join(root, "cue_conflict", shape)
    os.makedirs(folder)
    for n, texture in enumerate((categories[(k + 1) % 16], categories[(k + 5) % 16], shape), 1):
      _image(rng, members[texture][0], members[shape][0]).save(
          os.path.join(folder, f"{shape}{n}-{texture}{n}.png"))

  first_in9 = _classes_in9(eval_dir)
  for variant in IN9_VARIANTS:
    for c, name in enumerate(IN9_DIRS):
      folder = os.path.join(root, "in9", variant, "val", name)
      os.makedirs(folder)
      for i in range(2):
        bg = {"original": first_in9[c], "mixed_same": first_in9[c], "only_fg": None,
              "mixed_rand": first_in9[(c + 1 + i) % 9]}[variant]
        _image(rng, first_in9[c], bg).save(os.path.join(folder, f"{variant}_{c}_{i}.JPEG"), quality=95)


def _classes_in9(eval_dir: str) -> list[int]:
  with open(os.path.join(eval_dir, "in_to_in9.json")) as f:
    in9 = json.load(f)
  return [min(int(k) for k, v in in9.items() if v == c) for c in range(9)]
