"""Inception Score, FID and mask statistics of generated images (configs/generation_eval.py).

``config.source`` says where the images come from:

* ``folder`` — every PNG/JPEG/BMP/WebP under ``config.path`` (recursively, in sorted path order),
  any size, converted to RGB as pytorch-fid's loader does;
* ``dataset`` — a counterfactual dataset of ``generate_imagenet``
  (``<run_dir>/ims/<name>_x_gen.jpg`` in ``labels.csv`` order). That job stores no masks; a
  Re-CGN data folder's ``mean_masks.txt`` (one mean mask per image, in image order) gives the mask
  statistics when present;
* ``cgn`` — an ImageNet CGN sampled on the fly: the authors' ``cgn.pth``, a converted or exported
  CGN dir, or a ``train_cgn_imagenet`` workdir (its ``cgn/`` export). Image ``i`` draws its noise
  and classes from ``fold_in(key(seed), i)`` as ``generate_imagenet`` does
  (``cgn_jax/data/cgn_sampling.py``; mode ``random_same``, Re-CGN's, gives all three mechanisms
  the shape class), batches are split over every device (and host), and the CGN's masks give the
  mask statistics. The composite becomes uint8 as the authors save it (``normalize='minmax'``:
  per-image min-max, torchvision's ``save_image(normalize=True)``), so in modes ``random`` and
  ``best_classes`` the numbers are those of ``generate_imagenet``'s images of the same seed read
  back as a folder, JPEG compression aside.

Every image then takes one path: uint8 / 255, bilinear resize to 299 (torch ``F.interpolate``,
``align_corners=False``; on the host for files, on the devices for CGN samples), ``2x - 1``, and
Inception-v3 (``config.network``): ``fid`` is pytorch-fid's port of TF's pt_inception-2015-12-05
graph, whose Inception Score uses the 1008 logits without the fc bias (TF's original IS code,
torch-fidelity); ``torchvision`` is torchvision's graph with its 1000 biased logits (sbarratt's IS
code, which Re-CGN ran, but there with ``transform_input=True``: see ``config.transform_input``).
FID compares the pool3 features' mean and covariance with ``config.fid_reference``.

Writes ``<workdir>/generation_metrics.json`` (temporary name, then renamed) and prints a table.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from cgn_jax import checkpoints, parallel
from cgn_jax.data import cgn_sampling
from cgn_jax.data.imagenet_cfs import atomic_write
from cgn_jax.errors import ConfigError, InputError, check_choice
from cgn_jax.evaluation import generation_metrics as gm
from cgn_jax.models import imagenet_cgn, inception, loading

SOURCES = ("folder", "dataset", "cgn")
NETWORKS = inception.GRAPHS
CGN_MODES = ("random_same", "random", "best_classes")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
METRICS_FILE = "generation_metrics.json"
# Which logits the Inception Score reads, per network (see the module docstring).
IS_LOGITS = {"fid": ("logits_unbiased", "pool3 @ fc.weight (no bias)"),
             "torchvision": ("logits", "fc(pool3) (with bias)")}


# ---------------------------------------------------------------------------------------------
# Inputs.

def check_config(config: ml_collections.ConfigDict) -> None:
  """Every choice and path, before any model is loaded."""
  check_choice(config, "source", SOURCES)
  check_choice(config, "network", NETWORKS)
  check_choice(config, "mode", CGN_MODES)
  check_choice(config, "normalize", ("minmax", "fixed"))
  if not config.path:
    raise ConfigError(f"--config.path is empty; give the {config.source} to evaluate "
                      "(an image folder, a generate_imagenet run dir, or a CGN checkpoint)")
  if not os.path.exists(config.path):
    raise FileNotFoundError(f"config.path {config.path} does not exist; give an existing "
                            f"{'checkpoint' if config.source == 'cgn' else 'folder'}")
  if config.source == "cgn" and config.num_images <= 0:
    raise ConfigError(f"--config.num_images={config.num_images}: a CGN has no image count; give "
                      "how many to sample, e.g. --config.num_images=50000 (Re-CGN: 2000)")
  if config.splits < 1:
    raise ConfigError(f"--config.splits={config.splits} must be at least 1 (the convention: 10)")
  if not 0.0 <= config.mask_empty_below < config.mask_full_above <= 1.0:
    raise ConfigError(f"mask thresholds {config.mask_empty_below}, {config.mask_full_above} need "
                      "0 <= --config.mask_empty_below < --config.mask_full_above <= 1")
  if config.transform_input and config.network != "torchvision":
    raise ConfigError("--config.transform_input is torchvision's flag; set "
                      "--config.network=torchvision or drop it")
  if not config.inception_checkpoint:
    raise ConfigError("--config.inception_checkpoint is empty; give pytorch-fid's "
                      "pt_inception-2015-12-05-6726825d.pth (network fid) or torchvision's "
                      "inception_v3_google-0cc3c7bd.pth (network torchvision), see "
                      "configs/generation_eval.py")
  if not os.path.exists(config.inception_checkpoint):
    raise FileNotFoundError(f"config.inception_checkpoint {config.inception_checkpoint} does not "
                            "exist; see configs/generation_eval.py for where to get the weights")
  ref = config.fid_reference
  if ref and not (os.path.isdir(ref) or (os.path.isfile(ref) and ref.endswith(".npz"))):
    raise FileNotFoundError(f"config.fid_reference {ref} is neither a folder of images nor a "
                            "statistics .npz; give one, or '' for no FID")
  if config.save_reference_stats and not (ref and os.path.isdir(ref)):
    raise ConfigError("--config.save_reference_stats writes the statistics of a reference folder; "
                      "set --config.fid_reference to a folder of real images")


def list_images(folder: str, what: str = "config.path") -> list[str]:
  """Image files under ``folder``, recursively, sorted; hidden (e.g. temporary) files skipped."""
  if not os.path.isdir(folder):
    raise InputError(f"{what} {folder} is not a folder; give a folder of images")
  files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
                 if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
  if not files:
    raise InputError(f"{what} {folder} holds no image ({', '.join(IMAGE_EXTS)}); give a folder "
                     "with images, or --config.source=dataset/cgn for other inputs")
  return files


def dataset_images(run_dir: str) -> tuple[list[str], np.ndarray | None]:
  """A generate_imagenet run dir's composites in index order, and its mean masks if stored."""
  if not os.path.isdir(run_dir):
    raise InputError(f"config.path {run_dir} is not a folder; give the <workdir>/<run_name> folder "
                     "generate_imagenet wrote")
  ims = os.path.join(run_dir, "ims")
  if not os.path.isdir(ims):
    subs = sorted(d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d, "ims")))
    hint = f"did you mean {os.path.join(run_dir, subs[0])}?" if subs else \
        "give the <workdir>/<run_name> folder generate_imagenet wrote, or --config.source=folder"
    raise InputError(f"{run_dir} has no ims/ folder, so it is no counterfactual dataset; {hint}")
  labels = os.path.join(run_dir, "labels.csv")
  if os.path.isfile(labels):
    with open(labels, newline="") as f:
      rows = [r for r in csv.reader(f) if r and r[0] != "idx"]
    files = [os.path.join(ims, f"{r[1]}_x_gen.jpg") for r in sorted(rows, key=lambda r: int(r[0]))]
    files = [p for p in files if os.path.isfile(p)]
  else:
    files = [p for p in list_images(ims) if p.endswith("_x_gen.jpg")] or list_images(ims)
  if not files:
    raise InputError(f"{run_dir}: labels.csv lists no image present in ims/; generate the dataset "
                     "again (generate_imagenet completes a partial run)")
  masks = None
  mean_masks = os.path.join(run_dir, "mean_masks.txt")  # Re-CGN's generate_data.py writes this
  if os.path.isfile(mean_masks):
    with open(mean_masks) as f:
      masks = np.asarray([float(v) for v in f.read().split()], np.float64)
  return files, masks


