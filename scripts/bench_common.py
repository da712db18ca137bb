"""Helpers shared by the side-by-side benchmarks (scripts/bench*.py)."""

from __future__ import annotations

import os


def pin_xla_single_thread() -> None:
  """One intra-op thread for XLA's CPU backend; call before jax is imported (flags are read once)."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def cpu_model() -> str:
  """The CPU's model name (``conv_dw`` keys its measured choices by it too)."""
  from cgn_jax.models.conv_dw import cpu_model as model  # pylint: disable=import-outside-toplevel
  return model()
