"""The u2net converter maps every key of the full U2NET(3,1) state dict, and fails loudly otherwise.

The state dict is random but shaped exactly like the manifest of the authors' U2NET (798 entries,
BN buffers included); it goes through the real path: torch.save -> ``convert_file`` -> Orbax ->
``load_variables`` -> one forward.
"""

from __future__ import annotations

import collections
import json
import os

import jax
import numpy as np
import pytest
import torch

from cgn_jax import checkpoints
from cgn_jax.models import u2net
from converters.common import ConversionError
from converters.registry import convert_file, convert_state_dict
from converters.u2net import convert_u2net


def _random_state_dict(fixtures_dir: str) -> dict[str, np.ndarray]:
  """Manifest shapes/dtypes with plausible values: convs at std 1/sqrt(fan_in) (a little below He
  init, so that 30-odd layers with residual sums do not saturate the sigmoid), BN var in [0.5, 1.5]."""
  with open(os.path.join(fixtures_dir, "u2net_manifest.json")) as f:
    manifest = json.load(f)
  rng = np.random.default_rng(0)
  sd = collections.OrderedDict()
  for key, (shape, dtype) in manifest.items():
    if dtype == "int64":
      sd[key] = np.asarray(rng.integers(0, 1000), np.int64).reshape(shape)
    elif key.endswith("running_var"):
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif key.endswith("running_mean") or key.endswith("bias"):
      sd[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    elif len(shape) == 4:
      sd[key] = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape).astype(np.float32)
    else:  # BN weight
      sd[key] = rng.uniform(0.5, 1.0, shape).astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def full_sd(fixtures_dir):
  return _random_state_dict(fixtures_dir)


def test_full_u2net_converts_restores_and_runs(full_sd, tmp_path):
  assert len(full_sd) == 798
  src, dst = str(tmp_path / "u2net.pth"), str(tmp_path / "u2net_orbax")
  torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in full_sd.items()), src)
  meta = convert_file("u2net", src, dst)
  assert meta["model_config"] == {"variant": "u2net", "out_ch": 1}
  variables = checkpoints.load_variables(dst, "u2net")
  # One leaf per torch key: nothing dropped, nothing invented.
  assert len(jax.tree_util.tree_leaves(variables)) == len(full_sd)
  k = full_sd["stage4d.rebnconv3d.conv_s1.weight"]
  np.testing.assert_array_equal(variables["params"]["stage4d"]["rebnconv3d"]["conv_s1"]["kernel"],
                                k.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["stage5"]["rebnconv4"]["bn_s1"]["var"],
                                full_sd["stage5.rebnconv4.bn_s1.running_var"])
  assert int(variables["batch_stats"]["stage1"]["rebnconvin"]["bn_s1"]["num_batches_tracked"]) == int(
      full_sd["stage1.rebnconvin.bn_s1.num_batches_tracked"])

  model, loaded = u2net.load(dst)
  assert model.variant == "u2net"
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
  x = np.random.default_rng(1).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  # The restored tree must be exactly what the module asks for (structure and shapes).
  expected = jax.eval_shape(model.init, jax.random.key(0), x)
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), t)
  assert shapes(variables) == shapes(expected)
  out = np.asarray(jax.jit(model.apply)(variables, x))
  assert out.shape == (1, 64, 64, 1)
  assert np.all(np.isfinite(out)) and np.all(out > 0) and np.all(out < 1)


def test_u2netp_variant_detected(fixtures_dir):
  from converters.common import load_torch_state_dict  # pylint: disable=import-outside-toplevel
  _, cfg = convert_u2net(load_torch_state_dict(os.path.join(fixtures_dir, "u2netp.pth")))
  assert cfg == {"variant": "u2netp", "out_ch": 1}


def test_prefixed_state_dict(full_sd):
  """The ImageNet CGN's checkpoint holds the U2-Net under ``u2net.`` next to other modules."""
  sd = {f"u2net.{k}": v for k, v in full_sd.items()}
  sd["f_shape.0.weight"] = np.zeros((3, 3), np.float32)
  variables, cfg = convert_u2net(sd, prefix="u2net.")
  plain, _ = convert_u2net(full_sd)
  assert cfg["variant"] == "u2net"
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, plain)
  sd["u2net.stage9.rebnconvin.conv_s1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ConversionError, match=r"u2net\.stage9\.rebnconvin\.conv_s1\.weight"):
    convert_u2net(sd, prefix="u2net.")


def test_wrong_shape_names_the_key(full_sd):
  sd = dict(full_sd)
  sd["stage3d.rebnconv2d.conv_s1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
  with pytest.raises(ConversionError, match=r"stage3d\.rebnconv2d\.conv_s1\.weight.*shape"):
    convert_state_dict("u2net", sd)


def test_unknown_key_names_the_key(full_sd):
  sd = dict(full_sd)
  sd["side7.weight"] = np.zeros((1, 64, 3, 3), np.float32)
  with pytest.raises(ConversionError, match=r"unknown key 'side7\.weight'"):
    convert_state_dict("u2net", sd)


def test_missing_key_names_the_key(full_sd):
  sd = dict(full_sd)
  del sd["stage6.rebnconv4.bn_s1.running_mean"]
  with pytest.raises(ConversionError, match=r"missing key 'stage6\.rebnconv4\.bn_s1\.running_mean'"):
    convert_state_dict("u2net", sd)


def test_unsupported_width_is_rejected(full_sd):
  sd = dict(full_sd)
  sd["stage1.rebnconv1.conv_s1.weight"] = np.zeros((24, 64, 3, 3), np.float32)
  with pytest.raises(ConversionError, match=r"stage1\.rebnconv1\.conv_s1\.weight.*24"):
    convert_state_dict("u2net", sd)
