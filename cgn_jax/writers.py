"""Metric output: JSON lines always, TensorBoard when the optional extra is installed.

clu's metric writers import TensorFlow, which the core install avoids; so the JSON-lines writer is
ours and TensorBoard is added only when ``clu.metric_writers`` imports. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` to ``workdir/metrics.jsonl`` (+ TensorBoard if available)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active and tensorboard:
      try:
        from clu import metric_writers  # pylint: disable=import-outside-toplevel
        self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except Exception:  # ImportError without TensorFlow; anything else: TB is optional
        logging.info("TensorBoard writer unavailable (pip install 'cgn_jax[tensorboard]'); "
                     "metrics go to %s", self.path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), {k: v for k, v in row.items() if k != "step"})

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """All rows of ``metrics.jsonl`` (for tests and reports)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
