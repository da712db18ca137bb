"""Timing shared by the side-by-side benchmarks (scripts/bench_*.py)."""

from __future__ import annotations

import os
import time

import numpy as np


def pin_xla_single_thread() -> None:
  """One intra-op thread for XLA's CPU backend; call before jax is imported (flags are read once)."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def time_interleaved(fns: dict, reps: int) -> dict:
  """Median (wall, process CPU) seconds per call of each function, calls interleaved (A, B, A, ...).

  Interleaving keeps the ratio fair on a shared machine whose load drifts during the run. With one
  thread each, CPU seconds measure the work done even while other processes steal the cores.
  """
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t, c = time.perf_counter(), time.process_time()
      fn()
      times[k].append((time.perf_counter() - t, time.process_time() - c))
  return {k: tuple(np.median(np.array(v), axis=0)) for k, v in times.items()}


def cpu_model() -> str:
  """The CPU's model name (``conv_dw`` keys its measured choices by it too)."""
  from cgn_jax.models.conv_dw import cpu_model as model  # pylint: disable=import-outside-toplevel
  return model()
