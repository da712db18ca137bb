"""torchvision Bottleneck ResNets and the authors' InvariantEnsemble -> ``cgn_jax.models.resnet``.

Two namings of one backbone: torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``) and
the ensemble's, whose backbone is ``nn.Sequential(*resnet.children()[:-1])`` and so is numbered by
child index (``backbone.0`` conv1, ``.1`` bn1, ``.2`` ReLU, ``.3`` maxpool, ``.4``-``.7`` layer1-4,
``.8`` avgpool; only the indices with weights appear) next to heads ``m_{shape,texture,bg}.1``
(index 0 is a Flatten). ``blocks``, ``width`` and ``num_classes`` are read off the shapes, so
ResNet-50/101/152 and the small width-8 fixture convert alike; wide and grouped variants
(``wide_resnet50_2``, ``resnext``) have a Bottleneck inner width != planes and are refused.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from cgn_jax.models.resnet import EXPANSION, HEADS, num_features
from converters.common import ConversionError, StateDictReader, infer_dim
from converters.imagenet_cgn import strip_data_parallel

ENSEMBLE_STAGE0 = 4  # backbone child index of layer1


def _infer_arch(sd: Mapping[str, np.ndarray], family: str, stem: str,
                layer: Callable[[int], str]) -> tuple[list[int], int]:
  """(blocks per stage, width) from the stem conv and the ``<layer>.<j>.conv1`` keys present."""
  width = infer_dim(sd, f"{stem}.weight", 0, family)
  blocks = []
  for stage in range(4):
    n = 0
    while f"{layer(stage)}.{n}.conv1.weight" in sd:
      n += 1
    if n == 0:
      raise ConversionError(f"{family}: missing key '{layer(stage)}.0.conv1.weight' "
                            f"(is this a {family} checkpoint?)")
    blocks.append(n)
  inner = infer_dim(sd, f"{layer(0)}.0.conv1.weight", 0, family)
  if inner != width:
    raise ConversionError(
        f"{family}: key '{layer(0)}.0.conv1.weight' has {inner} outputs for a stem of {width}; "
        "wide or grouped Bottlenecks (wide_resnet, resnext) are not supported")
  return blocks, width


def _conv_bn(r: StateDictReader, params: dict, stats: dict, flax_conv: str, flax_bn: str,
             conv_key: str, bn_key: str, cin: int, cout: int, k: int) -> None:
  params[flax_conv] = r.conv(conv_key, cin, cout, k, bias=False)
  params[flax_bn], stats[flax_bn] = r.batch_norm(bn_key, cout)


def read_backbone(r: StateDictReader, stem_conv: str, stem_bn: str, layer: Callable[[int], str],
                  blocks: list[int], width: int) -> tuple[dict, dict]:
  """Every key of the stem and the four stages -> (params, batch_stats) of ``ResNet``'s layers."""
  params: dict = {}
  stats: dict = {}
  _conv_bn(r, params, stats, "conv1", "bn1", stem_conv, stem_bn, 3, width, 7)
  cin = width
  for stage, n in enumerate(blocks):
    planes = width * 2 ** stage
    for j in range(n):
      t = f"{layer(stage)}.{j}"
      p: dict = {}
      s: dict = {}
      _conv_bn(r, p, s, "conv1", "bn1", f"{t}.conv1", f"{t}.bn1", cin, planes, 1)
      _conv_bn(r, p, s, "conv2", "bn2", f"{t}.conv2", f"{t}.bn2", planes, planes, 3)
      _conv_bn(r, p, s, "conv3", "bn3", f"{t}.conv3", f"{t}.bn3", planes, planes * EXPANSION, 1)
      # torchvision adds the downsample exactly where the module does: first block of each stage
      # when the stride or the channel count changes (always, for Bottlenecks).
      if j == 0 and (stage > 0 or cin != planes * EXPANSION):
        _conv_bn(r, p, s, "downsample_conv", "downsample_bn", f"{t}.downsample.0",
                 f"{t}.downsample.1", cin, planes * EXPANSION, 1)
      params[f"layer{stage + 1}_{j}"], stats[f"layer{stage + 1}_{j}"] = p, s
      cin = planes * EXPANSION
  return params, stats


def convert_resnet50(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """torchvision ``ResNet(Bottleneck, blocks)`` state dict -> ``ResNet`` variables and config."""
  fam = "resnet50"
  layer = lambda stage: f"layer{stage + 1}"
  blocks, width = _infer_arch(sd, fam, "conv1", layer)
  num_classes = infer_dim(sd, "fc.weight", 0, fam)
  r = StateDictReader(sd, fam)
  params, stats = read_backbone(r, "conv1", "bn1", layer, blocks, width)
  params["fc"] = r.linear("fc", num_features(width), num_classes)
  r.finish()
  return ({"params": params, "batch_stats": stats},
          {"blocks": blocks, "width": width, "num_classes": num_classes})


def convert_invariant_ensemble(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """The authors' ``InvariantEnsemble`` state dict (``module.`` prefix or not) -> variables, config.

  Their training script saves ``{'state_dict': model.state_dict(), 'optimizer': ...}`` from a
  (Distributed)DataParallel wrapper; ``load_torch_state_dict`` unwraps the dict, this strips the
  prefix.
  """
  fam = "invariant_ensemble"
  sd = strip_data_parallel(sd)
  layer = lambda stage: f"backbone.{ENSEMBLE_STAGE0 + stage}"
  blocks, width = _infer_arch(sd, fam, "backbone.0", layer)
  num_classes = infer_dim(sd, "m_shape.1.weight", 0, fam)
  r = StateDictReader(sd, fam)
  backbone, stats = read_backbone(r, "backbone.0", "backbone.1", layer, blocks, width)
  params = {"backbone": backbone}
  for head in HEADS:
    params[head] = r.linear(f"{head}.1", num_features(width), num_classes)
  r.finish()
  return ({"params": params, "batch_stats": {"backbone": stats}},
          {"blocks": blocks, "width": width, "num_classes": num_classes})
