"""Helpers of the crash-safety tests: the real CLI in a subprocess, and "the same run" bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cgn_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = os.path.join(ROOT, "tests", "fault_injection.py")


def run_cli(args: list[str], fault: str | None = None, at: int = 0, timeout: int = 900):
  # Every compilation cached (0 s), even the tiny ones of eager ops: they add up to ~10 s a run.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = ([sys.executable, FAULTS, fault, str(at), "--"] if fault else
         [sys.executable, "-m", "cgn_jax.main"]) + args
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics_rows(workdir: str) -> list[dict]:
  """Every line must parse as strict JSON (no bare NaN); the timing column is dropped."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
      row.pop("steps_per_sec")
      rows.append(row)
  return rows


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_run(ref: str, other: str, export: str | None = None) -> None:
  """Bitwise: final checkpoint (state, metric accumulator, RNG), export, metrics rows."""
  assert metrics_rows(other) == metrics_rows(ref)
  a, rec_a = checkpoints.read_train_checkpoint(ref)
  b, rec_b = checkpoints.read_train_checkpoint(other)
  assert rec_a == rec_b
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fb[k], fa[k], err_msg=k)
  if export:
    ea = flat(checkpoints.load_variables(os.path.join(ref, export)))
    eb = flat(checkpoints.load_variables(os.path.join(other, export)))
    for k in ea:
      np.testing.assert_array_equal(eb[k], ea[k], err_msg=f"{export}{k}")
  assert not [d for d in os.listdir(os.path.join(other, "checkpoints")) if "tmp" in d]


def ckpt_steps(workdir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def ok(proc) -> None:
  assert proc.returncode == 0, proc.stderr[-3000:]


def killed_then_rerun(args: list[str], workdir: str, fault: str, at: int):
  """Runs with ``fault`` (it must die of SIGKILL), then reruns the same command; returns the rerun."""
  killed = run_cli(args + ["--workdir", workdir], fault, at)
  assert killed.returncode == -9, killed.stderr[-2000:]
  resumed = run_cli(args + ["--workdir", workdir])
  ok(resumed)
  return resumed
