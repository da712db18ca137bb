"""Every config builds, is locked, has its ``:tiny`` variant, and finds the data from any folder."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                     if not os.path.basename(p).startswith("_")
                     and os.path.basename(p) not in ("common.py", "mnist_base.py"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_locked_with_tiny(name):
  module = importlib.import_module(f"configs.{name}")
  for variant in ("", "tiny"):
    c = module.get_config(variant) if variant else module.get_config()
    assert c.is_locked, (name, variant)
    with pytest.raises(AttributeError):
      c.no_such_field = 1
    assert c.job, name
  with pytest.raises(ValueError, match="unknown variant|variant"):
    module.get_config("no_such_variant")


def test_default_data_paths_work_from_any_folder(data_dir, tmp_path):
  """The defaults are absolute: the wildlife config finds its textures from another folder."""
  code = ("from configs import mnist_wildlife; from cgn_jax.data import build; "
          "c = mnist_wildlife.get_config(); print(c.data_dir); "
          "print(build.default_paths(c.data_dir)['textures_dir'])")
  env = {k: v for k, v in os.environ.items() if k != "CGN_DATA"}
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  assert os.path.isabs(out[0]) and os.path.samefile(out[0], data_dir), out
  assert out[1] != "None" and os.path.isdir(out[1]), out
