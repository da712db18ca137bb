"""The authors' ImageNet CGN checkpoint (``cgn.pth``) -> Flax variables of the ImageNet CGN.

``cgn.state_dict()`` of ``imagenet/models/cgn.py::CGN`` is five models side by side: four BigGAN-deep
generators of one architecture (``biggan_GT.``, ``f_shape.``, ``f_text.``, ``f_bg.``) and a U2NET
(``u2net.``). Each prefix is handed to the family's own reader (``converters.biggan.read_biggan``,
``converters.u2net.read_u2net``), so the key maps live in one place; this file only splits the dict,
checks that nothing falls between the prefixes, and checks that the four BigGANs agree.

Result layout: ``{"params": {"biggan_GT": ..., "f_shape": ..., "f_text": ..., "f_bg": ...,
"u2net": ...}, "batch_stats": {same names}}`` and
``model_config = {"biggan": <BigGAN config>, "u2net": <U2-Net config>}``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from converters.biggan import read_biggan
from converters.common import ConversionError, StateDictReader
from converters.u2net import read_u2net

FAMILY = "imagenet_cgn"
BIGGANS = ("biggan_GT", "f_shape", "f_text", "f_bg")
U2NET = "u2net"
SUBMODULES = BIGGANS + (U2NET,)
# The authors' training script may save from a DataParallel wrapper, whose state_dict prefixes every
# key with 'module.'; their loaders strip it with str.replace. We only strip it as a leading prefix
# (a replace would also rewrite an inner '...module.' in a key name).
_DP_PREFIX = "module."


def strip_data_parallel(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a leading ``module.`` from every key; all keys must have it or none (else ConversionError)."""
  wrapped = [k for k in state_dict if k.startswith(_DP_PREFIX)]
  if not wrapped:
    return dict(state_dict)
  if len(wrapped) != len(state_dict):
    bare = next(k for k in state_dict if not k.startswith(_DP_PREFIX))
    raise ConversionError(
        f"{FAMILY}: key '{bare}' lacks the DataParallel prefix '{_DP_PREFIX}' that '{wrapped[0]}' "
        f"has; a checkpoint uses it on all keys or none")
  return {k[len(_DP_PREFIX):]: v for k, v in state_dict.items()}


def _split(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Keys grouped by submodule (full keys kept); a key under no known submodule is an error."""
  parts: dict[str, dict[str, np.ndarray]] = {name: {} for name in SUBMODULES}
  for key, value in state_dict.items():
    head, dot, _ = key.partition(".")
    if not dot or head not in parts:
      raise ConversionError(
          f"{FAMILY}: unknown key '{key}' (expected every key under one of "
          f"{', '.join(n + '.' for n in SUBMODULES)}; is this an ImageNet CGN checkpoint?)")
    parts[head][key] = value
  for name, part in parts.items():
    if not part:
      raise ConversionError(f"{FAMILY}: no keys under '{name}.' (is this an ImageNet CGN checkpoint?)")
  return parts


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
  """The first config field where ``b`` differs from the reference ``a``, as 'field b vs a'."""
  for field in sorted(set(a) | set(b)):
    if a.get(field) != b.get(field):
      return f"{field} {b.get(field)} vs {a.get(field)}"
  return "identical"


def _read(part: Mapping[str, np.ndarray], prefix: str, read_fn) -> tuple[dict, dict]:
  # One reader per submodule: its finish() rejects keys under the prefix that the family's map does
  # not know, with the full (prefixed) key in the message.
  reader = StateDictReader(part, FAMILY, prefix=prefix)
  out = read_fn(reader)
  reader.finish()
  return out


def convert_imagenet_cgn(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """Family function of ``imagenet_cgn``: ``cgn.state_dict()`` -> (variables, model_config).

  Args:
    state_dict: the CGN's keys as numpy arrays, all with or all without a leading ``module.``.

  Returns:
    ``variables`` with one ``params``/``batch_stats`` subtree per submodule, and
    ``model_config = {"biggan": ..., "u2net": ...}`` read off the tensor shapes.

  Raises:
    ConversionError: a key outside the five submodules, a missing or mis-shaped key, mixed
      ``module.`` prefixes, or BigGANs of different architectures; the message names the key or module.
  """
  parts = _split(strip_data_parallel(state_dict))
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  biggan_config = None
  for name in BIGGANS:
    variables, config = _read(parts[name], name + ".", read_biggan)
    # The Flax CGN builds all four generators from one config, so a checkpoint whose BigGANs
    # differ cannot be represented; say which one differs from biggan_GT rather than fail later.
    if biggan_config is None:
      biggan_config = config
    elif config != biggan_config:
      raise ConversionError(
          f"{FAMILY}: BigGAN '{name}' differs from '{BIGGANS[0]}' "
          f"({_first_difference(biggan_config, config)})")
    params[name], stats[name] = variables["params"], variables["batch_stats"]
  variables, u2net_config = _read(parts[U2NET], U2NET + ".", read_u2net)
  params[U2NET], stats[U2NET] = variables["params"], variables["batch_stats"]
  return {"params": params, "batch_stats": stats}, {"biggan": biggan_config, "u2net": u2net_config}
