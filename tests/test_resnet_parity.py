"""Parity of the Flax ResNet / InvariantEnsemble with torch, and the strictness of their converters.

* Every ``invariant_ensemble*`` fixture (its own case; the authors' class, eval mode): every array it
  holds, via ``parity.check_fixture``; the architecture is read from the fixture, the weights go
  .pth -> ``convert_file`` -> Orbax -> ``resnet.load``.
* ``resnet50_manifest.json``: random torchvision ResNet-50 and ensemble state dicts of exactly the
  manifest's keys and shapes go through the real path (torch.save -> convert -> load -> forward)
  and are compared with a torch.nn.functional forward of the same tensors. That reference covers
  what the [1,1,1,1] fixture cannot: blocks after the first of a stage (identity shortcut).
* The same reference in train mode checks the BatchNorm batch statistics and running-stat updates
  on a small (2,1,1,2) ResNet; the converter infers that architecture from the shapes alone.
* The authors' saved format (``{'state_dict': ..., 'optimizer': ...}``, ``module.`` keys), and an
  extra / missing / foreign key each failing with a ConversionError naming it.
Tolerances: ``parity.TOLERANCES`` ("resnet/*").
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgn_jax.models import resnet
from converters.common import ConversionError, load_torch_state_dict
from converters.registry import convert_file, convert_state_dict
from conftest import fixture_stems, load_fixture, nchw_to_nhwc
from parity import REPORT, TOLERANCES, Fixture, ParityError, Rule, check_fixture, compare

INPUTS = [r"seed|width|num_classes|blocks", r"input"]
R50 = ((3, 4, 6, 3), 64, 1000)


def _torchvision_shapes(blocks, width: int, num_classes: int) -> dict[str, tuple[int, ...]]:
  """Key -> shape of torchvision's ``ResNet(Bottleneck, blocks)`` state dict (checked against the
  manifest below), so that any architecture can be generated without torchvision."""
  out: dict[str, tuple[int, ...]] = {}

  def conv_bn(conv, bn, cin, cout, k):
    out[f"{conv}.weight"] = (cout, cin, k, k)
    for buf in ("weight", "bias", "running_mean", "running_var"):
      out[f"{bn}.{buf}"] = (cout,)
    out[f"{bn}.num_batches_tracked"] = ()

  conv_bn("conv1", "bn1", 3, width, 7)
  cin = width
  for s, n in enumerate(blocks):
    planes = width * 2 ** s
    for j in range(n):
      t = f"layer{s + 1}.{j}"
      conv_bn(f"{t}.conv1", f"{t}.bn1", cin, planes, 1)
      conv_bn(f"{t}.conv2", f"{t}.bn2", planes, planes, 3)
      conv_bn(f"{t}.conv3", f"{t}.bn3", planes, 4 * planes, 1)
      if j == 0:
        conv_bn(f"{t}.downsample.0", f"{t}.downsample.1", cin, 4 * planes, 1)
      cin = 4 * planes
  out["fc.weight"], out["fc.bias"] = (num_classes, cin), (num_classes,)
  return out


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """Plausible values: convs N(0, 1/fan_in), BN weight U(0.5, 1) (bn3 U(0.1, 0.3), so that 16
  residual additions keep the stream at |x| ~ 10), running var U(0.5, 1.5)."""
  rng = np.random.default_rng(seed)
  sd = collections.OrderedDict()
  for key, shape in shapes.items():
    if key.endswith("num_batches_tracked"):
      sd[key] = np.asarray(rng.integers(0, 1000), np.int64)
    elif key.endswith("running_var"):
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif key.endswith("running_mean") or key.endswith("bias"):
      sd[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    elif len(shape) == 4 or key.endswith("fc.weight"):
      sd[key] = (rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    else:  # BN weight
      lo, hi = (0.1, 0.3) if ".bn3." in key else (0.5, 1.0)
      sd[key] = rng.uniform(lo, hi, shape).astype(np.float32)
  return sd


def _as_ensemble(sd: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
  """A torchvision state dict renamed as the authors' ensemble (children index) with three heads."""
  rename = {"conv1": "backbone.0", "bn1": "backbone.1",
            **{f"layer{i}": f"backbone.{3 + i}" for i in range(1, 5)}}
  out = collections.OrderedDict()
  for key, value in sd.items():
    head, _, rest = key.partition(".")
    if head != "fc":
      out[f"{rename[head]}.{rest}"] = value
  rng = np.random.default_rng(seed)
  n, c = sd["fc.weight"].shape
  for h in resnet.HEADS:
    out[f"{h}.1.weight"] = rng.uniform(-1, 1, (n, c)).astype(np.float32) / np.sqrt(c)
    out[f"{h}.1.bias"] = rng.uniform(-1, 1, (n,)).astype(np.float32) / np.sqrt(c)
  return out


