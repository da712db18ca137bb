"""Counterfactual ImageNet images and interpolation sheets from the ImageNet CGN (the authors'
imagenet/generate_data.py), batched, jit-compiled and sharded over a ``data`` mesh.

A dataset run writes ``<workdir>/<run_name>/``, laid out so that the authors' loader
(``ImagenetCounterfactual``: ``read_csv(labels.csv, index_col=0)``, images at
``ims/<im_name>_x_gen.jpg``) reads it:

* ``ims/<run_name>_<i:07d>_x_gen.jpg`` — the composite ``x_gen`` of image ``i``;
* ``labels.csv`` — header ``idx,im_name,shape_cls,texture_cls,bg_cls``, then one row per image. The
  authors append every row with pandas as the *header* of an empty DataFrame, so their file has a
  blank first column and one header-like line per image; their loader needs that first column
  (``index_col=0``). We write one header and a real first column (the image index ``idx``), so the
  same call reads ours. With several processes, process ``p`` writes ``labels_<p:03d>.csv`` and
  :func:`merge_label_shards` joins the shards into ``labels.csv`` at the end;
* ``manifest.json`` — n_data, mode, truncation, seed, checkpoint and the sha256 of its bytes,
  model_config, ...; and beside the folder ``<run_name>_preview.png``, its first 16 images.

Image ``i`` depends only on ``(seed, i)``: its three classes and its noise come from
``fold_in(key(seed), i)``, drawn on the host's CPU backend (so the noise does not depend on the
accelerator's arithmetic either), hence not on the batch size, the device count or a resume — up
to float rounding in the forward pass (measured on CPU: bit-identical JPEGs from 1 process x 4
devices and from 2 processes x 2 devices with a resume in between).

Resuming is per index: ``i`` is complete when its image file (non-empty) *and* its CSV row exist.
Images are written under a temporary name and renamed; a batch's rows are appended (and fsynced)
only once all its images exist; a torn last line (killed mid-write) is cut off, and rows whose image
is gone are dropped, so a rerun regenerates exactly the missing indices — no duplicates, no gaps —
in the batches an uninterrupted run formed (a kill leaves whole batches), and the temporary files of
the killed writes are removed. A run directory holds one kind of data: a rerun with other settings,
or with other checkpoint bytes under the same path (a CGN retrained in place), is refused in one
line.

Pixels: the authors save with ``save_image(normalize=True)``, i.e. every image is min-max stretched
to [0, 255] on its own; ``normalize='minmax'`` (default) does the same float32 operations as
torchvision (``(x - min) / max(max - min, 1e-5) * 255 + 0.5``, floored), ``'fixed'`` maps [-1, 1]
linearly and keeps the generator's contrast. JPEG quality 75 is PIL's default, which torchvision
uses. Interpolation sheets (``config.interp``) are PNGs through ``save_image_grid`` ([-1, 1] mapped
linearly; masks shown as ``2m - 1``), where the authors min-max the whole sheet.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from cgn_jax import checkpoints, parallel
from cgn_jax.data.cgn_sampling import (BACKGROUNDS, FOREGROUND, MASKS, MODES,  # noqa: F401
                                       class_pools, draw_inputs, forward_fn, to_uint8)
from cgn_jax.data.cgn_sampling import selection as _selection
from cgn_jax.data.sheets import save_image_grid
from cgn_jax.data.imagenet_cfs import (HEADER, atomic_write, image_name, labels_name,
                                       merge_label_shards, present_images, read_labels,
                                       remove_leftovers, write_preview, write_rows)
from cgn_jax.models import imagenet_cgn, loading
from cgn_jax.models.imagenet_cgn import CGNConfig

FAMILY = "imagenet_cgn"
INTERP = {"all": (0, 1, 2), "shape": (0,), "text": (1,), "bg": (2,)}  # interpolated mechanisms
MANIFEST = "manifest.json"

# ---------------------------------------------------------------------------------------------
# Rows of sharded batches and the manifest (inputs and the forward pass: cgn_jax/data/cgn_sampling).

def _local_rows(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order it fed them."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(parallel.DATA_AXIS)))


def _from_local_rows(local: np.ndarray, mesh) -> jax.Array:
  shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), local, shape)


def _all_rows(x: jax.Array) -> np.ndarray:
  return np.asarray(x if jax.process_count() == 1 else multihost_utils.process_allgather(x, tiled=True))


def _check_manifest(run_dir: str, manifest: dict) -> None:
  """A run directory holds one kind of data: resuming with other settings would mix two."""
  path = os.path.join(run_dir, MANIFEST)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(manifest))
  diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new
          if k not in ("n_data", "complete") and old.get(k) != new[k]]
  if diff:
    raise FileExistsError(f"{run_dir} holds a run with other settings ({'; '.join(diff)}); choose "
                          f"another --config.run_name or delete that directory")


def _write_manifest(run_dir: str, manifest: dict) -> None:
  text = json.dumps(manifest, indent=1)
  atomic_write(os.path.join(run_dir, MANIFEST), lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------------------------
# The job.

def _resolve_model(config: ml_collections.ConfigDict, workdir: str, digest: str | None = None
                   ) -> tuple[CGNConfig, str, Callable[[], dict]]:
  """(architecture, source, loader of the variables): loading waits until something is to do.
  An authors' file of content ``digest`` is converted into ``converted/<digest[:16]>``."""
  if config.checkpoint:
    cache = os.path.join(workdir, "converted")
    if digest and os.path.isfile(config.checkpoint):
      cache = loading.conversion_cache(cache, digest)
    path = loading.converted_dir(config.checkpoint, FAMILY, cache)
    cfg = CGNConfig.from_dict(checkpoints.load_meta(path)["model_config"])
    return cfg, os.path.abspath(config.checkpoint), lambda: imagenet_cgn.load(path)[1]
  if not config.allow_random_init:
    raise FileNotFoundError(
        "config.checkpoint is empty: generation needs a trained ImageNet CGN; pass "
        "--config.checkpoint=cgn.pth (the authors' weights) or an exported <train workdir>/cgn, or "
        "--config.allow_random_init=True to test the plumbing with random weights")
  cfg = imagenet_cgn.config_from_fields(config.model)
  logging.warning("random ImageNet CGN weights (config.allow_random_init)")
  return (cfg, f"random weights (seed {config.seed})",
          lambda: imagenet_cgn.random_variables(cfg, config.seed))


