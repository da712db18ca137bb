"""Inception-v3 state dicts -> ``cgn_jax.models.inception.InceptionV3`` (families ``inception_v3``
and ``inception_v3_fid``).

Both layouts are torchvision's ``Inception3`` attribute names; they differ in the head:

* ``inception_v3`` — torchvision's ``inception_v3_google-0cc3c7bd.pth`` (IMAGENET1K_V1):
  ``AuxLogits.*`` and ``fc`` [1000, 2048]. A model built with ``aux_logits=False`` (no
  ``AuxLogits.*``) converts too.
* ``inception_v3_fid`` — pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: no ``AuxLogits``
  and ``fc`` [1008, 2048] (the TF graph's 1008 logits).

Every conv is ``<name>.conv.weight`` (no bias) plus ``<name>.bn.{weight,bias,running_mean,
running_var[,num_batches_tracked]}``; the widths are fixed by the architecture, so every key is
checked by shape, and a missing, unexpected or mis-shaped key fails naming it. The number of
classes is read off ``fc.weight``.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from converters.common import ConversionError, StateDictReader, infer_dim

# (name, cin, cout, (kh, kw)) of every BasicConv2d, in torchvision's order.
Conv = tuple[str, int, int, tuple[int, int]]


def _a(name: str, cin: int, pool: int) -> Iterator[Conv]:
  for branch, ci, co, k in (("branch1x1", cin, 64, 1), ("branch5x5_1", cin, 48, 1),
                            ("branch5x5_2", 48, 64, 5), ("branch3x3dbl_1", cin, 64, 1),
                            ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3),
                            ("branch_pool", cin, pool, 1)):
    yield f"{name}.{branch}", ci, co, (k, k)


def _b(name: str, cin: int) -> Iterator[Conv]:
  for branch, ci, co, k in (("branch3x3", cin, 384, 3), ("branch3x3dbl_1", cin, 64, 1),
                            ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3)):
    yield f"{name}.{branch}", ci, co, (k, k)


def _c(name: str, c7: int) -> Iterator[Conv]:
  cin = 768
  yield from ((f"{name}.branch1x1", cin, 192, (1, 1)),
              (f"{name}.branch7x7_1", cin, c7, (1, 1)),
              (f"{name}.branch7x7_2", c7, c7, (1, 7)),
              (f"{name}.branch7x7_3", c7, 192, (7, 1)),
              (f"{name}.branch7x7dbl_1", cin, c7, (1, 1)),
              (f"{name}.branch7x7dbl_2", c7, c7, (7, 1)),
              (f"{name}.branch7x7dbl_3", c7, c7, (1, 7)),
              (f"{name}.branch7x7dbl_4", c7, c7, (7, 1)),
              (f"{name}.branch7x7dbl_5", c7, 192, (1, 7)),
              (f"{name}.branch_pool", cin, 192, (1, 1)))


def _d(name: str) -> Iterator[Conv]:
  cin = 768
  yield from ((f"{name}.branch3x3_1", cin, 192, (1, 1)),
              (f"{name}.branch3x3_2", 192, 320, (3, 3)),
              (f"{name}.branch7x7x3_1", cin, 192, (1, 1)),
              (f"{name}.branch7x7x3_2", 192, 192, (1, 7)),
              (f"{name}.branch7x7x3_3", 192, 192, (7, 1)),
              (f"{name}.branch7x7x3_4", 192, 192, (3, 3)))


def _e(name: str, cin: int) -> Iterator[Conv]:
  yield from ((f"{name}.branch1x1", cin, 320, (1, 1)),
              (f"{name}.branch3x3_1", cin, 384, (1, 1)),
              (f"{name}.branch3x3_2a", 384, 384, (1, 3)),
              (f"{name}.branch3x3_2b", 384, 384, (3, 1)),
              (f"{name}.branch3x3dbl_1", cin, 448, (1, 1)),
              (f"{name}.branch3x3dbl_2", 448, 384, (3, 3)),
              (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3)),
              (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1)),
              (f"{name}.branch_pool", cin, 192, (1, 1)))


def backbone_convs() -> Iterator[Conv]:
  """Every BasicConv2d from Conv2d_1a_3x3 to Mixed_7c (AuxLogits excluded)."""
  yield from (("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)),
              ("Conv2d_2b_3x3", 32, 64, (3, 3)), ("Conv2d_3b_1x1", 64, 80, (1, 1)),
              ("Conv2d_4a_3x3", 80, 192, (3, 3)))
  yield from _a("Mixed_5b", 192, 32)
  yield from _a("Mixed_5c", 256, 64)
  yield from _a("Mixed_5d", 288, 64)
  yield from _b("Mixed_6a", 288)
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    yield from _c(name, c7)
  yield from _d("Mixed_7a")
  yield from _e("Mixed_7b", 1280)
  yield from _e("Mixed_7c", 2048)


AUX_CONVS: tuple[Conv, ...] = (("AuxLogits.conv0", 768, 128, (1, 1)),
                               ("AuxLogits.conv1", 128, 768, (5, 5)))


def _put(tree: dict, dotted: str, value) -> None:
  *path, leaf = dotted.split(".")
  for part in path:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def _basic_conv(r: StateDictReader, params: dict, stats: dict, conv: Conv) -> None:
  name, cin, cout, (kh, kw) = conv
  _put(params, f"{name}.conv", r.conv(f"{name}.conv", cin, cout, kh, kw, bias=False))
  bn_params, bn_stats = r.batch_norm(f"{name}.bn", cout)
  # A state dict saved without the counters (older torch, a hand-made port) converts too; the
  # module holds one, and eval mode never reads it.
  bn_stats.setdefault("num_batches_tracked", np.zeros((), np.int32))
  _put(params, f"{name}.bn", bn_params)
  _put(stats, f"{name}.bn", bn_stats)


def _convert(sd: Mapping[str, np.ndarray], family: str, aux: bool) -> tuple[dict, dict]:
  num_classes = infer_dim(sd, "fc.weight", 0, family)
  r = StateDictReader(sd, family)
  params: dict = {}
  stats: dict = {}
  for conv in backbone_convs():
    _basic_conv(r, params, stats, conv)
  if aux:
    for conv in AUX_CONVS:
      _basic_conv(r, params, stats, conv)
    params["AuxLogits"]["fc"] = r.linear("AuxLogits.fc", 768, num_classes)
  params["fc"] = r.linear("fc", 2048, num_classes)
  r.finish()
  return ({"params": params, "batch_stats": stats},
          {"num_classes": num_classes, "aux_logits": aux})


def convert_inception_v3(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """torchvision ``Inception3`` state dict (with or without ``AuxLogits``) -> variables, config."""
  return _convert(sd, "inception_v3", aux=any(k.startswith("AuxLogits.") for k in sd))


def convert_inception_v3_fid(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """pytorch-fid's ``pt_inception-2015-12-05`` state dict -> variables, config."""
  aux = sorted(k for k in sd if k.startswith("AuxLogits."))
  if aux:
    raise ConversionError(
        f"inception_v3_fid: unexpected key '{aux[0]}': an AuxLogits head is torchvision's "
        "inception_v3 layout (convert it as family inception_v3); pytorch-fid's "
        "pt_inception-2015-12-05 weights have none")
  return _convert(sd, "inception_v3_fid", aux=False)