def _save(sd: dict[str, np.ndarray], path) -> str:
  torch.save(collections.OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in sd.items()),
             str(path))
  return str(path)


def _torch_features(sd: dict[str, np.ndarray], x: np.ndarray, train: bool = False
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """torch.nn.functional forward of a torchvision-named state dict -> (pooled features, updated
  running stats {bn key: array} when ``train``). Independent of the port: torch's own padding,
  pooling and batch-norm kernels."""
  t = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  stats = {}

  def bn(key, h):
    mean, var = t[f"{key}.running_mean"].clone(), t[f"{key}.running_var"].clone()
    h = F.batch_norm(h, mean, var, t[f"{key}.weight"], t[f"{key}.bias"], training=train,
                     momentum=0.1, eps=1e-5)
    stats[f"{key}.running_mean"], stats[f"{key}.running_var"] = mean.numpy(), var.numpy()
    return h

  with torch.no_grad():
    h = F.relu(bn("bn1", F.conv2d(torch.from_numpy(x), t["conv1.weight"], stride=2, padding=3)))
    h = F.max_pool2d(h, 3, 2, 1)
    for s in range(1, 5):
      j = 0
      while f"layer{s}.{j}.conv1.weight" in t:
        p, stride = f"layer{s}.{j}", 2 if s > 1 and j == 0 else 1
        out = F.relu(bn(f"{p}.bn1", F.conv2d(h, t[f"{p}.conv1.weight"])))
        out = F.relu(bn(f"{p}.bn2", F.conv2d(out, t[f"{p}.conv2.weight"], stride=stride, padding=1)))
        out = bn(f"{p}.bn3", F.conv2d(out, t[f"{p}.conv3.weight"]))
        if f"{p}.downsample.0.weight" in t:
          h = bn(f"{p}.downsample.1", F.conv2d(h, t[f"{p}.downsample.0.weight"], stride=stride))
        h, j = F.relu(out + h), j + 1
    return h.mean((2, 3)).numpy(), stats


def _linear(sd, key, feats):
  return feats @ sd[f"{key}.weight"].T.astype(np.float64) + sd[f"{key}.bias"]


def _compare(actual, expected, tol: str, name: str) -> float:
  """``parity.compare``, recorded for the CGN_PARITY_REPORT table like ``check_fixture``'s rows."""
  err = compare(actual, expected, tol, name)
  REPORT.append(("resnet (torch.nn.functional)", name, tol, err, TOLERANCES[tol]))
  return err


@functools.lru_cache(maxsize=None)
def _ensemble_fn(model: resnet.InvariantEnsemble):
  """Jitted (features, output dict) of ``model``, cached so that tests share compilations."""
  return jax.jit(lambda v, x: (model.apply(v, x, method="features"), model.apply(v, x)))


# ---------------------------------------------------------------------------------------------
# The authors' InvariantEnsemble fixtures.

@pytest.mark.parametrize("stem", fixture_stems("invariant_ensemble"))
def test_invariant_ensemble_fixture(fixtures_dir, stem, tmp_path):
  fx = Fixture(load_fixture(fixtures_dir, stem), stem)
  meta = convert_file("invariant_ensemble", os.path.join(fixtures_dir, stem + ".pth"),
                      str(tmp_path / "ckpt"))
  assert meta["model_config"] == {"blocks": [int(b) for b in fx["blocks"]], "width": int(fx["width"]),
                                  "num_classes": int(fx["num_classes"])}
  model, variables = resnet.load(str(tmp_path / "ckpt"))
  assert isinstance(model, resnet.InvariantEnsemble)
  run = functools.cache(lambda: _ensemble_fn(model)(variables, nchw_to_nhwc(fx["input"])))

  def pred(m):
    if m[1] not in resnet.OUTPUT_KEYS:
      raise ParityError(f"{m.string}: the ensemble has no output '{m[1]}' (known: {resnet.OUTPUT_KEYS})")
    return np.asarray(run()[1][m[1]])

  rules = [Rule(r"eval_backbone_out", "resnet/out", lambda m: np.asarray(run()[0])[:, :, None, None]),
           Rule(r"eval_(\w+)", "resnet/out", pred)]
  check_fixture(fx, rules, INPUTS, stem)


def _fixture_sd(fixtures_dir: str) -> dict[str, np.ndarray]:
  load_fixture(fixtures_dir, "invariant_ensemble_small")  # skips (fails under CI) when absent
  return load_torch_state_dict(os.path.join(fixtures_dir, "invariant_ensemble_small.pth"))


def test_authors_checkpoint_format_and_loader_cache(fixtures_dir, tmp_path):
  """train_classifier.py saves {'state_dict': DataParallel state dict, 'optimizer': ...}."""
  sd = _fixture_sd(fixtures_dir)
  plain, cfg = convert_state_dict("invariant_ensemble", sd)
  src = str(tmp_path / "checkpoint.pth")
  torch.save({"epoch": 3, "arch": "resnet50", "best_acc1_overall": 12.5,
              "state_dict": collections.OrderedDict(
                  (f"module.{k}", torch.from_numpy(np.asarray(v))) for k, v in sd.items()),
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}, src)
  model, from_file = resnet.load(src, str(tmp_path / "cache"))  # a .pth defaults to the ensemble
  assert os.listdir(tmp_path / "cache") == ["invariant_ensemble_checkpoint"]
  assert model == resnet.InvariantEnsemble(**{**cfg, "blocks": tuple(cfg["blocks"])})
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_file, plain)
  # One array per torch key: nothing dropped, nothing invented.
  assert len(jax.tree_util.tree_leaves(from_file)) == len(sd)


