"""The one training loop that every training job runs on.

A job builds a :class:`Task` (its initial state, its step function, its batches, its hooks and its
export) for the mesh the loop hands it; the loop does the rest, identically for every job:

* **mesh and placement** from ``config.num_devices``: the state (and ``Task.constants``, frozen
  weights) replicated, each batch split on the ``data`` axis from this host's rows, one ``jax.jit``
  of the whole step with the state and the metric accumulator donated;
* **auto-resume** from ``<workdir>/checkpoints``: the state, the metric accumulator (so the means of a
  logging interval cut by a restart are the uninterrupted ones), the RNG key and the data position.
  Batches and randomness are functions of the step, so a resumed run is bitwise the uninterrupted
  one. A damaged newest checkpoint is set aside with a warning and the one before is used;
* **metrics**: clu ``Average`` per scalar, accumulated on device; at each log step one row in
  ``metrics.jsonl`` (TensorBoard too when installed), rows after the resumed step cut first;
* **crash safety**: each step also returns which of its losses and state parts are non-finite.
  The host reads that one step late (never stalling the device) and at once before any save, hook
  or export, and stops with :class:`NonFiniteError` naming the losses and the step; so nothing
  non-finite is ever checkpointed or exported, and the last good checkpoints never rotate out.
  SIGTERM/SIGINT finish the current step, save it and raise :class:`Interrupted`; a second signal
  kills at once;
* **periodic actions**: progress bar, sample sheets and evaluations (:class:`Hook`), checkpoints,
  the final save and the export. Whatever writes files runs on process 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from tqdm import tqdm

from cgn_jax import checkpoints, parallel
from cgn_jax.writers import MetricWriter

StepFn = Callable[[Any, Any, jax.Array, Any], tuple[Any, Mapping[str, jax.Array]]]


class NonFiniteError(RuntimeError):
  """A loss or a parameter became NaN/Inf; the message names them, the step and the last save."""


class Interrupted(Exception):
  """SIGTERM/SIGINT: the state was saved at ``step``; rerunning the same command resumes."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step = signum, step
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved to "
                     f"{directory}, rerun the same command to resume")


class BatchSource(Protocol):
  """Batches as a function of the step: what makes resuming exact."""

  def batch(self, step: int) -> Any:
    """This host's rows (``parallel.host_rows``) of the global batch of ``step``, as numpy."""

  def position(self, step: int) -> dict[str, Any]:
    """Where the data stands before ``step`` (JSON; stored with each checkpoint)."""


@dataclasses.dataclass
class Hook:
  """A periodic action after ``every`` steps (and after the last step when ``at_end``).

  ``fn(state, step)`` may return scalars, which join the metrics row of that step. Hooks run on
  process 0 only, unless ``all_processes`` (an evaluation with sharded computations, whose files
  the hook itself writes from process 0). On process 0 alone, ``state`` is a copy on one local
  device, so the hook may run any computation on it.
  """
  every: int
  fn: Callable[[Any, int], Optional[Mapping[str, float]]]
  all_processes: bool = False
  at_end: bool = True

  def due(self, step: int, last: int) -> bool:
    return bool(self.every and step % self.every == 0) or (self.at_end and step == last)


@dataclasses.dataclass
class Task:
  """What a job supplies: model-specific parts only.

  ``step_fn(state, batch, key, constants) -> (state, scalars)`` is one training step, not jitted;
  it folds the step into ``key`` itself (randomness as a function of the step). ``scalars`` are
  the losses (and other per-step means) to log; every one of them is checked for finiteness.
  """
  name: str
  state: Any
  step_fn: StepFn
  num_steps: int
  key: jax.Array
  metrics: Sequence[str] = ()  # the names of step_fn's scalars; () = found by an extra trace
  batches: Optional[BatchSource] = None
  constants: Any = None
  params: Callable[[Any], Any] = lambda state: state.params  # the trained parameters (overview)
  hooks: Sequence[Hook] = ()
  export: Optional[Callable[[Any], None]] = None  # the final state, on process 0
  # Each row, and the step resumed from (0: fresh), on every process (so each can return the
  # job's results); files are written from process 0.
  on_log: Optional[Callable[[int, dict[str, float]], None]] = None
  on_resume: Optional[Callable[[int], None]] = None
  bar_keys: Sequence[str] = ()
  unit: str = "step"
  log_every: Optional[int] = None  # overrides config.log.every_steps (e.g. once per epoch)
  checkpoint_every: Optional[int] = None  # overrides config.log.checkpoint_every


def run(config: ml_collections.ConfigDict, workdir: str, build: Callable[[Any], Task]) -> Any:
  """Runs (or resumes) ``build(mesh)`` in ``workdir`` with ``config.log``; returns the final state.

  Raises:
    NonFiniteError: a loss or the updated state was not finite (``config.log.check_finite``).
    Interrupted: SIGTERM/SIGINT; the state was saved first.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh(config.get("num_devices", -1))
  task = build(mesh)
  return _Loop(config.log, workdir, mesh, task).run()


def host_copy(tree: Any) -> Any:
  """A replicated pytree as numpy arrays, on any process (each holds a full copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)


