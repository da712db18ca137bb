"""Orbax storage: converted model variables and resumable training state.

Converted checkpoints are plain pytrees (``params``/``batch_stats``) with a small JSON metadata file
beside them, so they restore without the converter or torch. Every write goes to a temporary name and
is renamed into place, so an interrupted write never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "cgn_meta.json"
_TREE_DIR = "variables"


class CheckpointError(Exception):
  """A checkpoint path that is missing or not ours; the message says how to make one."""


def save_variables(path: str, variables: Any, meta: dict[str, Any] | None = None) -> None:
  """Writes ``variables`` (a pytree of arrays) and ``meta`` atomically to directory ``path``."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists already; remove it or choose another output directory")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  try:
    tree = jax.tree_util.tree_map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, _TREE_DIR), tree)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta or {}, f, indent=1, default=str)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def replace_variables(path: str, variables: Any, meta: dict[str, Any]) -> str:
  """``save_variables`` over an existing export (a training job's model at its end): the old copy
  is removed only once the new one is complete."""
  tmp = path + ".new"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  save_variables(tmp, variables, meta)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.rename(tmp, path)
  return path


def load_meta(path: str) -> dict[str, Any]:
  _check(path)
  with open(os.path.join(path, META_FILE)) as f:
    return json.load(f)


def load_variables(path: str, family: str | None = None) -> Any:
  """Restores a converted checkpoint as numpy arrays; ``family`` guards against the wrong file."""
  meta = load_meta(path)
  if family is not None and meta.get("family") != family:
    raise CheckpointError(
        f"{path} holds a '{meta.get('family')}' checkpoint, expected '{family}'")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(os.path.abspath(path), _TREE_DIR))
  return jax.tree_util.tree_map(np.asarray, tree)


def _check(path: str) -> None:
  if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, META_FILE)):
    raise CheckpointError(
        f"{path} is not a converted checkpoint; make one with "
        "`python -m converters FAMILY SRC.pth {path}`")


def converted_path(checkpoint: str, family: str, cache_dir: str) -> str:
  """The converted Orbax dir for ``checkpoint``: itself, or ``cache_dir/<family>_<stem>`` for a .pth.

  A ``.pth`` is converted once (needs the ``convert`` extra); later runs reuse the directory.
  """
  if os.path.isfile(checkpoint):
    dst = os.path.join(cache_dir, f"{family}_{os.path.splitext(os.path.basename(checkpoint))[0]}")
    if not os.path.isdir(dst):
      from converters.registry import convert_file  # pylint: disable=import-outside-toplevel
      convert_file(family, checkpoint, dst)
    return dst
  if not os.path.exists(checkpoint):
    raise CheckpointError(
        f"checkpoint {checkpoint} not found; give a .pth of the authors or a directory made by "
        f"`python -m converters {family} SRC.pth DST`")
  return checkpoint


def load_or_convert(checkpoint: str, family: str, cache_dir: str) -> tuple[Any, dict[str, Any]]:
  """Variables and metadata from a converted Orbax dir, or from a ``.pth`` converted on first use."""
  path = converted_path(checkpoint, family, cache_dir)
  return load_variables(path, family=family), load_meta(path)


class TrainCheckpointer:
  """Orbax ``CheckpointManager`` over ``workdir/checkpoints`` that resumes automatically.

  The state is any pytree (params, optimizer states, step); randomness is derived from the seed and
  the step, and data order from the seed and the epoch, so the step alone positions a resumed run.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2, save_every: int = 1000):
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options)

  def restore_or(self, state: Any) -> tuple[Any, int]:
    """(restored state, step) from the latest checkpoint, or (``state``, 0) when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return state, 0
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return restored, int(step)

  def maybe_save(self, step: int, state: Any, force: bool = False) -> None:
    if force or (self.save_every and step % self.save_every == 0):
      if step not in self.manager.all_steps():
        self.manager.save(step, args=ocp.args.StandardSave(state))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
