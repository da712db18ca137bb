"""The converter CLI fails loudly, in one line naming the key or the cause, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the converters read .pth with torch (the convert extra)")

from converters.__main__ import main as cli  # noqa: E402


def _cgn_sd(fixtures_dir):
  return torch.load(os.path.join(fixtures_dir, "mnist_cgn_colored_MNIST.pth"), map_location="cpu",
                    weights_only=True)


def _run(capsys, *args):
  rc = cli(list(args))
  err = capsys.readouterr().err.strip()
  return rc, err


def test_unknown_key(fixtures_dir, tmp_path, capsys):
  sd = _cgn_sd(fixtures_dir)
  sd["f_text1.99.weight"] = torch.zeros(3)
  torch.save(sd, tmp_path / "x.pth")
  rc, err = _run(capsys, "mnist_cgn", str(tmp_path / "x.pth"), str(tmp_path / "out"))
  assert rc != 0 and "unknown key 'f_text1.99.weight'" in err and len(err.splitlines()) == 1
  assert not os.path.exists(tmp_path / "out")


def test_missing_key(fixtures_dir, tmp_path, capsys):
  sd = _cgn_sd(fixtures_dir)
  del sd["f_text2.7.weight"]
  torch.save(sd, tmp_path / "x.pth")
  rc, err = _run(capsys, "mnist_cgn", str(tmp_path / "x.pth"), str(tmp_path / "out"))
  assert rc != 0 and "missing key 'f_text2.7.weight'" in err


def test_wrong_shape(fixtures_dir, tmp_path, capsys):
  sd = _cgn_sd(fixtures_dir)
  sd["f_shape.9.weight"] = torch.zeros(1, 32, 5, 5)
  torch.save(sd, tmp_path / "x.pth")
  rc, err = _run(capsys, "mnist_cgn", str(tmp_path / "x.pth"), str(tmp_path / "out"))
  assert rc != 0 and "'f_shape.9.weight' has shape (1, 32, 5, 5), expected (1, 32, 3, 3)" in err
  assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == ["x.pth"]


def test_truncated_file(fixtures_dir, tmp_path, capsys):
  data = open(os.path.join(fixtures_dir, "mnist_cgn_colored_MNIST.pth"), "rb").read()
  (tmp_path / "x.pth").write_bytes(data[: len(data) // 2])
  rc, err = _run(capsys, "mnist_cgn", str(tmp_path / "x.pth"), str(tmp_path / "out"))
  assert rc != 0 and "truncated or corrupt" in err and len(err.splitlines()) == 1


def test_not_a_checkpoint(tmp_path, capsys):
  (tmp_path / "x.pth").write_text("hello, I am a text file\n")
  rc, err = _run(capsys, "disc_lin", str(tmp_path / "x.pth"), str(tmp_path / "out"))
  assert rc != 0 and "not a torch checkpoint" in err


def test_biggan_checkpoint_given_as_mnist(fixtures_dir, tmp_path, capsys):
  rc, err = _run(capsys, "mnist_cgn", os.path.join(fixtures_dir, "biggan_deep_w16.pth"),
                 str(tmp_path / "out"))
  assert rc != 0 and "missing key 'label_emb.weight'" in err and "mnist_cgn checkpoint" in err


def test_mnist_checkpoint_given_as_classifier(fixtures_dir, tmp_path, capsys):
  rc, err = _run(capsys, "mnist_classifier", os.path.join(fixtures_dir, "mnist_cgn_colored_MNIST.pth"),
                 str(tmp_path / "out"))
  assert rc != 0 and "missing key 'cls.0.weight'" in err


def test_existing_output_is_not_overwritten(fixtures_dir, tmp_path, capsys):
  (tmp_path / "out").mkdir()
  rc, err = _run(capsys, "disc_conv", os.path.join(fixtures_dir, "mnist_disc_conv.pth"),
                 str(tmp_path / "out"))
  assert rc != 0 and "exists already" in err


def test_cli_subprocess_exit_code_and_one_line(fixtures_dir, tmp_path):
  """The real command line: exit status 1 and a single line on stderr, no traceback."""
  src = os.path.join(fixtures_dir, "biggan_deep_w16.pth")
  proc = subprocess.run([sys.executable, "-m", "converters", "disc_conv", src, str(tmp_path / "o")],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("error: disc_conv: missing key 'label_embedding.weight'")
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_float16_checkpoint_is_cast_to_float32(fixtures_dir, tmp_path):
  from cgn_jax import checkpoints
  from converters import convert_file
  convert_file("disc_lin", os.path.join(fixtures_dir, "mnist_disc_lin.pth"), str(tmp_path / "o"))
  v = checkpoints.load_variables(str(tmp_path / "o"), family="disc_lin")
  assert {np.asarray(a).dtype for a in __import__("jax").tree_util.tree_leaves(v)} == {np.dtype("float32")}
  with pytest.raises(checkpoints.CheckpointError, match="holds a 'disc_lin' checkpoint"):
    checkpoints.load_variables(str(tmp_path / "o"), family="mnist_cgn")


def test_every_listed_family_exists():
  """The registry names only families this version can convert (each module and function imports)."""
  from converters.registry import FAMILIES, family_fn
  for family in FAMILIES:
    assert callable(family_fn(family)), family


def test_cli_help_lists_the_families():
  from converters.registry import FAMILIES
  proc = subprocess.run([sys.executable, "-m", "converters", "--help"], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert all(f in proc.stdout for f in FAMILIES)