def _local_copy(tree: Any) -> Any:
  """A replicated pytree on this process's first device (no host round trip)."""
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def _zero_averages(names: Sequence[str]) -> dict[str, clu_metrics.Average]:
  return {n: clu_metrics.Average(total=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))
          for n in names}


def _state_groups(state: Any) -> tuple[list[str], list[list[Any]]]:
  """The state's leaves grouped by top-level field (``g_params``, ``opt``...), for naming."""
  groups: dict[str, list[Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = checkpoints.key_name(path[0]) if path else "state"
    groups.setdefault(name, []).append(leaf)
  return list(groups), list(groups.values())


def _all_finite(leaves: Sequence[Any]) -> jax.Array:
  ok = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(ok)) if ok else jnp.asarray(True)


class _Signals:
  """SIGTERM/SIGINT set a flag that the loop polls between steps; a second one kills at once."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._old: dict[int, Any] = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:  # asked twice: the user means it
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.signum = signum

  def __enter__(self):
    try:
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      pass
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)


class _Loop:
  """The loop's state between steps; ``run`` is the whole algorithm."""

  def __init__(self, log: ml_collections.ConfigDict, workdir: str, mesh, task: Task):
    self.log, self.workdir, self.mesh, self.task = log, workdir, mesh, task
    self.is_main = jax.process_index() == 0
    self.ckpt = checkpoints.TrainCheckpointer(workdir, log.keep_checkpoints)
    self.last_saved: Optional[int] = None

  # -- setup ------------------------------------------------------------------------------------

  def _compile(self, state, constants):
    """Jits the whole step (the task's step, the metric merge and the finiteness flags)."""
    task, check = self.task, self.log.check_finite
    repl = parallel.replicated(self.mesh)

    def step(state, acc, batch, key, constants):
      state, scalars = task.step_fn(state, batch, key, constants)
      names = sorted(scalars)
      if names != self.names:
        raise ValueError(f"{task.name}: the step returns {names}, Task.metrics says {self.names}")
      acc = {n: acc[n].merge(clu_metrics.Average(total=jnp.asarray(scalars[n], jnp.float32),
                                                 count=jnp.ones((), jnp.int32))) for n in names}
      if check:
        _, groups = _state_groups(state)
        bad = jnp.stack([~jnp.isfinite(scalars[n]) for n in names] +
                        [~_all_finite(g) for g in groups])
      else:
        bad = jnp.zeros((0,), bool)
      return state, acc, bad

    def names_of(state, batch, key, constants):
      return task.step_fn(state, batch, key, constants)[1]

    if task.metrics:
      self.names = sorted(task.metrics)
    else:  # an abstract trace on batch 0 finds the names
      batch = parallel.from_host_rows(task.batches.batch(0), self.mesh) if task.batches else None
      self.names = sorted(jax.eval_shape(names_of, state, batch, task.key, constants))
    self.groups = _state_groups(state)[0]
    batch_spec = parallel.batch_sharding(self.mesh) if task.batches else repl
    self.step = jax.jit(step, in_shardings=(repl, repl, batch_spec, repl, repl),
                        out_shardings=(repl, repl, repl), donate_argnums=(0, 1))

  def _restore(self, state, acc, key):
    """(state, acc, key, start step) from the newest intact checkpoint, or the given ones."""
    repl = parallel.replicated(self.mesh)
    tree = {"state": state, "acc": acc, "rng": jax.random.key_data(key)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=repl), tree)

    def check(restored):
      # One compiled reduction: op by op, thousands of leaves cost seconds at every start.
      finite = jax.jit(lambda t: _all_finite(jax.tree.leaves(t)))(restored["state"])
      if self.log.check_finite and not bool(finite):
        return "non-finite values"
      return ""

    found = self.ckpt.restore_latest(abstract, check, warn=self._print)
    if found is None:
      damaged = os.path.isdir(self.ckpt.directory + "_damaged")
      why = f"no {'intact ' if damaged else ''}checkpoint in {self.ckpt.directory}"
      self._print(f"{self.task.name}: starting fresh ({why})")
      return parallel.replicate(state, self.mesh), parallel.replicate(acc, self.mesh), key, 0
    tree, record = found
    start = int(record["step"])
    key = jax.random.wrap_key_data(np.asarray(host_copy(tree["rng"])), impl=jax.random.key_impl(key))
    self._print(f"{self.task.name}: resuming from {self.task.unit} {start} of {self.task.num_steps} "
                f"({self.ckpt.directory})")
    self.last_saved = start
    return tree["state"], tree["acc"], key, start

  # -- periodic parts ---------------------------------------------------------------------------

  def _print(self, msg: str) -> None:
    if self.is_main:
      print(msg, flush=True)

  def _check(self, bad, step: int) -> None:
    """Raises NonFiniteError when the flags of ``step`` say so (a host sync on that step)."""
    if not self.log.check_finite:
      return
    bad = np.asarray(bad)
    if not bad.any():
      return
    n = len(self.names)
    losses = [name for name, b in zip(self.names, bad[:n]) if b]
    parts = [name for name, b in zip(self.groups, bad[n:]) if b]
    what = "; ".join(filter(None, [f"loss {', '.join(losses)}" if losses else "",
                                   f"state {', '.join(parts)}" if parts else ""]))
    kept = (f"the last good checkpoint is step {self.last_saved} in {self.ckpt.directory}"
            if self.last_saved else "no checkpoint was written")
    raise NonFiniteError(f"non-finite {what} at {self.task.unit} {step}; stopped, {kept}. Lower the "
                         f"learning rate, or set --config.log.check_finite=False to debug")

  def _save(self, step: int, state, acc, key) -> None:
    record = {"data": self.task.batches.position(step) if self.task.batches else {},
              "unit": self.task.unit}
    # The key lives on one device; a multi-process save takes only global (here: replicated) arrays.
    rng = parallel.replicate(np.asarray(jax.random.key_data(key)), self.mesh)
    self.ckpt.save(step, {"state": state, "acc": acc, "rng": rng}, record)
    self.last_saved = step

  # -- the loop ---------------------------------------------------------------------------------

  def run(self):
    task, log = self.task, self.log
    self._compile(task.state, task.constants)
    state, acc, key, start = self._restore(task.state, _zero_averages(self.names), task.key)
    if task.on_resume:
      task.on_resume(start)
    writer = MetricWriter(self.workdir, tensorboard=log.tensorboard)
    writer.truncate_after(start)  # rows logged after that checkpoint come again
    if start == 0 and self.is_main:
      params = host_copy(task.params(state))
      n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
      print(f"{task.name}: {n:,} trainable parameters", flush=True)
      logging.info("%s", parameter_overview.get_parameter_overview(params))
    constants = parallel.replicate(task.constants, self.mesh)
    end = task.num_steps
    log_every = log.every_steps if task.log_every is None else task.log_every
    save_every = log.checkpoint_every if task.checkpoint_every is None else task.checkpoint_every
    bar = tqdm(total=end, initial=start, desc=task.name, unit=task.unit,
               disable=not self.is_main or not log.progress_bar)
    t0, since = time.time(), start
    pending = None  # (bad flags, step) not yet read on the host
    # closing(): however the loop ends, in-flight saves finish (a NaN stop keeps its good save).
    with _Signals() as signals, contextlib.closing(self.ckpt):
      for step in range(start, end):
        if signals.signum is not None or self._stop_requested(signals):
          self._interrupt(signals, pending, step, state, acc, key)
        batch = (parallel.from_host_rows(task.batches.batch(step), self.mesh)
                 if task.batches else None)
        state, acc, bad = self.step(state, acc, batch, key, constants)
        done = step + 1
        if pending is not None:
          self._check(*pending)  # the previous step, while this one runs
        pending = (bad, done)
        logs_now = bool(log_every and done % log_every == 0) or done == end
        saves_now = bool(save_every and done % save_every == 0) or done == end
        hooks = [h for h in task.hooks if h.due(done, end)]
        if logs_now or saves_now or hooks:
          self._check(*pending)
          pending = None
        extra: dict[str, float] = {}
        for hook in hooks:
          if hook.all_processes or self.is_main:
            out = hook.fn(state if hook.all_processes else _local_copy(state), done)
            extra.update(out or {})
        if logs_now or extra:
          row = {n: a.compute() for n, a in host_copy(acc).items() if int(a.count)}
          row.update(extra)
          row["steps_per_sec"] = (done - since) / max(time.time() - t0, 1e-9)
          writer.write_scalars(done, row)
          if task.on_log:
            task.on_log(done, {k: float(v) for k, v in row.items()})
          bar.set_postfix({k: f"{float(row[k]):.3f}" for k in task.bar_keys if k in row})
          acc = parallel.replicate(_zero_averages(self.names), self.mesh)
          t0, since = time.time(), done
        if saves_now:
          self._save(done, state, acc, key)
        bar.update(1)
      if pending is not None:
        self._check(*pending)
    bar.close()
    writer.flush()
    if self.is_main and task.export:
      task.export(_local_copy(state))
    parallel.sync(f"{task.name}: exported")  # the next job may read the export on any process
    return state

  def _stop_requested(self, signals: _Signals) -> bool:
    """Multi-process runs stop together: any process's signal stops all (one tiny all-gather)."""
    if jax.process_count() == 1:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.int32(signals.signum or 0))
    if np.any(flags) and signals.signum is None:
      signals.signum = int(np.max(flags))
    return bool(np.any(flags))

  def _interrupt(self, signals, pending, step: int, state, acc, key):
    if pending is not None:
      self._check(*pending)
    if step and self.last_saved != step:
      self._save(step, state, acc, key)
    raise Interrupted(signals.signum, step, self.ckpt.directory)