def _write_batch(batch, mesh, ims_dir: str, run_name: str, labels, pool, quality: int) -> int:
  """Waits for one batch, writes this process's images, then appends their rows."""
  idx, cls, pixels, raw = batch
  pixels = _local_rows(pixels, mesh)[:len(idx)]
  raw = _local_rows(raw, mesh)[:len(idx)] if raw is not None else None
  jobs = []
  for j, i in enumerate(idx):
    base = os.path.join(ims_dir, image_name(run_name, i) + "_x_gen")
    jobs.append(pool.submit(atomic_write, base + ".jpg",
                            functools.partial(_save_jpeg, pixels[j], quality)))
    if raw is not None:  # debug: the model's float output, before any rounding
      jobs.append(pool.submit(atomic_write, base + ".npy", functools.partial(np.save, arr=raw[j])))
  for job in jobs:
    job.result()
  if idx:
    labels.write("".join(f"{i},{image_name(run_name, i)},{c[0]},{c[1]},{c[2]}\n"
                         for i, c in zip(idx, cls)))
    labels.flush()
    os.fsync(labels.fileno())
  return len(idx)


def _save_jpeg(pixels: np.ndarray, quality: int, f) -> None:
  Image.fromarray(pixels).save(f, format="JPEG", quality=quality)


