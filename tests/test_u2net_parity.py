"""Parity of the Flax U2-Net with the authors' PyTorch U2NETP, and of its two torch-specific ops.

* Every ``u2netp*`` fixture (its own test case): every array it holds (final map, d0 logits,
  stages and side outputs), via ``parity.check_fixture``; an unknown array fails, naming it.
* The align_corners=True bilinear resize and the ceil-mode max pool against torch.nn.functional on
  odd, non-square sizes — the fixture's 64x64 input never exercises an odd side.
* A non-square, non-power-of-two forward: stage sizes follow ceil division, and the fusion of the
  side outputs equals torch's interpolate + conv2d applied to our own side maps.
* bf16 compute stays close (relative error) to float32.
Tolerances (torch-vs-torch noise of the fixtures README, and the measured self-consistency noise):
``parity.TOLERANCES``.
* Optional: with ``CGN_AUTHORS_REPO`` pointing at a checkout of the authors' code, the whole
  non-square forward against their class (skipped otherwise; their file is never copied here).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgn_jax.models.layers import max_pool_torch
from cgn_jax.models.u2net import U2Net, resize_bilinear_align_corners
from converters.common import load_torch_state_dict
from converters.u2net import convert_u2net
from conftest import assert_close, fixture_stems, load_fixture, nchw_to_nhwc
from parity import TOLERANCES, Fixture, ParityError, Rule, check_fixture, compare

INPUTS = [r"seed", r"input"]


@functools.lru_cache(maxsize=None)
def _model(fixtures_dir: str, stem: str, dtype=jnp.float32):
  """(torch state dict, variables, jitted debug forward); cached so that tests share compilations."""
  sd = load_torch_state_dict(os.path.join(fixtures_dir, stem + ".pth"))
  variables, cfg = convert_u2net(sd)
  model = U2Net(**cfg, dtype=dtype)
  return sd, variables, jax.jit(lambda v, x: model.apply(v, x, debug=True))


def _nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def _check(fixtures_dir: str, stem: str, arrays) -> dict[str, float]:
  """Compares every array of ``arrays`` (the fixture or a subset of it) with the port."""
  fx = Fixture(arrays, stem)
  _, variables, fwd = _model(fixtures_dir, stem)
  run = functools.cache(lambda: fwd(variables, nchw_to_nhwc(fx["input"])))

  def debug(m):
    inter = run()[1]
    if m[1] not in inter:
      raise ParityError(f"{m.string}: the port has no debug output '{m[1]}' (known: {sorted(inter)})")
    return _nchw(inter[m[1]])

  rules = [Rule(r"eval_out", "u2netp/map", lambda m: _nchw(run()[0])),
           Rule(r"eval_(\w+)", "u2netp/map", debug)]
  return check_fixture(fx, rules, INPUTS, stem)


@pytest.mark.parametrize("stem", fixture_stems("u2netp"))
def test_u2netp_fixture(fixtures_dir, stem):
  _check(fixtures_dir, stem, load_fixture(fixtures_dir, stem))


def test_reduced_fixture_is_checked_on_the_arrays_it_holds(fixtures_dir, tmp_path):
  full = load_fixture(fixtures_dir, "u2netp")
  keep = ("input", "eval_out", "eval_stage4d", "eval_side3")
  np.savez(tmp_path / "u2netp.npz", **{k: full[k] for k in keep})
  assert set(_check(fixtures_dir, "u2netp", load_fixture(str(tmp_path), "u2netp"))) == set(keep[1:])
  with pytest.raises(ParityError, match="eval_stage7"):
    _check(fixtures_dir, "u2netp", {**full, "eval_stage7": full["eval_stage6"]})
  with pytest.raises(ParityError, match="side_extra"):
    _check(fixtures_dir, "u2netp", {**full, "side_extra": full["eval_side1"]})
  with pytest.raises(ParityError, match="lacks 'input'"):
    _check(fixtures_dir, "u2netp", {"eval_side3": full["eval_side3"]})


@pytest.mark.parametrize("size", [(37, 23), (23, 37), (64, 64), (1, 1), (50, 19), (10, 7), (4, 3),
                                  (37, 1), (74, 46), (2, 2)])
def test_resize_bilinear_align_corners_matches_torch(size):
  x = torch.randn(2, 3, 37, 23, generator=torch.Generator().manual_seed(sum(size)))
  ref = F.interpolate(x, size=size, mode="bilinear", align_corners=True).numpy()
  got = resize_bilinear_align_corners(jnp.asarray(nchw_to_nhwc(x.numpy())), size)
  assert_close(got, nchw_to_nhwc(ref), atol=1e-6, rtol=1e-6, name=f"resize 37x23->{size}")


@pytest.mark.parametrize("hw", [(37, 23), (25, 19), (13, 10), (7, 5), (2, 2), (1, 1), (1, 3)])
def test_max_pool_ceil_mode_matches_torch(hw):
  x = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(hw[0] * 100 + hw[1]))
  ref = F.max_pool2d(x, 2, stride=2, ceil_mode=True).numpy()
  got = max_pool_torch(jnp.asarray(nchw_to_nhwc(x.numpy())), 2, 2, ceil_mode=True)
  assert_close(got, nchw_to_nhwc(ref), atol=0, name=f"max_pool ceil {hw}")


@functools.lru_cache(maxsize=None)
def _non_square_forward(fixtures_dir):
  """Fixture weights, batch 1, 50x38 input; returns (torch state dict, input NCHW, out, intermediates)."""
  load_fixture(fixtures_dir, "u2netp")  # skips (fails under CI) when the fixture is absent
  sd, variables, fwd = _model(fixtures_dir, "u2netp")
  x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 50, 38)).astype(np.float32)
  out, inter = fwd(variables, nchw_to_nhwc(x))
  return sd, x, out, inter


def test_non_square_shapes_and_fusion(fixtures_dir):
  sd, x, out, inter = _non_square_forward(fixtures_dir)
  h, w = x.shape[2:]
  side = lambda k: (math.ceil(h / 2 ** (k - 1)), math.ceil(w / 2 ** (k - 1)))  # ceil-mode chain
  assert out.shape == (1, h, w, 1)
  for k, name in ((3, "stage3"), (4, "stage4"), (5, "stage5"), (6, "stage6"), (5, "stage5d"),
                  (4, "stage4d"), (3, "stage3d")):
    assert inter[name].shape == (1, *side(k), 64), name
  for k in range(1, 7):
    assert inter[f"side{k}"].shape == (1, *side(k), 1), f"side{k}"
  # The fused map is outconv(cat(upsampled sides)); rebuild it with torch from our side maps.
  sides = [torch.from_numpy(np.array(inter[f"side{k}"]).transpose(0, 3, 1, 2)) for k in range(1, 7)]
  ups = [F.interpolate(s, size=(h, w), mode="bilinear", align_corners=True) for s in sides]
  d0 = F.conv2d(torch.cat(ups, 1), torch.from_numpy(sd["outconv.weight"]),
                torch.from_numpy(sd["outconv.bias"])).numpy()
  compare(inter["d0_logits"], nchw_to_nhwc(d0), "self/u2net_fusion", "d0 from torch fusion")
  compare(out, nchw_to_nhwc(1 / (1 + np.exp(-d0))), "self/u2net_fusion", "sigmoid(d0)")


def test_bf16_close_to_float32(fixtures_dir):
  fx = load_fixture(fixtures_dir, "u2netp")
  x = nchw_to_nhwc(fx["input"])
  _, variables, fwd32 = _model(fixtures_dir, "u2netp")
  _, _, fwd16 = _model(fixtures_dir, "u2netp", jnp.bfloat16)
  out32, i32 = fwd32(variables, x)
  out16, i16 = fwd16(variables, x)
  assert out16.dtype == jnp.float32 and i16["stage3"].dtype == jnp.bfloat16
  for key in ("stage3", "stage3d", "d0_logits"):
    a, b = np.asarray(i16[key], np.float32), np.asarray(i32[key])
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    bound = TOLERANCES["self/u2net_bf16_rel_l2"].atol  # measured <= 0.55%; see the table
    assert rel < bound, f"{key}: bf16 relative error {rel:.3g} >= {bound}"
  compare(out16, out32, "self/u2net_bf16_out", "bf16 vs f32 sigmoid output")


def _load_authors_u2net(repo: str):
  """Imports imagenet/models/u2net.py from a checkout of the authors' code (never copied here)."""
  if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
    # Their file imports torchvision.models without using it; a stub keeps torchvision optional.
    stub = types.ModuleType("torchvision")
    stub.models = types.ModuleType("torchvision.models")
    sys.modules["torchvision"] = stub
  spec = importlib.util.spec_from_file_location(
      "authors_u2net", os.path.join(repo, "imagenet", "models", "u2net.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_non_square_against_authors_class(fixtures_dir):
  repo = os.environ.get("CGN_AUTHORS_REPO")
  if not repo:
    pytest.skip("set CGN_AUTHORS_REPO to a checkout of the authors' code to run this comparison")
  net = _load_authors_u2net(repo).U2NETP(3, 1).eval()
  net.load_state_dict(torch.load(os.path.join(fixtures_dir, "u2netp.pth"), weights_only=True))
  _, x, out, _ = _non_square_forward(fixtures_dir)
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()
  assert_close(out, nchw_to_nhwc(ref), atol=1e-5, name="authors' U2NETP 50x38")