def load_image(path: str) -> np.ndarray:
  """One file -> float32 [299, 299, 3] in [0, 1] (RGB, /255, torch-exact bilinear resize)."""
  try:
    with Image.open(path) as im:
      pixels = np.asarray(im.convert("RGB"), np.uint8)
  except OSError as e:
    raise InputError(f"cannot read image {path} ({e}); remove or replace it") from None
  return inception.resize_bilinear(inception.to_unit(pixels[None]))[0]


# ---------------------------------------------------------------------------------------------
# The network.

def load_inception(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any, str]:
  """``(module, variables, path)``; an authors' file is converted once per content into
  ``<workdir>/converted``. Kept for the process (a driver evaluating several CGNs, the tests):
  restoring the 100 MB network costs seconds per run otherwise."""
  path = os.path.abspath(config.inception_checkpoint)
  stamp_of = os.path.join(path, checkpoints.META_FILE) if os.path.isdir(path) else path
  stamp = (os.path.getsize(stamp_of), os.stat(stamp_of).st_mtime_ns) \
      if os.path.isfile(stamp_of) else None
  key = (path, stamp, config.network, bool(config.transform_input))
  if key not in _LOADED:
    cache = os.path.join(workdir, "converted")
    if os.path.isfile(path):
      cache = loading.conversion_cache(cache, loading.file_digest(path))
    model, variables = inception.load(path, config.network, cache,
                                      transform_input=bool(config.transform_input))
    family = checkpoints.load_meta(path).get("family") if os.path.isdir(path) else None
    if family and family != inception.DEFAULT_FAMILY[config.network]:
      logging.warning("network %s with %s weights: not the usual pairing (fid: inception_v3_fid, "
                      "torchvision: inception_v3)", config.network, family)
    _LOADED.clear()  # one network held at a time
    _LOADED[key] = (model, variables)
  model, variables = _LOADED[key]
  return model, variables, path