def _generate_dataset(config, run_dir: str, cfg: CGNConfig, load: Callable, mesh
                      ) -> tuple[int, int]:
  p, nproc = jax.process_index(), jax.process_count()
  ims_dir = os.path.join(run_dir, "ims")
  os.makedirs(ims_dir, exist_ok=True)
  labels_path = os.path.join(run_dir, labels_name(p, nproc))
  rows = read_labels(labels_path, config.run_name)
  present = present_images(ims_dir, config.run_name, lambda i: i % nproc == p)
  complete = {i for i in rows if i in present}
  if len(complete) < len(rows):  # rows of lost images: drop them, the images come back
    write_rows(labels_path, {i: r for i, r in rows.items() if i in complete})
  mine = range(p, config.n_data, nproc)
  todo = [i for i in mine if i not in complete]
  per_host = config.batch_size // nproc
  n_batches = -(-len(todo) // per_host)
  if nproc > 1:  # every process joins every (collective) forward pass
    n_batches = int(np.max(multihost_utils.process_allgather(np.int32(n_batches))))
  if n_batches == 0:
    return 0, len(mine)

  gan = cfg.biggan
  variables = parallel.replicate(load(), mesh)
  fwd, sel = forward_fn(cfg, config.model.dtype), _selection(config.truncation, cfg)
  pools = class_pools(config.mode, config.classes, gan.num_classes)
  eye = np.eye(gan.num_classes, dtype=np.float32)
  written, pending = 0, None
  bar = tqdm(total=n_batches, desc=f"generate {config.run_name}", unit="batch",
             disable=p != 0 or not config.progress_bar)
  with concurrent.futures.ThreadPoolExecutor(config.num_writers) as pool, \
       open(labels_path, "a") as labels:
    for k in range(n_batches):
      idx = todo[k * per_host:(k + 1) * per_host]
      # Padding rows (a short last batch) repeat some index; their outputs are dropped.
      rows_in = np.asarray(idx + [idx[0] if idx else p] * (per_host - len(idx)), np.int32)
      z, cls, _ = draw_inputs(config.seed, rows_in, pools, config.truncation, gan.z_dim,
                              gan.num_classes)
      inputs = [_from_local_rows(a, mesh) for a in (z, eye[cls[:, 0]], eye[cls[:, 1]], eye[cls[:, 2]])]
      out = fwd(variables, *inputs, sel)
      current = (idx, cls[:len(idx)], to_uint8(out["x_gen"], config.normalize == "minmax"),
                 out["x_gen"] if config.save_npy else None)
      if pending is not None:  # write the previous batch while this one computes
        written += _write_batch(pending, mesh, ims_dir, config.run_name, labels, pool,
                                config.jpeg_quality)
        bar.update(1)
      pending = current
    written += _write_batch(pending, mesh, ims_dir, config.run_name, labels, pool,
                            config.jpeg_quality)
    bar.update(1)
  bar.close()
  return written, len(mine) - len(todo)


def interp_vectors(start: int, end: int, n_cols: int, num_classes: int) -> np.ndarray:
  """[n_cols, num_classes]: the one-hot of ``start`` blended linearly into that of ``end``."""
  lerp = np.linspace(0.0, 1.0, n_cols, dtype=np.float32)[:, None]
  eye = np.eye(num_classes, dtype=np.float32)
  return eye[start] * (1 - lerp) + eye[end] * lerp


def _generate_sheets(config, run_dir: str, cfg: CGNConfig, load: Callable, mesh
                     ) -> tuple[int, int]:
  """One PNG per index: the authors' interp_sheet, all columns in batched forward passes."""
  gan, cols = cfg.biggan, config.midpoints + 2
  sheets_dir = os.path.join(run_dir, "sheets")
  os.makedirs(sheets_dir, exist_ok=True)
  paths = [os.path.join(sheets_dir, f"{image_name(config.run_name, i)}_{config.interp}_interp.png")
           for i in range(config.n_data)]
  todo = np.asarray([not os.path.exists(q) for q in paths], np.int32)
  todo = np.flatnonzero(multihost_utils.broadcast_one_to_all(todo))  # process 0 writes sheets
  if not len(todo):
    return 0, config.n_data
  u = imagenet_cgn.load_fixed_noise(config.u_fixed, gan.z_dim)  # [1, z_dim], truncated already
  variables = parallel.replicate(load(), mesh)
  fwd, sel = forward_fn(cfg, config.model.dtype), _selection(config.truncation, cfg)
  pools = class_pools(config.mode, config.classes, gan.num_classes)
  _, cls, target = draw_inputs(config.seed, todo, pools, config.truncation, gan.z_dim,
                               gan.num_classes)
  if config.interp_cls >= 0:
    target[:] = config.interp_cls
  moved = INTERP[config.interp]
  extra = {"shape": "mask", "text": "foreground", "bg": "background"}.get(config.interp)
  group, b = max(1, config.batch_size // cols), config.batch_size
  for g in range(0, len(todo), group):
    sheets = range(g, min(g + group, len(todo)))
    ys = [np.concatenate([interp_vectors(cls[s, m], target[s] if m in moved else cls[s, m], cols,
                                         gan.num_classes) for s in sheets]) for m in range(3)]
    n = len(ys[0])
    pad = -n % b  # whole batches of the dataset's shape: the same compiled forward
    rows = [np.repeat(u, n + pad, 0)] + [np.pad(y, ((0, pad), (0, 0))) for y in ys]
    outs = []
    for r0 in range(0, n + pad, b):
      out = fwd(variables, *parallel.shard_batch([r[r0:r0 + b] for r in rows], mesh), sel)
      outs.append({k: _all_rows(out[k]) for k in ("x_gen", extra) if k})
    out = {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
    if extra == "mask":
      out["mask"] = np.repeat(2 * out["mask"] - 1, 3, -1)  # [0, 1] -> the grid's [-1, 1]
    for j, s in enumerate(sheets):
      grid = [out["x_gen"][j * cols:(j + 1) * cols]]
      if extra:
        grid.append(out[extra][j * cols:(j + 1) * cols])
      if jax.process_index() == 0:
        save_image_grid(paths[todo[s]], np.concatenate(grid), nrow=cols)
        print(f"sheet {paths[todo[s]]}: shape {cls[s, 0]}, texture {cls[s, 1]}, bg {cls[s, 2]}; "
              f"{config.interp} -> {target[s]}")
  return len(todo), config.n_data - len(todo)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Generates (or completes) ``<workdir>/<run_name>``; returns what was done."""
  t0 = time.time()
  if config.interp and config.interp not in INTERP:
    raise ValueError(f"config.interp='{config.interp}' is not one of '', {', '.join(INTERP)}")
  if config.mode != "fixed_classes" and tuple(config.classes) != (0, 0, 0):
    logging.warning("config.classes=%s is ignored in mode '%s'", tuple(config.classes), config.mode)
  mesh = parallel.create_mesh(jax.devices()[:config.num_devices] if config.num_devices > 0 else None)
  parallel.check_batch_size(config.batch_size, mesh, "batch_size")
  if config.normalize not in ("minmax", "fixed"):
    raise ValueError(f"config.normalize='{config.normalize}' is not 'minmax' or 'fixed'")
  if config.checkpoint and not os.path.exists(config.checkpoint):
    raise FileNotFoundError(f"checkpoint {config.checkpoint} not found; pass --config.checkpoint= "
                            "the authors' cgn.pth, a converted dir or <train workdir>/cgn")
  # The bytes, not the path: a checkpoint retrained in place must not complete the old run.
  digest = loading.file_digest(config.checkpoint) if config.checkpoint else None
  run_dir = os.path.join(workdir, config.run_name)
  if jax.process_index() == 0:  # then a barrier: no other process is writing these yet
    remove_leftovers(run_dir)
    loading.remove_stale_conversions(os.path.join(workdir, "converted"), config.checkpoint,
                                     digest, FAMILY)
  parallel.sync("generate_imagenet: cleaned")
  cfg, source, load = _resolve_model(config, workdir, digest)
  class_pools(config.mode, config.classes, cfg.biggan.num_classes)  # fail before any work
  if config.interp and not -1 <= config.interp_cls < cfg.biggan.num_classes:
    raise ValueError(f"config.interp_cls={config.interp_cls}: -1 (random) or a class id")
  os.makedirs(run_dir, exist_ok=True)
  manifest = {
      "kind": "interpolation_sheets" if config.interp else "dataset", "n_data": config.n_data,
      "mode": config.mode, "classes": list(config.classes) if config.mode == "fixed_classes" else None,
      "truncation": config.truncation, "seed": config.seed, "checkpoint": source,
      "checkpoint_sha256": digest,
      "model_config": cfg.to_dict(), "normalize": config.normalize,
      "jpeg_quality": config.jpeg_quality, "process_count": jax.process_count(),
      "labels": HEADER, "complete": False}
  if config.interp:
    manifest.update(interp=config.interp, midpoints=config.midpoints,
                    interp_cls=config.interp_cls, u_fixed=os.path.abspath(config.u_fixed))
  _check_manifest(run_dir, manifest)
  if jax.process_index() == 0:
    _write_manifest(run_dir, manifest)
  t_gen = time.time()
  generate = _generate_sheets if config.interp else _generate_dataset
  written, skipped = generate(config, run_dir, cfg, load, mesh)
  t_end = time.time()
  if jax.process_count() > 1:
    if not config.interp:  # each process counted its own shard (sheets: every process all of them)
      written, skipped = (int(v) for v in np.sum(
          multihost_utils.process_allgather(np.asarray([written, skipped])), axis=0))
    parallel.sync("generate_imagenet: done")
    if jax.process_index() == 0 and not config.interp:
      merge_label_shards(run_dir)
  if jax.process_index() == 0:
    _write_manifest(run_dir, {**manifest, "complete": True})
    preview = os.path.join(workdir, f"{config.run_name}_preview.png")
    if not config.interp and (written or not os.path.exists(preview)):
      write_preview(preview, os.path.join(run_dir, "ims"), config.run_name, config.n_data)
  parallel.sync("generate_imagenet: merged")  # labels.csv and the manifest, for every process
  what = "sheets" if config.interp else "images"
  rate = written / max(t_end - t_gen, 1e-9)
  print(f"generate_imagenet: wrote {written} {what}, skipped {skipped} already present, "
        f"{t_end - t0:.1f} s wall, {rate:.2f} {what}/s (incl. compilation) -> {run_dir}")
  return {"run_dir": run_dir, "written": written, "skipped": skipped, "seconds": t_end - t0,
          "per_second": rate}