def test_bf16_close_to_float32(fixtures_dir):
  variables, cfg = convert_state_dict("invariant_ensemble", _fixture_sd(fixtures_dir))
  cfg["blocks"] = tuple(cfg["blocks"])
  x = nchw_to_nhwc(load_fixture(fixtures_dir, "invariant_ensemble_small")["input"])
  outs = {dtype: _ensemble_fn(resnet.InvariantEnsemble(**cfg, dtype=dtype))(variables, x)[1]
          for dtype in (jnp.float32, jnp.bfloat16)}
  assert all(v.dtype == jnp.float32 for v in outs[jnp.bfloat16].values())  # float32 logits
  for key in resnet.OUTPUT_KEYS:
    a, b = np.asarray(outs[jnp.bfloat16][key]), np.asarray(outs[jnp.float32][key])
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    bound = TOLERANCES["self/resnet_bf16_rel_l2"].atol
    assert rel < bound, f"{key}: bf16 relative error {rel:.3g} >= {bound}"


# ---------------------------------------------------------------------------------------------
# Full-size ResNet-50 state dicts of the manifest.

@pytest.fixture(scope="module")
def manifest(fixtures_dir) -> dict[str, dict[str, tuple[int, ...]]]:
  with open(os.path.join(fixtures_dir, "resnet50_manifest.json")) as f:
    raw = json.load(f)
  return {name: {k: tuple(shape) for k, (shape, _) in keys.items()} for name, keys in raw.items()}


