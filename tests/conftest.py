"""Shared test plumbing: where the golden fixtures and shared data live, and what to do without them.

The folders come from ``CGN_FIXTURES`` / ``CGN_DATA`` (defaults: ../shared/... beside the checkout).
Without them a test is skipped with the reason, except under ``CI=true`` where a missing folder is a
failure: CI must never go green by skipping every parity test.
"""

from __future__ import annotations

import glob
import os

# Every test process simulates 4 CPU devices, so sharded code paths (mesh, batch split, cross-device
# batch-norm statistics) run in every job test; single-device code is unaffected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

# Convs keep XLA's own kernel gradient in tests (and in the jobs they start), so that no test
# times conv rules or depends on which one this CPU prefers; tests/test_layers.py checks each rule.
os.environ.setdefault("CGN_CONV_DW", "xla")

import tempfile

import jax
import numpy as np
import pytest

# One persistent compilation cache per test session, shared by both pytest-xdist workers (their
# files compile many of the same tiny-config programs) and by the jobs they start: a program
# compiled once is loaded everywhere else. CGN_TEST_JAX_CACHE reuses a cache across sessions.
# A size limit turns on JAX's file lock around every cache read and write, so that no process
# reads an entry another one is still writing (the children get the limit through the variable).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_CACHE = os.environ.get("CGN_TEST_JAX_CACHE") or (
    os.path.join(tempfile.gettempdir(), f"cgn_jax_cache_{_RUN_ID}") if _RUN_ID
    else tempfile.mkdtemp(prefix="cgn_jax_cache_"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 * 2**30))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("CGN_FIXTURES", os.path.join(_ROOT, "..", "shared", "fixtures"))
DATA = os.environ.get("CGN_DATA", os.path.join(_ROOT, "..", "shared", "data"))


def _require(path: str, what: str, env: str) -> str:
  if os.path.isdir(path):
    return os.path.abspath(path)
  msg = f"{what} not found at {os.path.abspath(path)}; set {env} to the shared/{what.split()[0]} folder"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(msg + " (required when CI=true)")
  pytest.skip(msg)


@pytest.fixture(scope="session")
def fixtures_dir() -> str:
  return _require(FIXTURES, "fixtures folder", "CGN_FIXTURES")


@pytest.fixture(scope="session")
def data_dir() -> str:
  return _require(DATA, "data folder", "CGN_DATA")


def fixture_stems(prefix: str) -> list[str]:
  """File stems of the ``<prefix>*.npz`` fixtures, for parametrising parity tests at collection time.

  When the folder is missing this returns one placeholder so that the test still runs and the
  ``fixtures_dir`` fixture skips (or fails under CI) with the reason.
  """
  stems = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(FIXTURES, prefix + "*.npz")))
  return stems or [f"{prefix}<no fixtures found>"]


def load_fixture(fixtures_dir: str, stem: str) -> dict[str, np.ndarray]:
  path = os.path.join(fixtures_dir, stem + ".npz")
  if not os.path.isfile(path):
    msg = f"fixture {path} missing"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def assert_close(actual, expected, atol: float = 1e-5, rtol: float = 0.0, name: str = "",
                 scale_rtol: float = 0.0) -> None:
  """max |a-e| <= atol + rtol*|e| + scale_rtol*max|e|, with the worst offender in the message.

  ``scale_rtol`` is the "relative for large-valued arrays" criterion: an error relative to the
  array's own scale, for arrays (such as the MNIST raw shape map, |x| up to 12) whose float32 noise
  is set by their largest values.
  """
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
  scale = float(np.max(np.abs(e))) if e.size else 0.0
  err = np.abs(a - e) - (atol + rtol * np.abs(e) + scale_rtol * scale)
  worst = float(np.max(np.abs(a - e))) if a.size else 0.0
  assert np.all(err <= 0), f"{name}: max abs error {worst:.3g} exceeds atol={atol} rtol={rtol}"


def pytest_terminal_summary(terminalreporter):
  """With CGN_PARITY_REPORT=1: the measured max error of every parity family compared this session."""
  if os.environ.get("CGN_PARITY_REPORT", "") != "1":
    return
  import parity  # pylint: disable=import-outside-toplevel
  if parity.REPORT:
    terminalreporter.section("parity: max |port - reference| per fixture and tolerance family")
    for line in parity.report_table(parity.REPORT):
      terminalreporter.write_line(line)


# The slowest files first (measured with --durations): the two pytest-xdist workers take whole
# files (--dist loadfile), so a long file handed out last would leave one worker idle at the end.
# pyproject's --no-loadscope-reorder keeps this order (pytest-xdist >= 3.6 would otherwise hand
# out the files with the most tests first: the parametrised parity files before a 4-test one
# that takes 10 minutes).
_SLOW_FIRST = ("test_imagenet_cgn_train.py", "test_mnist_jobs.py", "test_crash_safety.py",
               "test_generation_resume.py", "test_imagenet_cgn_grad.py",
               "test_imagenet_classifier_jobs.py", "test_train_step_parity.py",
               "test_imagenet_generate.py", "test_bad_inputs.py", "test_imagenet_cgn_converter.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
