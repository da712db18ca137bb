"""u2net.pth / u2netp.pth (or the U2-Net inside the ImageNet CGN's cgn.pth) -> Flax variables.

The Flax module keeps torch's module names, so each key maps by swapping separators:
``stage1.rebnconvin.conv_s1.weight`` -> params ``stage1/rebnconvin/conv_s1/kernel`` (OIHW -> HWIO),
``...bn_s1.running_mean`` -> batch_stats ``.../bn_s1/mean``. The variant is read off the widths.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from converters.common import ConversionError, StateDictReader
from cgn_jax.models.u2net import HEIGHTS, SIDE_SOURCES, STAGES, WIDTHS

FAMILY = "u2net"


def _rsu_convs(height: int, cin: int, mid: int, out: int) -> list[tuple[str, int, int]]:
  """(name, in_ch, out_ch) of every REBNCONV of one RSU block, in torch's registration order."""
  levels = 4 if height == 0 else height
  convs = [("rebnconvin", cin, out), ("rebnconv1", out, mid)]
  convs += [(f"rebnconv{i}", mid, mid) for i in range(2, levels + 1)]
  convs += [(f"rebnconv{i}d", 2 * mid, mid) for i in range(levels - 1, 1, -1)]
  return convs + [("rebnconv1d", 2 * mid, out)]


def _stage_inputs(in_ch: int, outs: dict[str, int]) -> dict[str, int]:
  """Input channels per stage: encoder chains, decoder stages see [upsampled deeper, skip]."""
  cins = {"stage1": in_ch}
  for prev, name in zip(STAGES[:5], STAGES[1:6]):
    cins[name] = outs[prev]
  for deeper, name, skip in zip(("stage6",) + STAGES[6:10], STAGES[6:],
                                ("stage5", "stage4", "stage3", "stage2", "stage1")):
    cins[name] = outs[deeper] + outs[skip]
  return cins


def detect_variant(reader: StateDictReader) -> str:
  """'u2net' or 'u2netp' from stage1's mid width (32 vs 16); both have out width 64 there."""
  mid = int(reader.take("stage1.rebnconv1.conv_s1.weight").shape[0])
  for variant, widths in WIDTHS.items():
    if widths[0][0] == mid:
      return variant
  raise ConversionError(
      f"{reader.family}: key '{reader.prefix}stage1.rebnconv1.conv_s1.weight' has {mid} output "
      f"channels; expected 32 (U2NET) or 16 (U2NETP)")


def read_u2net(reader: StateDictReader) -> tuple[dict, dict]:
  """Maps every U2-Net key under ``reader.prefix`` onto Flax variables; does not call finish().

  For a combined checkpoint (the ImageNet CGN holds the U2-Net under ``u2net.``) pass a reader
  built with that prefix over the whole state dict and fold ``reader.used`` into the caller's own.

  Returns:
    (variables, model_config) as a family function does.
  """
  variant = detect_variant(reader)
  widths = dict(zip(STAGES, WIDTHS[variant]))
  in_ch = int(reader.take("stage1.rebnconvin.conv_s1.weight").shape[1])
  out_ch = int(reader.take("outconv.weight").shape[0])
  cins = _stage_inputs(in_ch, {s: w[1] for s, w in widths.items()})
  params, stats = {}, {}
  for name, height in zip(STAGES, HEIGHTS):
    mid, out = widths[name]
    params[name], stats[name] = {}, {}
    for conv, cin, cout in _rsu_convs(height, cins[name], mid, out):
      key = f"{name}.{conv}"
      bn_params, bn_stats = reader.batch_norm(f"{key}.bn_s1", cout)
      # A checkpoint saved before torch 0.4.1 has no num_batches_tracked; the module expects one.
      bn_stats.setdefault("num_batches_tracked", np.zeros((), np.int32))
      params[name][conv] = {"conv_s1": reader.conv(f"{key}.conv_s1", cin, cout, 3), "bn_s1": bn_params}
      stats[name][conv] = {"bn_s1": bn_stats}
  for k, src in enumerate(SIDE_SOURCES, 1):
    params[f"side{k}"] = reader.conv(f"side{k}", widths[src][1], out_ch, 3)
  params["outconv"] = reader.conv("outconv", 6 * out_ch, out_ch, 1)
  return {"params": params, "batch_stats": stats}, {"variant": variant, "out_ch": out_ch}


def convert_u2net(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> tuple[dict, dict]:
  """Family function of ``u2net``: a U2NET or U2NETP state dict -> (variables, model_config).

  With ``prefix`` only the keys under it are considered, and every one of them must be mapped.
  """
  sub = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  reader = StateDictReader(sub, FAMILY, prefix=prefix)
  out = read_u2net(reader)
  reader.finish()
  return out