@pytest.fixture(scope="module")
def r50_sd(manifest) -> dict[str, np.ndarray]:
  return _random_state_dict(manifest["torchvision_resnet50"])


def test_key_generator_reproduces_the_manifests(manifest, r50_sd):
  assert len(manifest["torchvision_resnet50"]) == 320
  assert len(manifest["invariant_ensemble_resnet50"]) == 324
  assert list(_torchvision_shapes(*R50).items()) == list(manifest["torchvision_resnet50"].items())
  ens = _as_ensemble(r50_sd)
  assert {k: v.shape for k, v in ens.items()} == manifest["invariant_ensemble_resnet50"]


X64 = np.random.default_rng(5).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)


def test_torchvision_resnet50_converts_loads_and_matches_torch(r50_sd, tmp_path):
  meta = convert_file("resnet50", _save(r50_sd, tmp_path / "resnet50.pth"), str(tmp_path / "ckpt"))
  assert meta["model_config"] == {"blocks": [3, 4, 6, 3], "width": 64, "num_classes": 1000}
  model, variables = resnet.load(str(tmp_path / "ckpt"))
  assert model == resnet.ResNet()
  assert len(jax.tree_util.tree_leaves(variables)) == len(r50_sd)
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), t)
  expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))
  assert shapes(variables) == shapes(expected)
  logits = jax.jit(model.apply)(variables, nchw_to_nhwc(X64))
  assert logits.shape == (1, 1000)
  ref_feats, _ = _torch_features(r50_sd, X64)
  _compare(logits, _linear(r50_sd, "fc", ref_feats.astype(np.float64)), "resnet/random_weights",
          "resnet50 logits")


def test_invariant_ensemble_resnet50_converts_loads_and_runs(r50_sd, tmp_path):
  ens = _as_ensemble(r50_sd)
  src = _save({f"module.{k}": v for k, v in ens.items()}, tmp_path / "ensemble.pth")  # DataParallel
  model, variables = resnet.load(src, str(tmp_path / "cache"))
  assert model == resnet.InvariantEnsemble()
  assert len(jax.tree_util.tree_leaves(variables)) == len(ens)
  out = jax.jit(model.apply)(variables, nchw_to_nhwc(X64))
  assert {k: v.shape for k, v in out.items()} == {k: (1, 1000) for k in resnet.OUTPUT_KEYS}
  f64 = _torch_features(r50_sd, X64)[0].astype(np.float64)
  ref = {h: _linear(ens, f"{h}.1", f64) for h in resnet.HEADS}
  ref = {"shape_preds": ref["m_shape"], "texture_preds": ref["m_texture"], "bg_preds": ref["m_bg"],
         "avg_preds": (ref["m_shape"] + ref["m_texture"] + ref["m_bg"]) / 3,
         "shape_texture_preds": (ref["m_shape"] + ref["m_texture"]) / 2}
  for key in resnet.OUTPUT_KEYS:
    _compare(out[key], ref[key], "resnet/random_weights", f"ensemble {key}")


def _raises(family: str, sd, pattern: str) -> None:
  with pytest.raises(ConversionError, match=pattern) as info:
    convert_state_dict(family, sd)
  assert "\n" not in str(info.value)


