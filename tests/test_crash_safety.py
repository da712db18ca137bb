"""Crash safety of the shared training loop, through the real CLI in real subprocesses.

Each training job (MNIST CGN and classifier here; the ImageNet CGN in test_imagenet_cgn_train.py
against its shared run; ``:tiny`` configs) is run once uninterrupted, then killed with a real signal
at a fixed instant (``tests/fault_injection.py``) and rerun with the same command: the resumed run
must end bitwise equal to the uninterrupted one (final checkpoint, export, metrics rows). The subprocesses share the test session's persistent compilation
cache, so each step function compiles once for all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest

from cgn_jax import checkpoints

from crash import (assert_same_run, ckpt_steps, flat as _flat, killed_then_rerun, metrics_rows, ok,
                   run_cli)


def _uninterrupted(tmp_path_factory, config: str, data_dir: str, dataset_field: str):
  """(base dir, CLI args, reference workdir): the job run once, uninterrupted, on its own data."""
  base = tmp_path_factory.mktemp("crash_" + os.path.basename(config).split(".")[0])
  args = ["--config", config, f"--config.data_dir={data_dir}",
          f"--config.{dataset_field}={base / 'data'}"]
  ref = str(base / "reference")
  ok(run_cli(args + ["--workdir", ref]))
  return base, args, ref


# ---------------------------------------------------------------------------------------------
# MNIST CGN: 12 steps, a row every 4, a checkpoint every 6.

@pytest.fixture(scope="module")
def mnist_cgn(data_dir, tmp_path_factory):
  base, args, ref = _uninterrupted(tmp_path_factory, "configs/mnist_double_colored.py:tiny",
                                   data_dir, "dataset_dir")
  assert [r["step"] for r in metrics_rows(ref)] == [4, 8, 12] and ckpt_steps(ref) == [6, 12]
  return base, args, ref


@pytest.mark.parametrize("fault,at", [("kill_after_row", 8), ("kill_in_save", 6)])
def test_mnist_cgn_sigkill_then_rerun_equals_uninterrupted(mnist_cgn, fault, at):
  base, args, ref = mnist_cgn
  workdir = str(base / fault)
  resumed = killed_then_rerun(args, workdir, fault, at)
  assert "resuming from step" in resumed.stdout or fault == "kill_in_save", resumed.stdout
  assert_same_run(ref, workdir, export="generator")


@pytest.mark.parametrize("fault,at", [("term_after_row", 8), ("term_in_save", 6)])
def test_mnist_cgn_sigterm_saves_exits_nonzero_and_resumes_equal(mnist_cgn, fault, at):
  base, args, ref = mnist_cgn
  workdir = str(base / fault)
  stopped = run_cli(args + ["--workdir", workdir], fault, at)
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
  assert f"stopped by SIGTERM after step {at}" in stopped.stderr
  assert at in ckpt_steps(workdir) and not os.path.exists(os.path.join(workdir, "generator"))
  resumed = run_cli(args + ["--workdir", workdir])
  ok(resumed)
  assert f"resuming from step {at} of 12" in resumed.stdout
  assert_same_run(ref, workdir, export="generator")


def test_mnist_cgn_diverging_run_stops_naming_the_loss(mnist_cgn):
  base, args, ref = mnist_cgn
  workdir = str(base / "nan")
  shutil.copytree(ref, workdir)  # a run stopped at its step-6 checkpoint, rerun with lr 1e30
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  good_export = _flat(checkpoints.load_variables(os.path.join(workdir, "generator")))
  diverged = run_cli(args + ["--workdir", workdir, "--config.train.lr=1e30"])
  assert diverged.returncode == 1
  errors = [l for l in diverged.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in diverged.stderr, diverged.stderr[-3000:]
  assert "non-finite loss" in errors[0] and "g_adv" in errors[0], errors[0]
  assert "at step 8;" in errors[0], errors[0]  # step 7's update makes step 8's losses overflow
  assert "checkpoint is step 6" in errors[0], errors[0]
  assert ckpt_steps(workdir) == [6]  # nothing non-finite saved, the good one kept
  tree, _ = checkpoints.read_train_checkpoint(workdir)
  assert all(np.all(np.isfinite(v)) for v in _flat(tree).values() if v.dtype.kind == "f")
  assert [r["step"] for r in metrics_rows(workdir)] == [4]  # valid JSON, nothing after the stop
  exported = _flat(checkpoints.load_variables(os.path.join(workdir, "generator")))
  for k, v in good_export.items():  # the export was not overwritten
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_mnist_cgn_damaged_newest_checkpoint_falls_back(mnist_cgn):
  base, args, ref = mnist_cgn
  workdir = str(base / "damaged")
  shutil.copytree(ref, workdir)
  newest = os.path.join(workdir, "checkpoints", "12")
  files = [os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  shutil.rmtree(os.path.join(workdir, "generator"))
  resumed = run_cli(args + ["--workdir", workdir])
  ok(resumed)
  warnings = [l for l in resumed.stdout.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint 12" in warnings[0], resumed.stdout
  assert "resuming from step 6 of 12" in resumed.stdout
  assert os.path.isdir(os.path.join(workdir, "checkpoints_damaged", "12"))
  assert_same_run(ref, workdir, export="generator")


# ---------------------------------------------------------------------------------------------
# The MNIST classifier: 3 epochs of 16 steps, a checkpoint per epoch.

@pytest.fixture(scope="module")
def classifier(data_dir, tmp_path_factory):
  base, args, ref = _uninterrupted(tmp_path_factory, "configs/mnist_classifier.py:tiny", data_dir,
                                   "real_dataset_dir")
  assert ckpt_steps(ref) == [32, 48]  # keep_checkpoints 2 of the 3 epoch checkpoints
  return base, args, ref


@pytest.mark.parametrize("fault,at", [("kill_after_row", 32), ("kill_in_save", 16)])
def test_classifier_sigkill_then_rerun_equals_uninterrupted(classifier, fault, at):
  base, args, ref = classifier
  workdir = str(base / fault)
  killed = run_cli(args + ["--workdir", workdir], fault, at)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  done = json.load(open(os.path.join(workdir, "results.json")))["epochs"]
  # Epoch 1 is kept either way; the kill after row 32 comes before epoch 2 reaches results.json.
  assert [e["epoch"] for e in done] == [1]
  ok(run_cli(args + ["--workdir", workdir]))
  assert_same_run(ref, workdir)
  a = json.load(open(os.path.join(ref, "results.json")))
  b = json.load(open(os.path.join(workdir, "results.json")))
  assert b["epochs"] == a["epochs"] and len(a["epochs"]) == 3


def test_mnist_cgn_other_model_in_the_workdir_is_one_line_not_damage(mnist_cgn):
  """A checkpoint of another architecture is not "damaged": it stays, and the error says why."""
  base, args, ref = mnist_cgn
  workdir = str(base / "other_model")
  shutil.copytree(ref, workdir)
  run = run_cli(args + ["--workdir", workdir, "--config.model.ngf=16"])
  assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  errors = [l for l in run.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "another model or optimizer" in errors[0], run.stderr[-2000:]
  assert ckpt_steps(workdir) == [6, 12]
