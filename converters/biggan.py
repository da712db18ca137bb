"""BigGAN-deep state dict -> Flax variables of ``cgn_jax.models.biggan.BigGAN``.

Reads the authors' BigGAN state dicts and the published ``biggan-deep-{128,256,512}``
``pytorch_model.bin`` files (the same key names: pytorch-pretrained-BigGAN's). The architecture is
read off the tensor shapes; the only things the weights cannot tell are the up-sampling flags, which
alternate (no, yes, no, yes, ...) in every published BigGAN-deep config, and ``eps`` (1e-4 in all).

Key map (torch -> Flax), with ``L`` = ``generator.layers.N`` -> ``generator/layers_N``:
  spectral-norm layers ``X.weight_orig/.bias`` -> ``params/X/kernel,bias`` (kernels transposed to
  (in, out) / HWIO); ``X.weight_u/weight_v`` -> ``batch_stats/X/u,v`` (torch shapes);
  ``*.running_means/running_vars`` -> ``batch_stats/*/running_means,running_vars``;
  ``generator.bn.weight/bias`` -> ``params/generator/bn/scale,bias``; ``embeddings.weight`` (plain
  Linear, no spectral norm) -> ``params/embeddings/kernel`` (num_classes, z_dim); SelfAttn ``gamma``.

``read_biggan(reader)`` works on any ``StateDictReader`` (its ``prefix`` selects the sub-model), so the
ImageNet CGN converter can read its four BigGANs (``f_shape.``, ``f_text.``, ``f_bg.``,
``biggan_GT.``) from one reader and call ``finish()`` once.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from converters.common import ConversionError, StateDictReader, conv_kernel, linear_kernel

FAMILY = "biggan"


def _sn(r: StateDictReader, key: str, shape: tuple[int, ...], bias: bool) -> tuple[dict, dict]:
  """One spectral-norm Linear ((out, in)) or Conv2d ((out, in, kh, kw)) -> (params, batch_stats)."""
  w = r.take(f"{key}.weight_orig", shape)
  params = {"kernel": linear_kernel(w) if len(shape) == 2 else conv_kernel(w)}
  if bias:
    params["bias"] = r.take(f"{key}.bias", (shape[0],))
  stats = {"u": r.take(f"{key}.weight_u", (shape[0],)),
           "v": r.take(f"{key}.weight_v", (int(np.prod(shape[1:])),))}
  return params, stats


def _stats(r: StateDictReader, key: str, n_stats: int, c: int) -> dict:
  return {"running_means": r.take(f"{key}.running_means", (n_stats, c)),
          "running_vars": r.take(f"{key}.running_vars", (n_stats, c))}


def _shape(r: StateDictReader, key: str) -> tuple[int, ...]:
  full = r.prefix + key
  if full not in r.sd:
    raise ConversionError(f"{r.family}: missing key '{full}' (is this a BigGAN checkpoint?)")
  return tuple(int(d) for d in r.sd[full].shape)


def read_biggan(r: StateDictReader) -> tuple[dict, dict[str, Any]]:
  """Takes every BigGAN key under ``r.prefix`` from ``r``; returns (variables, model_config).

  Does not call ``r.finish()``: the caller decides when all sub-models have been read.
  """
  z_dim, num_classes = _shape(r, "embeddings.weight")
  ch = _shape(r, "generator.conv_to_rgb.weight_orig")[0]
  n_stats = _shape(r, "generator.bn.running_means")[0]
  cond = 2 * z_dim
  params: dict[str, Any] = {"embeddings": {"kernel": linear_kernel(
      r.take("embeddings.weight", (z_dim, num_classes)))}}
  gen_p: dict[str, Any] = {}
  gen_s: dict[str, Any] = {}
  gen_p["gen_z"], gen_s["gen_z"] = _sn(r, "generator.gen_z", (4 * 4 * 16 * ch, cond), True)

  pat = re.compile(re.escape(r.prefix) + r"generator\.layers\.(\d+)\.")
  indices = sorted({int(m.group(1)) for k in r.sd if (m := pat.match(k))})
  if indices != list(range(len(indices))):
    raise ConversionError(f"{r.family}: layer indices under '{r.prefix}generator.layers.' are not "
                          f"0..{len(indices) - 1}: {indices}")
  layers, attn_pos, n_up = [], None, 0
  channels = 16 * ch
  for n in indices:
    key = f"generator.layers.{n}"
    if r.has(f"{key}.gamma"):
      if attn_pos is not None:
        raise ConversionError(f"{r.family}: second attention layer at '{r.prefix}{key}'")
      attn_pos = len(layers)
      p, s = {"gamma": r.take(f"{key}.gamma", (1,))}, {}
      for name, cin, cout in (("theta", channels, channels // 8), ("phi", channels, channels // 8),
                              ("g", channels, channels // 2), ("o_conv", channels // 2, channels)):
        p[f"snconv1x1_{name}"], s[f"snconv1x1_{name}"] = _sn(
            r, f"{key}.snconv1x1_{name}", (cout, cin, 1, 1), False)
    else:
      cin = _shape(r, f"{key}.bn_0.running_means")[1]
      cout = _shape(r, f"{key}.conv_3.weight_orig")[0]
      if cin != channels or cin % ch or cout % ch:
        raise ConversionError(f"{r.family}: key '{r.prefix}{key}.bn_0.running_means' has {cin} "
                              f"channels, expected {channels} (multiple of channel_width {ch})")
      mid = cin // 4
      up = len(layers) % 2 == 1  # every published BigGAN-deep config alternates no/yes
      n_up += up
      p, s = {}, {}
      for i, c in enumerate((cin, mid, mid, mid)):
        bn = f"{key}.bn_{i}"
        p[f"bn_{i}"], s[f"bn_{i}"] = {}, _stats(r, bn, n_stats, c)
        for lin in ("scale", "offset"):
          p[f"bn_{i}"][lin], s[f"bn_{i}"][lin] = _sn(r, f"{bn}.{lin}", (c, cond), False)
      for i, (co, ci, k) in enumerate(((mid, cin, 1), (mid, mid, 3), (mid, mid, 3), (cout, mid, 1))):
        p[f"conv_{i}"], s[f"conv_{i}"] = _sn(r, f"{key}.conv_{i}", (co, ci, k, k), True)
      layers.append((up, cin // ch, cout // ch))
      channels = cout
    gen_p[f"layers_{n}"], gen_s[f"layers_{n}"] = p, s
  if channels != ch:
    raise ConversionError(f"{r.family}: last GenBlock gives {channels} channels but "
                          f"'{r.prefix}generator.conv_to_rgb.weight_orig' expects {ch}")
  gen_p["bn"] = {"scale": r.take("generator.bn.weight", (ch,)),
                 "bias": r.take("generator.bn.bias", (ch,))}
  gen_s["bn"] = _stats(r, "generator.bn", n_stats, ch)
  gen_p["conv_to_rgb"], gen_s["conv_to_rgb"] = _sn(r, "generator.conv_to_rgb", (ch, ch, 3, 3), True)
  params["generator"] = gen_p
  config = {"output_dim": 4 * 2**n_up, "z_dim": z_dim, "class_embed_dim": z_dim,
            "channel_width": ch, "num_classes": num_classes, "layers": [list(l) for l in layers],
            "attention_layer_position": len(layers) if attn_pos is None else attn_pos,
            "eps": 1e-4, "n_stats": n_stats}
  return {"params": params, "batch_stats": {"generator": gen_s}}, config


def convert_biggan_prefixed(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> tuple[dict, dict]:
  """Converts the BigGAN under ``prefix`` (e.g. ``'f_shape.'``); keys outside it are ignored, unknown
  keys inside it raise ConversionError naming the key."""
  sub = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  r = StateDictReader(sub, FAMILY, prefix=prefix)
  out = read_biggan(r)
  r.finish()
  return out


def convert_biggan(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """Registry entry: a whole BigGAN state dict (authors' or published) -> (variables, config)."""
  return convert_biggan_prefixed(state_dict, "")
