"""The torch-free ``.pth`` reader (converters/torch_reader.py) against ``torch.load``: bit for bit on
every fixture and on legacy-format files, and a crafted file that would run a command is refused
before anything runs."""

import glob
import os
import pickle
import zipfile

import numpy as np
import pytest

from converters import torch_reader
from converters.common import ConversionError

torch = pytest.importorskip("torch")


def _assert_same(ours, path):
  ref = torch.load(path, map_location="cpu", weights_only=True)
  assert list(ours) == list(ref)
  for k, t in ref.items():
    a, b = ours[k], t.numpy()
    assert isinstance(a, np.ndarray), (k, type(a))
    assert a.dtype == b.dtype and a.shape == b.shape, k
    np.testing.assert_array_equal(a, b, err_msg=k)


def test_every_fixture_reads_bit_exact(fixtures_dir):
  paths = sorted(glob.glob(os.path.join(fixtures_dir, "*.pth")))
  assert paths
  for path in paths:
    _assert_same(torch_reader.read(path), path)
  # torch's _metadata (spectral-norm versions etc.) survives as an attribute of the OrderedDict
  sd = torch_reader.read(os.path.join(fixtures_dir, "mnist_disc_conv.pth"))
  assert sd._metadata == torch.load(os.path.join(fixtures_dir, "mnist_disc_conv.pth"),
                                    weights_only=True)._metadata


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dtypes_views_and_legacy_format(tmp_path, legacy):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=g)
  sd = {"f32": base, "f16": torch.randn(3, 5, generator=g).half(), "f64": base.double(),
        "i64": torch.arange(7), "u8": torch.arange(5, dtype=torch.uint8), "b": base > 0,
        "t": base.t(), "slice": base[1:3, ::2], "scalar": torch.tensor(2.5)}
  path = str(tmp_path / "sd.pth")
  torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
  assert zipfile.is_zipfile(path) != legacy
  _assert_same(torch_reader.read(path), path)


class _RunsCommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_a_file_that_would_run_a_command_is_refused(tmp_path):
  marker = tmp_path / "ran"
  payload = pickle.dumps({"w": _RunsCommand(marker)}, protocol=2)
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", payload)
  with pytest.raises(ConversionError, match=r"refuses to load '(posix|os)\.system'"):
    torch_reader.read(path)
  legacy = str(tmp_path / "evil_legacy.pth")
  with open(legacy, "wb") as f:
    f.write(payload)
  with pytest.raises(ConversionError, match=r"refuses to load '(posix|os)\.system'"):
    torch_reader.read(legacy)
  assert not marker.exists()


def test_not_a_torch_file_is_one_line(tmp_path):
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(ConversionError, match="not a torch checkpoint"):
    torch_reader.read(str(empty))
  npz = tmp_path / "arrays.npz"
  np.savez(npz, a=np.zeros(3))
  with pytest.raises(ConversionError, match="without one data.pkl"):
    torch_reader.read(str(npz))


_NO_TORCH = """
import runpy, sys
sys.modules["torch"] = None  # any `import torch` now fails
sys.argv = ["converters"] + sys.argv[1:]
runpy.run_module("converters", run_name="__main__")
"""


def test_converting_and_loading_need_no_torch(fixtures_dir, tmp_path):
  """The install of README command (a) has no torch: conversion and loading must not import it."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from cgn_jax.models import mnist_cgn  # pylint: disable=import-outside-toplevel
  out = tmp_path / "cgn"
  src = os.path.join(fixtures_dir, "mnist_cgn_double_colored_MNIST.pth")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _NO_TORCH, "mnist_cgn", src, str(out)], cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # the same variables as the in-process conversion (whose parity tests/test_mnist_parity.py checks)
  _, ours = mnist_cgn.load(str(out))
  _, ref = mnist_cgn.load(src, str(tmp_path / "cache"))
  flat = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(ours), flat(ref)
  assert a.keys() == b.keys() and len(a) > 20
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
