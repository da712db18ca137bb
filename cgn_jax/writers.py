"""Metric output: JSON lines always, TensorBoard when the optional extra is installed.

clu's metric writers import TensorFlow, which the core install avoids; so the JSON-lines writer is
ours and TensorBoard is added only when ``clu.metric_writers`` imports. Only process 0 writes.

The file stays valid JSON lines whatever happens: non-finite values are written as ``null`` (bare
``NaN`` is not JSON), every row is flushed whole, and a resumed run first cuts the rows (and a torn
last line) that came after the checkpoint it resumes from, so each logged step has one row.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from cgn_jax.data.imagenet_cfs import atomic_write


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
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    row = {"step": int(step), **{k: v if math.isfinite(v) else None for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")
      f.flush()
    if self._tb is not None:
      self._tb.write_scalars(int(step), values)

  def truncate_after(self, step: int) -> None:
    """Keeps the rows up to ``step`` (a resumed run logs the later steps again)."""
    if not self.active or not os.path.exists(self.path):
      return
    keep = "".join(json.dumps(r) + "\n" for r in _read_rows(self.path) if r.get("step", 0) <= step)
    atomic_write(self.path, lambda f: f.write(keep.encode()))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """All rows of ``metrics.jsonl`` (for tests and reports)."""
  path = os.path.join(workdir, "metrics.jsonl")
  return _read_rows(path) if os.path.exists(path) else []


def _read_rows(path: str) -> list[dict[str, Any]]:
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line torn by a kill mid-write
        continue
  return rows
