"""The one way a model family's loader finds its variables: a converted dir or the authors' file.

Users hold the authors' ``.pth``/``.bin`` files; jobs want Orbax pytrees. Every family's ``load``
accepts either, so the conversion happens once, here, into ``<cache_dir>/<family>_<file stem>``,
and later runs restore that directory without torch. The converters are imported only when a file
must actually be converted: restoring never needs them (nor torch), and ``cgn_jax.checkpoints``
stays pure Orbax storage.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from typing import Any

import jax
import numpy as np

from cgn_jax import checkpoints, parallel

CACHE_ENV = "CGN_CACHE"


def default_cache_dir() -> str:
  """``$CGN_CACHE``, else ``~/.cache/cgn_jax/converted``: shared by every run of this user."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "cgn_jax",
                                                   "converted")


def converted_dir(checkpoint: str, family: str, cache_dir: str | None = None) -> str:
  """The converted Orbax directory of ``checkpoint``, converting an authors' file on first use.

  Args:
    checkpoint: a directory written by ``python -m converters FAMILY SRC DST`` (or exported by a
      training job), or an authors' ``.pth``/``.bin`` file.
    family: the converter family (``converters.registry.FAMILIES``) used for a file.
    cache_dir: where a file is converted to; ``None`` means :func:`default_cache_dir`.

  Returns:
    ``checkpoint`` itself for a directory, else ``<cache_dir>/<family>_<file stem>``.
  """
  if os.path.isdir(checkpoint):
    if not os.path.isfile(os.path.join(checkpoint, checkpoints.META_FILE)):
      raise checkpoints.CheckpointError(_not_converted(checkpoint, family))
    return checkpoint
  if not os.path.isfile(checkpoint):
    raise checkpoints.CheckpointError(
        f"checkpoint {checkpoint} not found; give a .pth of the authors or a directory made by "
        f"`python -m converters {family} SRC.pth DST`")
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  stem = os.path.splitext(os.path.basename(checkpoint))[0]
  dst = os.path.join(cache_dir, f"{family}_{stem}")

  def convert_once():
    if os.path.isdir(dst):
      _check_same_source(dst, checkpoint)
    else:
      _convert(family, checkpoint, dst)

  # Process 0 converts into a shared cache while the others wait, then they find it converted.
  parallel.main_process_first(f"convert {dst}", convert_once)
  return dst


def _not_converted(folder: str, family: str) -> str:
  """Why a folder is no converted checkpoint, and what to pass instead."""
  entries = sorted(os.listdir(folder))
  inside = [e for e in entries if os.path.isfile(os.path.join(folder, e, checkpoints.META_FILE))]
  files = [e for e in entries if e.endswith((".pth", ".bin", ".pt"))]
  convert = f"`python -m converters {family} SRC DST` (SRC: the .pth) and pass DST"
  if not entries:
    return f"{folder} is an empty folder, not a converted checkpoint; convert one with {convert}"
  if inside:  # a training workdir: its export is one level down
    return (f"{folder} is not a converted checkpoint; did you mean "
            f"{os.path.join(folder, inside[0])}?")
  if files:  # e.g. the published biggan-deep-256/ folder, which holds the .bin to convert
    return (f"{folder} is a folder, not a converted checkpoint; pass the file inside it "
            f"({os.path.join(folder, files[0])}) or convert it with {convert}")
  return (f"{folder} is not a converted checkpoint (no {checkpoints.META_FILE}); convert one with "
          f"{convert}")


def pick_family(checkpoint: str, family: str | None, families, default: str, where: str) -> str:
  """The family to load ``checkpoint`` as, for a model file whose families are ``families``.

  ``None`` takes a converted dir's stored family, or ``default`` for a ``.pth`` (which does not say);
  a foreign stored family falls through to ``load_converted``, whose error names it.
  """
  if family is None:
    is_converted = os.path.isfile(os.path.join(checkpoint, checkpoints.META_FILE))
    stored = checkpoints.load_meta(checkpoint).get("family") if is_converted else None
    family = stored if stored in families else default
  if family not in families:
    raise ValueError(f"family '{family}' is not in {where}; use one of {', '.join(families)}")
  return family


