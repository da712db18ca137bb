"""Inception-v3 (both graphs), its pre-processing and its converters against torch.

* ``inception_v3_fid`` (README §9): one random float16 state dict run through torchvision's graph
  (``eval_tv_*``) and pytorch-fid's (``eval_fid_*``), and pytorch-fid's wrapper from uint8 (resize
  ``resize_out_299``, then ``eval_fid_wrapper_pool3_from_uint8``). Every array the npz holds is
  compared (``parity.check_fixture``); each graph is compiled once for the module.
* ``inception_v3_manifest.json``: a random state dict of exactly torchvision's IMAGENET1K_V1 keys
  and shapes converts (family ``inception_v3``) to the fixture's tree plus the AuxLogits head, and
  that head matches a torch.nn.functional forward of the same tensors. Missing, unknown, mis-shaped and
  foreign (AuxLogits for the FID family) keys fail naming the key.
Tolerances: ``parity.TOLERANCES`` ("inception/*"), with why the README's are out of reach.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from cgn_jax.models import inception
from conftest import load_fixture, nchw_to_nhwc
from converters.common import ConversionError, load_torch_state_dict
from converters.inception import convert_inception_v3, convert_inception_v3_fid
from parity import Fixture, Rule, check_fixture, compare

STEM = "inception_v3_fid"
INPUTS = [r"input", r"resize_in_uint8"]


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  return Fixture(load_fixture(fixtures_dir, STEM), STEM)


@pytest.fixture(scope="module")
def fid_state_dict(fixtures_dir):
  sd = load_torch_state_dict(os.path.join(fixtures_dir, STEM + ".pth"))
  assert all(v.dtype != np.float16 for v in sd.values())  # the float16 file is read as float32
  return sd


@pytest.fixture(scope="module")
def converted(fid_state_dict):
  return convert_inception_v3_fid(fid_state_dict)


@pytest.fixture(scope="module")
def tv_state_dict(manifest):
  """Random tensors of exactly torchvision's IMAGENET1K_V1 keys and shapes."""
  return _random_state_dict(manifest["torchvision_inception_v3"])


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
  with open(os.path.join(fixtures_dir, "inception_v3_manifest.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def port(fixture, converted):
  """graph -> the port's outputs; each graph jitted and run once. The FID graph takes the fixture
  input and, in the same batch, the wrapper's resized uint8 images (host path: numpy)."""
  variables, config = converted
  assert config == {"num_classes": 1008, "aux_logits": False}
  resized = inception.resize_bilinear(inception.to_unit(nchw_to_nhwc(fixture["resize_in_uint8"])))
  x = nchw_to_nhwc(fixture["input"])

  @functools.cache
  def run(graph: str) -> dict[str, np.ndarray]:
    batch = np.concatenate([x, 2 * resized - 1]) if graph == "fid" else x
    out = jax.jit(inception.InceptionV3(graph=graph, **config).apply)(variables, batch)
    return {k: np.asarray(v) for k, v in out.items()} | {"resized": resized}

  return run


def _nchw(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 3, 1, 2)) if a.ndim == 4 else a


def test_every_array_of_the_fixture(fixture, port):
  n = fixture["input"].shape[0]
  graph = {"tv": "torchvision", "fid": "fid"}
  rules = [
      Rule(r"resize_out_299", "inception/resize", lambda m: _nchw(port("fid")["resized"])),
      Rule(r"eval_fid_wrapper_pool3_from_uint8", "inception/pool3",
           lambda m: port("fid")["pool3"][n:]),
      Rule(r"eval_fid_logits_unbiased", "inception/logits",
           lambda m: port("fid")["logits_unbiased"][:n]),
  ] + [Rule(rf"eval_(tv|fid)_({kind})", f"inception/{kind}",
            lambda m: _nchw(port(graph[m[1]])[m[2]][:n]))
       for kind in ("logits", "pool3", "Mixed_5d", "Mixed_6e")]
  errors = check_fixture(fixture, rules, INPUTS, STEM)
  assert len(errors) == len(fixture) - len(INPUTS) == 11  # every output array was compared
  # The graphs really differ on these weights: a mixed-up graph cannot pass.
  assert np.abs(fixture["eval_tv_logits"] - fixture["eval_fid_logits"]).max() > 1.0


def test_device_resize_matches_torch(fixture):
  """The resize the CGN source runs on the devices (jitted) is torch's too."""
  u8 = nchw_to_nhwc(fixture["resize_in_uint8"])
  got = jax.jit(lambda a: inception.resize_bilinear(inception.to_unit(a)))(u8)
  compare(_nchw(np.asarray(got)), fixture["resize_out_299"], "inception/resize",
          f"{STEM}:resize_out_299 (jitted)")
  same = np.random.default_rng(0).random((1, 5, 7, 3), np.float32)
  np.testing.assert_array_equal(inception.resize_bilinear(same, (5, 7)), same)  # torch copies


def _random_state_dict(shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors of the given shapes; BatchNorm variances positive, counters int64 scalars."""
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in shapes.items():
    if k.endswith("num_batches_tracked"):
      sd[k] = np.asarray(7, np.int64)
    elif k.endswith("running_var"):
      sd[k] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      sd[k] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
  return sd


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.shape(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_torchvision_layout_converts_with_its_aux_head(manifest, converted, tv_state_dict,
                                                      fid_state_dict):
  tv = manifest["torchvision_inception_v3"]
  assert set(manifest["pytorch_fid_pt_inception"]) == set(tv) - {k for k in tv if "AuxLogits" in k}
  assert set(fid_state_dict) == set(manifest["pytorch_fid_pt_inception"])
  variables, config = convert_inception_v3(tv_state_dict)
  assert config == {"num_classes": 1000, "aux_logits": True}
  got, fid = _shapes(variables), _shapes(converted[0])
  aux = {k for k in got if "/AuxLogits/" in k}
  assert len(aux) == 14 and set(got) - aux == set(fid)  # every manifest key mapped, nothing else
  for k in fid:
    expect = {"params/fc/kernel": (2048, 1000), "params/fc/bias": (1000,)}.get(k, fid[k])
    assert got[k] == expect, k
  assert got["params/Mixed_7c/branch3x3_2a/conv/kernel"] == (1, 3, 384, 384)  # OIHW -> HWIO


def test_aux_head_matches_torch(tv_state_dict):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  sd = tv_state_dict
  variables, config = convert_inception_v3(sd)
  x = np.random.default_rng(2).standard_normal((2, 17, 17, 768)).astype(np.float32)
  aux_vars = {c: v["AuxLogits"] for c, v in variables.items()}
  got = jax.jit(inception.InceptionAux(config["num_classes"]).apply)(aux_vars, x)

  t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items() if k.startswith("AuxLogits.")}
  def basic(h, name):
    h = F.conv2d(h, t[f"{name}.conv.weight"])
    h = F.batch_norm(h, t[f"{name}.bn.running_mean"], t[f"{name}.bn.running_var"],
                     t[f"{name}.bn.weight"], t[f"{name}.bn.bias"], False, 0.0, 1e-3)
    return F.relu(h)
  h = F.avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 5, stride=3)
  h = basic(basic(h, "AuxLogits.conv0"), "AuxLogits.conv1")
  ref = F.linear(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1), t["AuxLogits.fc.weight"],
                 t["AuxLogits.fc.bias"]).numpy()
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)


def test_wrong_keys_fail_naming_the_key(fid_state_dict, tv_state_dict):
  sd = fid_state_dict
  missing = dict(sd)
  del missing["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  with pytest.raises(ConversionError,
                     match=r"missing key 'Mixed_6c\.branch7x7dbl_3\.bn\.running_var'"):
    convert_inception_v3_fid(missing)
  with pytest.raises(ConversionError, match=r"unknown key 'Mixed_8a\.conv\.weight'"):
    convert_inception_v3_fid({**sd, "Mixed_8a.conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
  wrong = {**sd, "Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3), np.float32)}
  with pytest.raises(ConversionError, match=r"'Mixed_5b\.branch5x5_2\.conv\.weight' has shape "
                     r"\(64, 48, 3, 3\), expected \(64, 48, 5, 5\)"):
    convert_inception_v3_fid(wrong)
  with pytest.raises(ConversionError, match=r"unexpected key 'AuxLogits\..*family inception_v3"):
    convert_inception_v3_fid(tv_state_dict)
  no_bn_count = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  variables, _ = convert_inception_v3_fid(no_bn_count)  # a state dict without the counters
  assert variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["num_batches_tracked"] == 0