_LOADED: dict[tuple, tuple[Any, Any]] = {}


@functools.lru_cache(maxsize=8)
def measure_fn(model: inception.InceptionV3, logits_key: str, mesh) -> Callable:
  """``jit(variables, x01) -> {pool3, logits}`` for a batch-sharded [B, H, W, 3] in [0, 1]; the
  outputs are replicated (every process gets the whole batch). Cached: one compilation per shape
  serves every run of the process."""
  def measure(variables, x01):
    out = model.apply(variables, 2 * inception.resize_bilinear(x01) - 1)
    return {"pool3": out["pool3"], "logits": out[logits_key]}
  return jax.jit(measure, out_shardings=parallel.replicated(mesh))


@functools.lru_cache(maxsize=8)
def cgn_pixels_fn(mesh, minmax: bool) -> Callable:
  """``jit(x_gen, mask) -> (x01, mask means)``: the CGN composite [-1, 1] -> the saved uint8 ->
  [0, 1] at 299 (the resize of the files, on the devices), batch-sharded exactly like a batch of
  files (so ``measure_fn`` reuses its compilation), and each image's mean mask, replicated."""
  def pixels(x_gen, mask):
    x01 = inception.to_unit(cgn_sampling.to_uint8(x_gen, minmax))
    return inception.resize_bilinear(x01), jnp.mean(mask.astype(jnp.float32), axis=(1, 2, 3))
  return jax.jit(pixels, out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))


def _collect(outputs: Iterator[tuple[dict, int, Any]], total: int, desc: str,
             progress: bool) -> dict[str, np.ndarray]:
  """Concatenates the per-batch outputs (replicated arrays, ``valid`` leading rows each). A batch is
  read back only once the next one is dispatched, so the devices never wait for the host."""
  parts: dict[str, list] = {}
  bar = tqdm(total=total, desc=desc, unit="img", disable=not progress or jax.process_index() != 0)

  def keep(item):
    out, valid, mask = item
    for k, v in {**out, **({"mask": mask} if mask is not None else {})}.items():
      parts.setdefault(k, []).append(np.asarray(v.addressable_data(0))[:valid])
    bar.update(valid)

  previous = None
  for item in outputs:
    if previous is not None:
      keep(previous)
    previous = item
  if previous is not None:
    keep(previous)
  bar.close()
  return {k: np.concatenate(v) for k, v in parts.items()}


def measure_files(files: list[str], measure: Callable, variables, mesh, config,
                  desc: str) -> dict[str, np.ndarray]:
  """pool3 and logits of ``files``; each host decodes only its rows of every global batch, the
  next batch while the devices run the current one."""
  b = config.batch_size
  rows = parallel.host_rows(b)
  n_batches = -(-len(files) // b)

  def host_batch(pool, k):
    idx = list(range(k * b, min((k + 1) * b, len(files))))
    idx += [idx[-1]] * (b - len(idx))  # a short last batch repeats its last image; dropped later
    return [pool.submit(load_image, files[i]) for i in idx[rows]]

  def outputs():
    with concurrent.futures.ThreadPoolExecutor(max(1, config.num_loaders)) as pool:
      pending = host_batch(pool, 0)
      for k in range(n_batches):
        x = np.stack([f.result() for f in pending])
        if k + 1 < n_batches:
          pending = host_batch(pool, k + 1)
        yield (measure(variables, parallel.from_host_rows(x, mesh)), min(b, len(files) - k * b),
               None)

  return _collect(outputs(), len(files), desc, config.progress_bar)


def _cgn_checkpoint(path: str) -> str:
  """A train_cgn_imagenet workdir means its ``cgn/`` export."""
  export = os.path.join(path, "cgn")
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, checkpoints.META_FILE)) and \
     os.path.isfile(os.path.join(export, checkpoints.META_FILE)):
    return export
  return path