def test_extra_missing_and_foreign_keys_name_the_key(r50_sd):
  ens = _as_ensemble(r50_sd)
  _raises("resnet50", {**r50_sd, "layer2.0.conv4.weight": np.zeros(3, np.float32)},
          r"unknown key 'layer2\.0\.conv4\.weight'")
  _raises("invariant_ensemble", {**ens, "m_shape.2.weight": np.zeros(3, np.float32)},
          r"unknown key 'm_shape\.2\.weight'")
  for family, sd, key in (("resnet50", r50_sd, "layer3.4.bn2.running_var"),
                          ("invariant_ensemble", ens, "backbone.6.4.bn2.running_var"),
                          ("invariant_ensemble", ens, "m_bg.1.bias")):
    _raises(family, {k: v for k, v in sd.items() if k != key}, rf"missing key '{re.escape(key)}'")
  _raises("resnet50", {**r50_sd, "layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)},
          r"'layer1\.0\.conv2\.weight' has shape \(64, 64, 1, 1\)")
  _raises("invariant_ensemble", r50_sd, r"missing key 'backbone\.0\.weight'")  # wrong family
  _raises("resnet50", ens, r"missing key 'conv1\.weight'")
  wide = _random_state_dict(_torchvision_shapes((1, 1, 1, 1), 8, 10))
  wide["layer1.0.conv1.weight"] = np.zeros((16, 8, 1, 1), np.float32)  # wide_resnet's 2x inner width
  _raises("resnet50", wide, r"'layer1\.0\.conv1\.weight' has 16 outputs.*not supported")


# ---------------------------------------------------------------------------------------------
# A small ResNet of another depth, in train mode.

def test_small_resnet_train_mode_matches_torch():
  blocks, width, num_classes = (2, 1, 1, 2), 8, 7
  sd = _random_state_dict(_torchvision_shapes(blocks, width, num_classes), seed=3)
  variables, cfg = convert_state_dict("resnet50", sd)
  assert cfg == {"blocks": list(blocks), "width": width, "num_classes": num_classes}
  model = resnet.ResNet(blocks, width, num_classes)
  x = np.random.default_rng(4).uniform(-1, 1, (4, 3, 36, 36)).astype(np.float32)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, new = fwd(variables, nchw_to_nhwc(x))
  ref_feats, ref_stats = _torch_features(sd, x, train=True)
  _compare(logits, _linear(sd, "fc", ref_feats.astype(np.float64)), "resnet/random_weights",
           "small resnet train-mode logits")
  layer = lambda key: re.sub(r"^layer(\d)\.(\d+)\.", r"layer\1_\2/", key)
  for key, ref in ref_stats.items():
    path, buf = layer(key).replace("downsample.1", "downsample_bn").rsplit(".", 1)
    node = new["batch_stats"]
    for part in path.split("/"):
      node = node[part]
    _compare(node[{"running_mean": "mean", "running_var": "var"}[buf]], ref, "resnet/bn_running", key)
    nbt = node["num_batches_tracked"]
    assert int(nbt) == int(sd[f"{key.rsplit('.', 1)[0]}.num_batches_tracked"]) + 1, key


def test_ensemble_from_pretrained_resnet():
  """InvariantEnsemble(arch, pretrained=True): torchvision backbone, fresh, distinct heads."""
  sd = _random_state_dict(_torchvision_shapes((1, 1, 1, 1), 8, 10), seed=6)
  rn_vars, _ = convert_state_dict("resnet50", sd)
  model = resnet.InvariantEnsemble((1, 1, 1, 1), 8, 10)
  variables = resnet.ensemble_from_resnet(rn_vars, jax.random.key(0), model)
  # Shapes only: compiling a full init takes ~20 s on CPU (XLA's random-bit generation).
  fresh = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))), jax.random.key(0))
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), t)
  assert shapes(variables) == shapes(fresh)
  assert not np.allclose(variables["params"]["m_shape"]["kernel"], variables["params"]["m_bg"]["kernel"])
  bound = 1 / np.sqrt(resnet.num_features(8))  # torch's default Linear init: U(-1/sqrt(in), ..)
  assert np.abs(variables["params"]["m_texture"]["kernel"]).max() <= bound
  np.testing.assert_array_equal(variables["params"]["backbone"]["layer3_0"]["conv2"]["kernel"],
                                rn_vars["params"]["layer3_0"]["conv2"]["kernel"])
  with pytest.raises(ValueError, match="blocks or width"):
    resnet.ensemble_from_resnet(rn_vars, jax.random.key(0), resnet.InvariantEnsemble((1, 2, 1, 1), 8, 10))
