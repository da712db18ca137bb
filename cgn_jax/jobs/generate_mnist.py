"""Counterfactual MNIST datasets from a CGN, like the authors' mnists/generate_data.py, but batched,
jit-compiled and sharded over every device.

For every batch of shape labels one mask is drawn; then ``no_cfs`` times the foreground and
background labels are fresh random permutations of the batch's labels (the authors'
``counterfactual=True``) with fresh noise, and the image is ``mask*f + (1-mask)*b`` labelled with
the *shape* class. The dataset stores all three label columns (label = shape, texture, bg); a batch
is stored round by round (its ``no_cfs`` counterfactuals of row 0..B-1, then the next round).

The generator may also be a GAN exported by ``train_gan_mnist`` (``checkpoint`` = its
``<workdir>/generator``): ``no_cfs`` samples of fresh noise per label, written the same way to
``<dataset>_gan`` ([Re]'s ``generate_gan_dataset``; texture and bg columns = the class).

Output: ``<workdir>/<dataset>_counterfactual`` (``out_dir`` overrides; see cgn_jax/data/storage.py)
and beside it ``<name>_preview.png``, a grid of its first 64 images. Batch ``i`` takes the i-th draw
of the label stream ``default_rng(seed)`` and the noise ``fold_in(key(seed), i)``, so a rerun after
a kill fast-forwards the label stream to where the last complete shard ended, continues there
(``storage.PartWriter``), and ends with the same files as an uninterrupted run. A ``dataset_size``
that is no multiple of ``batch_size * no_cfs`` is met exactly: the last batch is generated whole
and its first images (in the stored order) are kept. The manifest's ``fingerprint`` (every field
that changes the output, and the sha256 of the checkpoint's bytes) decides reuse: the same
fingerprint is reused, anything else regenerates, and the old dataset is replaced only when the new
one is complete.

Several processes: each writes the rows its devices hold, in the stored order, as part ``p<index>``
(shards ``train-p<index>-<k>``); process 0 merges the parts' records into one manifest (part 0's
shards first) once every process is done. One process writes part ``''``, i.e. the single-process
layout ``train-<k>``.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cgn_jax import parallel
from cgn_jax.composer import compose
from cgn_jax.data import storage
from cgn_jax.data.mnist_variants import VARIANTS
from cgn_jax.data.sheets import save_image_grid
from cgn_jax.errors import check_choice
from cgn_jax.models import loading, mnist_cgn, mnist_gan
from cgn_jax.models.mnist_cgn import MnistCGN

# Bump when the same config would give other images: the fingerprint then refuses old datasets.
RECIPE_VERSION = 2
PREVIEW_IMAGES = 64


def make_generate_fn(cgn: MnistCGN, no_cfs: int, flatten: bool = True):
  """``fn(variables, ys [B], key) -> (images [no_cfs*B,H,W,3], y_fg, y_bg)`` in eval mode.

  ``flatten=False`` gives ``[no_cfs, B, ...]`` arrays, which keep each row on the device of its
  label, and the shape labels as a fourth: every output row a process holds comes with its labels.
  """

  def fn(variables, ys, key):
    k_mask, k_cf = jax.random.split(key)
    mask = cgn.apply(variables, ys, k_mask, method=MnistCGN.sample_mask)

    def one(k):
      kp1, kp2, kt = jax.random.split(k, 3)
      y_fg = ys[jax.random.permutation(kp1, ys.shape[0])]
      y_bg = ys[jax.random.permutation(kp2, ys.shape[0])]
      fg, bg = cgn.apply(variables, y_fg, y_bg, kt, method=MnistCGN.sample_textures)
      return compose(mask, fg, bg), y_fg, y_bg

    # One counterfactual round at a time: batch-B activations stay in cache, which makes the
    # texture convs ~1.7x faster per image on CPU than one vmapped batch of no_cfs*B.
    out = jax.lax.map(one, jax.random.split(k_cf, no_cfs))
    if not flatten:
      return (*out, jnp.broadcast_to(ys, (no_cfs,) + ys.shape))
    return tuple(a.reshape((-1,) + a.shape[2:]) for a in out)

  return fn


def generate(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes (or reuses, or completes) ``config.dataset_size`` counterfactual images; returns the
  dataset directory."""
  check_choice(config, "dataset", VARIANTS)
  if config.dataset_size < 1:
    raise ValueError(f"config.dataset_size={config.dataset_size}: generate at least one image")
  if config.checkpoint and not os.path.exists(config.checkpoint):
    raise FileNotFoundError(
        f"checkpoint {config.checkpoint} not found; pass --config.checkpoint= an authors' .pth, a "
        "converted dir or <train workdir>/generator (set $CGN_DATA to the folder holding "
        "pretrained/mnist_cgn/ for the default), or '' for random weights")
  kind = "gan" if mnist_gan.is_gan_checkpoint(config.checkpoint) else "counterfactual"
  name = f"{config.dataset}_{kind}"
  out = os.path.abspath(config.out_dir or os.path.join(workdir, name))
  storage.check_replaceable(out)  # before minutes of work, not at the end
  p, nproc = jax.process_index(), jax.process_count()
  digest = loading.file_digest(config.checkpoint) if config.checkpoint else None
  fingerprint = _fingerprint(config, digest, nproc)
  converted = os.path.join(workdir, "converted")
  if p == 0:
    storage.remove_leftovers(out)
    for tmp in glob.glob(os.path.join(glob.escape(os.path.dirname(out)),
                                      f".{glob.escape(os.path.basename(_preview_path(out)))}.*")):
      os.remove(tmp)  # save_image_grid's temporary name
    loading.remove_stale_conversions(converted, config.checkpoint, digest, "mnist_cgn")
  state = storage.dataset_state(out, fingerprint)
  parallel.sync("generate_mnist: looked")  # before any process changes the folder
  if state == "complete":
    print(f"reusing {out}")
  elif state == "staged":  # killed while moving it into place
    if p == 0:
      storage.install_staged(out)
  else:
    _generate(config, out, fingerprint, digest, converted)
  if p == 0 and (state != "complete" or not os.path.exists(_preview_path(out))):
    _write_preview(out)
  parallel.sync("generate_mnist: done")  # the dataset is in place for every process
  return out