def measure_cgn(config, workdir: str, measure: Callable, variables, mesh
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """pool3, logits and mean masks of ``config.num_images`` CGN samples, and what was sampled."""
  path = _cgn_checkpoint(config.path)
  cache = os.path.join(workdir, "converted")
  digest = loading.file_digest(path) if os.path.isfile(path) else None
  if digest:
    cache = loading.conversion_cache(cache, digest)
  cgn, cgn_vars = imagenet_cgn.load(path, cache)
  cfg, gan = cgn.config, cgn.config.biggan
  cgn_vars = parallel.replicate(cgn_vars, mesh)
  fwd = cgn_sampling.forward_fn(cfg, "float32")
  sel = cgn_sampling.selection(config.truncation, cfg)
  mode = "random" if config.mode == "random_same" else config.mode
  pools = cgn_sampling.class_pools(mode, (0, 0, 0), gan.num_classes)
  eye = np.eye(gan.num_classes, dtype=np.float32)
  pixels = cgn_pixels_fn(mesh, config.normalize == "minmax")
  b, n = config.batch_size, config.num_images

  def outputs():
    for start in range(0, n, b):
      idx = np.minimum(np.arange(start, start + b), n - 1)  # pad a short last batch
      z, cls, _ = cgn_sampling.draw_inputs(config.seed, idx, pools, config.truncation, gan.z_dim,
                                           gan.num_classes)
      if config.mode == "random_same":  # Re-CGN's sample_classes('random_same'): one class for all
        cls[:, 1:] = cls[:, :1]
      inputs = parallel.shard_batch([z, eye[cls[:, 0]], eye[cls[:, 1]], eye[cls[:, 2]]], mesh)
      out = fwd(cgn_vars, *inputs, sel)
      x01, mask_mean = pixels(out["x_gen"], out["mask"])
      yield measure(variables, x01), min(b, n - start), mask_mean

  info = {"checkpoint": os.path.abspath(path), "checkpoint_sha256": digest,
          "truncation": config.truncation, "mode": config.mode, "seed": config.seed,
          "normalize": config.normalize, "model_config": cfg.to_dict()}
  return _collect(outputs(), n, "cgn samples", config.progress_bar), info


# ---------------------------------------------------------------------------------------------
# The job.

def _stored_reference(config) -> tuple[Any, Any, dict] | None:
  """``(mu, sigma, description)`` of a statistics-file ``fid_reference``, read before any work."""
  ref = config.fid_reference
  if not (ref and os.path.isfile(ref)):
    return None
  mu, sigma, stored = gm.load_stats(ref)
  if stored.get("network") not in (None, config.network):
    raise ConfigError(f"{ref} holds statistics of network '{stored['network']}', this run uses "
                      f"'{config.network}'; set --config.network={stored['network']} or recompute "
                      "the statistics from the reference images")
  if not stored:
    logging.warning("%s does not say which network made it; FID assumes the same (%s)", ref,
                    config.network)
  return mu, sigma, {"path": os.path.abspath(ref), "num_images": stored.get("num_images")}


def _folder_reference(config, measure, variables, mesh, meta: dict) -> tuple[Any, Any, dict]:
  """``(mu, sigma, description)`` of a reference folder, its statistics saved if asked."""
  ref = config.fid_reference
  files = list_images(ref, "config.fid_reference")
  feats = measure_files(files, measure, variables, mesh, config, "reference")["pool3"]
  mu, sigma = gm.statistics(feats)
  if config.save_reference_stats and jax.process_index() == 0:
    gm.save_stats(config.save_reference_stats, mu, sigma, num_images=len(files),
                  source=os.path.abspath(ref), **meta)
  return mu, sigma, {"path": os.path.abspath(ref), "num_images": len(files),
                     "saved_stats": config.save_reference_stats or None}


def _table(result: dict) -> str:
  s, src = result["inception_score"], result["source"]
  lines = [f"evaluate_generation: {s['num_images']} images, {src['kind']} {src['path']}",
           f"  Inception Score ({s['network']} network, {s['splits']} splits)  "
           f"{s['mean']:.3f} ± {s['std']:.3f}"]
  if result["fid"] is not None:
    ref = result["fid_reference"]
    lines.append(f"  FID vs {ref['path']} ({ref['num_images'] or '?'} images)  {result['fid']:.3f}")
  if result["mask"] is not None:
    m = result["mask"]
    lines.append(f"  mask mean ± std  {m['mean']:.4f} ± {m['std']:.4f}")
    lines.append(f"  masks with mean < {m['empty_below']:g} / > {m['full_above']:g}  "
                 f"{100 * m['frac_empty']:.1f}% / {100 * m['frac_full']:.1f}%")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Measures the images of ``config.source``; writes and returns generation_metrics.json's dict."""
  t0 = time.time()
  check_config(config)
  mesh = parallel.create_mesh(config.num_devices)
  parallel.check_batch_size(config.batch_size, mesh, "batch_size")
  files, masks = [], None
  if config.source == "folder":
    files = list_images(config.path)
  elif config.source == "dataset":
    files, masks = dataset_images(config.path)
  if files and config.num_images > 0:
    if len(files) < config.num_images:
      logging.warning("%s holds %d images (< num_images %d): evaluating all of them",
                      config.path, len(files), config.num_images)
    files = files[:config.num_images]
  stored_reference = _stored_reference(config)
  if config.fid_reference and os.path.isdir(config.fid_reference):
    list_images(config.fid_reference, "config.fid_reference")  # fail before any work
  os.makedirs(workdir, exist_ok=True)

  model, variables, inception_path = load_inception(config, workdir)
  variables = parallel.replicate(variables, mesh)
  logits_key, logits_what = IS_LOGITS[config.network]
  measure = measure_fn(model, logits_key, mesh)
  source: dict[str, Any] = {"kind": config.source, "path": os.path.abspath(config.path)}
  if config.source == "cgn":
    out, info = measure_cgn(config, workdir, measure, variables, mesh)
    source.update(info)
  else:
    out = measure_files(files, measure, variables, mesh, config, config.source)
    if masks is not None:
      if len(masks) < len(files):
        logging.warning("mean_masks.txt has %d values for %d images: no mask statistics",
                        len(masks), len(files))
      else:
        out["mask"] = masks[:len(files)]
  n = len(out["pool3"])
  source["num_images"] = n

  preprocessing = inception.PREPROCESSING
  if config.source == "cgn":
    preprocessing = (f"CGN x_gen [-1, 1] -> uint8 ({config.normalize}, as generate_imagenet saves "
                     f"it), then {preprocessing}")
  if config.transform_input:
    preprocessing += ", then torchvision's transform_input (as inception_v3(pretrained=True))"
  meta = {"network": config.network, "preprocessing": preprocessing,
          "inception_checkpoint": inception_path}
  mean, std, per_split = gm.inception_score(gm.softmax(out["logits"]), config.splits)
  result: dict[str, Any] = {
      "inception_score": {"mean": mean, "std": std, "splits": config.splits, "num_images": n,
                          "network": config.network, "preprocessing": preprocessing,
                          "logits": f"{logits_what}, {out['logits'].shape[1]} classes",
                          "split_scores": per_split},
      "fid": None, "fid_reference": None, "mask": None, "source": source,
      "inception_checkpoint": inception_path}
  if config.fid_reference:
    mu_ref, sigma_ref, ref_info = stored_reference or _folder_reference(
        config, measure, variables, mesh, meta)
    result["fid"] = gm.frechet_distance_features(out["pool3"], mu_ref, sigma_ref)
    result["fid_reference"] = ref_info
  if "mask" in out:
    result["mask"] = gm.mask_statistics(out["mask"], config.mask_empty_below,
                                        config.mask_full_above)
  result["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    text = json.dumps(result, indent=1)
    atomic_write(os.path.join(workdir, METRICS_FILE), lambda f: f.write(text.encode()))
    print(f"{_table(result)}\n  -> {os.path.join(workdir, METRICS_FILE)} "
          f"({result['seconds']:.1f} s)", flush=True)
  parallel.sync("evaluate_generation: written")
  return result
