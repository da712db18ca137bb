"""Orbax storage: converted model variables and resumable training state.

Converted checkpoints are plain pytrees (``params``/``batch_stats``) with a small JSON metadata file
beside them, so they restore without the converter or torch. Every write goes to a temporary name and
is renamed into place, so an interrupted write never leaves a half-written checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

META_FILE = "cgn_meta.json"
_TREE_DIR = "variables"

# Orbax splits every replicated array into one slice per replica so that all replicas write in
# parallel ("replica-parallel"); it turns this off on GPUs but not on CPUs. The slices are eager
# device ops, one XLA compile per new shape: with 4 (simulated) CPU devices, a 25 MB ImageNet CGN
# state took ~10 s per save for ~10,000 slices. Replica 0 writing each array whole is what Orbax
# does on GPUs; the files are the same.
def _register_array_handler() -> None:
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns of every override, on every run
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


_register_array_handler()


def _this_process_only() -> ocp.StandardCheckpointer:
  """A checkpointer for one process's own numpy pytree (an export, a converted model).

  Orbax's default waits at a barrier of every process; a write done by process 0 alone (or a read
  each process does on its own) would hang there forever in a multi-process run.
  """
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}"))


class CheckpointError(Exception):
  """A checkpoint path that is missing or not ours; the message says how to make one."""


def save_variables(path: str, variables: Any, meta: dict[str, Any] | None = None) -> None:
  """Writes ``variables`` (a pytree of arrays) and ``meta`` atomically to directory ``path``."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists already; remove it or choose another output directory")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  # A save killed mid-write leaves its temporary sibling; the next save of this path clears it.
  pattern = glob.escape(os.path.basename(path)) + ".tmp-*"
  for stale in glob.glob(os.path.join(glob.escape(parent), pattern)):
    shutil.rmtree(stale, ignore_errors=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename into place
  try:
    tree = jax.tree_util.tree_map(np.asarray, variables)
    with _this_process_only() as ckptr:
      ckptr.save(os.path.join(tmp, _TREE_DIR), tree)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta or {}, f, indent=1, default=str)
    os.rename(tmp, path)
  except BaseException:
    # After a failed write, tensorstore's writes still in flight can recreate folders under tmp
    # just after a first removal: remove until it stays gone.
    for _ in range(10):
      shutil.rmtree(tmp, ignore_errors=True)
      time.sleep(0.05)
      if not os.path.exists(tmp):
        break
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
  with _this_process_only() as ckptr:
    tree = ckptr.restore(os.path.join(os.path.abspath(path), _TREE_DIR))
  return jax.tree_util.tree_map(np.asarray, tree)


def _check(path: str) -> None:
  if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, META_FILE)):
    raise CheckpointError(
        f"{path} is not a converted checkpoint; make one with "
        f"`python -m converters FAMILY SRC.pth {path}`")


class TrainCheckpointer:
  """Orbax ``CheckpointManager`` over ``workdir/checkpoints`` for the training loop's state.

  A checkpoint holds one pytree (the train state, the metric accumulator, the RNG key data) and a
  JSON record (step, data position). Orbax writes each step under a temporary name and renames it
  when complete, so a save cut short by a crash is never listed, and its leftovers are removed at
  the next start. A checkpoint that fails to restore (a truncated or lost file) is moved aside to
  ``workdir/checkpoints_damaged/`` with a one-line warning, and the next older one is tried.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"tree": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_tree: Any, check: Callable[[Any], str] | None = None,
                     warn: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]] | None:
    """(tree, record) of the newest intact checkpoint, or None when there is none.

    ``abstract_tree`` gives the structure, shapes, dtypes and shardings; ``check(tree)`` may reject
    a restored tree by returning a reason (e.g. non-finite values).
    """
    for step in reversed(self.steps()):
      self._check_structure(step, abstract_tree)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            tree=ocp.args.StandardRestore(abstract_tree), record=ocp.args.JsonRestore()))
        problem = check(restored.tree) if check else ""
      except Exception as e:  # pylint: disable=broad-except  # any damage means: not this one
        first = (str(e).splitlines() or [""])[0].split(" See full")[0]  # tensorstore's long tail
        problem = f"{type(e).__name__}: {first[:160]}"
      if not problem:
        return restored.tree, dict(restored.record)
      self._set_aside(step)
      warn(f"warning: checkpoint {step} in {self.directory} is damaged ({problem}); "
           f"moved it to {self.directory}_damaged/ and trying the one before")
    return None

  def _check_structure(self, step: int, abstract_tree: Any) -> None:
    """Another model or optimizer in the same workdir is a user error, not damage: say so."""
    try:
      stored = _shapes(self.manager.item_metadata(step)["tree"])
    except Exception:  # pylint: disable=broad-except  # unreadable metadata: damage, found below
      return
    wanted = _shapes(abstract_tree)
    if stored != wanted:
      diff = sorted(set(stored.items()) ^ set(wanted.items()))[0][0]
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} was written by another model or optimizer (it "
          f"differs at {'/'.join(diff)}); resume with the config that wrote it, or use a new --workdir")

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst_dir = self.directory + "_damaged"
      os.makedirs(dst_dir, exist_ok=True)
      dst = os.path.join(dst_dir, str(step))
      n = 1
      while os.path.exists(dst):
        dst, n = os.path.join(dst_dir, f"{step}.{n}"), n + 1
      if os.path.exists(src):
        os.rename(src, dst)
    self.manager.reload()

  def save(self, step: int, tree: Any, record: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of ``tree`` and ``record`` at ``step``, once per step."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(tree), record=ocp.args.JsonSave({**record, "step": int(step)})))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def key_name(k: Any) -> str:
  """A pytree path entry as its bare name: a dataclass field and a dict key of one name agree."""
  return str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{leaf path as names: shape}."""
  return {tuple(key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_train_checkpoint(workdir: str, step: int | None = None) -> tuple[Any, dict[str, Any]]:
  """(tree as numpy, record) of a training checkpoint in ``workdir`` (the newest by default), for
  inspection and comparison; no model code or abstract state needed."""
  ckpt = TrainCheckpointer(workdir)
  try:
    step = max(ckpt.steps()) if step is None else step
    # Onto this process's first device, whatever devices (or processes) wrote it.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                            ckpt.manager.item_metadata(step)["tree"])
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        tree=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    return jax.tree_util.tree_map(np.asarray, restored.tree), dict(restored.record)
  finally:
    ckpt.close()