def _generate(config, out: str, fingerprint: dict, digest: str | None, converted: str) -> None:
  p, nproc = jax.process_index(), jax.process_count()
  cache = loading.conversion_cache(converted, digest) if digest else converted
  n_classes, variables, generate_fn = _load_generator(config, cache)
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.batch_size, mesh, "batch_size")
  b, k = config.batch_size, config.no_cfs
  n_batches = -(-config.dataset_size // (b * k))
  keep_last = config.dataset_size - (n_batches - 1) * b * k  # images kept of the last batch
  out_sharding = NamedSharding(mesh, P(None, parallel.DATA_AXIS))  # [no_cfs, B, ...]
  held = _held_rows(out_sharding, (k, b))
  per_batch = k * len(held)  # this process's images of a whole batch

  writer = storage.PartWriter(out, fingerprint, part=_part(p, nproc),
                              shard_size=config.shard_size or None)
  done = writer.rows
  start = n_batches if writer.complete else min(done // per_batch, n_batches)
  if nproc > 1:  # every process joins every (collective) forward pass
    start = int(np.min(multihost_utils.process_allgather(np.int32(start))))
  if done and p == 0:
    print(f"resuming {out} at batch {start} of {n_batches} ({done} images of this process kept)")

  fn = jax.jit(generate_fn,
               in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                             parallel.replicated(mesh)),
               out_shardings=out_sharding)
  variables = parallel.replicate(variables, mesh)
  key = jax.random.key(config.seed)
  label_rng = np.random.default_rng(config.seed)
  for _ in range(start):  # the same label stream as an uninterrupted run
    label_rng.integers(0, n_classes, b)
  rounds_of_held = (np.arange(k)[:, None] * b + held[None, :]).reshape(-1)  # index in the batch

  def write(i, res):
    x, y_fg, y_bg, y = (_local_rows(a).reshape((per_batch,) + a.shape[2:]) for a in res)
    labels = {"label": y, "texture": y_fg, "bg": y_bg}
    kept = np.ones(per_batch, bool) if i < n_batches - 1 else rounds_of_held < keep_last
    kept[:max(0, done - i * per_batch)] = False  # in the shards already
    if kept.any():
      writer.add(storage.encode_uint8(x[kept]), {c: v[kept] for c, v in labels.items()})

  t0 = time.time()
  pending = None
  for i in tqdm(range(start, n_batches), desc="counterfactuals", unit="batch",
                total=n_batches, initial=start, disable=not config.progress_bar or p != 0):
    ys = label_rng.integers(0, n_classes, b).astype(np.int32)
    res = fn(variables, parallel.shard_batch(ys, mesh), jax.random.fold_in(key, i))
    if pending is not None:  # write the previous batch while this one computes
      write(*pending)
    pending = (i, res)
  if pending is not None:
    write(*pending)
  writer.close()
  parallel.sync("generate_mnist: parts closed")
  if p == 0:
    meta = {"name": os.path.basename(out), "seed": config.seed,
            "dataset_size": config.dataset_size, "no_cfs": k, "source": _source(config),
            "checkpoint_sha256": digest, "process_count": nproc}
    order = (_stored_positions(out_sharding, n_batches, k, b, config.dataset_size)
             if nproc > 1 else None)
    storage.install_parts(out, meta, [_part(q, nproc) for q in range(nproc)], order=order)
    what = ("GAN samples" if mnist_gan.is_gan_checkpoint(config.checkpoint)
            else "counterfactual images")
    print(f"wrote {config.dataset_size} {what} to {out} "
          f"({n_batches - start} batches in {time.time() - t0:.1f} s)")


def _load_generator(config, cache: str):
  """``(n_classes, variables, fn)``: ``fn(variables, ys, key)`` gives ``[no_cfs, B, ...]`` images
  and label columns (``make_generate_fn(flatten=False)``), of a CGN or of an exported GAN."""
  if mnist_gan.is_gan_checkpoint(config.checkpoint):
    gen, variables = mnist_gan.load(config.checkpoint)
    return gen.n_classes, variables, mnist_gan.make_generate_fn(gen, config.no_cfs)
  cgn, variables = mnist_cgn.load_or_init(config.checkpoint, cache)
  cgn = cgn.clone(subpixel=config.fast_upsample)
  return cgn.n_classes, variables, make_generate_fn(cgn, config.no_cfs, flatten=False)


def _fingerprint(config, digest: str | None, nproc: int) -> dict[str, Any]:
  """Everything that changes the stored files."""
  return {"job": "generate_mnist", "recipe_version": RECIPE_VERSION, "dataset": config.dataset,
          "weights": digest or "random MnistCGN() of seed 0", "seed": config.seed,
          "dataset_size": config.dataset_size, "no_cfs": config.no_cfs,
          "batch_size": config.batch_size, "fast_upsample": config.fast_upsample,
          "shard_size": config.shard_size, "process_count": nproc}


def _held_rows(sharding: NamedSharding, shape: tuple[int, int]) -> np.ndarray:
  """Batch rows (axis 1) this process's devices hold, ascending, each once."""
  n = shape[1]
  index = sharding.addressable_devices_indices_map(shape).values()
  spans = {i[1].indices(n)[:2] for i in index}
  return np.concatenate([np.arange(a, z) for a, z in sorted(spans)])


def _stored_positions(sharding: NamedSharding, n_batches: int, no_cfs: int, batch: int,
                      size: int) -> np.ndarray:
  """Each stored row's position in the one-process order (batch, round, row), parts one after
  the other: process q stores, per batch and round, the batch rows its devices hold."""
  shape = (no_cfs, batch)
  rows: dict[int, set] = {}
  for device, index in sharding.devices_indices_map(shape).items():
    rows.setdefault(device.process_index, set()).update(range(*index[1].indices(batch)))
  out = []
  for q in sorted(rows):
    held = np.asarray(sorted(rows[q]))
    pos = (np.arange(n_batches)[:, None, None] * no_cfs * batch
           + np.arange(no_cfs)[None, :, None] * batch + held[None, None, :]).reshape(-1)
    out.append(pos[pos < size])
  return np.concatenate(out)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a ``[no_cfs, B, ...]`` array sharded over B (as ``_held_rows``), from
  its addressable shards: the global array is not addressable here with several processes."""
  n = x.shape[1]
  by_start = {}
  for shard in x.addressable_shards:
    a, z, _ = shard.index[1].indices(n)
    by_start.setdefault(a, shard)
  return np.concatenate([np.asarray(by_start[a].data) for a in sorted(by_start)], axis=1)


def _part(process: int, count: int) -> str:
  return "" if count == 1 else f"p{process:03d}"


def _preview_path(out: str) -> str:
  return os.path.join(os.path.dirname(out), os.path.basename(out) + "_preview.png")


def _write_preview(out: str) -> str:
  """A grid of the dataset's first images, 8 per row, twice the size."""
  manifest = storage.read_manifest(out)
  images = []
  for x, _ in storage.iter_shards(out, "train"):
    images.append(np.asarray(x[:PREVIEW_IMAGES - sum(map(len, images))]))
    if sum(map(len, images)) >= PREVIEW_IMAGES:
      break
  x = storage.decode_images(np.concatenate(images), manifest["image"]["encoding"])
  return save_image_grid(_preview_path(out), x, nrow=8, scale=2)


def _source(config) -> str:
  return os.path.abspath(config.checkpoint) if config.checkpoint else "random weights"


run = generate