def load_converted(checkpoint: str, family: str,
                   cache_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
  """``(variables, meta)`` of ``checkpoint`` (see :func:`converted_dir`), as numpy arrays.

  ``meta["model_config"]`` holds the constructor arguments read off the tensor shapes.
  """
  path = converted_dir(checkpoint, family, cache_dir)
  meta = checkpoints.load_meta(path)
  if meta.get("family") != family:
    raise checkpoints.CheckpointError(
        f"{path} holds a '{meta.get('family')}' checkpoint, expected '{family}'; pass a {family} "
        f"checkpoint (`python -m converters {family} SRC DST` makes one from the .pth)")
  variables = checkpoints.load_variables(path, family=family)
  check_finite(variables, path)
  return variables, meta


def check_finite(variables: Any, path: str) -> None:
  """Refuses a model with NaN/Inf weights, naming the array: it would only give NaN images."""
  for keys, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      bad = int(np.size(a) - np.isfinite(a).sum())
      kinds = " and ".join(k for k, f in (("NaN", np.isnan), ("Inf", np.isinf)) if f(a).any())
      raise checkpoints.CheckpointError(
          f"{path}: {'/'.join(checkpoints.key_name(k) for k in keys)} holds {bad} {kinds} of "
          f"{a.size} values; the model diverged or the files are damaged: export it again from a "
          f"good training checkpoint, or convert the .pth again")


def _convert(family: str, src: str, dst: str) -> None:
  from converters import registry  # pylint: disable=import-outside-toplevel
  try:
    registry.convert_file(family, os.path.realpath(src), dst)
  except OSError:
    # Another process (a second host on a shared disk) may have finished the same conversion
    # first; its atomic rename makes a complete directory, so use it.
    if not os.path.isfile(os.path.join(dst, checkpoints.META_FILE)):
      raise


def _check_same_source(dst: str, src: str) -> None:
  """Two files with one name (``cgn.pth`` of two runs) would share a cache entry: refuse that."""
  stored = checkpoints.load_meta(dst).get("source")
  # Conversions before the source was stored as an absolute path cannot be compared.
  if stored and os.path.isabs(stored) and os.path.realpath(src) != stored:
    raise checkpoints.CheckpointError(
        f"{dst} holds the conversion of {stored}, not of {os.path.realpath(src)}; delete it or "
        f"pass another cache_dir")


def conversion_cache(folder: str, digest: str) -> str:
  """Where a job converts an authors' file whose ``file_digest`` is ``digest``: one folder per
  content under ``folder``, because ``converted_dir`` tells conversions apart by file name
  only, and new bytes under an old name must not be served the old conversion."""
  return os.path.join(folder, digest[:16])


def remove_stale_conversions(folder: str, checkpoint: str, digest: str | None,
                             family: str) -> list[str]:
  """Removes, below a jobs' ``converted`` ``folder``, what killed conversions left
  (``NAME.tmp-XXXX``, checkpoints.save_variables' temporary names) and, for an authors' file
  ``checkpoint`` of content ``digest``, the conversions of that file name's earlier contents."""
  if not os.path.isdir(folder):
    return []
  old_name = (f"{family}_{os.path.splitext(os.path.basename(checkpoint))[0]}"
              if checkpoint and os.path.isfile(checkpoint) and digest else None)
  removed = [os.path.join(folder, e) for e in os.listdir(folder) if ".tmp-" in e]
  for d in sorted(os.listdir(folder)):
    sub = os.path.join(folder, d)
    if not re.fullmatch(r"[0-9a-f]{16}", d) or not os.path.isdir(sub):
      continue
    if old_name and d != digest[:16] and os.path.isdir(os.path.join(sub, old_name)):
      removed.append(sub)
    else:
      removed += [os.path.join(sub, e) for e in os.listdir(sub) if ".tmp-" in e]
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  return removed


def file_digest(path: str) -> str:
  """sha256 of a file, or of a directory's files (each one's relative path, size and bytes, in
  sorted order): what a checkpoint holds, whatever its name or modification time."""
  h = hashlib.sha256()
  if os.path.isdir(path):
    files = sorted(os.path.relpath(os.path.join(d, f), path)
                   for d, _, names in os.walk(path) for f in names)
    for rel in files:
      full = os.path.join(path, rel)
      h.update(f"{rel}\0{os.path.getsize(full)}\0".encode())
      _hash_file(h, full)
  elif os.path.isfile(path):
    _hash_file(h, path)
  else:
    raise FileNotFoundError(f"{path} not found; give an existing checkpoint file or directory")
  return h.hexdigest()


def _hash_file(h, path: str) -> None:
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
