"""Every bad input a new user can type ends in one line, ``error: <cause>; <fix>``.

Each case runs the real command line (``python -m cgn_jax.main`` or ``python -m converters``) in a
subprocess, two at a time, and checks what the user sees and what is left on disk: a non-zero exit,
stderr of at most three lines (JAX/absl start-up warnings aside) whose last one starts with
``error:``, the cause and the fix named, and no output, temporary or partial file left behind.
A full disk is a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored so writes fail with EFBIG); a
read-only folder is a mode-555 folder, or for root a read-only tmpfs in a private mount namespace.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import pytest

from conftest import DATA, FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = [sys.executable, "-m", "cgn_jax.main"]
CONVERT = [sys.executable, "-m", "converters"]
# Start-up chatter of JAX/XLA/absl that is not ours to shorten; filtered by name, nothing else.
NOISE = re.compile(r"^(WARNING|INFO):(absl|jax)|^[WIE]\d{4} |^WARNING: All log messages before "
                   r"absl::InitializeLog|An NVIDIA GPU may be present|Falling back to cpu")
LEFTOVER = re.compile(r"\.tmp|\.incomplete|\.part$|\.new$|orbax-checkpoint-tmp")


@dataclasses.dataclass
class Case:
  name: str
  argv: Callable[[dict], list[str]]  # paths -> command line
  expect: tuple[str, ...]            # substrings of the error line
  absent: Callable[[dict], list[str]] = lambda p: []  # paths that must not exist afterwards
  limit_bytes: int = 0               # >0: RLIMIT_FSIZE, a disk that is full after that many bytes
  needs: tuple[str, ...] = ()        # "fixtures", "data", "read_only"
  existing_workdir: bool = False     # the workdir exists before (and stays, holding no file)


def _cfg(spec, *more, workdir="w"):
  return lambda p: MAIN + ["--config", f"configs/{spec}", "--workdir", p[workdir], *more]


def _with(spec, *more, workdir="w"):
  """A config command whose overrides name input paths (``{key}`` is ``paths[key]``)."""
  return lambda p: _cfg(spec, *(m.format(**p) for m in more), workdir=workdir)(p)


def _gone(*keys):
  return lambda p: [p[k] for k in keys]


CASES = [
    # --- the config and the flags (parsed before any job code runs) ----------------------------
    Case("unknown_key", _cfg("mnist_sample.py:tiny", "--config.n_per_clas=3"),
         ("no field 'n_per_clas'", "did you mean --config.n_per_class?"), _gone("w")),
    Case("unknown_nested_key", _cfg("mnist_colored.py:tiny", "--config.train.lrr=0.1"),
         ("no field 'train.lrr'", "--config.train.lr?"), _gone("w")),
    Case("key_at_the_wrong_level", _cfg("mnist_colored.py:tiny", "--config.batch_size=8"),
         ("no field 'batch_size'", "--config.train.batch_size?"), _gone("w")),
    Case("value_of_the_wrong_type", _cfg("mnist_sample.py:tiny", "--config.n_per_class=two"),
         ("--config.n_per_class='two'", "int values (default 2)"), _gone("w")),
    Case("unknown_variant", _cfg("mnist_colored.py:nope"),
         ("unknown variant 'nope'", ":re, :tiny"), _gone("w")),
    Case("unknown_config_file", _cfg("mnist_sampel.py"),
         ("no such file", "did you mean configs/mnist_sample.py?"), _gone("w")),
    Case("missing_workdir", lambda p: MAIN + ["--config", "configs/mnist_sample.py:tiny"],
         ("--workdir is required",)),
    Case("unknown_flag", lambda p: MAIN + ["--config", "configs/mnist_sample.py:tiny",
                                           "--workdr", p["w"]],
         ("Unknown command line flag 'workdr'", "workdir"), _gone("w")),
    Case("workdir_is_a_file", _cfg("mnist_sample.py:tiny", workdir="file"),
         ("is a file, not a folder",)),
    Case("workdir_inside_a_file", _cfg("mnist_sample.py:tiny", workdir="in_file"),
         ("is a file, so the folder cannot be created",)),
    Case("workdir_read_only", _cfg("mnist_sample.py:tiny", workdir="ro"),
         ("not writable", "choose a folder you can write to"), needs=("read_only",)),
    Case("workdir_in_a_read_only_folder", _cfg("mnist_sample.py:tiny", workdir="in_ro"),
         ("cannot create --workdir", "not writable"), needs=("read_only",)),
    # --- enumerated fields, checked before anything is built -------------------------------
    Case("train_on", _cfg("mnist_classifier.py:tiny", "--config.train_on=cf"),
         ("--config.train_on='cf' is not one of real, counterfactual, mixed",
          "did you mean --config.train_on=counterfactual?"), _gone("w")),
    Case("dataset_name", _cfg("mnist_colored.py:tiny", "--config.dataset=colored_mnist"),
         ("--config.dataset='colored_mnist'", "did you mean --config.dataset=colored_MNIST?"),
         _gone("w")),
    # --- data and checkpoints ---------------------------------------------------------------
    Case("data_dir_missing", _with("mnist_colored.py:tiny", "--config.data_dir={nowhere}"),
         ("--config.data_dir=", "does not exist", "mnist/"), _gone("w")),
    Case("data_dir_empty", _with("mnist_wildlife.py:tiny", "--config.data_dir={empty}"),
         ("--config.data_dir=", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
          "textures/object/*.jpg", "textures/background/*.jpg"), _gone("w")),
    Case("pipeline_data_dir_names_its_own_field",
         _with("quickstart.py:tiny", "--config.cgn.data_dir={nowhere}"),
         ("--config.cgn.data_dir=", "does not exist", "point --config.cgn.data_dir"), _gone("w")),
    Case("heatmap_images_missing", _with("imagenet_heatmaps.py:tiny", "--config.images={nowhere}"),
         ("--config.images=", "does not exist", "folder of .png/.jpg images"), _gone("w")),
    Case("checkpoint_empty_folder", _with("mnist_sample.py:tiny", "--config.checkpoint={empty}"),
         ("is an empty folder, not a converted checkpoint", "python -m converters mnist_cgn"),
         _gone("w")),
    Case("checkpoint_of_another_family",
         _with("mnist_sample.py:tiny", "--config.checkpoint={disc_lin}"),
         ("holds a 'disc_lin' checkpoint, expected 'mnist_cgn'", "python -m converters mnist_cgn"),
         _gone("w"), needs=("fixtures",)),
    Case("sample_from_non_finite_weights",
         _with("mnist_sample.py:tiny", "--config.checkpoint={nan_cgn}"),
         ("holds 1 NaN of", "export it again"), _gone("w"), needs=("fixtures",)),
    Case("generate_from_non_finite_weights",
         _with("mnist_generate.py:tiny", "--config.checkpoint={nan_cgn}"),
         ("holds 1 NaN of", "export it again"), _gone("w"), needs=("fixtures",)),
    # --- a full disk --------------------------------------------------------------------------
    Case("disk_full_converting_on_first_use",
         _with("mnist_sample.py:tiny", "--config.checkpoint={cgn_pth}"),
         ("cannot write", "File too large", "--workdir"), limit_bytes=4096, needs=("fixtures",),
         existing_workdir=True),
    Case("disk_full_building_a_dataset", _cfg("mnist_colored.py:tiny"),
         ("cannot write", "--workdir"), _gone("w"), limit_bytes=64 << 10, needs=("data",)),
    Case("disk_full_converting",
         lambda p: CONVERT + ["mnist_cgn", p["cgn_pth"], p["out"]],
         ("cannot write", "File too large", "DST"), _gone("out"), limit_bytes=4096,
         needs=("fixtures",)),
    # --- the converter ------------------------------------------------------------------------
    Case("converter_family", lambda p: CONVERT + ["mnist_cgnn", p["cgn_pth"], p["out"]],
         ("unknown family 'mnist_cgnn'", "did you mean mnist_cgn?"), _gone("out"),
         needs=("fixtures",)),
    Case("converter_zero_byte_file", lambda p: CONVERT + ["mnist_cgn", p["zero"], p["out"]],
         ("is an empty file (0 bytes), not a torch checkpoint",), _gone("out")),
    Case("converter_npz", lambda p: CONVERT + ["mnist_cgn", p["npz"], p["out"]],
         ("is a numpy .npz archive (arrays weights), not a torch checkpoint",), _gone("out")),
    Case("converter_git_lfs_pointer", lambda p: CONVERT + ["mnist_cgn", p["text"], p["out"]],
         ("is a git-lfs pointer", "git lfs pull", "not a torch checkpoint"), _gone("out")),
    Case("converter_random_bytes", lambda p: CONVERT + ["mnist_cgn", p["random"], p["out"]],
         ("is unrecognised binary data", "not a torch checkpoint"), _gone("out")),
    Case("converter_truncated", lambda p: CONVERT + ["mnist_cgn", p["truncated"], p["out"]],
         ("truncated or corrupt",), _gone("out"), needs=("fixtures",)),
    Case("converter_foreign_checkpoint", lambda p: CONVERT + ["disc_conv", p["cgn_pth"], p["out"]],
         ("missing key", "disc_conv checkpoint?"), _gone("out"), needs=("fixtures",)),
    Case("converter_converted_dir", lambda p: CONVERT + ["disc_lin", p["disc_lin"], p["out"]],
         ("is a converted checkpoint already",), _gone("out"), needs=("fixtures",)),
    Case("converter_dst_exists", lambda p: CONVERT + ["mnist_cgn", p["cgn_pth"], p["empty"]],
         ("exists already",), needs=("fixtures",)),
]


def _read_only_dir(base: str) -> tuple[str | None, list[str]]:
  """(a read-only folder, the command prefix that makes it read-only), or (None, []) if neither a
  mode-555 folder (root writes there anyway) nor a private read-only tmpfs is available."""
  path = os.path.join(base, "read_only")
  os.makedirs(path)
  os.chmod(path, 0o555)
  if not os.access(path, os.W_OK):
    return path, []
  prefix = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro,size=64k none "$0" && exec "$@"',
            path]
  if shutil.which("unshare"):
    probe = subprocess.run(prefix + ["sh", "-c", 'test ! -w "$0"', path], capture_output=True,
                           check=False)
    if probe.returncode == 0:
      return path, prefix
  return None, []


def _make_inputs(base: str) -> tuple[dict, set[str]]:
  """The inputs the cases share (read, never written), and which optional ones exist here."""
  have = set()
  p = {"nowhere": os.path.join(base, "no_such_folder"), "empty": os.path.join(base, "empty"),
       "file": os.path.join(base, "a_file"), "zero": os.path.join(base, "zero.pth"),
       "npz": os.path.join(base, "weights.pth"), "text": os.path.join(base, "lfs_pointer.pth"),
       "random": os.path.join(base, "random.pth")}
  p["in_file"] = os.path.join(p["file"], "work")
  os.makedirs(p["empty"])
  open(p["file"], "w").close()
  open(p["zero"], "wb").close()
  with open(p["npz"], "wb") as f:  # an .npz renamed .pth: a zip, but not torch's
    np.savez(f, weights=np.zeros(3))
  with open(p["text"], "w") as f:  # what a clone without git-lfs holds instead of the .pth
    f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
  with open(p["random"], "wb") as f:
    f.write(np.random.default_rng(0).integers(1, 8, 4096, dtype=np.uint8).tobytes())
  ro, prefix = _read_only_dir(base)
  if ro:
    have.add("read_only")
    p.update(ro=ro, in_ro=os.path.join(ro, "work"), ro_prefix=prefix)
  if os.path.isdir(DATA):
    have.add("data")
  cgn_pth = os.path.join(FIXTURES, "mnist_cgn_colored_MNIST.pth")
  if os.path.isfile(cgn_pth):
    have.add("fixtures")
    p.update(cgn_pth=cgn_pth, truncated=os.path.join(base, "truncated.pth"),
             disc_lin=os.path.join(base, "disc_lin"), nan_cgn=os.path.join(base, "nan_cgn"))
    with open(cgn_pth, "rb") as f, open(p["truncated"], "wb") as g:
      g.write(f.read()[: os.path.getsize(cgn_pth) // 2])
    p["nan_array"] = _converted_inputs(p)
  return p, have


def _converted_inputs(p: dict) -> str:
  """A converted disc_lin dir and a converted mnist_cgn dir with one NaN; returns its array name."""
  # pylint: disable=import-outside-toplevel
  import jax
  from cgn_jax import checkpoints
  from converters.common import load_torch_state_dict
  from converters.registry import convert_file, convert_state_dict
  convert_file("disc_lin", os.path.join(FIXTURES, "mnist_disc_lin.pth"), p["disc_lin"])
  variables, model_config = convert_state_dict("mnist_cgn",
                                               load_torch_state_dict(p["cgn_pth"]))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  path, first = next((k, v) for k, v in leaves if k[0].key == "params")
  first = np.array(first)
  first.flat[0] = np.nan
  variables = jax.tree_util.tree_unflatten(
      treedef, [first if k == path else v for k, v in leaves])
  checkpoints.save_variables(p["nan_cgn"], variables,
                             {"family": "mnist_cgn", "model_config": model_config})
  return "/".join(checkpoints.key_name(k) for k in path)


# Sets the file-size limit, ignores SIGXFSZ (so a write past it raises EFBIG) and becomes the
# command: no preexec_fn, which would fork this multithreaded (JAX) test process into Python code.
_LIMIT = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
          "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
          "os.execv(sys.argv[2], sys.argv[2:])")


def _run(case: Case, paths: dict) -> tuple[subprocess.CompletedProcess, float]:
  argv = case.argv(paths)
  if case.limit_bytes:
    argv = [sys.executable, "-c", _LIMIT, str(case.limit_bytes)] + argv
  if "read_only" in case.needs:
    argv = paths["ro_prefix"] + argv
  t0 = time.time()
  proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  return proc, time.time() - t0


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  """{case name: (process, seconds, paths)}: every runnable case, two subprocesses at a time."""
  shared, have = _make_inputs(str(tmp_path_factory.mktemp("inputs")))
  runnable = {}
  for case in CASES:
    if set(case.needs) <= have:
      own = str(tmp_path_factory.mktemp(case.name))  # what the command may write: nothing
      runnable[case.name] = (case, {**shared, "w": os.path.join(own, "work"),
                                    "out": os.path.join(own, "out"), "own": own})
      if case.existing_workdir:
        os.makedirs(runnable[case.name][1]["w"])
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(_run, case, paths) for name, (case, paths) in runnable.items()}
    return {name: (*futures[name].result(), runnable[name][1]) for name in futures}


def _leftovers(base: str) -> list[str]:
  found = []
  for folder, dirs, files in os.walk(base):
    found += [os.path.join(folder, n) for n in dirs + files if LEFTOVER.search(n)]
  return found


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line(case: Case, outcomes, request):
  if case.name not in outcomes:
    for need in case.needs:
      if need in ("fixtures", "data"):
        request.getfixturevalue(f"{need}_dir")  # skips, or fails under CI=true
    pytest.skip(f"needs {', '.join(case.needs)}: not available here (a read-only folder needs a "
                f"non-root user or unshare)")
  proc, _, paths = outcomes[case.name]
  lines = [line for line in proc.stderr.splitlines() if line.strip() and not NOISE.search(line)]
  assert proc.returncode != 0, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert lines and lines[-1].startswith("error: ") and len(lines) <= 3, proc.stderr
  expect = list(case.expect)
  if case.name.endswith("non_finite_weights"):
    expect.append(paths["nan_array"])
  for text in expect:
    assert text in lines[-1], (text, lines[-1])
  for path in case.absent(paths):
    assert not os.path.exists(path), f"{path} left behind: {os.listdir(path)}"
  for folder in (paths["own"], os.path.dirname(paths["empty"])):
    assert not _leftovers(folder), _leftovers(folder)
  kept = [paths["w"]] if case.existing_workdir else []
  assert sorted(os.path.join(paths["own"], n) for n in os.listdir(paths["own"])) == kept
  assert not os.listdir(paths["empty"])
  for folder in kept:  # an existing workdir may keep an empty cache folder, no file
    assert not [f for _, _, files in os.walk(folder) for f in files], list(os.walk(folder))


def test_help_lists_the_jobs_and_the_configs():
  from cgn_jax.jobs import JOBS  # pylint: disable=import-outside-toplevel
  proc = subprocess.run(MAIN + ["--help"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert all(job in proc.stdout for job in JOBS)
  for line in ("configs/mnist_colored.py", "variants: re, tiny", "configs/imagenet_classifier.py",
               "variants: cgn, baseline, tiny, tiny_baseline"):
    assert line in proc.stdout, line
