"""On-disk layout of a counterfactual ImageNet dataset: an image folder and a labels CSV.

The layout is the authors' (imagenet/generate_data.py writes it, their ImagenetCounterfactual loader
reads it with ``read_csv(labels.csv, index_col=0)``): ``ims/<im_name>_x_gen.jpg`` and
``labels.csv`` with the columns ``idx,im_name,shape_cls,texture_cls,bg_cls``. Every write is atomic
and a torn last CSV line is repaired, so the generation job can resume per index
(cgn_jax/jobs/generate_imagenet.py); :func:`remove_leftovers` deletes the temporary files of writes
that a kill interrupted. Beside the run directory, ``<run_name>_preview.png`` shows its first
images.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Callable

import numpy as np
from absl import logging
from PIL import Image

from cgn_jax.data.sheets import save_image_grid
from cgn_jax.data.storage import DataError

PREVIEW_IMAGES = 16

HEADER = "idx,im_name,shape_cls,texture_cls,bg_cls"
_ROW = re.compile(r"^(\d+),([^,]+),(\d+),(\d+),(\d+)$")


def image_name(run_name: str, i: int) -> str:
  """The authors' ``im_name`` of image ``i`` (the CSV column; files add ``_x_gen.jpg``)."""
  return f"{run_name}_{i:07d}"


def labels_name(process_index: int, process_count: int) -> str:
  return "labels.csv" if process_count == 1 else f"labels_{process_index:03d}.csv"


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
  """Writes through ``write(file)`` to a temporary name in the same folder, then renames."""
  folder, base = os.path.split(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_rows(path: str, rows: dict[int, str]) -> None:
  """The whole labels file (header + ``rows`` in order), atomically."""
  text = "".join(f"{r}\n" for r in [HEADER] + list(rows.values()))
  atomic_write(path, lambda f: f.write(text.encode()))


def read_labels(path: str, run_name: str) -> dict[int, str]:
  """index -> CSV line of a labels file (created with its header if missing). A torn last line
  (no newline: the process died mid-write) is cut off; a malformed complete line is an error."""
  if not os.path.exists(path):
    write_rows(path, {})
    return {}
  with open(path, "rb") as f:
    data = f.read()
  if not data.endswith(b"\n"):
    cut = data.rfind(b"\n") + 1
    logging.warning("%s: dropping torn last line %r", path, data[cut:])
    if cut == 0:
      write_rows(path, {})
      return {}
    os.truncate(path, cut)
    data = data[:cut]
  lines = data.decode().splitlines()
  if lines[0] != HEADER:
    raise DataError(f"{path} starts with '{lines[0]}', not '{HEADER}'; it is not a labels file of "
                    f"this job: delete it or choose another --config.run_name")
  rows, dup = {}, False
  for n, line in enumerate(lines[1:], start=2):
    m = _ROW.match(line)
    if not m or m.group(2) != image_name(run_name, int(m.group(1))):
      raise DataError(f"{path}:{n}: malformed row '{line}'; delete that line (its image is then "
                      f"regenerated) and rerun")
    dup |= int(m.group(1)) in rows
    rows.setdefault(int(m.group(1)), line)
  if dup:  # never written by this job; keep the first and regenerate nothing
    write_rows(path, rows)
  return rows


def present_images(ims_dir: str, run_name: str, owned: Callable[[int], bool]) -> set[int]:
  """Indices (owned by this process) with a non-empty image; removes their leftover temp files."""
  name = re.escape(run_name)
  done = re.compile(rf"^{name}_(\d{{7,}})_x_gen\.jpg$")
  tmp = re.compile(rf"^\.{name}_(\d{{7,}})_x_gen\.")
  out = set()
  with os.scandir(ims_dir) as entries:
    for e in entries:
      if (m := done.match(e.name)) and owned(int(m.group(1))) and e.stat().st_size > 0:
        out.add(int(m.group(1)))
      elif (m := tmp.match(e.name)) and e.name.endswith(".tmp") and owned(int(m.group(1))):
        os.remove(e.path)  # a write interrupted before its rename
  return out


def merge_label_shards(run_dir: str) -> str:
  """Joins every process's ``labels_<p>.csv`` into ``labels.csv`` (sorted by index), the one file
  the authors' loader reads; returns its path."""
  rows = {}
  for name in sorted(os.listdir(run_dir)):
    if re.fullmatch(r"labels_\d{3}\.csv", name):
      with open(os.path.join(run_dir, name)) as f:
        for line in f.read().splitlines()[1:]:
          if m := _ROW.match(line):
            rows.setdefault(int(m.group(1)), line)
  path = os.path.join(run_dir, "labels.csv")
  write_rows(path, dict(sorted(rows.items())))
  return path


def remove_leftovers(run_dir: str) -> list[str]:
  """Removes the temporary files of killed writes in ``run_dir`` (manifest, labels, sheets:
  ``atomic_write``'s ``.NAME.XXXX.tmp``, ``save_image_grid``'s ``.NAME.png.XXXX.png``) and of its
  preview beside it; the image folder's are :func:`present_images`' (per process). Call it while
  no other process writes there."""
  parent, name = os.path.split(os.path.abspath(run_dir))
  here, there = glob.escape(run_dir), glob.escape(parent)
  stale = (glob.glob(os.path.join(here, ".*.tmp"))
           + glob.glob(os.path.join(here, "sheets", ".*.png"))
           + glob.glob(os.path.join(there, f".{glob.escape(name)}_preview.png.*.png")))
  for path in stale:
    os.remove(path)
  return stale


def write_preview(path: str, ims_dir: str, run_name: str, n_data: int) -> str:
  """A PNG grid of the first images (8 per row) of a run, as stored (JPEG pixels)."""
  images = []
  for i in range(min(n_data, PREVIEW_IMAGES)):
    with Image.open(os.path.join(ims_dir, image_name(run_name, i) + "_x_gen.jpg")) as im:
      images.append(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1)
  return save_image_grid(path, np.stack(images), nrow=8)
